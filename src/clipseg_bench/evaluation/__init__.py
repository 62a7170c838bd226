"""Evaluation: metrics (pure functions), ``evaluate`` (a run -> metrics.json), ``score`` (a folder of
predicted NIfTI masks -> the same 3D metrics), ``segment`` (a tuned run + a CT -> a NIfTI mask)."""
