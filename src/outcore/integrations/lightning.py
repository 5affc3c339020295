"""Lightning (`lightning.pytorch.Trainer`) under an outcore budget: one `ooc.iteration()`
per optimizer step.

    from outcore.integrations.lightning import OutcoreCallback

    ooc = outcore.OutOfCore(budget="2GiB")
    trainer = lightning.Trainer(accelerator="cpu", accumulate_grad_batches=4,
                                callbacks=[OutcoreCallback(ooc)])
    trainer.fit(model, loader)
    print(ooc.report()); ooc.close()

NOTE [Which Lightning events]
Chosen from the source of the Lightning this was written against (2.6.6), not from the
hook docs. Paths are under `lightning/pytorch/`. Per micro-batch,
`_TrainingEpochLoop.advance` (loops/training_epoch_loop.py) runs:

    311      batch, _, __ = next(data_fetcher)                       fetch (+ batch_to_device)
    334      _call_callback_hooks(trainer, "on_train_batch_start", batch, batch_idx)
    335      _call_lightning_module_hook(trainer, "on_train_batch_start", ...)
    352      batch_output = self.automatic_optimization.run(trainer.optimizers[0], batch_idx, kwargs)
    360      self.update_lr_schedulers("step", update_plateau_schedulers=False)
    375      _call_callback_hooks(trainer, "on_train_batch_end", batch_output, batch, batch_idx)
    376      _call_lightning_module_hook(trainer, "on_train_batch_end", ...)

then `on_advance_end` (validation at line 406, after `on_validation_model_zero_grad` at
404 when the batch stepped). `_AutomaticOptimization.run` (loops/optimization/automatic.py)
decides with `fit_loop._should_accumulate()` (line 176: `ready % accumulate_grad_batches`,
training_epoch_loop.py 440, or the epoch's last batch):

    185      closure()                                   accumulating: no optimizer step
    192      self._optimizer_step(batch_idx, closure)    the micro-batch that steps

and `Closure.closure` (lines 131-140) runs `training_step` (the forward), then
`zero_grad_fn`, then backward. `zero_grad_fn` exists only when
`batch_idx % accumulate_grad_batches == 0` (line 220): **the zero_grad of a step runs in
its first micro-batch, after that micro-batch's forward and before its backward**
(`on_before_zero_grad` at 291, `optimizer.zero_grad()` in core/module.py 1391), not after
`optimizer.step()`. The stepping micro-batch goes through the `optimizer_step` hook
(automatic.py 272; core/module.py 1368 `optimizer.step(closure=optimizer_closure)`), and
the precision plugin (plugins/precision/precision.py) runs the closure inside
`optimizer.step` (line 123 `return optimizer.step(closure=closure, **kwargs)`, 109
`closure_result = closure()`), then `on_before_optimizer_step` (87) and gradient
clipping (89), then the optimizer's update.

So one optimizer step, zero_grad included, lies entirely between `on_train_batch_start`
of its first micro-batch and `on_train_batch_end` of the micro-batch that stepped: the
iteration is entered at the first (when none is open) and left at the second (when
`trainer.global_step`, Lightning's count of completed optimizer steps, has moved since
it was entered). Every iteration then runs the same ops: forward 1, zero_grad, backward
1, micro-batches 2..k's forwards and backwards, clipping, the update and the LR
scheduler's step. The loading of micro-batches 2..k (line 311) comes inside the
iteration too, but is set aside (`OutOfCore._aside`): `_DataFetcher.__next__`
(loops/fetchers.py 57-70) calls the epoch loop's `_on_before_fetch` before it and its
`_on_after_fetch` in a `finally` after it (assigned at each epoch's start,
training_epoch_loop.py 250-251), and the callback wraps the two on the loop object for
the fit. Inside the step the loader's ops (a TensorDataset's `select` of each row of the
whole dataset tensor, the collate's `stack`) made the dataset an array of the step:
read back from the swap file in every step for one micro-batch's rows, or
InfeasibleBudget naming the dataset's size (helper-53); set aside, the micro-batch is
new to the step like the first one. Because zero_grad comes in
the next step, the gradients of a step stay alive between iterations (Lightning keeps
them there; outcore maps them like other state) and are dropped at the next step's
zero_grad. The stepping micro-batch's forward runs inside `optimizer.step(closure)`,
which outcore's recorder counts as the optimizer's, so the loss copy Lightning keeps past
the step (`ClosureResult`, automatic.py 59: `self.loss = self.closure_loss.detach().clone()`)
looks like lazily created optimizer state; outcore ignores new state under 64 KiB when it
decides whether to record again, so with AdamW two iterations record (its moments are
made in the first) and later ones replay (docs/integrations.md, "Lightning"; helper-178 saw 1
and 2 record, 3 on replay).
`on_before_zero_grad` / `on_before_optimizer_step` come before the update, so neither
can end a step. The first micro-batch's fetch, `on_advance_end` (validation at the
batch that stepped, loggers' saving) and checkpointing (ModelCheckpoint runs last among
the callbacks, after this one) run between iterations, on plain PyTorch objects (README,
"Between iterations").

A step can be left without a step-end: `trainer.should_stop` set in the middle of an
accumulation ends the epoch loop (its `done`), and a LightningModule's
`on_train_batch_start` returning -1 ends the epoch after the hook (line 335). The
iteration still open is ended, as a block that ran to its end, at `on_train_epoch_end`
and at the latest at `on_train_end`; Lightning keeps the accumulated gradients, and so
does outcore.

NOTE [Exceptions]
`_call_and_handle_interrupt` (trainer/call.py), around every `trainer.fit`, calls
`_interrupt` for every exception: `except KeyboardInterrupt` (57) and `except
BaseException` (68) both call `_interrupt(trainer, exception)` (61, 69), which calls
`_call_callback_hooks(trainer, "on_exception", exception)` (78). So `on_exception` ends
the interrupted iteration with that exception, the way `with ooc.iteration():` does, and
no guard around `trainer.fit` is needed: every tensor keeps the value it had when the
exception landed, `ooc.close()` and later iterations work. Lightning then re-raises
other exceptions, but turns a KeyboardInterrupt into `sys.exit(1)` after setting SIGINT
to SIG_IGN (line 60) and tearing down (62; trainer/connectors/signal_connector.py 125-129
puts back the handlers of before `fit`). The iteration ends between the two, and outcore
leaves Lightning's SIG_IGN alone (NOTE [Interrupts] in run/interrupts.py, rule 5). An
iteration still open at the next `on_fit_start` (an earlier callback's `on_exception`
raised, so this one's never ran) is ended there, as interrupted, with a warning;
`callback.end(exc)` ends it at once.
"""
from __future__ import annotations

