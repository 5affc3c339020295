"""How fast the swap disk moves bytes, the way outcore moves them (`outcore bench disk`)."""
from __future__ import annotations

import os
import tempfile
import threading
import time

from ..errors import OutcoreError
from ..memory import AlignedBuffer
from ..units import format_bytes
from ..run.movers.disk import CHUNK_BYTES, DiskMover


# The transfer size at which the mover's CPU share is measured: the size of a typical
# activation of the steps in docs/ (a 1024 x 256 float32 is 1 MiB). Smaller transfers
# cost relatively more CPU (~0.35 of their time at 64 KiB here), larger ones less (~0.1
# at 8 MiB).
CPU_PROBE_BYTES = 1 << 20
CPU_PROBE_TRANSFERS = 32


def measure_disk(size: int, directory: str | None = None) -> dict:
    """GB/s for write alone, read alone, and write+read at once (total of both); and
    `transfer_cpu_share`: the CPU seconds the mover's threads spend per second of
    transfer (its syscalls and staging copies), from CPU_PROBE_TRANSFERS writes and as
    many reads of CPU_PROBE_BYTES through the mover itself; Machine.transfer_cpu_share."""
    where = directory or tempfile.gettempdir()
    try:
        mover = DiskMover(directory)      # private, unlinked swap file; O_DIRECT probe
    except OutcoreError as err:
        raise OutcoreError(f"cannot make a test file in {where}: {_cause(err)}; pass --dir a "
                           "writable directory on the disk to measure") from None
    stop = threading.Event()              # a Ctrl-C: the threads end before the file closes
    try:
        try:
            extent_a = mover.allocate(size)
            extent_b = mover.allocate(size)
        except OutcoreError as err:
            raise OutcoreError(f"cannot reserve twice --size {format_bytes(size)} in {where}: "
                               f"{_cause(err)}; pass a smaller --size, or --dir on a disk with "
                               "room") from None
        buffers = [AlignedBuffer(CHUNK_BYTES), AlignedBuffer(CHUNK_BYTES)]
        fd = mover._fd

        def write(extent, buf):
            for off in range(0, size, CHUNK_BYTES):
                if stop.is_set():
                    return
                os.pwrite(fd, buf.view[:min(CHUNK_BYTES, size - off)], extent.offset + off)

        def read(extent, buf):
            for off in range(0, size, CHUNK_BYTES):
                if stop.is_set():
                    return
                os.preadv(fd, [buf.view[:min(CHUNK_BYTES, size - off)]], extent.offset + off)

        def timed(*jobs):
            threads = [threading.Thread(target=f, args=a) for f, a in jobs]
            start = time.perf_counter()
            try:
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            finally:                      # interrupted: stop them before anything closes
                stop.set()
                for t in threads:
                    if t.ident is not None:
                        t.join()
                stop.clear()
            return time.perf_counter() - start

        write(extent_b, buffers[1])        # something to read back
        figures = {
            "write_GBps": size / timed((write, (extent_a, buffers[0]))) / 1e9,
            "read_GBps": size / timed((read, (extent_b, buffers[1]))) / 1e9,
            "both_total_GBps": 2 * size / timed((write, (extent_a, buffers[0])),
                                                (read, (extent_b, buffers[1]))) / 1e9,
            "o_direct": mover.direct, "filesystem": mover.filesystem, "directory": mover.location,
            "bytes": size,
        }
        for b in buffers:
            b.close()
        figures["transfer_cpu_share"] = _cpu_share(mover)
        return figures
    finally:
        mover.close()


def _cause(err: OutcoreError) -> str:
    """What the system said, without the library's advice (swap_dir=, the budget)."""
    cause = err.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(err).split(";")[0].split(". ")[0]


def _cpu_share(mover: DiskMover) -> float:
    """CPU seconds per second of transfer of the mover's workers, at CPU_PROBE_BYTES."""
    buf = AlignedBuffer(CPU_PROBE_BYTES)
    try:
        extents = [mover.allocate(CPU_PROBE_BYTES) for _ in range(CPU_PROBE_TRANSFERS)]
        busy = mover.busy_write_s + mover.busy_read_s
        cpu = mover.cpu_write_s + mover.cpu_read_s
        for move in (mover.write, mover.read):
            for extent in extents:
                move(buf.address, CPU_PROBE_BYTES, extent, buf).result()
        busy = mover.busy_write_s + mover.busy_read_s - busy
        return (mover.cpu_write_s + mover.cpu_read_s - cpu) / busy if busy > 0 else 0.0
    finally:
        buf.close()
