"""The disk mover's transfers straight between tensor memory and the swap file: every
size and page offset round-trips bitwise, a read never touches memory outside its
destination, and errors and short transfers are handled as with staging."""
import errno
import mmap
import os

import numpy as np
import pytest
import torch

from outcore.errors import OutcoreError
from outcore.memory import ALIGNMENT
from outcore.run.movers import disk
from outcore.run.movers.disk import DiskMover

MiB = 2**20
SIZES = [1, 63, 4095, 4096, 4097, 8 * MiB + 123, 20 * MiB]
GUARD = 2 * ALIGNMENT
MODES = {
    "direct": dict(direct_min_bytes=0),           # every size through the direct path
    "default": dict(),                             # small transfers staged whole
    "buffered": dict(direct=False),
}


@pytest.fixture(scope="module", params=list(MODES))
def mover(request):
    m = DiskMover(**MODES[request.param])
    if request.param != "buffered" and not m.direct:
        m.close()
        pytest.skip("the temp directory's filesystem refuses O_DIRECT")
    assert m.direct == (request.param != "buffered")
    yield m
    m.close()


class Region:
    """`nbytes` at `offset` bytes past a page boundary, inside a private mapping with
    guard bytes on both sides."""

    def __init__(self, nbytes: int, offset: int, fill: int | None = None, seed: int = 0):
        self.map = mmap.mmap(-1, offset + nbytes + 2 * GUARD)
        self.all = np.frombuffer(self.map, dtype=np.uint8)
        self.start = GUARD + offset
        self.address = self.all.ctypes.data + self.start
        assert (self.all.ctypes.data % ALIGNMENT, self.address % ALIGNMENT) == (0, offset % ALIGNMENT)
        if fill is None:
            self.all[:] = np.random.default_rng(seed).integers(0, 256, self.all.size, dtype=np.uint8)
        else:
            self.all[:] = fill
        self.nbytes = nbytes

    @property
    def bytes(self) -> np.ndarray:
        return self.all[self.start:self.start + self.nbytes]


def round_trip(mover, nbytes, src_offset, dst_offset):
    src = Region(nbytes, src_offset, seed=nbytes + src_offset)
    before = src.all.copy()
    extent = mover.allocate(nbytes)
    try:
        mover.write(src.address, nbytes, extent, src).result()
        assert np.array_equal(src.all, before)                      # a write reads only
        dst = Region(nbytes, dst_offset, fill=0xA5)
        mover.read(dst.address, nbytes, extent, dst).result()
        assert np.array_equal(dst.bytes, src.bytes)
        # Nothing outside the destination was written, not even within its pages.
        assert (dst.all[:dst.start] == 0xA5).all()
        assert (dst.all[dst.start + nbytes:] == 0xA5).all()
    finally:
        mover.free(extent)


@pytest.mark.parametrize("nbytes", SIZES)
@pytest.mark.parametrize("src_offset", [0, 64, 3000])
def test_round_trip_same_page_offset(mover, nbytes, src_offset):
    round_trip(mover, nbytes, src_offset, src_offset)


@pytest.mark.parametrize("nbytes", SIZES)
@pytest.mark.parametrize("src_offset,dst_offset", [(64, 0), (0, 64), (64, 4032), (3000, 1000)])
def test_round_trip_other_page_offset(mover, nbytes, src_offset, dst_offset):
    round_trip(mover, nbytes, src_offset, dst_offset)


def test_extent_reused_for_a_grown_storage(mover):
    """A storage that grew within its old extent's length may not fit there at its page
    offset: it is then staged from the extent's start, and still reads back."""
    extent = mover.allocate(3 * MiB)
    try:
        nbytes = extent.length - 10
        src = Region(nbytes, 64, seed=7)
        mover.write(src.address, nbytes, extent, src).result()
        for offset in (64, 0):
            dst = Region(nbytes, offset, fill=0xA5)
            mover.read(dst.address, nbytes, extent, dst).result()
            assert np.array_equal(dst.bytes, src.bytes)
            assert (dst.all[:dst.start] == 0xA5).all() and (dst.all[dst.start + nbytes:] == 0xA5).all()
    finally:
        mover.free(extent)


