"""Hugging Face `transformers.Trainer` under an outcore budget: one `ooc.iteration()` per
optimizer step.

    from outcore.integrations.transformers import OutcoreCallback

    ooc = outcore.OutOfCore(budget="2GiB")
    callback = OutcoreCallback(ooc)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    with callback:                 # ends a step an exception leaves open (see below)
        trainer.train()
    print(ooc.report()); ooc.close()

or, in one call, `train(trainer, ooc)` (adds the callback for the call, guards it, and
returns what `trainer.train()` returns).

NOTE [Which Trainer events]
Chosen from `Trainer._run_epoch` of the transformers this was written against (5.24),
not from the callback docs. Per optimizer step the loop prefetches the step's
micro-batches (`get_batch_samples`), then for each micro-batch `step += 1` and:

    if step % gradient_accumulation_steps == 0:   on_step_begin      (first micro-batch)
    training_step(...)                             forward + backward
    if do_sync_step:                               (last micro-batch of the step)
        clip gradients; on_pre_optimizer_step; optimizer.step(); on_optimizer_step
        lr_scheduler.step(); model.zero_grad(); global_step += 1; on_step_end
        _maybe_log_save_evaluate(...)              logging, evaluation, checkpoints
    else:                                          on_substep_end

So `on_step_begin` fires once per optimizer step, before the first micro-batch's forward,
and `on_step_end` once, after `optimizer.step()` and `model.zero_grad()`: the iteration
is entered at the first and left at the second, and holds every micro-batch of the
accumulation, the clipping, the optimizer step and the zero_grad (what outcore plans as
one step). `on_pre_optimizer_step` / `on_optimizer_step` come before zero_grad, and
`on_substep_end` fires between micro-batches, so none of them can end the step. Data
loading (prefetched before `on_step_begin`), logging, evaluation and checkpoint saving
(after `on_step_end`) run between iterations, on plain PyTorch objects (README,
"Between iterations").

The loop can leave a step without `on_step_end`: a callback that sets
`should_epoch_stop` / `should_training_stop` in `on_substep_end` breaks out in the
middle of an accumulation, and an iterable dataset can run out mid-accumulation. The
epoch then ends (`on_epoch_end`, then `_maybe_log_save_evaluate`), so an iteration still
open is ended, as a block that ran to its end, at `on_epoch_end`, and again at the
latest at `on_train_end`.

NOTE [Exceptions]
No callback event fires when an exception (KeyboardInterrupt included) escapes the
training loop, so the iteration it interrupts would stay open: its dispatch mode still
pushed, `ooc.close()` refused. `with callback:` around `trainer.train()` (or `train()`)
ends that iteration with the exception, the way `with ooc.iteration():` does, and lets
the exception go on: every tensor keeps the value it had when the exception landed, and
`ooc.close()` and the next iteration work. Without the guard, `on_train_begin` warns; a
step left open that way is ended by `callback.end(exc)`, or else (as interrupted, with a
warning) at the next `on_train_begin`.
"""
from __future__ import annotations

import warnings

try:
    # An absolute import: this module is outcore.integrations.transformers, and this
    # names the top-level `transformers` package, not this module.
    import transformers
    from transformers import TrainerCallback
except ImportError as exc:       # pragma: no cover - transformers is a test dependency
    raise ImportError("outcore.integrations.transformers needs `transformers` (and, for its "
                      "Trainer, `accelerate`): pip install 'transformers[torch]'") from exc

import torch

from ..errors import OutcoreError
from ..run.ooc import OutOfCore
from ._step import StepIterations, make_movable  # noqa: F401  (make_movable: outcore.integrations.transformers.make_movable)

__all__ = ["OutcoreCallback", "train"]


