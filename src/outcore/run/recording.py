"""The recording iteration: record the trace while running memory-safe (on-demand)."""
from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import _disable_current_modes

from ..aten import byte_span, distinct_storages, iter_tensors
from ..errors import warn
from ..states import FAST
from ..trace.recorder import Recording
from .compose import DISTRIBUTED_NAMESPACES, around, ddp_buckets_unbuilt, under_torch_compile
from .interrupts import Shield, critical, no_raise
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
    An optimizer function that needs more than that (Adam's update reads three tensors
    of the parameter's size) is only seen when it runs; stopping then would leave the
    parameters half-updated, so the step is completed correctly (over budget) and the
    error is raised when it ends, naming the function of the rest of the step that
    needed the most (the step runs to its end anyway; naming the first, a retry at its
    figure met the error again at a later update of the same step: Adam's lerp_, then
    its addcdiv_). OutOfCore then refuses later iterations at once.

    Raised at once, the error names the first function that cannot fit, not the step's
    largest need, so a user who takes its figure may retry once per layer
    (benchmarks/budget_retries.py). Running on past that function to learn the rest was
    tried and is not done: the step then changes what a retry starts from (gradients set
    or accumulated, a GradScaler's unscale, LBFGS's counters, DDP's reduction half done,
    updates through `.data`), and a retry trains on wrong values without an error."""

    def __init__(self, residency: Residency, budget: int, shield: Shield, *, label: str = "",
                 fsdp_uninitialized: tuple = (), batch_leaves=frozenset(), said=None):
        super().__init__(label=label, batch_leaves=batch_leaves)
        self.shield = shield
        self.residency = residency
        self.on_demand = OnDemand(residency, budget)
        self.budget = budget
        self.infeasible = None
        self._optimizer_began = False
        self._entries = []
        # What the OutOfCore has warned of: once each, also where a filter made the
        # warning an error (NOTE [Warnings as errors] in errors.py) and the step ended.
        self.said = said if said is not None else set()
        self.ddp_unbuilt = ddp_buckets_unbuilt()      # read by OutOfCore._plan_recording
        self._ddp_watch = {id(m) for m in (ref() for ref in self.ddp_unbuilt) if m is not None}
        self.fsdp_uninitialized = fsdp_uninitialized  # so is this (compose.fsdp_set_up)
        # Arrays whose storage cannot move from the op that first sees them on (Residency
        # NOTE 7), also those that die within the step (a DataLoader worker's batch, in
        # shared memory): the plan counts them held, as it does those alive at the end
        # (OutOfCore._disowned). One that becomes unmovable later (`.numpy()` at the end
        # of the step) is not: the plan may move it before, and counting it for its whole
        # life could make the budget infeasible.
        self.unmovable: set[int] = set()

    def _make_finalizer(self, key, ident):
        """The recorder's storage-death callback is a weakref callback, where Python
        swallows exceptions: a Ctrl-C that landed in it was printed as "Exception ignored"
        and lost (the step ran on), and that death went unnoted. Marked `no_raise`, the
        signal is noted there and raised at the next held section's end (NOTE
        [Interrupts] rule 6). The callbacks share one code object: the set holds it once."""
        return no_raise(super()._make_finalizer(key, ident))

    @critical
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.shield.forked:          # NOTE [Forked children] in interrupts.py
            return func(*args, **(kwargs or {}))
        self.shield.depth += 1          # one held section per op (NOTE [Interrupts])
        try:
            if self.residency.stopped_callback is not None:    # NOTE [Collectives in
                self.residency.raise_stopped_callback()        # flight] rule 5 (compose.py)
            if COMPILED_EAGER not in self.said and under_torch_compile():
                self.said.add(COMPILED_EAGER)
                warn(COMPILED_EAGER, stacklevel=2)
            if func.namespace in DISTRIBUTED_NAMESPACES:
                return around(self.residency, func, args, kwargs or {},
                              lambda f, a, k: super(SafeRecording, self).__torch_dispatch__(
                                  f, types, a, k))
            return super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            self.shield.exit(self)

    def read_past(self, entry) -> None:
        """`entry`, tracked since an earlier op, was just pinned: PyTorch reads it past
        the dispatcher (NOTE [Read past the dispatcher] in aten.py; a PackedSequence's
        batch_sizes built by hand). Unlike one that becomes unmovable late for another
        reason, it is counted held for its whole life: the same step reads it the same
        way each time, and a plan that moved it before would deviate every time."""
        self.residency.newly_pinned = [e for e in self.residency.newly_pinned if e is not entry]
        known = self._live.get(entry.key)
        if known is not None and entry.nbytes >= self.residency.min_move_bytes:
            self.unmovable.add(known[0])

    def _enter_optimizer(self, optimizer, *args):
        super()._enter_optimizer(optimizer, *args)
        if self._optimizer_began:
            return
        # Every parameter's update asked, the error names the one that needs the most: a
        # retry at the first one's figure met the next one's (helper-88 #4).
        res = self.residency
        worst, shape, counters = 0, None, 0
        # Outside the recording: a sparse gradient's parts are ops (`_indices`,
        # `_values`), which recorded here put four functions into the step that no replay
        # runs, and every replay left its plan there (helper-150).
        with _disable_current_modes():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        needed = _update_bytes(res, optimizer, group, p)
                        if needed > worst:
                            worst, shape = needed, _shape_here(p)
                        if not optimizer.state.get(p):
                            counters += _first_state(optimizer, group)[1]
        # The step counters a first step makes (Adam's `state["step"]`, one scalar per
        # parameter) stay in memory under min_move_bytes: with them the figure named is
        # one a retry trains at (8 bytes short, it completed over the budget).
        pinned = res.pinned_resident + res.owned_bytes() + (
            counters if res.min_move_bytes > 8 else 0)
        if worst and worst + pinned > self.budget:
            raise infeasible(len(self._functions), "the optimizer step of a parameter of "
                             f"shape {shape}", "optimizer", worst, pinned, self.budget,
                             res.min_move_bytes, res=res, wrote=self._wrote())

    def _wrote(self) -> int:
        """How many tensors that existed before the step it has written so far."""
        return sum(1 for log in self._logs if log.existed_before and log.write_phases)

    def _before_op(self, func, args, kwargs, inputs, index) -> None:
        self._entries = self.on_demand.before(inputs, func, args, kwargs)

    def _after_op(self, func, inputs, written, outputs) -> None:
        entries = self._entries
        created = self.on_demand.after(entries, written, outputs)
        fn = self._functions[-1]
        if fn.phase == "optimizer":
            # From its first op on, the optimizer's step has changed something (its own
            # Python state too: SparseAdam sets state["step"] before it makes its moments,
            # and a step stopped there left it unusable, KeyError 'exp_avg' on the next
            # try): an op over the budget from here is completed with the step, not raised
            # at once (the check before the step, `_enter_optimizer`, raises untouched).
            self._optimizer_began = True
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
        worst = self.budget if self.infeasible is None else self.infeasible.needed_bytes
        if movable + pinned > worst:
            error = infeasible(fn.index, fn.op, fn.phase, movable, pinned,
                               self.budget, res.min_move_bytes, completed=self._optimizer_began,
                               inputs=outputs if func.is_view else inputs, res=res,
                               wrote=0 if self._optimizer_began else self._wrote())
            self.infeasible = error     # the iteration's over-budget warning defers to it
            if not self._optimizer_began:
                raise error


def _shape_here(p) -> str:
    """A parameter's shape as the budget error names it: with FSDP2 (a DTensor) this
    rank's shard beside it, whose bytes the error counts (helper-148: the global shape
    alone read as if the whole parameter were needed)."""
    local = getattr(p, "_local_tensor", None)
    if local is None or tuple(local.shape) == tuple(p.shape):
        return str(tuple(p.shape))
    return f"{tuple(p.shape)}, this rank's shard {tuple(local.shape)}"


def _update_bytes(res: Residency, optimizer, group: dict, p) -> int:
    """What the update of parameter `p` holds on the fast tier at once, as far as can be
    told before it runs (`SafeRecording._enter_optimizer`), each moving storage whole:

    - the parameter's storage;
    - beside it, the larger of the gradient and the state. The gradient: its whole
      storage where an op reads it with the parameter (plain SGD's `add_`, Adam's
      coupled weight decay), else its own bytes (where parameters and gradients are
      views of two flat buffers, Megatron's, DeepSpeed's, apex's, no op of Adam reads
      both). The state: its two largest storages (Adam's `addcdiv_` reads the
      parameter, `exp_avg` and a `denom` of `exp_avg_sq`'s size; AMSGrad's third is not
      read beside them), or, before a first step made it, as many tensors of the
      parameter's size as the optimizer makes (`_first_state`);
    - for a fused kernel, which reads them all at once, the parameter, the gradient and
      the state together;
    - for Adagrad on a sparse gradient, instead, the larger of the parameter and the
      state beside the gradient and its rows once coalesced (`_coalesced_bytes`);
    - where an op makes a tensor of the parameter's size beside two it reads (SGD's
      weight decay and Nesterov momentum, Adagrad's and RMSprop's `addcdiv_`), that too.
      State not read in this step yet (kept from before, loaded) is counted where it
      is, in memory.

    Counted both flat buffers whole, this refused budgets the step trains in
    (helper-122: 8 MiB asked, where `smallest_budget` said 6 MiB); counted the
    gradient's own bytes for every optimizer, it let plain SGD start and complete over
    the budget (helper-124), as it did SGD with weight decay or Nesterov momentum,
    Adagrad, RMSprop, and any optimizer whose state existed before the recording (not
    read yet, it counted 0: helper-126). `tests/run/test_budget_errors.py` sweeps SGD,
    Adam, AdamW, Adagrad and RMSprop, foreach and fused, plain and flat, first steps
    and later ones, against what the step needs. For other optimizers it is a lower
    bound: a step it lets through may complete over the budget, and InfeasibleBudget
    then says so at its end."""
    def whole(storage) -> int:
        entry = res.entry_of(storage)    # an evicted storage has size 0 now
        if entry is None:   # not read in this step yet (state kept or loaded): in memory
            nbytes = storage.nbytes()
            return nbytes if nbytes >= res.min_move_bytes else 0
        return entry.nbytes if not entry.pinned else 0

    params = distinct_storages((p,))
    keys = {s._cdata for s in params}
    # (A sparse gradient's indices and values, each a storage.)
    whole_grad = sum(whole(s) for s in distinct_storages(iter_tensors((p.grad,)))
                     if s._cdata not in keys)
    decoupled = group.get("decoupled_weight_decay",
                          isinstance(optimizer, torch.optim.AdamW))
    grad_bytes = whole_grad
    if p.grad.layout is torch.strided and not (
            isinstance(optimizer, torch.optim.SGD) and not group.get("momentum")
            or group.get("weight_decay") and not decoupled):
        grad_bytes = min(whole_grad, p.grad.numel() * p.grad.element_size())
    state = distinct_storages(iter_tensors(
        v for v in optimizer.state.get(p, {}).values()
        if isinstance(v, torch.Tensor) and v.numel() > 1))
    sizes = sorted((whole(s) for s in state if s._cdata not in keys), reverse=True)
    param_bytes = sum(whole(s) for s in params)
    fused = bool(group.get("fused"))         # one kernel reads them all at once
    own = p.numel() * p.element_size()
    if state:
        # Two of it beside the parameter where the optimizer is known to read them so
        # (Adam's); one for any other (SparseAdam reads one dense moment at a time: with
        # two counted, a retry at the figure its error named was refused).
        read = 2 if type(optimizer) in _FIRST_STATE else 1
        state_bytes = sum(sizes if fused else sizes[:read])
    elif param_bytes:           # made where the parameter is: on the fast tier, moving
        made = _first_state(optimizer, group)[0]
        state_bytes = (made if fused else min(made, 2)) * own
    else:
        state_bytes = 0
    if fused:
        return param_bytes + grad_bytes + state_bytes
    need = param_bytes + max(grad_bytes, state_bytes)
    if isinstance(optimizer, torch.optim.Adagrad) and p.grad.layout is not torch.strided:
        # A sparse gradient's update reads one dense tensor at a time beside the
        # gradient made coalesced (`grad.coalesce()`: on the CPU its values' storage as
        # large as the gradient's, whatever repeats), `state_sum.add_(...)`, then
        # `state_sum.sparse_mask(grad)`, which makes a row per distinct index beside
        # them, then `param.add_(...)`. Counted together, they refused budgets the step
        # trains in (helper-220: 10.8 MiB asked, where it trains at 7).
        return max(param_bytes, state_bytes) + whole_grad + _coalesced_bytes(p.grad, whole_grad)
    if isinstance(optimizer, (torch.optim.Adagrad, torch.optim.RMSprop)):
        # `param.addcdiv_(grad, std)`: a new tensor of its size beside both (helper-126).
        need = max(need, param_bytes + whole_grad + own)
    if isinstance(optimizer, torch.optim.SGD):
        # A new gradient of the parameter's size beside the two it is made of:
        # `grad.add(param, alpha=weight_decay)`, `grad.add(buf, alpha=momentum)` for
        # Nesterov's (helper-126: SGD with either completed over the budget).
        if group.get("weight_decay"):
            need = max(need, param_bytes + whole_grad + own)
        if group.get("nesterov") and group.get("momentum") and not group.get("foreach"):
            # (foreach adds in place: refused at 2.2-2.8 MiB, it trains at 2.2)
            need = max(need, whole_grad + (sizes[0] if sizes else own) + own)
    return need


def _coalesced_bytes(grad, whole: int) -> int:
    """The bytes of a sparse COO gradient's rows once coalesced (indices and values, one
    row per distinct index), counted by `torch.unique` of its indices, once per
    recording; `whole` (its storages' bytes, as many rows as it has) where it is
    coalesced already, or where its indices are not in memory to count (outcore moved
    them out: helper-221, `torch.unique` of an evicted storage raised)."""
    if grad.layout is not torch.sparse_coo or grad.is_coalesced():
        return whole
    indices, values = grad._indices(), grad._values()
    if indices.untyped_storage().nbytes() < byte_span(indices)[1]:
        return whole
    rows = torch.unique(indices, dim=1).shape[1]
    per_row = math.prod(values.shape[1:])
    return rows * (indices.shape[0] * indices.element_size() + per_row * values.element_size())


def _first_state(optimizer, group: dict) -> tuple[int, int]:
    """What an optimizer's first step makes as a parameter's state (`_FIRST_STATE`): how
    many tensors of the parameter's size it reads beside it (momentum buffers, Adam's
    two moments), and the bytes of its step counter; (0, 0) for one not known."""
    known = _FIRST_STATE.get(type(optimizer))
    return known(group) if known is not None else (0, 0)


def _counter_bytes() -> int:
    """A step counter's bytes: torch.optim's `_get_scalar_dtype()` is float64 where the
    default dtype is, else float32."""
    return 8 if torch.get_default_dtype() == torch.float64 else 4


# (RAdam is not here: its first steps read neither moment beside the parameter, and
# counted so it refused budgets it trains in: helper-126.)
_FIRST_STATE = {
    torch.optim.SGD: lambda group: (1 if group.get("momentum") else 0, 0),
    **{kind: (lambda group: (3 if group.get("amsgrad") else 2, _counter_bytes()))
       for kind in (torch.optim.Adam, torch.optim.AdamW)},
    **{kind: (lambda group: (2, _counter_bytes())) for kind in (torch.optim.NAdam,
                                                                torch.optim.Adamax)},
}
