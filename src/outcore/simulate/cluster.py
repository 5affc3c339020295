"""How a training step recorded in one process would run on several devices.

`predict(trace, machine=..., interconnect=..., ranks=p, strategy=...)` takes the trace of
one single-process iteration and predicts one rank's step under data parallelism (DDP),
fully sharded data parallelism (FSDP / ZeRO-3) or a GPipe pipeline (PP), from three
models: the machine's compute model (outcore.simulate.machines), the α-β collective costs
of outcore.simulate.comm, and, when a rank's memory is below what the step needs in-core,
outcore's own planner and simulator on that rank's share of the trace. The survey behind
the strategies is Ben-Nun & Hoefler (arXiv 1802.09941): data parallelism replicates the
model and allreduces gradients; model (layer) parallelism and pipelining split the
network; sharding trades memory for allgathers. docs/distributed.md has the formulas,
the assumptions and a worked table.

`rank_configurations(trace, device=..., interconnect=..., max_devices=N)` answers "how
many devices, and which strategy?": every strategy on 1, 2, 4, ... N devices, in-core
where a rank's step fits the device and out-of-core (budget = device memory) where it
does not, ranked by predicted throughput.

Approximations (each also stated where it is made):

1. Batch splitting (ddp, fsdp with global_batch_scaling=True): the trace's batch is the
   global batch, each rank runs 1/p of it. A rank's trace is the recorded one with the
   bytes of every non-state array first used before the optimizer (activations,
   temporaries, the batch) and the FLOPs, bytes touched and duration of every function
   before the optimizer multiplied by 1/p. Fixed per-op costs (the machine's launch
   time) do not shrink; weights touched by an op are scaled with it (they should not
   be), so small per-rank batches come out a little optimistic on memory-bound ops.
2. State: parameters, gradients and optimizer state ("parameter", "gradient",
   "optimizer_state" categories of the trace) are replicated per rank in ddp and per
   stage in pp, and divided by p in fsdp (optimizer compute too: each rank updates its
   shard). Buffers stay replicated.
3. Communication runs on one serial lane per rank that overlaps compute (NCCL's own
   stream); collectives never slow the compute down (no contention for memory
   bandwidth or SMs), and the host link used for out-of-core transfers is separate from
   the interconnect (not true for the "pcie4" preset, where both share PCIe).
4. Out-of-core: a rank's timeline is outcore.simulate on outcore.plan of the rank's
   trace under the budget; collectives are laid over that timeline (their stalls do not
   re-time the swap transfers).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import InfeasibleBudget, OutcoreError
from ..trace.model import Trace
from ..units import format_bytes, parse_bytes
from .comm import allgather_time, allreduce_time, p2p_time, reduce_scatter_time
from .comm import interconnect as get_interconnect
from .machines import Machine, machine as get_machine

STRATEGIES = ("ddp", "fsdp", "pp")
STATE = ("parameter", "gradient", "optimizer_state")
DEFAULT_BUCKET_BYTES = 25 * 2**20          # DDP's bucket_cap_mb default (25 MiB)
# GPipe's bubble is (s - 1) / (m + s - 1) of the step: 4 microbatches per stage keeps it
# under 20% (Huang et al., GPipe, 2019, found m >= 4s made it negligible).
MICROBATCHES_PER_STAGE = 4


@dataclass(frozen=True)
class Prediction:
    """One rank's predicted step under a strategy (all ranks are alike, except pp stages:
    there the slowest stage sets the step and the largest stage sets the peak).

    step_s: one training step, comm stalls and out-of-core stalls included.
    compute_s: the same step with collectives free (in-core: the compute alone).
    comm_s: seconds the rank's comm lane is busy; exposed_comm_s = step_s - compute_s,
    the part compute did not hide (0 <= exposed_comm_s <= comm_s).
    per_rank_peak_bytes: device memory one rank needs (the largest pp stage).
    throughput_relative: samples per second relative to one device running the whole
    trace in-core (a hypothetical device with enough memory when it does not fit).
    budget: per-rank device memory given to predict when the step was planned out of
    core under it; None when it ran in-core. fits: per_rank_peak_bytes <= the machine's
    fast_bytes."""
    strategy: str
    ranks: int
    dp: int
    pp: int
    machine: str
    interconnect: str
    step_s: float
    compute_s: float
    comm_s: float
    exposed_comm_s: float
    per_rank_peak_bytes: int
    throughput_relative: float
    budget: int | None
    fits: bool
    microbatches: int = 1
    notes: tuple[str, ...] = ()

    @property
    def out_of_core(self) -> bool:
        return self.budget is not None

    @property
    def devices(self) -> int:
        """Devices the configuration uses (= ranks: dp x pp)."""
        return self.ranks

    def __str__(self) -> str:
        where = f"out-of-core under {format_bytes(self.budget)}" if self.budget else "in-core"
        lines = [
            f"{self.strategy} on {self.ranks} x {self.machine} over {self.interconnect} ({where}):",
            f"  step          {self.step_s * 1e3:10.2f} ms  ({self.throughput_relative:.2f}x the "
            "throughput of one device in-core)",
            f"  compute       {self.compute_s * 1e3:10.2f} ms  (collectives free)",
            f"  comm          {self.comm_s * 1e3:10.2f} ms busy, {self.exposed_comm_s * 1e3:.2f} ms "
            "exposed",
            f"  per-rank peak {format_bytes(self.per_rank_peak_bytes):>13}  "
            + ("fits" if self.fits else "does NOT fit") + " the device",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# -- a rank's share of the trace ----------------------------------------------------------

def _regions(trace) -> tuple[int, int]:
    """(index of the first backward function, index of the first optimizer function);
    len(functions) where there is none. Functions before the first backward one are the
    forward region ("other" ops there, e.g. BatchNorm counters, included)."""
    n = len(trace.functions)
    first_bwd = next((f.index for f in trace.functions if f.phase == "backward"), n)
    first_opt = next((f.index for f in trace.functions if f.phase == "optimizer"), n)
    return min(first_bwd, first_opt), first_opt


def scale_trace(trace: Trace, batch_factor: float = 1.0, *, state_factor: float = 1.0,
                optimizer_factor: float = 1.0) -> Trace:
    """The trace with its batch-dependent parts scaled (approximations 1 and 2 of the
    module docstring).

    batch_factor multiplies the bytes of non-state arrays first used before the optimizer
    and the FLOPs, bytes touched and durations of functions before the optimizer.
    state_factor multiplies the bytes of parameters, gradients and optimizer state (fsdp:
    1/p); optimizer_factor the cost of optimizer functions (fsdp: 1/p). Bytes are rounded
    up to whole bytes, never below 1. Structure (functions, accesses, lifetimes) is
    unchanged, so every planner invariant of the original holds for the result."""
    if batch_factor == state_factor == optimizer_factor == 1.0:
        return trace
    _, first_opt = _regions(trace)

    def scaled(n, f):
        return n if f == 1.0 else max(1, math.ceil(n * f))

    arrays = []
    for a in trace.arrays:
        if a.category in STATE:
            f = state_factor
        elif a.first_use < first_opt:
            f = batch_factor
        else:
            f = 1.0
        arrays.append(a if f == 1.0 else dataclasses.replace(a, nbytes=scaled(a.nbytes, f)))
    functions = []
    for fn in trace.functions:
        f = batch_factor if fn.index < first_opt else optimizer_factor
        functions.append(fn if f == 1.0 else dataclasses.replace(
            fn, duration_s=fn.duration_s * f, flops=int(round(fn.flops * f)),
            bytes_touched=int(round(fn.bytes_touched * f))))
    return Trace(functions=tuple(functions), arrays=tuple(arrays), device=trace.device,
                 durations=trace.durations, info=dict(trace.info))


@dataclass(frozen=True)
class _Run:
    """A rank's timeline without collectives: how long each function holds the compute
    lane (its compute plus any out-of-core stall before it), and the peak it needs."""
    spans: tuple[float, ...]
    peak_bytes: int
    budget: int | None          # the planner's budget, None in-core
    bytes_moved: int = 0


def _run(trace, m: Machine, plan_budget: int | None, policy: str = "adaptive",
         held: tuple[int, int, str] | None = None) -> _Run:
    """In-core (plan_budget None, or at least the in-core peak): compute times alone.
    Otherwise outcore.plan under plan_budget and outcore.simulate; span i is the time
    from the end of function i-1 to the end of function i. `held`: (the rank's budget,
    the bytes the strategy holds beside the step, what they are), which plan_budget is
    the difference of: an InfeasibleBudget then names the rank's budget and the rank's
    smallest feasible one, not the planner's."""
    peak = max(_occupancy(trace), default=0)
    if plan_budget is None or plan_budget >= peak:
        return _Run(tuple(m.compute_time(f) for f in trace.functions), peak, None)
    from ..plan import plan
    from .engine import simulate
    try:
        schedule = plan(trace, plan_budget, policy)
    except InfeasibleBudget as exc:
        if held is None:
            raise
        budget, overhead, what = held
        need = exc.min_feasible_bytes + overhead
        raise InfeasibleBudget(
            f"a per-rank budget of {format_bytes(budget)} leaves {format_bytes(plan_budget)} "
            f"for the step beside {what} ({format_bytes(overhead)}), and function "
            f"{exc.function_index} ({exc.op}, {exc.phase}) needs {format_bytes(exc.needed_bytes)} "
            f"at once. The smallest feasible per-rank budget is {format_bytes(need)} "
            f"({need:,} B): raise the budget to that or more",
            function_index=exc.function_index, op=exc.op, phase=exc.phase,
            needed_bytes=exc.needed_bytes, budget_bytes=budget, min_feasible_bytes=need) from exc
    sim = simulate(trace, schedule, m)
    ends = [s + c for s, c in zip(sim.start_s, sim.compute_s)]
    # The final waits on swap-outs belong to the step, and so do the boundary transfers
    # OutOfCore makes before the next one (state the step ends and starts with apart).
    ends[-1] = sim.iteration_time_s
    spans = [ends[0]] + [b - a for a, b in zip(ends, ends[1:])]
    return _Run(tuple(spans), schedule.peak_bytes, plan_budget, schedule.bytes_moved)