@pytest.mark.parametrize("nbytes", [100 * 1024, 4097, 32 * MiB + 8])
def test_torch_storage_evicted_and_restored(mover, nbytes):
    """As the Residency does it: write a storage's bytes, resize_(0), resize_ back (the
    memory usually lands elsewhere), read. Covers heap and mmapped allocations."""
    t = torch.empty(nbytes, dtype=torch.uint8).random_(0, 256)
    want = t.clone()
    storage = t.untyped_storage()
    extent = mover.allocate(nbytes)
    try:
        mover.write(storage.data_ptr(), nbytes, extent, storage).result()
        storage.resize_(0)
        other = torch.empty(nbytes + 777, dtype=torch.uint8)     # moves the next allocation
        storage.resize_(nbytes)
        mover.read(storage.data_ptr(), nbytes, extent, storage).result()
        assert torch.equal(t, want)
        del other
    finally:
        mover.free(extent)


def test_busy_time_is_counted(mover):
    w, r = mover.busy_write_s, mover.busy_read_s
    round_trip(mover, 2 * MiB + 5, 64, 64)
    assert mover.busy_write_s > w and mover.busy_read_s > r


# -- errors and short transfers ----------------------------------------------------------
@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_write_error_propagates_and_source_is_intact(mover, monkeypatch, code):
    src = Region(3 * MiB + 100, 64, seed=3)
    before = src.all.copy()
    extent = mover.allocate(src.nbytes)

    def broken(fd, data, offset):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(disk.os, "pwrite", broken)
    try:
        with pytest.raises(OSError) as err:
            mover.write(src.address, src.nbytes, extent, src).result()
        assert err.value.errno == code
        assert np.array_equal(src.all, before)
    finally:
        monkeypatch.undo()
        mover.free(extent)


def test_read_error_propagates(mover, monkeypatch):
    src = Region(3 * MiB + 100, 64, seed=4)
    extent = mover.allocate(src.nbytes)
    try:
        mover.write(src.address, src.nbytes, extent, src).result()

        def broken(fd, buffers, offset):
            raise OSError(errno.EIO, "I/O error")
        monkeypatch.setattr(disk.os, "preadv", broken)
        dst = Region(src.nbytes, 64, fill=0)
        with pytest.raises(OSError):
            mover.read(dst.address, dst.nbytes, extent, dst).result()
    finally:
        monkeypatch.undo()
        mover.free(extent)


def test_end_of_file_is_an_error(mover, monkeypatch):
    extent = mover.allocate(2 * MiB)
    monkeypatch.setattr(disk.os, "preadv", lambda fd, buffers, offset: 0)
    try:
        dst = Region(2 * MiB, 64, fill=0)
        with pytest.raises(disk.SwapFileShort, match="ends before this tensor.s bytes"):
            mover.read(dst.address, dst.nbytes, extent, dst).result()
    finally:
        monkeypatch.undo()
        mover.free(extent)


def test_a_look_at_the_size_taken_before_a_growth_is_not_a_cut(tmp_path, monkeypatch):
    """A worker's look at the kept file's size (`_notice_cut`) that read the size before
    the step's thread grew the file, and compared it after that thread had kept the grown
    size, took the file for cut: a full-suite run failed a fresh state_dir's recording
    with SwapFileShort, nothing truncated. The looks are serialized now."""
    import threading
    mover = DiskMover(path=str(tmp_path / "state.swap"))
    real, looked, grown = os.fstat, threading.Event(), threading.Event()

    def fstat(fd):
        result = real(fd)
        if threading.current_thread().name == "slow look" and not looked.is_set():
            looked.set()
            grown.wait(0.5)             # the step's thread grows the file meanwhile
        return result
    try:
        mover.allocate(MiB)
        monkeypatch.setattr(os, "fstat", fstat)
        worker = threading.Thread(target=mover._notice_cut, name="slow look")
        worker.start()
        looked.wait(5)
        mover.allocate(4 * MiB)         # grows the file
        mover._notice_cut()             # and looks at its size, as the next transfer does
        grown.set()
        worker.join()
        monkeypatch.undo()
        assert mover._cut is None, "a growth was taken for a cut"
    finally:
        mover.close()


