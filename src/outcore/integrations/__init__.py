"""Integrations of `outcore.OutOfCore` with training frameworks.

- `outcore.integrations.transformers`: `OutcoreCallback`, a Hugging Face
  `transformers.TrainerCallback` that runs each optimizer step of a `Trainer` as one
  `ooc.iteration()`, and `train(trainer, ooc)`. Needs `transformers`
  and `accelerate` (`pip install 'transformers[torch]'`); importing this package
  does not import them.
- `outcore.integrations.lightning`: `OutcoreCallback`, a `lightning.pytorch.Callback`
  that runs each optimizer step of a Lightning `Trainer` as one `ooc.iteration()`.
  Needs `lightning`.

- `make_movable(optimizer, ooc)`: gives optimizer state loaded with `torch.load` (so
  unresizable, pinned in RAM for good) memory of its own, the same values. The callbacks
  call it at a run's first step; call it yourself after `accelerator.load_state(...)` or
  `optimizer.load_state_dict(torch.load(...))` in a loop of your own.
  `make_movable(model, ooc)`: the same for a model loaded by mapping its file
  (`from_pretrained`, `torch.load(mmap=True)` with `assign=True`), each weight when the
  step first uses it (NOTE [Loaded by mapping] in run/mapped.py).

docs/integrations.md says which framework events they use and why.
"""
from ._step import make_movable  # noqa: F401  (needs neither transformers nor lightning)

__all__ = ["make_movable"]
