"""Integrations of `outcore.OutOfCore` with training frameworks.

- `outcore.integrations.transformers`: `OutcoreCallback`, a Hugging Face
  `transformers.TrainerCallback` that runs each optimizer step of a `Trainer` as one
  `ooc.iteration()`, and `train(trainer, ooc)`. Needs `transformers`
  and `accelerate` (`pip install 'transformers[torch]'`); importing this package
  does not import them.
"""
