"""The host tier (`offload="host"`) without a GPU: the pool's accounting, the host
mover's bookkeeping and its spill to disk, and the whole executor on the emulated link
(run/movers/host.py: CPU threads stand in for the copy streams). What needs CUDA itself
(streams, events, page locking, the real allocator) is checked by
benchmarks/gpu_check.py on a GPU machine; nothing here claims it."""
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

    res = Residency(Mover())
    assert res._elsewhere(Storage("cpu")) is True
    assert res._elsewhere(Storage("cuda")) is False
    res.mover.device_type = "cpu"
    with pytest.raises(outcore.OutcoreError, match="cuda tensor.*offload='host' CUDA tensors"):
        res._elsewhere(Storage("cuda"))


_trained_runs = {}


def _train_host(name, which, host_budget, monkeypatch):
    """Plain and host-tier twins, 4 iterations; also the pool's bytes in use at each
    allocation while a plan replayed, and host_bytes_needed of that plan."""
    key = (name, which, host_budget)
    if key not in _trained_runs:
        trace = steady_trace(name, "adam")
        budget = budgets(trace)[which]
        used, real_taken, current = [], HostPool._taken, []

        def taken(pool, *args):          # the pool's bytes in use while a plan replays
            out = real_taken(pool, *args)
            if current[0].schedule is not None:
                used.append(pool.in_use)
            return out
        monkeypatch.setattr(HostPool, "_taken", taken)
        with outcore.OutOfCore(budget=budget, offload="host", host_budget=host_budget,
                               min_move_bytes=0) as ooc:
            current.append(ooc)
            result = train_twins(lambda: build(name, "adam"), lambda w: w.step(), ooc, iterations=4)
            report, mover = ooc.report(), ooc._mover
            pool = (mover.pool.peak_in_use, mover.pool.peak_capacity, mover.pool.limit)
            spilled = mover.spilled_bytes
            assert ooc.schedule.options["machine"] == ooc.machine == "h100-80gb"   # a GPU model
            needed = mover.reserved
        _trained_runs[key] = (budget, result, report, pool, spilled, (needed, used))
    return _trained_runs[key]


@pytest.mark.parametrize("host_budget", [None, "small", 0])
@pytest.mark.parametrize("name", ["resnet18", "gpt2-tiny"])
def test_bitwise_equal_on_three_tiers(emulated, monkeypatch, name, host_budget):
    """Adam at the tight budget: all on the host tier (None), the host tier full and the
    rest spilled to disk ("small": an eighth of the state), or everything on disk (0).
    Bitwise equal to plain PyTorch, replays within the budget, the pool within
    host_budget."""
    if host_budget == "small":
        trace = steady_trace(name, "adam")
        host_budget = sum(a.nbytes for a in trace.arrays if a.kind == "persistent") // 8
    budget, result, report, (peak_in_use, peak_capacity, limit), spilled, (needed, used) = _train_host(
        name, "tight", host_budget, monkeypatch)
    assert_same_training(result)
    replays = [it for it in report.iterations if it.mode == "replay"]
    assert replays and all(it.peak_resident <= budget and it.deviation is None
                           for it in replays), str(report)
    assert all(it.bytes_written > 0 for it in replays), str(report)
    assert peak_capacity <= limit and peak_in_use <= peak_capacity
    # host_bytes_needed bounds what the replays hold, and the pool was grown to it once
    # planned (or to host_budget), not segment by segment during the replays.
    assert max(used, default=0) <= needed
    assert peak_capacity >= min(needed, limit)
    if host_budget is None:
        assert spilled == 0 and peak_in_use > 0
    else:
        assert spilled > 0
        if host_budget == 0:
            assert peak_capacity == 0
    assert "pool" in report.swap and "spilled" in report.swap


def test_interrupted_iteration_on_the_host_tier_loses_nothing(emulated):
    """An exception in the middle of a step under offload="host": every storage whole,
    training goes on bitwise (as test_safety's disk version)."""
    trace = steady_trace("resnet18", "sgd")
    budget = budgets(trace)["half"]

    class Interrupt(Exception):
        pass

    def step(w, interrupt):
        loss = w.loss()
        if interrupt:
            raise Interrupt()
        loss.backward()
        w.optimizer.step()
        w.optimizer.zero_grad()

    plain, managed = build("resnet18", "sgd"), build("resnet18", "sgd")
    with outcore.OutOfCore(budget=budget, offload="host", host_budget=2 * MiB,
                           min_move_bytes=0) as ooc:
        for it in range(5):
            for w, under in ((plain, False), (managed, True)):
                try:
                    if under:
                        with ooc.iteration():
                            step(w, it == 3)
                    else:
                        step(w, it == 3)
                except Interrupt:
                    pass
            for p in managed.model.parameters():
                assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
    assert_bitwise_equal(state_of(plain.model, plain.optimizer),
                         state_of(managed.model, managed.optimizer))


def test_state_stays_on_the_host_tier_between_iterations(emulated, tmp_path):
    """NOTE [Host tier between iterations]: state the plan leaves on the host tier stays
    there (MAPPED, not read back into the fast tier), reads and saves see the right
    values, writes between iterations are honoured by the next one, and after close()
    the tensors are still whole."""
    from outcore.states import MAPPED
    trace = steady_trace("resnet18", "sgd")
    budget = budgets(trace)["half"]
    plain, managed = build("resnet18", "sgd"), build("resnet18", "sgd")
    ooc = outcore.OutOfCore(budget=budget, offload="host", min_move_bytes=0)
    for it in range(5):
        plain.step()
        with ooc.iteration():
            managed.step()
        res = ooc._res
        assert res.resident <= budget
        mapped = {e.key for e in res.entries.values() if e.state is MAPPED}
        params = list(zip(managed.model.parameters(), plain.model.parameters()))
        out = [(p, q) for p, q in params if p.untyped_storage()._cdata in mapped]
        if ooc.schedule is not None:
            assert out, "a replay left no parameter on the host tier"
        for p, q in params:
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
