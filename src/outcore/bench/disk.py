"""How fast the swap disk moves bytes, the way outcore moves them (`outcore bench disk`)."""
from __future__ import annotations

import os
import threading
import time

from ..memory import AlignedBuffer
from ..run.movers.disk import CHUNK_BYTES, DiskMover


def measure_disk(size: int, directory: str | None = None) -> dict:
    """GB/s for write alone, read alone, and write+read at once (total of both)."""
    mover = DiskMover(directory)          # private, unlinked swap file; O_DIRECT probe
    try:
        extent_a = mover.allocate(size)
        extent_b = mover.allocate(size)
        buffers = [AlignedBuffer(CHUNK_BYTES), AlignedBuffer(CHUNK_BYTES)]
        fd = mover._fd

        def write(extent, buf):
            for off in range(0, size, CHUNK_BYTES):
                os.pwrite(fd, buf.view[:min(CHUNK_BYTES, size - off)], extent.offset + off)

        def read(extent, buf):
            for off in range(0, size, CHUNK_BYTES):
                os.preadv(fd, [buf.view[:min(CHUNK_BYTES, size - off)]], extent.offset + off)

        def timed(*jobs):
            threads = [threading.Thread(target=f, args=a) for f, a in jobs]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
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
        return figures
    finally:
        mover.close()
