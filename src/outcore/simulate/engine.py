"""Discrete-event replay of a Schedule on a Machine.

Three lanes: compute (functions in order), the slow->fast link and the fast->slow link,
each serving its transfers in issue order (two lanes when the machine's link is shared:
then reads and writes queue on one). The executor model is the one the Schedule
describes: at each boundary the end-actions of the previous function and the begin-
actions of the next are issued in order; SWAP_IN and SWAP_OUT are asynchronous (a
swap-out starts when the function that last produced the data has finished); a function
starts once the previous one is done and all its swapped-in operands have arrived; WAIT
blocks until that swap-out has completed. Time lost waiting is the function's stall.

With `comm=(interconnect, ranks)` a fourth lane carries collectives (a trace of one rank
under torchrun records them as `c10d.*` functions): such a function takes no time on the
compute lane; once its operands are ready it issues its collective, priced by
outcore.simulate.comm, on the comm lane (serial, in issue order: one process group, one
stream), and the next function that touches any of its arrays waits for it to finish (a
stall), as does a swap-out of one of them. The step ends when the last collective has.
Without `comm`, a collective is an ordinary function with its recorded duration.

NOTE [No core to spare]. On a machine whose compute is the host CPU (Machine.cores > 0),
the mover's threads and a CPU collective's threads (gloo) need CPU too, while their
transfer or collective runs: Machine.transfer_cpu_share of each second a transfer is on
its link (the mover's syscalls and staging copies), Interconnect.cpu_share of each
second a collective is on the comm lane (its copies and reductions). Where a core is
free they run beside compute and cost it nothing. Where there is none (a rank per core
or more: `contended`), they take it from the rank's core as the scheduler would: while
the rank waits (a stall) the core is theirs at no cost; while a function computes, the
two share it half and half, so a function of c seconds whose interval overlaps helper
work needing h seconds of CPU takes c + min(h, c) (h counted over the function's
unstretched interval). Whether a core is free depends on the ranks per node and the
threads each computes on (the trace's `threads`, torch's intra-op threads when it was
recorded: Machine.no_core_to_spare). simulate_ranks decides per node; simulate (one rank)
from the trace alone: one process computing on 2 threads fills this 2-core machine, and
there compute loses 0.24-0.31 s per second of transfer beside it, counted as here
(`benchmarks/contention.py`, docs/planning.md "Simulation"). Why it matters across ranks
(docs/distributed.md, "No core to spare"): on this 2-core machine
benchmarks/distributed_fit.py predicted 0.97-1.44 of the measured replay on one rank,
but 0.71-1.09 on two before this was modelled.

NOTE [Duplex link]. A machine with `link_both` (Machine.transfer_end) has two lanes
that are not independent: while both carry a transfer, together they move link_both
B/s, less than link_in + link_out (a GPU's host link: 85 GB/s together against about
55 each alone on an H100, docs/gpu-check.md). Lanes are scheduled in issue order, so a
transfer is priced when issued, with the other lane busy until a known time: the one
issued later gets what link_both leaves beside the other's speed while both run, then
its own speed; the earlier one keeps its own. The total while both run is link_both,
as measured; how it splits between the two is not modelled."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import OutcoreError
from ..plan.schedule import SWAP_IN, SWAP_OUT, WAIT, require_schedule
from ..trace.model import require_trace
from ..units import format_bytes
from .comm import collective_bytes, collective_kind, collective_time, interconnect, p2p_time
from .machines import machine as get_machine
from .machines import trace_threads


@dataclass(frozen=True)
class Transfer:
    array: int
    direction: str        # "in" or "out"
    nbytes: int
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Simulation:
    machine: str
    step_time_s: float            # the iteration, transfers and stalls included
    in_core_time_s: float         # the same functions with nothing to move (repeats included)
    stall_s: tuple[float, ...]    # per function: waiting on WAITs and swap-ins
    start_s: tuple[float, ...]    # per function: when it started computing
    peak_bytes: int
    bytes_in: int
    bytes_out: int
    transfers: tuple[Transfer, ...]
    shared_link: bool = False
    compute_s: tuple[float, ...] = ()   # per function: how long it computed
    # Per function: how long it computes alone, as plain PyTorch's step runs it (no
    # contention), 0 for a recompute (plain PyTorch does not run it): the in-core clock.
    plain_s: tuple[float, ...] = ()
    # Between iterations OutOfCore leaves state where the step left it (run/mapped.py);
    # before the next step it writes out the state the schedule ends with in fast memory
    # but starts without, and reads in the state it starts with but ends without; both
    # synchronous.
    boundary_s: float = 0.0
    # With simulate(..., comm=...): seconds the comm lane was busy, and each collective
    # (direction "comm", array = the first array it touched).
    comm_s: float = 0.0
    collectives: tuple[Transfer, ...] = ()
    # Compute time lost to helper threads that had no core of their own (NOTE [No core
    # to spare]): the functions' computing time beyond their in-core time.
    contention_s: float = 0.0
    # Compute of the functions that recompute an array (Function.repeats): part of
    # in_core_time_s, which plain PyTorch's step does not run.
    recompute_s: float = 0.0

    @property
    def plain_time_s(self) -> float:
        """The step as plain PyTorch runs it, on this machine: the in-core time less the
        recomputes (the figure speed is measured against)."""
        return self.in_core_time_s - self.recompute_s

    @property
    def iteration_time_s(self) -> float:
        """What OutOfCore's iteration takes: the step and its boundary transfers."""
        return self.step_time_s + self.boundary_s

    @property
    def total_stall_s(self) -> float:
        return sum(self.stall_s)

    @property
    def speed_vs_in_core(self) -> float:
        return self.plain_time_s / self.step_time_s if self.step_time_s else 1.0

    @property
    def link_busy_s(self) -> tuple[float, float]:
        """Seconds each link (in, out) carries data: with compute, the physical bound."""
        ins = sum(t.end_s - t.start_s for t in self.transfers if t.direction == "in")
        outs = sum(t.end_s - t.start_s for t in self.transfers if t.direction == "out")
        return ins, outs

    @property
    def physical_limit_s(self) -> float:
        """This schedule's own bound: its compute, or its busiest link (both directions'
        time together when the link is shared). It moves these bytes no faster; another
        schedule may. For the step's limit over all schedules see
        outcore.simulate.physical_limit (limit.py)."""
        ins, outs = self.link_busy_s
        return max(self.in_core_time_s, ins + outs if self.shared_link else max(ins, outs))

    def __str__(self) -> str:
        bound = self.physical_limit_s
        return "\n".join([
            f"Simulated on {self.machine}:",
            f"  step time   {self.step_time_s * 1e3:10.2f} ms  ({100 * self.speed_vs_in_core:.1f}% of "
            f"in-core speed; in-core {self.plain_time_s * 1e3:.2f} ms)",
            *([f"  recompute   {self.recompute_s * 1e3:10.2f} ms  of compute making arrays "
               "again"] if self.recompute_s > 0 else []),
            f"  stalls      {self.total_stall_s * 1e3:10.2f} ms  in "
            f"{sum(1 for s in self.stall_s if s > 0)} of {len(self.stall_s)} functions",
            *([f"  contention  {self.contention_s * 1e3:10.2f} ms  of compute lost to the "
               "mover's CPU (no core to spare)"] if self.contention_s > 0 else []),
            f"  moved       {format_bytes(self.bytes_in)} in, {format_bytes(self.bytes_out)} out; "
            f"this schedule's bound {bound * 1e3:.2f} ms (max of compute and the links' busy time)",
            f"  peak fast   {format_bytes(self.peak_bytes)}",
            f"  between iterations {self.boundary_s * 1e3:.2f} ms: state the step ends and the "
            "next one starts with on different tiers, moved before it",
        ])


