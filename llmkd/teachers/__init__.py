"""Teacher sources: where teacher outputs come from (a live frozen model, a logit cache, ...)."""
