"""Page-aligned staging buffers for O_DIRECT I/O (buffer address, offset and length must
all be multiples of the device block size; a page is a multiple of every common one)."""
from __future__ import annotations

import ctypes
import mmap

ALIGNMENT = 4096


def round_up(n: int, to: int = ALIGNMENT) -> int:
    return (n + to - 1) // to * to


class AlignedBuffer:
    """An anonymous, page-aligned buffer; `view` is a writable memoryview over it and
    `address` its start, for ctypes.memmove (which releases the GIL)."""

    def __init__(self, size: int):
        self.size = round_up(size)
        self._map = mmap.mmap(-1, self.size)
        self.view = memoryview(self._map)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def close(self) -> None:
        self.view.release()
        try:
            self._map.close()
        except BufferError:      # a ctypes reference is still alive; the GC frees it
            pass