def simulate(trace, schedule, machine="cpu-disk", *, comm=None) -> Simulation:
    """Replay `schedule` for `trace` on `machine` (a preset name or a Machine).

    comm: None, or (interconnect, ranks) with an Interconnect or preset name of
    outcore.simulate.comm and the number of ranks the trace's collectives span: they
    then run on their own lane at the modelled speed (module docstring), each starting
    as soon as this rank issues it: the other ranks are assumed to be there already
    (simulate_ranks models them). One rank leaves its helper threads a core of their own
    unless the threads it computed on (the trace's `threads`) fill the machine's cores
    (NOTE [No core to spare]); ranks that share a node's cores are simulate_ranks' to
    model."""
    require_trace(trace, "outcore.simulate")
    require_schedule(schedule, "outcore.simulate")
    m = get_machine(machine)
    link, ranks = _comm_args(comm)
    lane = _rank_lane(trace, schedule, m, link,
                      contended=m.no_core_to_spare(1, trace_threads(trace)))
    issue = next(lane)
    while not isinstance(issue, Simulation):
        issue = lane.send((issue.begin_s, issue.begin_s
                           + collective_time(issue.op, issue.nbytes, ranks, link)))
    return issue


@dataclass(frozen=True)
class _Issue:
    """A rank's simulation asks when the collective it issues at `begin_s` ends."""
    op: str
    kind: str              # comm.collective_kind
    nbytes: int
    begin_s: float         # when this rank's operands and comm lane are ready
    peer: int | None       # p2p: the other rank