import contextlib
import warnings

try:
    from lightning.pytorch import Callback
except ImportError as exc:       # pragma: no cover - lightning is a test dependency
    raise ImportError("outcore.integrations.lightning needs `lightning` (Lightning 2.x): "
                      "pip install lightning") from exc

from ..errors import OutcoreError
from ._step import StepIterations, make_movable

__all__ = ["OutcoreCallback"]


class OutcoreCallback(StepIterations, Callback):
    """Runs each optimizer step of a `lightning.pytorch.Trainer` as one `ooc.iteration()`.

    Enters the iteration at `on_train_batch_start` of a step's first micro-batch and
    leaves it at `on_train_batch_end` of the micro-batch that stepped, so every
    micro-batch of a gradient accumulation (`Trainer(accumulate_grad_batches=k)`) and the
    step's zero_grad, which Lightning runs in the first micro-batch, are one outcore
    iteration (NOTE [Which Lightning events]). An iteration still open at
    `on_train_epoch_end` or `on_train_end` (the loop stopped in the middle of an
    accumulation) is ended there; an exception ends it at `on_exception` (NOTE
    [Exceptions]).

    ooc: an open `outcore.OutOfCore` without `state_dir` (resume from Lightning's
        checkpoints). At `on_fit_start` the fit must use automatic optimization, train on
        the CPU in one process (outcore's limits; README, "Limits today"); otherwise
        `OutcoreError`. A `torch.compile`d module runs eagerly, bitwise the uncompiled
        one's (docs/integrations.md).
    """

    framework = "Lightning"
    resume_advice = ("Resume a Lightning run from Lightning's own checkpoints (ModelCheckpoint, "
                     "trainer.fit(..., ckpt_path=...))")

    def __init__(self, ooc):
        StepIterations.__init__(self, ooc)
        self._opened_at = None      # trainer.global_step when it was entered
        self._warned_validation = False
        self._fetch_hooks = None    # (epoch loop, our two wrappers) while a fit runs
        self._asides: list = []     # ExitStacks of fetches set aside, until they end
        self._loaded = False        # a fit began: it may have loaded a checkpoint (ckpt_path)

    # -- Lightning events --------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module):
        self._end_abandoned("a step of an earlier fit was left open (its on_exception never "
                            "reached OutcoreCallback)")
        if not getattr(pl_module, "automatic_optimization", True):
            raise OutcoreError(
                "OutcoreCallback supports automatic optimization only: with "
                "automatic_optimization=False, training_step decides when optimizer.step() and "
                "zero_grad() run, so the callback cannot tell where an optimizer step begins and "
                "ends. Wrap your own step in `with ooc.iteration():` instead (one block per "
                "optimizer step, inside training_step), without this callback")
        self._require_device_one_process(
            getattr(getattr(trainer, "strategy", None), "root_device", None),
            getattr(trainer, "world_size", 1), "Trainer(accelerator='cpu')")
        self._set_fetching_aside(trainer)
        self._loaded = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.in_step:
            return                  # a later micro-batch of the step already open
        self._finish(None)
        if self._loaded:            # `fit(ckpt_path=...)` restores the optimizer after
            self._loaded = False    # on_fit_start, with torch.load: unresizable state
            for optimizer in getattr(trainer, "optimizers", ()):
                make_movable(optimizer, self.ooc)
            make_movable(pl_module, self.ooc, refuse=False)    # NOTE [Loaded by mapping]
        self._opened_at = trainer.global_step
        self._begin_step()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.in_step and trainer.global_step != self._opened_at:
            self.steps += 1
            self._finish(None)

    def on_validation_start(self, trainer, pl_module):
        if self.in_step and not self._warned_validation:
            self._warned_validation = True
            warnings.warn(
                "OutcoreCallback: validation runs in the middle of a gradient accumulation, inside "
                "the step's outcore iteration; steps with and without it differ, so outcore records "
                "again after each (correct, slower). Make val_check_interval a multiple of "
                "accumulate_grad_batches", RuntimeWarning, stacklevel=2)

    def on_train_epoch_end(self, trainer, pl_module):
        self._close_asides()
        self._finish(None)

    def on_train_end(self, trainer, pl_module):
        self._end_fit(None)

    def on_exception(self, trainer, pl_module, exception):
        self._end_fit(exception)

    def _end_fit(self, exc) -> None:
        """End the open iteration (with `exc`, or as a block that ran to its end) and put
        Lightning's fetch hooks back."""
        try:
            self._close_asides()
            self._finish(exc)
        finally:
            self._unhook_fetching()

    def teardown(self, trainer, pl_module, stage):
        # A fit that ran no step (max_steps already reached) ends without on_train_end.
        self._close_asides()
        self._unhook_fetching()

    # -- the loading of micro-batches 2..k (NOTE [Which Lightning events]) ----------------
    def _set_fetching_aside(self, trainer) -> None:
        """Wrap the epoch loop's `_on_before_fetch`/`_on_after_fetch` (instance
        attributes, for this fit) so that a fetch inside an open iteration runs set aside.
        A Lightning without them fetches inside the step, as before."""
        self._unhook_fetching()
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        before = getattr(loop, "_on_before_fetch", None)
        after = getattr(loop, "_on_after_fetch", None)
        if not (callable(before) and callable(after)):
            return

        def on_before_fetch():
            before()
            if self.in_step:
                # Listed before it is entered: an exception (a Ctrl-C) between the two
                # still finds it (`_close_asides`, also where Lightning's `_start_profiler`
                # call, outside its `try`, never reaches `on_after_fetch`).
                aside = contextlib.ExitStack()
                self._asides.append(aside)
                aside.enter_context(self.ooc._aside())

        def on_after_fetch():
            try:
                self._close_asides()
            finally:
                after()
        loop._on_before_fetch, loop._on_after_fetch = on_before_fetch, on_after_fetch
        self._fetch_hooks = (loop, on_before_fetch, on_after_fetch)

    def _close_asides(self) -> None:
        """Put the dispatch modes back where a fetch set them aside (before the iteration
        ends: its own mode must be on the stack then)."""
        while self._asides:
            self._asides.pop().close()

    def _unhook_fetching(self) -> None:
        """Put the epoch loop's own methods back (where ours are still there)."""
        hooks, self._fetch_hooks = self._fetch_hooks, None
        if hooks is None:
            return
        loop, before, after = hooks
        for name, ours in (("_on_before_fetch", before), ("_on_after_fetch", after)):
            if loop.__dict__.get(name) is ours:
                del loop.__dict__[name]
