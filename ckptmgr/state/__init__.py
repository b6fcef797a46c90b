"""Training objects <-> plain state trees: wrappers, key rules, per-object state, staging copies.

Nothing here does I/O: :mod:`.modules` gives clean state dicts whatever
wrappers a model is in and loads them back with a report, :mod:`.keys` renames
keys, :mod:`.objects` collects and applies optimizers, schedulers, scaler,
RNG and user state, and :mod:`.staging` copies state into reusable buffers
for async saves.
"""