def simulate_ranks(traces, schedules, machine="cpu-disk", *, link,
                   ranks_per_node: int | None = None) -> list[Simulation]:
    """Simulate every rank of one distributed step together: one trace and schedule per
    rank (rank r at index r), `link` an Interconnect or preset name of
    outcore.simulate.comm. Each rank runs as `simulate` runs it, with one difference: a
    collective starts only when every rank has issued it (the k-th collective of each rank
    is one operation), and a point-to-point transfer only when both its sender and its
    receiver have (the k-th c10d.send from a to b meets the k-th recv_ on b from a); each
    side's comm lane is busy until it ends. So a rank waits for a slower one, as under
    torchrun, and a pipeline's bubble appears. Host time then counts only its CPU time
    (Machine.host_waits=False): the waits are what this models.

    ranks_per_node: how many of the ranks share one machine's cores (default: all of
    them, as `torchrun --nproc-per-node N` on one host). With no more cores than that
    (Machine.cores), helper threads take their CPU from compute: NOTE [No core to spare].

    Collectives are matched within one process group of all ranks; a step whose ranks
    issue them over subgroups (2-D parallelism) is not modelled."""
    m = get_machine(machine)
    if m.host_time:
        m = replace(m, host_waits=False)
    traces, schedules = list(traces), list(schedules)
    for r, (trace, schedule) in enumerate(zip(traces, schedules)):
        require_trace(trace, f"simulate_ranks (rank {r})")
        require_schedule(schedule, f"simulate_ranks (rank {r})")
    n = len(traces)
    if n < 1 or len(schedules) != n:
        raise OutcoreError(f"simulate_ranks needs one schedule per trace; got {n} traces and "
                           f"{len(schedules)} schedules")
    link = interconnect(link)
    per_node = n if ranks_per_node is None else ranks_per_node
    if isinstance(per_node, bool) or not isinstance(per_node, int) or not 1 <= per_node <= n:
        raise OutcoreError(f"simulate_ranks: ranks_per_node must be an integer from 1 to the "
                           f"{n} ranks, got {ranks_per_node!r}")
    contended = m.no_core_to_spare(per_node, max(trace_threads(t) for t in traces))
    lanes = [_rank_lane(t, s, m, link, contended) for t, s in zip(traces, schedules)]
    results: list = [None] * n
    waiting: list = [None] * n          # rank -> its pending _Issue
    counts = [dict() for _ in range(n)]  # rank -> {match key: how many it issued}
    keys: list = [None] * n             # rank -> the match key of its pending issue

    def advance(r, value=None):
        out = next(lanes[r]) if value is None else lanes[r].send(value)
        if isinstance(out, Simulation):
            results[r], waiting[r] = out, None
            return
        waiting[r] = out
        keys[r] = _match_key(out, r, n)
        counts[r][keys[r]] = counts[r].get(keys[r], 0) + 1

    for r in range(n):
        advance(r)
    while any(w is not None for w in waiting):
        progressed = False
        for r in range(n):
            issue = waiting[r]
            if issue is None:
                continue
            group = _partners(r, keys, counts, waiting, n)
            if group is None:
                continue
            begin = max(waiting[q].begin_s for q in group)
            if issue.kind == "p2p":
                end = begin + p2p_time(max(waiting[q].nbytes for q in group), link)
            else:
                end = begin + collective_time(issue.op, max(waiting[q].nbytes for q in group),
                                              n, link)
            for q in group:
                advance(q, (begin, end))
            progressed = True
        if not progressed:
            pending = "; ".join(f"rank {r} waits in {w.op}" for r, w in enumerate(waiting)
                                if w is not None)
            raise OutcoreError(f"simulate_ranks: the ranks' traces do not match ({pending}, and "
                               "no other rank issues the same operation); record every rank's "
                               "same iteration, with the same process group")
    return results


