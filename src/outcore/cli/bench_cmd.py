"""`outcore bench disk`: how fast the swap disk moves bytes, the way outcore moves them."""
from __future__ import annotations

import json
import os
import threading
import time

from ..errors import OutcoreError
from ..memory import AlignedBuffer
from ..run.movers.disk import CHUNK_BYTES, DiskMover
from ..units import format_bytes, parse_bytes


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure what outcore runs on",
                       description="Measure the machine outcore plans for. `disk`: sequential "
                                   "write, read, and both at once, through the same swap file "
                                   "path as training (O_DIRECT where supported, 8 MiB requests, "
                                   "one thread per direction).")
    p.add_argument("what", choices=("disk",), help="what to measure")
    p.add_argument("--size", default="1GiB", help="bytes per direction (default 1GiB)")
    p.add_argument("--dir", default=None, help="directory of the swap file (default: temp dir)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=run)


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


def run(args) -> int:
    size = parse_bytes(args.size)
    if size < CHUNK_BYTES:
        raise OutcoreError(f"--size must be at least {format_bytes(CHUNK_BYTES)}, got {args.size}")
    size -= size % 4096
    fig = measure_disk(size, args.dir)
    if args.json:
        print(json.dumps(fig))
        return 0
    mode = "O_DIRECT" if fig["o_direct"] else "buffered, page cache dropped"
    print(f"disk under {fig['directory']} ({fig['filesystem'] or 'unknown fs'}, {mode}), "
          f"{format_bytes(size)} per direction, {format_bytes(CHUNK_BYTES)} requests:")
    print(f"  write alone       {fig['write_GBps']:6.2f} GB/s")
    print(f"  read alone        {fig['read_GBps']:6.2f} GB/s")
    print(f"  write + read      {fig['both_total_GBps']:6.2f} GB/s in total (both at once)")
    return 0
