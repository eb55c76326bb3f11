"""``tunelab eval`` and ``tunelab diagnose``: task metrics on train vs held-out, the paraphrase
(memorization) gap, forgetting against the base model, and a run's diagnosis with its curves."""