def _match_key(issue: _Issue, rank: int, ranks: int):
    """What pairs an issue with the other ranks': a collective by its kind, a send or
    receive by (sender, receiver)."""
    if issue.kind != "p2p":
        return ("collective",)
    peer = issue.peer
    if peer is None:
        if ranks != 2:
            raise OutcoreError(f"simulate_ranks: rank {rank}'s {issue.op} does not say which rank "
                               "it talks to (a trace recorded before outcore kept it); record "
                               "the ranks again")
        peer = 1 - rank
    if not 0 <= peer < ranks or peer == rank:
        raise OutcoreError(f"simulate_ranks: rank {rank}'s {issue.op} talks to rank {peer}, but "
                           f"the simulation has ranks 0..{ranks - 1}")
    sending = issue.op.startswith("c10d.send")
    return ("p2p", rank, peer) if sending else ("p2p", peer, rank)


def _partners(rank, keys, counts, waiting, ranks):
    """The ranks that take part in `rank`'s pending issue once all of them have issued
    it (the same key, the same count), or None while one is still missing."""
    key = keys[rank]
    group = range(ranks) if key[0] == "collective" else (key[1], key[2])
    for q in group:
        if waiting[q] is None or keys[q] != key or counts[q][key] != counts[rank][key]:
            return None
    return list(group)


def _rank_lane(trace, schedule, m, link, contended=False):
    """One rank's replay as a generator: it yields an _Issue for each collective (with a
    link) and is sent (start, end) of that collective; it yields the Simulation last.
    contended: no core to spare for helper threads (NOTE [No core to spare])."""
    helpers = _HelperWork()               # when the mover and gloo need CPU, and how much
    transfer_cpu = m.transfer_cpu_share if contended else 0.0
    comm_cpu = link.cpu_share if contended and link is not None else 0.0
    comm_free = 0.0                       # when the comm lane is next free
    comm_done: dict[int, float] = {}      # array -> when the collective touching it ends
    collectives = []
    arrays = trace.arrays
    t = 0.0
    # When each link is next free; a shared link is one lane for both directions.
    lane_in, lane_out = ("link", "link") if m.shared_link else ("in", "out")
    free = {lane_in: 0.0, lane_out: 0.0}
    in_done: dict[int, float] = {}
    out_done: dict[int, float] = {}
    transfers = []
    stalls, starts, computes, plain = [], [], [], []
    in_core = contention = recompute = 0.0
    for i, fn in enumerate(trace.functions):
        stall = 0.0
        for act in schedule.begin[i]:
            a = act.array
            if act.kind == WAIT:
                done = out_done.pop(a)
                if done > t:
                    stall += done - t
                    t = done
            elif act.kind == SWAP_IN:
                nb = arrays[a].nbytes
                start = max(t, free[lane_in])
                free[lane_in] = in_done[a] = m.transfer_end(nb, "in", start, free[lane_out])
                transfers.append(Transfer(a, "in", nb, start, in_done[a]))
                helpers.add(lane_in, start, in_done[a], transfer_cpu)
        ready = t
        for acc in fn.accesses:
            done = in_done.pop(acc.array, None)
            if done is not None and done > ready:
                ready = done
            # An array a collective is still reducing / gathering / sending is not ready.
            done = comm_done.pop(acc.array, None) if comm_done else None
            if done is not None and done > ready:
                ready = done
        stall += ready - t
        starts.append(ready)
        kind = collective_kind(fn.op) if link is not None else None
        # A collective's op runs on the comm lane; the host runs what comes before it
        # (Machine.host_part: the framework's Python, the executor's cost per op).
        compute = m.host_part(fn) if kind is not None else m.compute_time(fn)
        in_core += compute
        if fn.repeats is not None:
            recompute += compute
        plain.append(0.0 if fn.repeats is not None else compute)
        if compute > 0.0 and helpers:      # the core shared half and half with the helpers
            lost = min(helpers.need(ready, ready + compute), compute)
            contention += lost
            compute += lost
        if kind is not None:
            # Issued on the comm lane once its operands are there and that host part ran.
            touched = list(dict.fromkeys(fn.arrays()))
            nb = collective_bytes(kind, [arrays[a].nbytes for a in touched])
            begin, comm_free = yield _Issue(fn.op, kind, nb, max(ready + compute, comm_free),
                                            fn.peer)
            for a in touched:
                comm_done[a] = comm_free
            collectives.append(Transfer(touched[0] if touched else -1, "comm", nb, begin,
                                        comm_free))
            helpers.add("comm", begin, comm_free, comm_cpu)
        computes.append(compute)
        t = ready + compute
        for act in schedule.end[i]:
            a = act.array
            if act.kind == SWAP_OUT:
                nb = arrays[a].nbytes
                start = max(t, free[lane_out], comm_done.get(a, 0.0))
                free[lane_out] = out_done[a] = m.transfer_end(nb, "out", start, free[lane_in])
                transfers.append(Transfer(a, "out", nb, start, out_done[a]))
                helpers.add(lane_out, start, out_done[a], transfer_cpu)
            elif act.kind == WAIT:
                done = out_done.pop(a)
                if done > t:
                    stall += done - t
                    t = done
        stalls.append(stall)
    # The step is over when its last collective is (a rank cannot start the next one
    # before its gradients are reduced); that wait counts as the last function's stall.
    if comm_free > t and stalls:
        stalls[-1] += comm_free - t
        t = comm_free
    start_set, end_set = set(schedule.resident_at_start), set(schedule.resident_at_end)
    state = [a for a in arrays if a.kind == "persistent" and a.existed_before]
    boundary = (sum(m.transfer_time(a.nbytes, "out") for a in state
                    if a.id in end_set and a.id not in start_set)
                + sum(m.transfer_time(a.nbytes, "in") for a in state
                      if a.id in start_set and a.id not in end_set))
    yield Simulation(machine=m.name, step_time_s=t, in_core_time_s=in_core, stall_s=tuple(stalls),
                     start_s=tuple(starts), compute_s=tuple(computes), plain_s=tuple(plain),
                     peak_bytes=schedule.peak_bytes,
                     bytes_in=schedule.bytes_in, bytes_out=schedule.bytes_out,
                     transfers=tuple(transfers), shared_link=m.shared_link, boundary_s=boundary,
                     comm_s=sum(c.end_s - c.start_s for c in collectives),
                     collectives=tuple(collectives), contention_s=contention,
                     recompute_s=recompute)