def test_a_kept_file_cut_and_grown_again_is_never_read_as_zeros(tmp_path):
    """Something else truncates a kept (state_dir) file and it grows again past the cut:
    the hole reads zeros, which must never be taken for a tensor's bytes (helper-135),
    also for a read queued before the cut was seen and after a second cut above the
    first, which drops what was written again past it (helper-136)."""
    mover = DiskMover(path=str(tmp_path / "state.swap"))
    try:
        extents = [mover.allocate(MiB) for _ in range(3)]
        sources = [Region(MiB, 0, seed=k) for k in range(3)]
        for extent, src in zip(extents, sources):
            mover.write(src.address, src.nbytes, extent, src).result()

        def read(k):
            dst = Region(MiB, 0, fill=7)
            mover.read(dst.address, dst.nbytes, extents[k], dst).result()
            assert np.array_equal(dst.bytes, sources[k].bytes), k
        read(2)
        os.truncate(tmp_path / "state.swap", extents[1].offset)     # 1 and 2 cut away
        grown = mover.allocate(MiB)                                 # grown past the cut
        assert os.stat(tmp_path / "state.swap").st_size > extents[2].offset + MiB
        read(0)
        for k in (1, 2):
            with pytest.raises(disk.SwapFileShort):
                read(k)
        mover.write(sources[2].address, MiB, extents[2], sources[2]).result()   # anew
        read(2)
        os.truncate(tmp_path / "state.swap", extents[2].offset + 4096)   # a second cut
        mover.allocate(MiB)
        with pytest.raises(disk.SwapFileShort):
            read(2)
        read(0)
        mover.free(grown)
    finally:
        mover.close()