class OutcoreCallback(StepIterations, TrainerCallback):
    """Runs each optimizer step of a `transformers.Trainer` as one `ooc.iteration()`.

    Enters the iteration at `on_step_begin` (before the first micro-batch of the step)
    and leaves it at `on_step_end` (after `optimizer.step()` and `model.zero_grad()`), so
    all micro-batches of a gradient accumulation are one outcore iteration (NOTE [Which
    Trainer events]). An iteration still open at `on_epoch_end` or `on_train_end` (the
    loop stopped in the middle of an accumulation) is ended there.

    Use it as a context manager around `trainer.train()`: an exception escaping the
    training loop then ends the interrupted iteration with that exception (NOTE
    [Exceptions]).

    ooc: an open `outcore.OutOfCore` without `state_dir` (use the Trainer's checkpoints
        to resume). Other errors: the Trainer must train on the CPU, in one process
        (outcore's limits; README, "Limits today"). With `torch_compile=True` the steps run
        eagerly, bitwise the uncompiled model's (docs/integrations.md).
    """

    framework = "the Trainer"
    resume_advice = ("Resume a Trainer run from the Trainer's own checkpoints (save_steps, "
                     "trainer.train(resume_from_checkpoint=...))")

    def __init__(self, ooc):
        StepIterations.__init__(self, ooc)
        self._guards = 0            # `with callback:` blocks open
        self._loaded = False        # a run began: the Trainer may have loaded a checkpoint

    # -- the guard ---------------------------------------------------------------------
    def __enter__(self):
        self._guards += 1
        return self

    def __exit__(self, exc_type, exc, tb):
        self._guards -= 1
        self._finish(exc)
        return False

    # -- Trainer events ----------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        # A step left open by an exception that escaped an earlier train() without the guard
        # (or by Trainer's auto_find_batch_size retrying after one).
        self._end_abandoned("an exception escaped trainer.train() in the middle of a step, "
                            "outside `with callback:`")
        self._require_device_one_process(getattr(args, "device", None),
                                         getattr(args, "world_size", 1),
                                         "TrainingArguments(use_cpu=True)")
        if self._guards == 0:
            warnings.warn("OutcoreCallback: trainer.train() runs outside `with callback:`; an exception "
                          "escaping a step would leave its outcore iteration open (and ooc.close() "
                          "refused) until callback.end(). Use `with callback: trainer.train()` or "
                          "outcore.integrations.transformers.train(trainer, ooc)",
                          RuntimeWarning, stacklevel=2)
        self._loaded = True
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self._finish(None)          # none is open in Trainer 5.24's loop (NOTE [Which Trainer events])
        if self._loaded:
            self._loaded = False
            make_movable(kwargs.get("optimizer"), self.ooc)
            # from_pretrained's weights: NOTE [Loaded by mapping] in run/mapped.py
            make_movable(kwargs.get("model"), self.ooc, refuse=False)
        self._begin_step()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.in_step:
            self.steps += 1
        self._finish(None)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        self._finish(None)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._finish(None)
        return control


def train(trainer, ooc, **train_kwargs):
    """`trainer.train(**train_kwargs)` with each optimizer step as one `ooc.iteration()`.

    Uses the trainer's `OutcoreCallback` for `ooc` if it has one, else adds one for the
    call (and removes it afterwards); runs under its guard, so an exception escaping a
    step ends that iteration with the exception and goes on. Returns what `train()`
    returns."""
    if not isinstance(trainer, transformers.Trainer):
        raise OutcoreError(f"train() needs a transformers.Trainer, got {type(trainer).__name__}")
    if not isinstance(ooc, OutOfCore):
        raise OutcoreError(f"train() needs an outcore.OutOfCore, got {type(ooc).__name__}")
    ours = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, OutcoreCallback)]
    others = [cb for cb in ours if cb.ooc is not ooc]
    if others:
        raise OutcoreError(f"this Trainer already has {others[0]!r} for another OutOfCore; "
                           "one OutcoreCallback per Trainer")
    callback = ours[0] if ours else OutcoreCallback(ooc)
    if not ours:
        trainer.add_callback(callback)
    try:
        with callback:
            return trainer.train(**train_kwargs)
    finally:
        if not ours:
            trainer.remove_callback(callback)
