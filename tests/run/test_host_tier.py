"""The host tier (`offload="host"`) without a GPU: the pool's accounting, the host
mover's bookkeeping and its spill to disk, and the whole executor on the emulated link
(run/movers/host.py: CPU threads stand in for the copy streams). What needs CUDA itself
(streams, events, page locking, the real allocator) is what
benchmarks/gpu_tier_check.py checks on a GPU machine; nothing here claims it."""
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import outcore
from outcore.memory import ALIGNMENT
from outcore.memory.host_pool import HostPool
from outcore.run.movers import host
from outcore.run.movers.disk import DiskMover
from outcore.run.movers.host import EmulatedLink, HostMover

from ..trace.helpers import assert_bitwise_equal, state_of
from .twins import assert_same_training, budgets, build, steady_trace, train_twins

MiB = 2**20


@pytest.fixture
def emulated(monkeypatch):
    """offload="host" on this machine: the emulated link instead of a CUDA device."""
    monkeypatch.setattr(host, "default_link", EmulatedLink)


# -- the pool ------------------------------------------------------------------------------
def test_pool_locks_exact_segments_and_no_power_of_two():
    locked, unlocked = [], []
    pool = HostPool(3 * MiB + 5, pin=lambda a, n: locked.append((a, n)),
                    unpin=unlocked.append, segment_bytes=MiB)
    assert pool.limit == 3 * MiB                     # whole pages only
    a = pool.allocate(MiB + 1)                       # larger than a segment: its own size
    assert a.length == MiB + ALIGNMENT and pool.capacity == MiB + ALIGNMENT
    b = pool.allocate(100)                           # a fresh 1 MiB segment
    assert b.length == ALIGNMENT and pool.capacity == 2 * MiB + ALIGNMENT
    c = pool.allocate(600 * 1024)                    # fits in b's segment
    assert c.segment == b.segment and pool.capacity == 2 * MiB + ALIGNMENT
    assert pool.in_use == a.length + b.length + c.length
    assert [n for _, n in locked] == [MiB + ALIGNMENT, MiB]   # exact sizes, page-locked once
    assert pool.allocate(MiB) is None and pool.refused == 1   # only 1 MiB - 1 page is left
    d = pool.allocate(MiB - ALIGNMENT)               # the last segment: what the limit leaves
    assert d is not None and pool.capacity == pool.limit
    pool.free(b)
    pool.free(c)
    assert pool.allocate(700 * 1024).segment == b.segment    # freed runs coalesce and serve
    assert pool.peak_capacity == 3 * MiB
    pool.close()
    assert sorted(unlocked) == sorted(a for a, _ in locked)   # every segment unlocked


def test_pool_with_no_room_refuses_everything():
    pool = HostPool(0)
    assert pool.allocate(1) is None and pool.capacity == 0
    with pytest.raises(ValueError):
        HostPool(-1)


def test_a_reservation_too_large_to_lock_at_once_leaves_the_pool_growing_in_pieces():
    """A machine that page-locks 4 MiB at a time but not 16 MiB at once: the reservation
    fails with a warning and the pool still grows by segments (helper-67: the limit fell
    to 0, and the whole host tier spilled to disk for good)."""
    def pin(address, size):
        if size > 4 * MiB:
            raise outcore.OutcoreError("page-locking refused")
    pool = HostPool(16 * MiB, pin=pin, unpin=lambda address: None, segment_bytes=2 * MiB)
    with pytest.warns(RuntimeWarning, match="could not reserve 16.00 MiB at once.*2.00 MiB at a time"):
        pool.reserve(16 * MiB)
    assert pool.limit == 16 * MiB and pool.capacity == 0
    extents = [pool.allocate(MiB) for _ in range(6)]
    assert all(e is not None for e in extents) and pool.capacity == 6 * MiB
    pool.close()


def test_a_segment_that_cannot_be_locked_caps_the_pool_and_warns():
    """Page-locking refused (the machine is out of lockable memory): the pool stays at
    what it holds, says so, and the extent spills instead of failing the step."""
    calls = []

    def pin(address, size):
        calls.append(size)
        if len(calls) > 1:
            raise outcore.OutcoreError("page-locking failed (CUDA error 2)")
    pool = HostPool(8 * MiB, pin=pin, unpin=lambda a: None, segment_bytes=MiB)
    assert pool.allocate(MiB) is not None
    with pytest.warns(RuntimeWarning, match="could not grow.*spills to disk"):
        assert pool.allocate(MiB) is None
    assert pool.limit == pool.capacity == MiB and pool.allocate(1) is None
    pool.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3 * MiB)), max_size=40),
       st.integers(0, 8 * MiB))