@pytest.mark.parametrize("nbytes", [4097, 3 * MiB + 100, 20 * MiB])
def test_short_transfers_are_continued(mover, monkeypatch, nbytes):
    """The kernel may move fewer bytes than asked (O_DIRECT ones in whole blocks)."""
    step = ALIGNMENT if mover.direct else 1000
    real_pwrite, real_preadv = os.pwrite, os.preadv
    calls = []

    def short_pwrite(fd, data, offset):
        calls.append("w")
        data = memoryview(data)
        return real_pwrite(fd, data[:max(step, len(data) // 2 // step * step)], offset)

    def short_preadv(fd, buffers, offset):
        calls.append("r")
        (data,) = buffers
        data = memoryview(data)
        return real_preadv(fd, [data[:max(step, len(data) // 2 // step * step)]], offset)
    monkeypatch.setattr(disk.os, "pwrite", short_pwrite)
    monkeypatch.setattr(disk.os, "preadv", short_preadv)
    try:
        round_trip(mover, nbytes, 64, 64)
        round_trip(mover, nbytes, 64, 1000)
    finally:
        monkeypatch.undo()
    assert calls.count("w") > 2 and calls.count("r") > 2


def test_memory_refused_for_direct_io_is_staged(monkeypatch):
    """Memory the kernel will not do direct I/O on (EINVAL/EFAULT) goes through the
    staging buffer instead."""
    mover = DiskMover(direct_min_bytes=0)
    if not mover.direct:
        mover.close()
        pytest.skip("no O_DIRECT here")
    real_pwrite, real_preadv = os.pwrite, os.preadv
    refused = []

    def is_tensor_memory(data):
        return isinstance(data, memoryview) and data.obj is None   # not the staging mmap

    def pwrite(fd, data, offset):
        if is_tensor_memory(data):
            refused.append("w")
            raise OSError(errno.EFAULT, "Bad address")
        return real_pwrite(fd, data, offset)

    def preadv(fd, buffers, offset):
        if is_tensor_memory(buffers[0]):
            refused.append("r")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)
    monkeypatch.setattr(disk.os, "pwrite", pwrite)
    monkeypatch.setattr(disk.os, "preadv", preadv)
    try:
        round_trip(mover, 9 * MiB + 123, 64, 64)
    finally:
        monkeypatch.undo()
        mover.close()
    assert "w" in refused and "r" in refused


def test_direct_path_uses_tensor_memory():
    """With O_DIRECT, a large transfer's interior pages go straight to and from the
    tensor's memory (no staging copy)."""
    mover = DiskMover()
    if not mover.direct:
        mover.close()
        pytest.skip("no O_DIRECT here")
    real_pwrite, real_preadv = os.pwrite, os.preadv
    moved = {"w": 0, "r": 0}

    def pwrite(fd, data, offset):
        n = real_pwrite(fd, data, offset)
        if isinstance(data, memoryview) and data.obj is None:
            moved["w"] += n
        return n

    def preadv(fd, buffers, offset):
        n = real_preadv(fd, buffers, offset)
        if isinstance(buffers[0], memoryview) and buffers[0].obj is None:
            moved["r"] += n
        return n
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(disk.os, "pwrite", pwrite)
        mp.setattr(disk.os, "preadv", preadv)
        round_trip(mover, 16 * MiB, 64, 64)
    mover.close()
    assert moved == {"w": 16 * MiB - ALIGNMENT, "r": 16 * MiB - ALIGNMENT}


def test_swap_on_shared_memory(tmp_path):
    """/dev/shm (tmpfs): O_DIRECT where the kernel allows it, else buffered; either way
    exact."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with pytest.warns(UserWarning, match="tmpfs"):
        mover = DiskMover("/dev/shm")
    try:
        for nbytes in (4097, 8 * MiB + 123):
            round_trip(mover, nbytes, 64, 64)
            round_trip(mover, nbytes, 64, 100)
    finally:
        mover.close()


def test_full_disk_on_allocate_reserves_nothing(monkeypatch):
    mover = DiskMover()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(disk.os, "posix_fallocate", full)
    try:
        with pytest.raises(OutcoreError, match="exhausted"):
            mover.allocate(MiB)
        assert mover.allocator.in_use == 0 and mover.file_bytes == 0
    finally:
        monkeypatch.undo()
        mover.close()


def bench(count: int = 16, size: int = 32 * MiB, swap_dir: str | None = None,
          prefault: bool = False) -> None:
    """Write `count` tensors of `size` bytes through the mover, read them back into fresh
    allocations, and print wall time, GB/s and the worker threads' CPU time."""
    import time
    m = DiskMover(swap_dir)
    src = [torch.empty(size // 4).uniform_() for _ in range(count)]
    extents = [m.allocate(size) for _ in src]

    def cpu(worker):
        return worker.submit(time.thread_time).result()
    w0, r0, t0 = cpu(m._writer), cpu(m._reader), time.perf_counter()
    for t, e in zip(src, extents):
        done = m.write(t.data_ptr(), size, e, t)
    done.result()
    t1, w1 = time.perf_counter(), cpu(m._writer)
    dst = [torch.empty(size // 4) for _ in src]
    if prefault:
        for t in dst:
            t.zero_()
    t2 = time.perf_counter()
    for t, e in zip(dst, extents):
        done = m.read(t.data_ptr(), size, e, t)
    done.result()
    t3, r1 = time.perf_counter(), cpu(m._reader)
    exact = all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(src, dst))
    gb = count * size / 1e9
    print(f"{m!r}: {count} x {size // MiB} MiB at data_ptr % 4096 = {src[0].data_ptr() % 4096}, "
          f"destination {'pre-faulted' if prefault else 'fresh'}, bitwise equal: {exact}")
    print(f"  write {t1 - t0:.3f} s  {gb / (t1 - t0):.2f} GB/s  writer CPU {w1 - w0:.3f} s")
    print(f"  read  {t3 - t2:.3f} s  {gb / (t3 - t2):.2f} GB/s  reader CPU {r1 - r0:.3f} s")
    m.close()


if __name__ == "__main__":     # .venv/bin/python tests/run/test_disk_direct.py [swap_dir]
    import sys
    for prefault in (False, True, False, True):
        bench(swap_dir=sys.argv[1] if len(sys.argv) > 1 else None, prefault=prefault)
