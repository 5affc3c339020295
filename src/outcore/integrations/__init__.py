"""Integrations of `outcore.OutOfCore` with training frameworks.

- `outcore.integrations.transformers`: `OutcoreCallback`, a Hugging Face
  `transformers.TrainerCallback` that runs each optimizer step of a `Trainer` as one
  `ooc.iteration()`, and `train(trainer, ooc)`. Needs `transformers`
  and `accelerate` (`pip install 'transformers[torch]'`); importing this package
  does not import them.
- `outcore.integrations.lightning`: `OutcoreCallback`, a `lightning.pytorch.Callback`
  that runs each optimizer step of a Lightning `Trainer` as one `ooc.iteration()`.
  Needs `lightning`.

docs/integrations.md says which framework events they use and why.
"""