def test_pool_accounting_on_random_sequences(ops, limit):
    """NOTE [Host pool accounting]: live extents never overlap, in_use is their sum,
    capacity never exceeds the limit, and a refusal means no segment had the room and
    no new segment would fit."""
    pool = HostPool(limit, segment_bytes=MiB)
    live = []
    try:
        for free_one, nbytes in ops:
            if free_one and live:
                pool.free(live.pop(len(live) // 2))
                continue
            got = pool.allocate(nbytes)
            length = -(-nbytes // ALIGNMENT) * ALIGNMENT
            if got is None:
                assert length > pool.limit - pool.capacity
                assert all(n < length for seg in pool.segments
                           for _, n in seg.allocator.free_runs())
                continue
            assert got.length == length
            live.append(got)
            assert pool.capacity <= pool.limit
            assert pool.in_use == sum(e.length for e in live)
            spans = sorted((e.address, e.address + e.length) for e in live)
            assert all(a_end <= b for (_, a_end), (b, _) in zip(spans, spans[1:]))
    finally:
        pool.close()


# -- the mover -----------------------------------------------------------------------------
def _mover(tmp_path, host_budget):
    return HostMover(EmulatedLink(), host_budget, DiskMover(str(tmp_path)), segment_bytes=MiB,
                     staging_bytes=64 * 1024)


@pytest.mark.parametrize("nbytes", [1, 4095, 4096, 64 * 1024 + 3, 300_001])
@pytest.mark.parametrize("host_budget", [0, 4 * MiB])
def test_round_trip_on_either_tier(tmp_path, nbytes, host_budget):
    """Through the pool, or (host_budget 0) spilled to disk through the staging buffer in
    chunks: the bytes come back as they were, and a storage's neighbours are untouched."""
    mover = _mover(tmp_path, host_budget)
    try:
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        keep = src.clone()
        extent = mover.allocate(nbytes)
        assert extent.tier == ("host" if host_budget else "disk")
        storage = src.untyped_storage()
        mover.write(storage.data_ptr(), nbytes, extent, storage).result()
        storage.resize_(0)
        storage.resize_(nbytes)
        mover.read(storage.data_ptr(), nbytes, extent, storage).result()
        assert torch.equal(src, keep)
        mover.free(extent)
        assert mover.pool.in_use == 0
        assert mover.spilled_bytes == (0 if host_budget else nbytes)
    finally:
        mover.close()


class _Held:
    """A transfer that finishes when the test says so."""

    def __init__(self):
        self.finished = threading.Event()

    def done(self):
        return self.finished.is_set()

    def result(self):
        self.finished.wait()


class _ManualLink(EmulatedLink):
    def __init__(self):
        super().__init__()
        self.pending = []

    def copy_in(self, storage, host_address, nbytes):
        held = _Held()
        self.pending.append(held)
        return held


def test_an_extent_is_reused_only_after_its_transfer(tmp_path):
    """NOTE [Stream-ordered transfers] 4: freeing an extent a swap-in still reads from
    quarantines it; the pool hands it out again only once that copy finished."""
    link = _ManualLink()
    mover = HostMover(link, ALIGNMENT, DiskMover(str(tmp_path)), segment_bytes=ALIGNMENT)
    try:
        storage = torch.zeros(16, dtype=torch.uint8).untyped_storage()
        first = mover.allocate(16)
        mover.read(storage.data_ptr(), 16, first, storage)      # in flight
        mover.free(first)
        assert mover.pool.in_use == ALIGNMENT                   # not given back yet
        link.pending[0].finished.set()
        again = mover.allocate(16)                              # now it is
        assert again.tier == "host" and again.place.address == first.place.address
        mover.free(again)
        # A full pool waits for a quarantined extent rather than spill to disk.
        third = mover.allocate(16)
        mover.read(storage.data_ptr(), 16, third, storage)
        mover.free(third)
        threading.Timer(0.05, link.pending[1].finished.set).start()
        assert mover.allocate(16).tier == "host"
    finally:
        for held in link.pending:
            held.finished.set()
        mover.close()


def test_quarantine_tells_extents_of_different_segments_apart(tmp_path):
    """Two extents at the same offset of two segments: freeing the one whose swap-in is
    still reading keeps it out of the pool, whatever the other's transfer did."""
    link = _ManualLink()
    mover = HostMover(link, 2 * ALIGNMENT, DiskMover(str(tmp_path)), segment_bytes=ALIGNMENT)
    try:
        storage = torch.zeros(16, dtype=torch.uint8).untyped_storage()
        busy, idle = mover.allocate(16), mover.allocate(16)
        assert busy.place.segment != idle.place.segment and busy.offset == idle.offset == 0
        mover.read(storage.data_ptr(), 16, busy, storage)
        mover.read(storage.data_ptr(), 16, idle, storage)
        link.pending[1].finished.set()             # only the second one finished
        mover.free(busy)
        mover.free(idle)
        again = mover.allocate(16)
        assert again.place.address == idle.place.address
        assert mover.pool.in_use == 2 * ALIGNMENT  # busy's extent is still quarantined
    finally:
        for held in link.pending:
            held.finished.set()
        mover.close()


# -- OutOfCore(offload="host") ------------------------------------------------------------
def test_offload_host_needs_cuda_and_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    with pytest.raises(outcore.OutcoreError, match="needs a CUDA device.*offload='disk'"):
        outcore.OutOfCore(budget="1GiB", offload="host")


def test_bad_host_arguments_are_clear(emulated, tmp_path):
    with pytest.raises(outcore.OutcoreError, match="host_budget.*offload='disk' has none"):
        outcore.OutOfCore(budget="1GiB", host_budget="1GiB")
    with pytest.raises(outcore.OutcoreError, match="state_dir is not supported with offload='host'"):
        outcore.OutOfCore(budget="1GiB", offload="host", state_dir=str(tmp_path / "s"))
    with pytest.raises(outcore.OutcoreError, match="host_budget must be a byte count >= 0.*negative"):
        outcore.OutOfCore(budget="1GiB", offload="host", host_budget=-1)
    with pytest.raises(outcore.OutcoreError, match="unknown offload 'gpu'.*'host'"):
        outcore.OutOfCore(budget="1GiB", offload="gpu")
    assert list(tmp_path.iterdir()) == []


def test_a_tensor_on_another_device_is_refused():
    """Residency NOTE 6: a storage on a device the mover cannot reach is refused with an
    error naming both; a CPU one in a GPU step stays put."""
    from outcore.run.residency import Residency

    class Storage:
        def __init__(self, kind):
            self.device = torch.device(kind)

        def nbytes(self):
            return 4096

    class Mover:
        device_type = "cuda"

    class OnDevice0(Mover):
        device_index = 0

    res = Residency(Mover())
    assert res._elsewhere(Storage("cpu")) is True
    assert res._elsewhere(Storage("cuda")) is False
    res = Residency(OnDevice0())
    assert res._elsewhere(Storage("cuda:0")) is False
    with pytest.raises(outcore.OutcoreError, match="cuda:1.*one OutOfCore manages one device"):
        res._elsewhere(Storage("cuda:1"))
    res.mover.device_type = "cpu"
    with pytest.raises(outcore.OutcoreError, match="cuda tensor.*offload='host' CUDA tensors"):
        res._elsewhere(Storage("cuda"))


def test_cpu_storages_in_a_gpu_step_stay_put_outside_the_budget():
    """Residency NOTE 6 with real storages: under a mover of CUDA tensors, a CPU storage
    is tracked `elsewhere` (in no counter, never moved, its death retired cleanly)."""
    from outcore.run.residency import Residency

    class Mover:
        device_type, device_index = "cuda", 0

    res = Residency(Mover())
    t = torch.ones(1000)
    entry = res.track(t.untyped_storage())
    assert entry.elsewhere and entry.pinned and res.resident == res.pinned_resident == 0
    res.evict(entry)
    res.evict_lru(0, set())
    assert entry.state is outcore.states.FAST and res.recount() == (0, 0)
    assert torch.equal(t, torch.ones(1000))
    del t
    res.recount()                           # reaps the dead entry
    assert res.resident == 0 and not res.entries


def test_cuda_storages_move_though_pytorch_calls_them_shared():
    """Residency NOTE 7: PyTorch's `is_shared()` is True for every CUDA storage; asked of
    one, it pinned every array of a GPU step (all 'never move', InfeasibleBudget at the
    first recording on an H200, docs/gpu-check.md). Shared memory is a CPU matter."""
    from outcore.run.residency import Residency, movable

    class CudaStorage:                    # what a real CUDA storage answers
        device = torch.device("cuda", 0)
        _cdata = 12345

        def resizable(self):
            return True

        def is_shared(self):
            return True

        def nbytes(self):
            return 4096

    class Mover:
        device_type, device_index = "cuda", 0

    storage = CudaStorage()
    assert movable(storage)
    res = Residency(Mover())
    entry = res.track(storage)
    assert not entry.pinned and not entry.elsewhere and res.pinned_resident == 0
    shared = torch.ones(1000)
    shared.share_memory_()
    assert not movable(shared.untyped_storage())       # a CPU one in shared memory stays


_trained_runs = {}


def _train_host(name, host_budget, monkeypatch):
    """Plain and host-tier twins, Adam at the tight budget, 4 iterations. Returns a dict:
    the budget, the twins' result, the report, the pool's figures, the bytes spilled,
    the fast tier's bytes after each iteration, what the plan needs of the host tier
    (mover.reserved) and leaves there between iterations (lasting_slow_bytes), and the
    pool's bytes in use at each allocation while a plan replayed."""
    key = (name, host_budget)
    if key in _trained_runs:
        return _trained_runs[key]
    budget = budgets(steady_trace(name, "adam"))["tight"]
    used, real_taken, current = [], HostPool._taken, []

    def taken(pool, *args):          # the pool's bytes in use while a plan replays
        out = real_taken(pool, *args)
        if current[0].schedule is not None:
            used.append(pool.in_use)
        return out
    monkeypatch.setattr(HostPool, "_taken", taken)
    plain, managed = build(name, "adam"), build(name, "adam")
    losses_plain, losses_ooc, between = [], [], []
    with outcore.OutOfCore(budget=budget, offload="host", host_budget=host_budget,
                           min_move_bytes=0) as ooc:
        current.append(ooc)
        for it in range(4):
            torch.manual_seed(100 + it)
            losses_plain.append(plain.step().detach().clone())
            torch.manual_seed(100 + it)
            with ooc.iteration():
                loss = managed.step()
            losses_ooc.append(loss.detach().clone())
            between.append(ooc._res.resident)
        mover = ooc._mover
        run = dict(budget=budget, report=ooc.report(), between=between, used=used,
                   result=(state_of(plain.model, plain.optimizer),
                           state_of(managed.model, managed.optimizer), losses_plain, losses_ooc),
                   pool=(mover.pool.peak_in_use, mover.pool.peak_capacity, mover.pool.limit),
                   spilled=mover.spilled_bytes, needed=mover.reserved,
                   lasting=host.lasting_slow_bytes(ooc.trace, ooc.schedule))
        assert ooc.schedule.options["machine"] == ooc.machine == "h100-80gb"   # a GPU model
    _trained_runs[key] = run
    return run


@pytest.mark.parametrize("tier", ["host", "spill"])
@pytest.mark.parametrize("name", ["resnet18-tiny", "gpt2-tiny"])
def test_bitwise_equal_on_three_tiers(emulated, monkeypatch, name, tier):
    """Adam at the tight budget, with the host tier unbounded ("host"), or ("spill") with
    host_budget the state left there between iterations plus a quarter of what the step
    adds, so that the rest of the step spills to disk. Bitwise equal to plain PyTorch;
    the fast tier within the budget during the replays and between every iteration; the
    pool within host_budget and grown to the plan's need once planned."""
    host_budget = None
    if tier == "spill":
        first = _train_host(name, None, monkeypatch)
        host_budget = first["lasting"] + (first["needed"] - first["lasting"]) // 4
    run = _train_host(name, host_budget, monkeypatch)
    budget, report = run["budget"], run["report"]
    assert_same_training(run["result"])
    replays = [it for it in report.iterations if it.mode == "replay"]
    assert replays and all(it.peak_resident <= budget and it.deviation is None
                           for it in replays), str(report)
    assert all(it.bytes_written > 0 for it in replays), str(report)
    assert max(run["between"][2:]) <= budget, run["between"]
    peak_in_use, peak_capacity, limit = run["pool"]
    assert peak_capacity <= limit and peak_in_use <= peak_capacity
    # host_bytes_needed bounds what the replays hold, and the pool was grown to it once
    # planned (or to host_budget), not segment by segment during the replays.
    assert max(run["used"], default=0) <= run["needed"]
    assert peak_capacity >= min(run["needed"], limit)
    assert (run["spilled"] > 0) == (tier == "spill")
    assert "pool" in report.swap and "spilled" in report.swap


def test_state_larger_than_the_host_budget_is_refused_and_loses_nothing(emulated):
    """host_budget 0: the plan would leave state on the slow tier between iterations,
    which on a GPU cannot be mapped from the disk: HostBudgetTooSmall when the recording
    that planned ends (that step completed, bitwise), and the next iteration does not
    start."""
    budget = budgets(steady_trace("resnet18-tiny", "adam"))["tight"]
    plain, managed = build("resnet18-tiny", "adam"), build("resnet18-tiny", "adam")
    with outcore.OutOfCore(budget=budget, offload="host", host_budget=0, min_move_bytes=0) as ooc:
        with pytest.raises(outcore.HostBudgetTooSmall, match="Raise host_budget to at least") as err:
            for _ in range(4):
                plain.step()
                with ooc.iteration():
                    managed.step()
        assert err.value.needed_bytes > 0 == err.value.host_budget
        assert_bitwise_equal(state_of(plain.model, plain.optimizer),
                             state_of(managed.model, managed.optimizer))
        with pytest.raises(outcore.HostBudgetTooSmall, match="did not start"):
            with ooc.iteration():
                managed.step()
    assert_bitwise_equal(state_of(plain.model, plain.optimizer),
                         state_of(managed.model, managed.optimizer))


def test_without_swap_data_ptr_state_the_gpu_cannot_hold_is_refused(emulated, monkeypatch):
    """A PyTorch without `UntypedStorage._swap_data_ptr_` (2.11) reads the state left on
    the host tier back at every iteration's end: where the fast tier has not that much
    free, the recording that planned ends with HostBudgetTooSmall naming the upgrade
    (helper-67: on the H200 the paper step's iterations ended in CUDA out of memory),
    that step completed bitwise, and nothing later starts."""
    monkeypatch.setattr(outcore.aten, "SWAPS_DATA_PTR", False)
    monkeypatch.setattr(EmulatedLink, "free_bytes", lambda self: 4096)
    budget = budgets(steady_trace("resnet18-tiny", "adam"))["tight"]
    plain, managed = build("resnet18-tiny", "adam"), build("resnet18-tiny", "adam")
    with outcore.OutOfCore(budget=budget, offload="host", min_move_bytes=0) as ooc:
        with pytest.raises(outcore.HostBudgetTooSmall, match="no UntypedStorage._swap_data_ptr_"
                           ".*at most .* is free. Upgrade PyTorch"):
            for _ in range(4):
                plain.step()
                with ooc.iteration():
                    managed.step()
        assert_bitwise_equal(state_of(plain.model, plain.optimizer),
                             state_of(managed.model, managed.optimizer))
        with pytest.raises(outcore.HostBudgetTooSmall, match="did not start"):
            with ooc.iteration():
                managed.step()


def test_state_stays_on_the_host_tier_between_iterations(emulated, tmp_path):
    """NOTE [Host tier between iterations]: state the plan leaves on the host tier stays
    there (MAPPED, not read back into the fast tier), reads and saves see the right
    values, writes between iterations are honoured by the next one, and after close()
    the tensors are still whole."""
    from outcore.states import MAPPED
    trace = steady_trace("resnet18-tiny", "sgd")
    budget = budgets(trace)["half"]
    plain, managed = build("resnet18-tiny", "sgd"), build("resnet18-tiny", "sgd")
    ooc = outcore.OutOfCore(budget=budget, offload="host", min_move_bytes=0)
    for it in range(5):
        plain.step()
        with ooc.iteration():
            managed.step()
        res = ooc._res
        assert res.resident <= budget
        mapped = {e.key for e in res.entries.values() if e.state is MAPPED}
        params = list(zip(managed.model.parameters(), plain.model.parameters()))
        # Parameters and momentum: the plan keeps in the fast tier what the next step
        # uses first (edges.end_keep_set), so what it leaves on the host tier may be
        # either.
        state = params + [(managed.optimizer.state[p]["momentum_buffer"],
                           plain.optimizer.state[q]["momentum_buffer"]) for p, q in params
                          if p in managed.optimizer.state]
        out = [(p, q) for p, q in state if p.untyped_storage()._cdata in mapped]
        if ooc.schedule is not None:
            assert out, "a replay left no state on the host tier"
        for p, q in state:
            assert torch.equal(p, q) and p.sum().item() == q.sum().item()
        path = tmp_path / f"state{it}.pt"
        ooc.save(managed.model.state_dict(), path)
        loaded = torch.load(path)
        assert all(torch.equal(loaded[k], v) for k, v in plain.model.state_dict().items())
        if out:                                   # a write into state left on the host tier
            with torch.no_grad():
                out[0][0].mul_(0.5)
                out[0][1].mul_(0.5)
            assert torch.equal(out[0][0], out[0][1])
    ooc.close()
    assert_bitwise_equal(state_of(plain.model, plain.optimizer),
                         state_of(managed.model, managed.optimizer))
    plain.step()
    managed.step()                                # plain PyTorch again, on the same tensors
    assert_bitwise_equal(state_of(plain.model, plain.optimizer),
                         state_of(managed.model, managed.optimizer))


def _host_points():
    from outcore.run.movers.host import HostMapping
    from outcore.run.residency import Residency
    return [(HostMover, "write", 5), (HostMover, "read", 4), (HostMover, "free", 6),
            (HostMover, "allocate", 3), (HostMover, "map", 3), (HostMover, "promote", 2),
            (HostMapping, "unmap", 3), (Residency, "_wait", 10), (Residency, "map_slow", 3),
            (Residency, "unmap_all", 3)]


@pytest.mark.parametrize("point", range(10))
def test_sigint_inside_the_host_mover(emulated, monkeypatch, point):
    """Ctrl-C landing at any of these calls of the host tier's executor: the iteration
    ends with KeyboardInterrupt, every tensor is whole, the counters are exact, nothing
    is left unusable between iterations, and training goes on bitwise equal to plain
    PyTorch from there (the disk tier's version: test_interrupts.py)."""
    from .test_interrupts import interrupted_then_plain, warm
    owner, name, n = _host_points()[point]
    budget = budgets(steady_trace("mlp-tiny", "adam"))["tight"]
    w = warm("mlp-tiny", "adam")
    with outcore.OutOfCore(budget=budget, offload="host", min_move_bytes=0) as ooc:
        interrupted_then_plain(monkeypatch, w, ooc, owner, name, n,
                               again=lambda: monkeypatch.setattr(host, "default_link", EmulatedLink))



def test_copies_that_lag_change_nothing(monkeypatch):
    """Races widened on the CPU: every emulated copy first sleeps up to 3 ms (a copy
    engine's latency), and part of each step spills through the staging buffers: the
    executor's waits, the quarantine and the spill ordering keep training bitwise."""
    monkeypatch.setattr(host, "default_link", EmulatedLink)
    first = _train_host("gpt2-tiny", None, monkeypatch)
    host_budget = first["lasting"] + (first["needed"] - first["lasting"]) // 4
    monkeypatch.setattr(host, "default_link", lambda: EmulatedLink(jitter_s=0.003, seed=7))
    with outcore.OutOfCore(budget=first["budget"], offload="host", host_budget=host_budget,
                           min_move_bytes=0) as ooc:
        result = train_twins(lambda: build("gpt2-tiny", "adam"), lambda w: w.step(), ooc, iterations=4)
        replays = [it for it in ooc.report().iterations if it.mode == "replay"]
        spilled = ooc._mover.spilled_bytes
    assert_same_training(result)
    assert replays and all(it.bytes_read > 0 for it in replays) and spilled > 0


def test_a_cpu_step_under_a_gpu_offload_is_refused_with_its_state_intact(monkeypatch):
    """offload="host" manages CUDA tensors: a step whose tensors are all on the CPU would
    run with the budget bounding nothing. Refused when the recording ends (that step
    ran as plain PyTorch, bitwise), not silently."""
    class CudaLike(EmulatedLink):
        device_type = "cuda"                 # what a real CudaLink manages

    monkeypatch.setattr(host, "default_link", CudaLike)
    plain, managed = build("mlp", "sgd"), build("mlp", "sgd")
    with outcore.OutOfCore(budget="1MiB", offload="host") as ooc:
        plain.step()
        with pytest.raises(outcore.OutcoreError, match="none of the step's .* tensors is on that device"):
            with ooc.iteration():
                managed.step()
        assert ooc._res.resident == 0
    assert_bitwise_equal(state_of(plain.model, plain.optimizer),
                         state_of(managed.model, managed.optimizer))
