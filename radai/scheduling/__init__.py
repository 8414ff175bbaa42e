"""Batching scheduler: `policy` (pure state machine), `loop` (worker thread per model), `inferer` (MONAI
sliding window over any predictor). Import from the submodules; this package imports nothing heavy."""
