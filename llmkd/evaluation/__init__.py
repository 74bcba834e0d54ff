"""Evaluation: task metrics in the dataset's label space (`metrics`), checkpoints scored and timed
(`checkpoints`), the teacher-vs-student report (`report`)."""