def _occupancy(trace, only=None):
    from ..plan.feasibility import occupancy
    return occupancy(trace, only)


def _overlay(spans, events) -> tuple[float, float]:
    """Lay collectives over a compute timeline. events: (issue_index, "before" | "after",
    seconds, wait_index) -- issued on the serial comm lane before / after function
    issue_index runs, and function wait_index (None: the end of the step) cannot start
    before it has finished. Returns (step end, comm lane busy seconds)."""
    n = len(spans)
    issue = {("before", i): [] for i in range(n)} | {("after", i): [] for i in range(n)}
    waits = {i: [] for i in range(n + 1)}
    for k, (i, when, secs, w) in enumerate(events):
        issue[(when, i)].append((k, secs))
        waits[n if w is None else w].append(k)
    done = {}
    t = lane = busy = 0.0

    def put(k, secs):
        nonlocal lane, busy
        lane = max(t, lane) + secs
        busy += secs
        done[k] = lane

    for i in range(n):
        for k, secs in issue[("before", i)]:
            put(k, secs)
        for k in waits[i]:
            t = max(t, done[k])
        t += spans[i]
        for k, secs in issue[("after", i)]:
            put(k, secs)
    for k in waits[n]:
        t = max(t, done[k])
    return max(t, lane), busy


# -- strategies ----------------------------------------------------------------------------

