"""What the framework callbacks share: one `ooc.iteration()` per optimizer step, opened
at one framework event and ended at another, or with the exception that stopped it.

Contract of `_finish` (NOTE [Exceptions] in transformers.py, on_exception in
lightning.py): the open iteration ends as a block that ran to its end (`exc` None:
outcore's own errors are raised) or interrupted by `exc` (they are added to it as
notes). `_open` is let go only once the iteration has ended (`entered` turns False
inside its held exit: `open`), so a Ctrl-C landing in `_finish` leaves it for the next ender.
"""
from __future__ import annotations

import warnings

import torch

from ..errors import OutcoreError
from ..run.ooc import OutOfCore


class StepIterations:
    """Mixed into each framework's callback class. `framework` names it in errors;
    `resume_advice` says how to resume with the framework's own checkpoints."""

    framework = "the framework"
    resume_advice = ""

    def __init__(self, ooc):
        if not isinstance(ooc, OutOfCore):
            raise OutcoreError(f"OutcoreCallback needs an outcore.OutOfCore, got {type(ooc).__name__}: "
                               "OutcoreCallback(outcore.OutOfCore(budget=...))")
        require_open(ooc)
        if ooc.state_dir is not None:
            raise OutcoreError(
                "OutcoreCallback does not support OutOfCore(..., state_dir=...): its iterations "
                f"would be committed apart from {self.framework}'s step count, data position and "
                f"schedulers. {self.resume_advice} and create the OutOfCore without state_dir")
        self.ooc = ooc
        self.steps = 0              # optimizer steps run as outcore iterations
        self._open = None           # the ooc.iteration() in progress, if any

    def end(self, exc: BaseException | None = None) -> None:
        """End the iteration left open (with `exc`, or as a block that ran to its end if
        `exc` is None). Does nothing when no iteration is open."""
        self._finish(exc)

    @property
    def in_step(self) -> bool:
        """Whether an outcore iteration begun by this callback is open."""
        return self._open is not None and self._open.open

    def _end_abandoned(self, how: str) -> None:
        """At the start of a run: end a step an earlier run left open (`how` it was left),
        with a RuntimeWarning, and forget an iteration that never started."""
        if self.in_step:
            abandoned = OutcoreError(f"{how}; that step was ended only now, at the start of the "
                                     "next run")
            self._finish(abandoned)
            notes = "".join(f" {n}" for n in getattr(abandoned, "__notes__", ()))
            warnings.warn(f"OutcoreCallback: {abandoned}.{notes}", RuntimeWarning, stacklevel=3)
        self._finish(None)
        require_open(self.ooc)

    def _require_device_one_process(self, device, world: int, on_cpu: str) -> None:
        """outcore's limits the framework's settings may break: the step runs on the device
        whose memory is the fast tier (RAM with offload="disk", a GPU with
        offload="host"), and the callbacks step one process (`on_cpu`: the framework's
        setting for the CPU)."""
        kind, want = getattr(device, "type", "cpu") if device is not None else None, self.ooc.fast_device
        if kind is not None and kind != want:
            if want == "cpu":
                raise OutcoreError(f"OutcoreCallback with offload='disk' trains on the CPU (the fast "
                                   f"tier is RAM); this Trainer trains on {device}. Pass {on_cpu}, "
                                   "or create the OutOfCore with offload='host' for a GPU")
            raise OutcoreError(f"OutcoreCallback with offload='{self.ooc.offload}' trains on the "
                               f"{want} device (its memory is the fast tier); this Trainer trains "
                               f"on {device}. Give the Trainer that device, or create the "
                               f"OutOfCore with offload='disk' and pass {on_cpu}")
        if world != 1:
            raise OutcoreError(f"OutcoreCallback runs in one process; this Trainer runs {world}. "
                               "outcore itself composes with torch.distributed (DDP, FSDP2: one "
                               "OutOfCore per rank, docs/distributed.md), but this callback does "
                               "not yet: under torchrun, wrap each optimizer step of your own loop "
                               "in `with ooc.iteration():` instead")

    def _begin_step(self) -> None:
        iteration = self.ooc.iteration()
        self._open = iteration
        iteration.__enter__()       # when it raises, it has ended itself: `entered` is False

    def _finish(self, exc) -> None:
        """End the open iteration (module docstring)."""
        iteration = self._open
        if iteration is None:
            return
        try:
            if iteration.open:
                if exc is None:
                    iteration.__exit__(None, None, None)
                else:
                    iteration.__exit__(type(exc), exc, exc.__traceback__)
        finally:
            if not iteration.open and self._open is iteration:
                self._open = None

    def __repr__(self) -> str:
        return f"OutcoreCallback({self.ooc!r}, steps={self.steps}{', in a step' if self.in_step else ''})"


def require_open(ooc) -> None:
    if ooc.closed:
        raise OutcoreError(f"{ooc!r} is closed; create a new OutOfCore (and OutcoreCallback) to train")


def make_movable(optimizer, ooc) -> int:
    """Give the optimizer's state tensors that no storage of theirs can move (loaded
    with `torch.load`: unresizable) memory of their own, the same values; returns how
    many. `trainer.train(resume_from_checkpoint=...)` loads the optimizer's state with
    torch.load itself, after `on_train_begin`: kept as loaded, that state stays in RAM
    for good (Residency NOTE 7), and at the budget the run trained with the resumed run
    was refused (InfeasibleBudget), with advice (".clone() those") a Trainer user could
    not follow; so did Lightning's `trainer.fit(..., ckpt_path=...)` (helper-71). Runs at
    the first step of each `train()` / `fit()` call, between iterations.
    Storages in shared memory are the user's choice and stay as they are; and storages
    `ooc` moves are left alone: between iterations its state on the slow tier is mapped
    from the swap file, unresizable too (NOTE [Mapped state]), and copying it would
    read the whole state into RAM at once (a reviewer's find: a second `train()` on one
    Trainer copied all of Adam's state)."""
    if optimizer is None:
        return 0
    inner = getattr(optimizer, "optimizer", optimizer)      # accelerate's wrapper
    done = 0
    for per_param in getattr(inner, "state", {}).values():
        if not isinstance(per_param, dict):
            continue
        for key, value in list(per_param.items()):
            if not isinstance(value, torch.Tensor) or value.device.type != "cpu":
                continue
            storage = value.untyped_storage()
            if storage.resizable() or storage.is_shared():
                continue
            entry = ooc._res.entry_of(storage)
            if entry is None or entry.pinned:
                per_param[key] = value.clone()
                done += 1
    return done
