"""imagen_jax.train: training one cascade stage (see docs/train.md).

- optim.py: optimizers (Adam, Adafactor), warm-up + cosine schedule, EMA.
- state.py: TrainState (params, opt_state, ema_params, step, rng) split off an NNX model.
- step.py: the pure train step (state, batch, rng) -> (state, metrics); validation loss.
- loop.py: `train`, the gin-configured loop behind `imagen-train`.
- checkpoint.py: orbax checkpoints, model.json/model.gin, `load_for_inference`.
- metrics.py: FLOP counts, MFU, metric writers.
- export.py: EMA parameters to safetensors.
"""