def gradient_production(trace) -> list[tuple[int, int]]:
    """(function index, array id) for each gradient, in the order backward produces them:
    the last function of the backward phase that creates or writes it (accumulation
    included). Gradients backward never writes (unused parameters) are left out."""
    last = {}
    for fn in trace.functions:
        if fn.phase != "backward":
            continue
        for acc in fn.accesses:
            if acc.kind != "read" and trace.arrays[acc.array].category == "gradient":
                last[acc.array] = fn.index
    return sorted((i, a) for a, i in last.items())


def ddp_buckets(trace, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[tuple[int, int]]:
    """(ready function index, bytes) per DDP bucket: gradients in production order, a
    bucket closed once it holds at least bucket_bytes (DDP's bucket_cap_mb; the reducer
    orders buckets by the reverse of parameter order, which is about production order),
    ready when its last gradient is produced."""
    out, size, ready = [], 0, -1
    for i, a in gradient_production(trace):
        size += trace.arrays[a].nbytes
        ready = i
        if size >= bucket_bytes:
            out.append((ready, size))
            size = 0
    if size:
        out.append((ready, size))
    return out


def _ddp(trace, p, m, link, budget, *, bucket_bytes, gradient_as_bucket_view, global_batch,
         notes):
    rank_trace = scale_trace(trace, 1.0 / p) if global_batch else trace
    buckets = ddp_buckets(rank_trace, bucket_bytes)
    # DDP copies gradients into its bucket buffers (one more copy of every gradient)
    # unless gradient_as_bucket_view=True makes the gradients views of the buckets.
    overhead = 0 if gradient_as_bucket_view else sum(b for _, b in buckets)
    what = "DDP's bucket buffers"
    run = _run(rank_trace, m, _plan_budget(budget, overhead, what),
               held=None if budget is None else (budget, overhead, what))
    first_opt = _regions(rank_trace)[1]
    wait = first_opt if first_opt < len(rank_trace.functions) else None
    events = [(i, "after", allreduce_time(nb, p, link), wait) for i, nb in buckets]
    step, busy = _overlay(run.spans, events)
    notes.append(f"{len(buckets)} gradient buckets of <= {format_bytes(bucket_bytes)} "
                 f"({format_bytes(sum(b for _, b in buckets))}), ring allreduce each")
    if overhead:
        notes.append(f"+{format_bytes(overhead)} bucket buffers (gradient_as_bucket_view=False)")
    return run, step, busy, run.peak_bytes + overhead


def fsdp_units(trace, unit_bytes: int = DEFAULT_BUCKET_BYTES) -> list[tuple[int, ...]]:
    """Parameters grouped as FSDP would wrap them, in forward order: parameters read by
    one forward function belong together (a module's weight and bias); consecutive groups
    are merged until a unit holds at least unit_bytes (wrapping whole blocks rather than
    every leaf module). An approximation: the trace does not record module boundaries."""
    first_bwd, _ = _regions(trace)
    params = {a.id for a in trace.arrays if a.category == "parameter"}
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first = {}
    for fn in trace.functions[:first_bwd]:
        used = [acc.array for acc in fn.accesses if acc.array in params]
        for a in used:
            first.setdefault(a, fn.index)
            parent[find(a)] = find(used[0])
    groups = {}
    for a in sorted(first, key=first.get):
        groups.setdefault(find(a), []).append(a)
    ordered = sorted(groups.values(), key=lambda g: min(first[a] for a in g))
    units, current, size = [], [], 0
    for g in ordered:
        current += g
        size += sum(trace.arrays[a].nbytes for a in g)
        if size >= unit_bytes:
            units.append(tuple(current))
            current, size = [], 0
    if current:
        units.append(tuple(current))
    return units


def _fsdp(trace, p, m, link, budget, *, unit_bytes, global_batch, notes):
    units = fsdp_units(trace, unit_bytes)
    full = [sum(trace.arrays[a].nbytes for a in u) for u in units]
    rank_trace = scale_trace(trace, 1.0 / p if global_batch else 1.0, state_factor=1.0 / p,
                             optimizer_factor=1.0 / p)
    n = len(rank_trace.functions)
    first_bwd, first_opt = _regions(rank_trace)
    # Gathered parameters of the unit running and the one prefetched, and one unit's
    # unsharded gradients awaiting their reduce-scatter, on top of the sharded step.
    biggest = max(full, default=0)
    gathered = min(2, len(units))       # the unit running and the one prefetched, if any
    overhead = (gathered + 1) * biggest
    what = (f"FSDP's gathered units (the largest unit's parameters {gathered + 1} times: the "
            f"unit running{', the one prefetched' if gathered > 1 else ''}, and one unit's "
            "gradients before their reduce-scatter)")
    run = _run(rank_trace, m, _plan_budget(budget, overhead, what),
               held=None if budget is None else (budget, overhead, what))
    # Where each unit is used: its first forward function, its first backward function.
    unit_of = {a: k for k, u in enumerate(units) for a in u}
    fwd_use, bwd_use = [None] * len(units), [None] * len(units)
    for f in rank_trace.functions[:first_opt]:
        uses = fwd_use if f.index < first_bwd else bwd_use
        for acc in f.accesses:
            k = unit_of.get(acc.array)
            if k is not None and uses[k] is None:
                uses[k] = f.index
    fwd_use = [0 if i is None else i for i in fwd_use]
    events = []
    wait_end = first_opt if first_opt < n else None
    # Forward: allgather unit k before its first use; unit k+1's is issued as unit k
    # starts (one unit ahead, FSDP's forward prefetch).
    for k, nb in enumerate(full):
        issue = 0 if k == 0 else fwd_use[k - 1]
        events.append((issue, "before", allgather_time(nb, p, link), fwd_use[k]))
    # Backward, units in the order backward first reads them: reshard-after-forward means
    # gathering again, issued as the previous unit's backward starts (backward prefetch).
    order = sorted((k for k in range(len(units)) if bwd_use[k] is not None), key=lambda k: bwd_use[k])
    for j, k in enumerate(order):
        issue = first_bwd if j == 0 else bwd_use[order[j - 1]]
        events.append((min(issue, bwd_use[k]), "before", allgather_time(full[k], p, link), bwd_use[k]))
    # Reduce-scatters: the trace does not say which gradient belongs to which parameter,
    # so units (in backward order; those backward never reads, such as an embedding,
    # last) take gradients in production order by bytes: unit j's reduce-scatter is
    # issued once the gradients produced cover the parameter bytes of units 0..j.
    order += [k for k in range(len(units)) if bwd_use[k] is None]
    produced, cum, at = [], 0, 0
    for i, a in gradient_production(trace):
        cum += trace.arrays[a].nbytes
        produced.append((cum, i))
    target = 0
    for k in order:
        target += full[k]
        while at < len(produced) - 1 and produced[at][0] < target:
            at += 1
        ready = produced[at][1] if produced else max(first_opt - 1, 0)
        events.append((ready, "after", reduce_scatter_time(full[k], p, link), wait_end))
    step, busy = _overlay(run.spans, events)
    notes.append(f"{len(units)} FSDP units (>= {format_bytes(unit_bytes)} of parameters each, "
                 f"largest {format_bytes(biggest)}): allgather before forward and backward, "
                 "reduce-scatter after backward, one unit ahead")
    notes.append(f"+{format_bytes(overhead)} for gathered parameters ({gathered} "
                 f"unit{'s' if gathered > 1 else ''}) and one unit's unsharded gradients")
    return run, step, busy, run.peak_bytes + overhead


def pipeline_stages(trace, stages: int, machine="a100-40gb", *, link=None,
                    microbatches: int = 1) -> dict:
    """Split the step into `stages` contiguous stages of the forward, balanced by compute.

    Every function gets an *anchor*, a forward function: a forward function is its own;
    a backward or optimizer function's is the latest forward anchor among the arrays it
    touches (parameters anchor at their first forward use, forward-created arrays at
    their creator), else the earliest anchor among arrays backward created, else the
    previous function's; arrays it creates take its anchor. Forward functions then carry
    their own time plus the time of every function anchored to them, and are cut into
    `stages` contiguous runs minimizing the largest run (binary search on the bound,
    greedy fill). Each cut then moves between its neighbours (_refine_cuts): with an
    interconnect `link`, to where compute and the p2p of `microbatches` microbatches
    balance best; without, to where the fewest forward bytes cross it (a block boundary
    rather than mid-attention) as long as no stage grows beyond the largest one. A
    function's stage is its anchor's.

    Returns {"stage_of_function": [...], "stage_of_array": [...], "cuts": [first forward
    index of each stage], "forward_s", "backward_s", "optimizer_s": per-stage seconds,
    "send_bytes": bytes of forward activations crossing from stage k to k+1}."""
    m = get_machine(machine)
    fns, arrays = trace.functions, trace.arrays
    n = len(fns)
    first_bwd, first_opt = _regions(trace)
    if stages > first_bwd:
        raise OutcoreError(f"cannot split {first_bwd} forward functions into {stages} stages")
    anchor = [None] * len(arrays)
    fwd_known = [False] * len(arrays)
    fn_anchor = [0] * n
    for fn in fns[:first_bwd]:
        fn_anchor[fn.index] = fn.index
        for acc in fn.accesses:
            if anchor[acc.array] is None:
                anchor[acc.array] = fn.index
                fwd_known[acc.array] = True
    prev = first_bwd - 1 if first_bwd else 0
    for fn in fns[first_bwd:]:
        fwd = [anchor[acc.array] for acc in fn.accesses if fwd_known[acc.array]]
        later = [anchor[acc.array] for acc in fn.accesses
                 if not fwd_known[acc.array] and anchor[acc.array] is not None]
        a = max(fwd) if fwd else (min(later) if later else prev)
        fn_anchor[fn.index] = prev = a
        for acc in fn.accesses:
            if anchor[acc.array] is None:
                anchor[acc.array] = a
    times = [m.compute_time(f) for f in fns]
    weight = [0.0] * max(first_bwd, 1)
    for i in range(min(first_opt, n)):
        weight[fn_anchor[i]] += times[i]
    cuts = _refine_cuts(_linear_partition(weight[:first_bwd], stages), weight[:first_bwd],
                        _cut_bytes(trace, first_bwd), link, microbatches)
    stage_at = [0] * max(first_bwd, 1)
    for k, c in enumerate(cuts):
        for i in range(c, cuts[k + 1] if k + 1 < len(cuts) else first_bwd):
            stage_at[i] = k
    stage_of_function = [stage_at[fn_anchor[i]] for i in range(n)]
    stage_of_array = [stage_at[a] if a is not None else 0 for a in anchor]
    fwd_s, bwd_s, opt_s = [0.0] * stages, [0.0] * stages, [0.0] * stages
    for i in range(n):
        target = fwd_s if i < first_bwd else bwd_s if i < first_opt else opt_s
        target[stage_of_function[i]] += times[i]
    # Activations crossing a boundary: created in the forward by stage a, read in the
    # forward by stage b > a: sent along a -> a+1 -> ... -> b.
    last_reader = {}
    for fn in fns[:first_bwd]:
        for acc in fn.accesses:
            last_reader[acc.array] = max(last_reader.get(acc.array, 0), stage_of_function[fn.index])
    send = [0] * stages
    for a in arrays:
        if a.existed_before or a.first_use >= first_bwd:
            continue                  # parameters live with their stage; inputs are loaded
        for k in range(stage_of_array[a.id], last_reader.get(a.id, 0)):
            send[k] += a.nbytes
    return {"stage_of_function": stage_of_function, "stage_of_array": stage_of_array,
            "cuts": cuts, "forward_s": fwd_s, "backward_s": bwd_s, "optimizer_s": opt_s,
            "send_bytes": send}


def _cut_bytes(trace, first_bwd) -> list[int]:
    """Per forward position c: bytes of forward-created arrays a cut before function c
    would have to send (created before c, read in the forward at or after c)."""
    delta = [0] * (first_bwd + 2)
    last_read = {}
    for fn in trace.functions[:first_bwd]:
        for acc in fn.accesses:
            last_read[acc.array] = fn.index
    for a in trace.arrays:
        if a.existed_before or a.first_use >= first_bwd:
            continue
        end = last_read.get(a.id, a.first_use)
        if end > a.first_use:                     # crosses cuts at first_use+1 .. end
            delta[a.first_use + 1] += a.nbytes
            delta[end + 1] -= a.nbytes
    out, run = [], 0
    for c in range(first_bwd + 1):
        run += delta[c]
        out.append(run)
    return out


def _refine_cuts(cuts, weights, cut_bytes, link=None, microbatches: int = 1) -> list[int]:
    """Move each cut (not the first, at 0), in order, to a better place between its
    neighbours. Without a link: where the fewest bytes cross, among the positions that
    keep both stages beside it within the partition's largest stage (balance never gets
    worse). With a link: where the larger of the two stages' time per microbatch --
    compute / m plus the p2p of what crosses its two cuts, m-th of it -- is least; the
    refined cuts are kept only if the slowest stage is faster than with the balanced ones."""
    if len(cuts) < 2:
        return cuts
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    ends = cuts[1:] + [len(weights)]
    bound = max(prefix[e] - prefix[c] for c, e in zip(cuts, ends)) * (1 + 1e-12)
    m = microbatches

    def stage_time(lo, hi):
        sends = sum(p2p_time(cut_bytes[x] / m, link) for x in (lo, hi) if 0 < x < len(weights))
        return (prefix[hi] - prefix[lo]) / m + sends

    out = [0]
    for k, c in enumerate(cuts[1:], start=1):
        nxt = ends[k]
        span = range(out[-1] + 1, nxt)
        if link is None:
            candidates = [x for x in span
                          if prefix[x] - prefix[out[-1]] <= bound and prefix[nxt] - prefix[x] <= bound]
            key = lambda x: (cut_bytes[x], abs(prefix[x] - prefix[c]))  # noqa: E731
        else:
            candidates = list(span)
            key = lambda x: (max(stage_time(out[-1], x), stage_time(x, nxt)), cut_bytes[x])  # noqa: E731
        out.append(min(candidates or [c], key=key))
    if link is not None:
        # Cut by cut is greedy: keep the refined cuts only if the slowest stage gains.
        def slowest(cs):
            return max(stage_time(a, b) for a, b in zip(cs, cs[1:] + [len(weights)]))
        return out if slowest(out) <= slowest(cuts) else cuts
    return out


def _linear_partition(weights, parts: int) -> list[int]:
    """Start indices of `parts` contiguous, non-empty runs of `weights` minimizing the
    largest run's sum (binary search on the bound; greedy fill checks a bound)."""
    n = len(weights)

    def cuts_for(bound):
        cuts, run = [0], 0.0
        for i, w in enumerate(weights):
            # Start a new run when this one would overflow, or when the runs left need
            # every remaining function to stay non-empty.
            if i > 0 and (run + w > bound or n - i == parts - len(cuts)) and len(cuts) < parts:
                cuts.append(i)
                run = 0.0
            run += w
        return cuts if len(cuts) == parts and run <= bound else None

    lo, hi = max(weights, default=0.0), sum(weights)
    best = cuts_for(hi) or list(range(parts))
    for _ in range(60):
        mid = (lo + hi) / 2
        found = cuts_for(mid)
        if found is not None:
            best, hi = found, mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * max(hi, 1e-30):
            break
    return best


def _stage_trace(trace, stage_of_function, k) -> Trace:
    """Stage k's own step as a Trace: its functions in order (renumbered), the arrays they
    touch (renumbered in order of first access). Arrays another stage created arrive
    before the step (kind "input"), as the pipeline hands them over."""
    from ..trace.model import Access, Array, Function
    keep = [f for f in trace.functions if stage_of_function[f.index] == k]
    new_id, uses = {}, {}
    functions = []
    for j, fn in enumerate(keep):
        accesses = []
        for slot, acc in enumerate(fn.accesses):
            nid = new_id.setdefault(acc.array, len(new_id))
            uses.setdefault(nid, []).append((j, slot))
            accesses.append(Access(nid, acc.kind))
        functions.append(Function(index=j, op=fn.op, phase=fn.phase, accesses=tuple(accesses),
                                  duration_s=fn.duration_s, flops=fn.flops,
                                  bytes_touched=fn.bytes_touched, split=fn.split,
                                  host_s=fn.host_s, host_cpu_s=fn.host_cpu_s))
    old_index = [f.index for f in keep]
    arrays = []
    for old, nid in sorted(new_id.items(), key=lambda kv: kv[1]):
        a = trace.arrays[old]
        first, last = uses[nid][0][0], uses[nid][-1][0]
        made_here = not a.existed_before and stage_of_function[a.first_use] == k \
            and old_index[first] == a.first_use
        if made_here or a.existed_before:
            kind, before = a.kind, a.existed_before
        else:
            # Handed over by another stage before this one's step; "input" promises it is
            # only read, so one the stage writes (or that persists) is kept as persistent.
            writes = any(fn.accesses[slot].kind != "read" for j, slot in uses[nid]
                         for fn in (functions[j],))
            kind = "persistent" if (a.kind == "persistent" or writes) else "input"
            before = True
        freed = None
        if kind != "persistent" and a.freed_after is not None:
            freed = max([j for j, i in enumerate(old_index) if i <= a.freed_after] or [last])
            freed = max(freed, last)
        arrays.append(Array(id=nid, nbytes=a.nbytes, dtype=a.dtype, device=a.device, kind=kind,
                            category=a.category, origin=uses[nid][0], first_use=first,
                            last_use=last, freed_after=freed, existed_before=before))
    return Trace(functions=tuple(functions), arrays=tuple(arrays), device=trace.device,
                 durations=trace.durations, info=dict(trace.info))


def _pp(trace, s, m, link, budget, *, microbatches, notes):
    split = pipeline_stages(trace, s, m, link=link, microbatches=microbatches)
    fwd, bwd, opt, send = split["forward_s"], split["backward_s"], split["optimizer_s"], split["send_bytes"]
    peaks, slow, planned = [], [], False
    for k in range(s):
        stage = _stage_trace(trace, split["stage_of_function"], k)
        run = _run(stage, m, _plan_budget(budget, 0, ""))
        in_core = sum(m.compute_time(f) for f in stage.functions)
        # Out of core, a stage's compute stretches by its simulated slowdown (the
        # full-batch stage stands in for each of its microbatches).
        slow.append(sum(run.spans) / in_core if in_core else 1.0)
        peaks.append(run.peak_bytes)
        planned = planned or run.budget is not None
    mb = microbatches
    # Per microbatch, stage k computes its share and sends its activations forward and
    # their gradients back (not overlapped with its compute: a conservative GPipe).
    compute = [slow[k] * (fwd[k] + bwd[k]) / mb for k in range(s)]
    p2p = [p2p_time(send[k] / mb, link) + (p2p_time(send[k - 1] / mb, link) if k else 0.0)
           for k in range(s)]
    slots = mb + s - 1
    optimizer = max(slow[k] * opt[k] for k in range(s))
    step = slots * max(c + q for c, q in zip(compute, p2p)) + optimizer
    compute_only = slots * max(compute) + optimizer
    busy = slots * max(p2p)
    notes.append(f"GPipe, {mb} microbatches: bubble {(s - 1) / slots:.0%} of the pipeline; "
                 f"stage compute {', '.join(f'{(f + b) * 1e3:.1f}' for f, b in zip(fwd, bwd))} ms "
                 f"per step; activations sent {', '.join(format_bytes(b) for b in send[:-1])}")
    notes.append("per-stage peak: the stage's own arrays at full batch (GPipe holds every "
                 "microbatch's activations until its backward)")
    run = _Run((), max(peaks), budget if planned else None)
    return run, step, busy, max(peaks), compute_only


def _plan_budget(budget, overhead, what) -> int | None:
    """The planner's budget: the rank's memory less what the strategy holds beside the
    step (DDP buckets, FSDP's gathered units)."""
    if budget is None:
        return None
    left = budget - overhead
    if left <= 0:
        raise OutcoreError(f"a per-rank budget of {format_bytes(budget)} leaves nothing for the "
                           f"step: {what} alone take {format_bytes(overhead)}; the budget "
                           f"must exceed that")
    return left


# -- the public entry points ---------------------------------------------------------------

def _require_batch(batch) -> None:
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise OutcoreError(f"batch must be an integer >= 1 (the samples of the traced step), "
                           f"got {batch!r}")


def predict(trace: Trace, *, machine="a100-40gb", interconnect="nvlink-a100", ranks: int = 1,
            strategy: str = "ddp", budget=None, global_batch_scaling: bool = True,
            buckets=DEFAULT_BUCKET_BYTES, microbatches: int | None = None,
            batch: int | None = None, gradient_as_bucket_view: bool = False) -> Prediction:
    """Predict one rank's step of `trace` on `ranks` devices of `machine` joined by
    `interconnect` under `strategy`:

    ddp   every rank runs the whole model on its share of the batch; gradients are
          bucketed (`buckets` bytes, DDP's 25 MiB) in the order backward produces them,
          each bucket's ring allreduce starts when its last gradient is produced and runs
          on the comm lane while backward goes on; the optimizer starts when backward and
          the last allreduce are done. Memory: the step plus DDP's bucket buffers (a second
          copy of the gradients, unless gradient_as_bucket_view).
    fsdp  parameters, gradients and optimizer state sharded p ways; each unit's
          parameters (fsdp_units: `buckets` bytes at least) allgathered before its
          forward and again before its backward, one unit ahead, its gradients
          reduce-scattered after its backward. Memory: the sharded step plus two gathered
          units and one unit's full gradients.
    pp    `ranks` stages (pipeline_stages) with a GPipe schedule of `microbatches`
          (default 4 per stage, capped at `batch`): step = (m + s - 1) x the slowest
          stage's time per microbatch (compute + p2p of its activations and their
          gradients) + the slowest stage's optimizer. Memory: the largest stage's arrays.

    global_batch_scaling: True keeps the trace's batch as the global batch (ddp and fsdp
    ranks each run 1/ranks of it); False gives every rank the trace's whole batch (the
    global batch grows with ranks). `batch`, when known, checks that every rank and
    microbatch gets at least one sample.
    budget: per-rank device memory for out-of-core training. When the predicted per-rank
    peak exceeds it, the rank's trace is planned (outcore.plan, adaptive) under the
    budget less the strategy's own overhead and simulated (outcore.simulate); raises
    InfeasibleBudget when even that cannot fit."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise OutcoreError(f"ranks must be an integer >= 1, got {ranks!r}")
    _require_batch(batch)
    if strategy not in STRATEGIES:
        raise OutcoreError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    m = get_machine(machine)
    link = get_interconnect(interconnect)
    bucket_bytes = parse_bytes(buckets)
    if bucket_bytes < 1:
        raise OutcoreError(f"buckets must be at least 1 byte, got {buckets!r}")
    budget = None if budget is None else parse_bytes(budget)
    if not trace.functions:
        raise OutcoreError("the trace has no functions: nothing to predict")
    split_batch = global_batch_scaling and strategy in ("ddp", "fsdp")
    if batch is not None and split_batch and batch < ranks:
        raise OutcoreError(f"a global batch of {batch} cannot be split over {ranks} ranks "
                           "(each needs at least one sample)")
    base = sum(m.compute_time(f) for f in trace.functions)
    notes = []
    mb, dp, pp = 1, ranks, 1
    if ranks == 1:
        # One device: plain training, whatever the strategy (nothing to reduce or split).
        run = _run(trace, m, budget)
        step = compute = sum(run.spans)
        busy, peak = 0.0, run.peak_bytes
        notes.append("one rank: no communication, the step as recorded")
    elif strategy == "ddp":
        run, step, busy, peak = _ddp(trace, ranks, m, link, budget, bucket_bytes=bucket_bytes,
                                     gradient_as_bucket_view=gradient_as_bucket_view,
                                     global_batch=split_batch, notes=notes)
        compute = sum(run.spans)
    elif strategy == "fsdp":
        run, step, busy, peak = _fsdp(trace, ranks, m, link, budget, unit_bytes=bucket_bytes,
                                      global_batch=split_batch, notes=notes)
        compute = sum(run.spans)
    else:
        dp, pp = 1, ranks
        mb = microbatches if microbatches is not None else MICROBATCHES_PER_STAGE * ranks
        if batch is not None:
            mb = min(mb, batch)
        if isinstance(mb, bool) or not isinstance(mb, int) or mb < 1:
            raise OutcoreError(f"microbatches must be an integer >= 1, got {microbatches!r}")
        if batch is not None and microbatches is not None and microbatches > batch:
            raise OutcoreError(f"{microbatches} microbatches need a batch of at least that many "
                               f"samples, got {batch}")
        run, step, busy, peak, compute = _pp(trace, ranks, m, link, budget, microbatches=mb,
                                             notes=notes)
    if run.budget is not None:
        notes.append(f"out-of-core: planned under {format_bytes(run.budget)} per rank "
                     f"(adaptive), {format_bytes(run.bytes_moved)} moved per step"
                     if strategy != "pp" else "out-of-core: stages planned under the budget")
    elif budget is not None:
        notes.append(f"the budget {format_bytes(budget)} holds the whole step: in-core")
    samples = ranks if (strategy in ("ddp", "fsdp") and not global_batch_scaling) else 1
    exposed = max(0.0, step - compute)
    return Prediction(strategy=strategy, ranks=ranks, dp=dp, pp=pp, machine=m.name,
                      interconnect=link.name, step_s=step, compute_s=compute, comm_s=busy,
                      exposed_comm_s=min(exposed, busy) if busy else 0.0,
                      per_rank_peak_bytes=int(peak),
                      throughput_relative=samples * base / step if step > 0 else float("inf"),
                      budget=budget if run.budget is not None else None,
                      fits=peak <= m.fast_bytes, microbatches=mb, notes=tuple(notes))


def device_counts(max_devices: int) -> list[int]:
    """1, 2, 4, ... up to max_devices, and max_devices itself."""
    if isinstance(max_devices, bool) or not isinstance(max_devices, int) or max_devices < 1:
        raise OutcoreError(f"max_devices must be an integer >= 1, got {max_devices!r}")
    out, n = [], 1
    while n < max_devices:
        out.append(n)
        n *= 2
    return out + [max_devices]


def rank_configurations(trace: Trace, *, device="a100-40gb", interconnect="nvlink-a100",
                        max_devices: int = 8, budgets=None, strategies=STRATEGIES,
                        global_batch_scaling: bool = True, batch: int | None = None,
                        buckets=DEFAULT_BUCKET_BYTES, microbatches: int | None = None) -> list[Prediction]:
    """Every strategy on 1, 2, 4, ... max_devices devices, best first.

    A configuration whose per-rank step fits the device in-core gives one row (budget
    None). One that does not gives its in-core row (fits=False: it would need more
    memory than the device has) and one out-of-core row per budget in `budgets` (default:
    the device's memory; each at most the device's memory), planned by outcore; a budget
    the planner cannot meet gives a row with fits=False and the reason in its notes.
    One device is strategy "single". Rows are sorted fitting first, then by predicted
    throughput (samples/s relative to one device in-core) descending."""
    _require_batch(batch)
    m = get_machine(device)
    counts = device_counts(max_devices)
    budgets = [m.fast_bytes] if budgets is None else [parse_bytes(b) for b in budgets]
    too_big = [b for b in budgets if b > m.fast_bytes]
    if too_big:
        raise OutcoreError(f"budget {format_bytes(too_big[0])} exceeds the device's "
                           f"{format_bytes(m.fast_bytes)} ({m.name})")
    for s in strategies:
        if s not in STRATEGIES:
            raise OutcoreError(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
    rows = []
    common = dict(machine=m, interconnect=interconnect, global_batch_scaling=global_batch_scaling,
                  buckets=buckets, batch=batch, microbatches=microbatches)
    for n in counts:
        for strategy in (["ddp"] if n == 1 else strategies):
            if batch is not None and n > batch and strategy in ("ddp", "fsdp") and global_batch_scaling:
                continue              # fewer samples than ranks
            label = "single" if n == 1 else strategy
            try:
                first = predict(trace, ranks=n, strategy=strategy, **common)
            except OutcoreError as exc:          # e.g. more stages than forward functions
                rows.append(_failed(label, n, m, interconnect, str(exc)))
                continue
            first = dataclasses.replace(first, strategy=label)
            rows.append(first)
            if first.fits:
                continue
            for b in budgets:
                try:
                    p = predict(trace, ranks=n, strategy=strategy, budget=b, **common)
                    rows.append(dataclasses.replace(p, strategy=label))
                except InfeasibleBudget as exc:
                    rows.append(_failed(label, n, m, interconnect,
                                        f"out-of-core under {format_bytes(b)} infeasible: needs "
                                        f"{format_bytes(exc.min_feasible_bytes)} per rank", budget=b))
                except OutcoreError as exc:
                    rows.append(_failed(label, n, m, interconnect, str(exc), budget=b))
    rows.sort(key=lambda r: (not r.fits, -r.throughput_relative))
    return rows


def _failed(label, n, m, link, why, budget=None) -> Prediction:
    # A configuration that cannot run: no time, no throughput, the reason in its notes.
    name = link if isinstance(link, str) else link.name
    return Prediction(strategy=label, ranks=n, dp=1 if label == "pp" else n, pp=n if label == "pp" else 1,
                      machine=m.name, interconnect=name, step_s=float("inf"), compute_s=float("inf"),
                      comm_s=0.0, exposed_comm_s=0.0, per_rank_peak_bytes=0, throughput_relative=0.0,
                      budget=budget, fits=False, notes=(why,))


def format_table(rows, *, markdown: bool = False) -> str:
    """The ranked configurations as a text (or markdown) table."""
    head = ["devices", "strategy", "dp", "pp", "budget/device", "fits", "step ms",
            "throughput", "per-rank peak", "comm ms (exposed)"]
    body = []
    for r in rows:
        budget = "in-core" if r.budget is None else format_bytes(r.budget)
        fits = "yes" if r.fits else "no"
        if math.isinf(r.step_s):
            body.append([str(r.ranks), r.strategy, str(r.dp), str(r.pp), budget, fits, "-", "-", "-",
                         r.notes[0] if r.notes else ""])
            continue
        body.append([str(r.ranks), r.strategy, str(r.dp), str(r.pp), budget, fits,
                     f"{r.step_s * 1e3:.1f}", f"{r.throughput_relative:.2f}x",
                     format_bytes(r.per_rank_peak_bytes),
                     f"{r.comm_s * 1e3:.1f} ({r.exposed_comm_s * 1e3:.1f})"])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h)
              for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*row) for row in body]
    return "\n".join(lines)
