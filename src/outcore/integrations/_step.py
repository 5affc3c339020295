"""What the framework callbacks share: one `ooc.iteration()` per optimizer step, opened
at one framework event and ended at another, or with the exception that stopped it.

Contract of `_finish` (NOTE [Exceptions] in transformers.py, on_exception in
lightning.py): the open iteration ends as a block that ran to its end (`exc` None:
outcore's own errors are raised) or interrupted by `exc` (they are added to it as
notes). `_open` is let go only once the iteration has ended (`entered` turns False
inside its held exit: `open`), so a Ctrl-C landing in `_finish` leaves it for the next ender.
"""
from __future__ import annotations

import logging
import warnings
import weakref

import torch

from ..errors import OutcoreError
from ..run.mapped import loaded_by_mapping, private_file_spans
from ..run.ooc import OutOfCore
from ..units import format_bytes

log = logging.getLogger("outcore")


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

    def __reduce_ex__(self, protocol):
        # helper-206: Trainer(strategy="ddp_spawn") pickles its callbacks into the spawned
        # processes, and failed with "cannot pickle '_thread.RLock' object".
        raise OutcoreError(
            "OutcoreCallback cannot go to another process (a spawning launcher such as "
            "strategy='ddp_spawn' pickles the callbacks): its OutOfCore holds this process's "
            "swap file, threads and memory. Train in this process (no spawning strategy), or, "
            "under torchrun, wrap each optimizer step of your own loop in `with "
            "ooc.iteration():` with one OutOfCore per rank (docs/distributed.md)")

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


def make_movable(target, ooc, refuse: bool = True) -> int:
    """Let `ooc` move tensors whose storages PyTorch cannot resize; returns how many.

    A module (`target`: a model loaded by mapping its file, transformers'
    `from_pretrained` or `torch.load(mmap=True)` with `load_state_dict(...,
    assign=True)`): its parameters and buffers whose bytes lie in private mappings of
    files each get memory of their own when the step first uses them, one at a time
    (NOTE [Loaded by mapping] in run/mapped.py), as `.clone()` would give it: views of
    the loaded file taken elsewhere (a numpy array, another `get_tensor` of the same
    name) keep the bytes as loaded. Call it between iterations, before the first that
    uses them; two storages of the module over the same bytes are refused
    (OutcoreError), nothing named. Weights an iteration of `ooc` has used as loaded
    already stay in memory for its life: refused (OutcoreError) with `refuse`, else
    (the callbacks, at each `train()` / `fit()`) a warning, the rest named.

    An optimizer: its state tensors that no storage of theirs can move (loaded
    with `torch.load`: unresizable) get memory of their own, the same values, now.
    `trainer.train(resume_from_checkpoint=...)` loads the optimizer's state with
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
    if target is None:
        return 0
    if isinstance(target, torch.nn.Module):
        return _loaded_by_mapping(target, ooc, refuse)
    inner = getattr(target, "optimizer", target)      # accelerate's wrapper
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


def _loaded_by_mapping(module, ooc, refuse: bool = True) -> int:
    """make_movable for a module: name to `ooc` the storages of its parameters and
    buffers loaded by mapping a file, not tracked yet and worth a transfer (NOTE [Loaded
    by mapping] rule 2). Where `ooc` tracks some as loaded already, raise OutcoreError
    (`refuse`: a user's call), or log a warning and name the rest (the callbacks', at
    each train() or fit(): the run goes on as before, those weights in memory)."""
    require_open(ooc)
    if ooc._active:
        raise OutcoreError(f"make_movable(model, ooc) inside `with ooc.{ooc._active}():`; "
                           "call it between iterations, before the first that uses the model")
    res = ooc._res
    spans = private_file_spans()         # read once for all of them
    found: dict[int, tuple[str, object]] = {}
    seen: dict[int, tuple[str, int]] = {}     # loaded by mapping, already tracked as such
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        storage = t.untyped_storage()
        if (storage._cdata in found or storage.nbytes() < res.min_move_bytes
                or not loaded_by_mapping(storage, spans)):
            continue
        entry = res.entry_of(storage)
        if entry is not None:         # moved by outcore (its state mapped between
            if entry.pinned:          # iterations is unresizable too: left alone), or
                seen[storage._cdata] = (name, storage.nbytes())      # pinned as loaded
            continue
        found[storage._cdata] = (name, storage)
    if seen:
        # helper-164: after an iteration that ran the model (one that raised
        # InfeasibleBudget, whose advice names make_movable), the storages it tracked
        # stay pinned as loaded: make_movable took the rest, and every later iteration
        # raised again.
        names = sorted(name for name, _ in seen.values())
        said = (f"make_movable(model, ooc): {len(seen)} of the model's weights loaded by "
                f"mapping ({format_bytes(sum(n for _, n in seen.values()))}: "
                f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) were used by an "
                "iteration of this OutOfCore already, as loaded: they stay in memory for its "
                "life. Close it, make a new OutOfCore, and call make_movable(model, new_ooc) "
                "before its first iteration")
        if refuse:
            raise OutcoreError(said + ". Nothing was changed")
        log.warning("%s; the others move", said)
    ranges = sorted((s.data_ptr(), s.data_ptr() + s.nbytes(), name) for name, s in found.values())
    for (_, end, first), (start, _, second) in zip(ranges, ranges[1:]):
        if start < end:
            raise OutcoreError(
                f"make_movable: {first} and {second} lie over the same bytes of a mapped "
                "file in two storages; each would get a copy of its own and they would no "
                "longer share them. Load the model so that tensors that share memory share "
                "a storage (from_pretrained, torch.load(mmap=True) do), or .clone() one of "
                "them first. Nothing was changed")
    for key, (_, storage) in found.items():
        res.adoptable[key] = weakref.ref(storage)
    return len(found)
