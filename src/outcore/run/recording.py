"""The recording iteration: record the trace while running memory-safe (on-demand)."""
from __future__ import annotations

import warnings

import torch

from ..aten import distinct_storages, written_tensors
from ..states import FAST
from ..trace.recorder import Recording
from .compose import DISTRIBUTED_NAMESPACES, around, ddp_buckets_unbuilt, under_torch_compile
from .interrupts import Shield, critical
from .on_demand import OnDemand, infeasible, needed
from .residency import Residency


COMPILED_EAGER = (
    "a torch.compile'd function or module runs inside ooc.iteration(): TorchDynamo does "
    "not compile under a dispatch mode, and outcore records and replays the step through "
    "one, so it runs eagerly, op by op. Training is exact, but its results are bitwise "
    "those of the uncompiled model (not of a compiled run without outcore), and the "
    "compile's speed is lost. Pass the uncompiled model to silence this, or train "
    "without outcore where the step fits in memory")


class SafeRecording(Recording):
    """Records like `outcore.record()` and keeps managed bytes within the budget as it
    goes, with room for what each op creates (on_demand.room: from the op's meta
    kernel, else as large as its largest input, which an op creating more exceeds).

    InfeasibleBudget is raised, before the optimizer changes anything, when
      * a forward or backward function cannot fit: it needs its own movable arrays
        plus every small or unmovable array alive (they never move) at once, or
      * at the optimizer's step (its pre-hook) some parameter and its gradient do not
        fit together (every update op of torch's optimizers reads both, or the
        parameter and a state tensor of its size).
    A forward or backward function that cannot fit does not stop the step at once: it
    runs (over the budget, with everything else evicted), and so do the ones after it,
    until the step would change a tensor that outlives it (the optimizer's pre-hook, or
    an op writing a tensor made before the step) or ends; the error raised then names
    the function that needs the most of all those that ran, so that one retry at its
    figure gets past forward and backward (raising at the first one made users retry
    about once per layer: benchmarks/budget_retries.py). A CUDA out-of-memory error in
    that stretch raises the error too.
    An optimizer function that needs more than that (Adam's update reads three tensors
    of the parameter's size) is only seen when it runs; stopping then would leave the
    parameters half-updated, so the step is completed correctly (over budget) and the
    error is raised when it ends. OutOfCore then refuses later iterations at once."""

    def __init__(self, residency: Residency, budget: int, shield: Shield, *, label: str = "",
                 fsdp_uninitialized: tuple = (), batch_leaves=frozenset()):
        super().__init__(label=label, batch_leaves=batch_leaves)
        self.shield = shield
        self.residency = residency
        self.on_demand = OnDemand(residency, budget)
        self.budget = budget
        self._infeasible = None     # found in the optimizer: raised once the step completed
        self._pending = None        # the largest forward/backward need over the budget so far
        self._state_written = False
        self._entries = []
        self.compiled_seen = False
        self.ddp_unbuilt = ddp_buckets_unbuilt()      # read by OutOfCore._plan_recording
        self.fsdp_uninitialized = fsdp_uninitialized  # so is this (compose.fsdp_set_up)
        # Arrays whose storage cannot move from the op that first sees them on (Residency
        # NOTE 7), also those that die within the step (a DataLoader worker's batch, in
        # shared memory): the plan counts them held, as it does those alive at the end
        # (OutOfCore._disowned). One that becomes unmovable later (`.numpy()` at the end
        # of the step) is not: the plan may move it before, and counting it for its whole
        # life could make the budget infeasible.
        self.unmovable: set[int] = set()

    @critical
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.shield.forked:          # NOTE [Forked children] in interrupts.py
            return func(*args, **(kwargs or {}))
        self.shield.depth += 1          # one held section per op (NOTE [Interrupts])
        try:
            if not self.compiled_seen and under_torch_compile():
                self.compiled_seen = True
                warnings.warn(COMPILED_EAGER, stacklevel=2)
            if func.namespace in DISTRIBUTED_NAMESPACES:
                return around(self.residency, func, args, kwargs or {},
                              lambda f, a, k: super(SafeRecording, self).__torch_dispatch__(
                                  f, types, a, k))
            try:
                return super().__torch_dispatch__(func, types, args, kwargs)
            except torch.OutOfMemoryError:
                if self._pending is None:
                    raise
                raise self._pending from None   # ran past a function that cannot fit
        finally:
            self.shield.exit()

    @property
    def infeasible(self):
        """The InfeasibleBudget OutOfCore raises once the step ended, if any."""
        return self._infeasible if self._infeasible is not None else self._pending

    def _enter_optimizer(self, optimizer, *args):
        super()._enter_optimizer(optimizer, *args)
        if self._state_written:
            return
        res = self.residency
        worst = self._pending
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                needed = 0
                for storage in distinct_storages((p, p.grad)):
                    entry = res.entry_of(storage)    # an evicted storage has size 0 now
                    if entry is not None and not entry.pinned:
                        needed += entry.nbytes
                pinned = res.pinned_resident + res.owned_bytes()
                if (needed and needed + pinned > self.budget
                        and (worst is None or needed + pinned > worst.needed_bytes)):
                    worst = infeasible(len(self._functions), "the optimizer step of a parameter "
                                       f"of shape {tuple(p.shape)}", "optimizer", needed,
                                       pinned, self.budget, res.min_move_bytes)
        if worst is not None:
            raise worst

    def _before_op(self, func, args, kwargs, inputs, index) -> None:
        if self._pending is not None and self._changes_state(func, args, kwargs, inputs):
            raise self._pending         # before the step changes what outlives it
        self._entries = self.on_demand.before(inputs, func, args, kwargs)

    def _changes_state(self, func, args, kwargs, inputs) -> bool:
        """Whether the op writes a tensor made before the step that training changes: a
        parameter anywhere, anything else in backward or the optimizer (a gradient kept
        from the last step, optimizer state). Forward's own buffer updates (batch norm's
        running statistics and its counter) run on: the step changed them before it found
        the function it cannot fit too. A storage the recorder has not seen yet was made
        outside the step's ops."""
        late = self._phase(inputs) in ("backward", "optimizer")
        for t in written_tensors(func, args, kwargs or {}):
            known = self._live.get(t.untyped_storage()._cdata)
            if known is not None and not self._logs[known[0]].existed_before:
                continue                # made in this step
            if late or isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad):
                return True
        return False

    def _after_op(self, func, inputs, written, outputs) -> None:
        entries = self._entries
        created = self.on_demand.after(entries, written, outputs)
        fn = self._functions[-1]
        if fn.phase == "optimizer" and written:
            self._state_written = True
        res = self.residency
        for entry in (*entries, *created):
            if entry.elsewhere or entry.owner or entry.state is not FAST:
                continue
            storage = entry.ref()
            if storage is not None and entry.nbytes >= res.min_move_bytes and \
                    res.pin_if_unmovable(entry, storage):
                known = self._live.get(entry.key)
                if known is not None and self._logs[known[0]].first_use == fn.index:
                    self.unmovable.add(known[0])
        movable, pinned = needed(res, entries, created)
        if movable + pinned > self.budget and self._infeasible is None:
            error = infeasible(fn.index, fn.op, fn.phase, movable, pinned,
                               self.budget, res.min_move_bytes, completed=self._state_written)
            if self._state_written:
                self._infeasible = error
            elif self._pending is None or error.needed_bytes > self._pending.needed_bytes:
                self._pending = error   # raised before state changes, or at the end