class _HelperWork:
    """The spans during which helper threads need CPU, per lane (in, out or one shared
    link, comm), each with the CPU share it needs. A lane's spans come in time order and
    never overlap (a lane moves one thing at a time), and the functions that ask come in
    time order too, so each lane keeps a cursor: `need` costs amortized O(1)."""
    __slots__ = ("lanes",)

    def __init__(self):
        self.lanes: dict[str, list] = {}    # lane -> [starts, ends, shares, cursor]

    def __bool__(self) -> bool:
        return bool(self.lanes)

    def add(self, lane: str, start: float, end: float, share: float) -> None:
        if share > 0.0 and end > start:
            spans = self.lanes.setdefault(lane, [[], [], [], 0])
            spans[0].append(start)
            spans[1].append(end)
            spans[2].append(share)

    def need(self, a: float, b: float) -> float:
        """CPU seconds the helpers need during [a, b] (a never decreases between calls)."""
        total = 0.0
        for spans in self.lanes.values():
            starts, ends, shares, k = spans
            while k < len(ends) and ends[k] <= a:
                k += 1
            spans[3] = k
            while k < len(starts) and starts[k] < b:
                total += shares[k] * (min(ends[k], b) - max(starts[k], a))
                k += 1
        return total


def _comm_args(comm):
    """(Interconnect, ranks) from simulate's `comm` argument, or (None, 1) without one."""
    if comm is None:
        return None, 1
    try:
        link, ranks = comm
    except (TypeError, ValueError):
        raise OutcoreError(f"comm must be (interconnect, ranks), e.g. ('nvlink-a100', 8); "
                           f"got {comm!r}") from None
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise OutcoreError(f"comm ranks must be an integer >= 1, got {ranks!r}")
    return interconnect(link), ranks
