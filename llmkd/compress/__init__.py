"""`llmkd compress`: from a teacher and a user's data to the best student under a speed budget.

Stages live in their own modules; `checks` (the data) and `teacher_checks` (the teacher) run first, before
anything is trained, so that bad data or an unusable teacher is reported with its numbers and its fix.
"""
