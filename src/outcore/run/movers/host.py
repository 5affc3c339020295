"""The host mover (`offload="host"`): GPU memory is the fast tier, page-locked host
memory the slow one, and a disk the third tier past `host_budget`.

    GPU (budget) ──copy out──▶ host pool (host_budget) ──full──▶ disk (swap file)

It has the disk mover's interface (allocate, free, write, read, close), so the Residency
and the Replayer run it unchanged; what differs is where the copies run:

* A **link** does the copies. `CudaLink` has one copy stream per direction, as the
  planner and the simulator assume (a GPU's two copy engines). `EmulatedLink` stands in
  for it on CPU tensors, one worker thread per direction, so that everything but the
  CUDA calls is tested on machines without a GPU (tests/run/test_host_tier.py).
* The **pool** (memory/host_pool.py) holds the host tier's bytes in page-locked
  segments outcore sizes itself; an extent it cannot give spills to the disk mover.

NOTE [Stream-ordered transfers] (CudaLink)
  1. A swap-out waits, on the copy-out stream, for an event recorded on the stream the
     step runs on (`current_stream()`) when the eviction is asked for: the producing
     kernel has finished before the bytes are copied. The host thread does not wait.
  2. Its device memory is released (`resize_(0)` in Residency.finish) only after the
     host thread has waited for the copy's event: the plan's WAIT is where the budget
     forces that wait, and nowhere else does the host block on a swap-out.
  3. A swap-in allocates the storage on the step's stream, then the copy-in stream waits
     for an event recorded there (the memory's previous users are done) and copies.
     Making it ready (`Transfer.result()`) makes the step's stream wait for the copy's
     event: the consumer kernel waits on the GPU, the host thread does not. The copied
     storage is `record_stream`ed on the copy-in stream, so that it dying before any
     consumer ran cannot hand its memory to another tensor while the copy writes it.
  4. A host extent is given back to the pool only once the transfer that last used it
     has finished (`HostMover.free` quarantines it until its event completes): a freed
     extent is never overwritten by a swap-out while a swap-in still reads it.
  5. A spilled transfer (to or from the disk tier) goes through a page-locked staging
     buffer on the mover's own thread per direction, chunk by chunk, each chunk's copy
     synchronized before the disk sees it. Reading one back blocks the host thread until
     it is in GPU memory: the disk is the slowest tier and the pool keeps it for what
     does not fit in `host_budget`.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ...errors import OutcoreError
from ...memory import AlignedBuffer, Extent, round_up
from ...plan.schedule import SWAP_OUT
from ...memory.host_pool import HostPool, PoolExtent
from ...units import format_bytes
from ..interrupts import no_raise
from .disk import let_go_of_threads

STAGING_BYTES = 8 * 2**20


def physical_memory() -> int:
    """Bytes of RAM this machine has."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


CGROUP_FS, PROC_CGROUP = "/sys/fs/cgroup", "/proc/self/cgroup"


def cgroup_limit_files(proc_cgroup: str, root: str = CGROUP_FS) -> list[str]:
    """The memory limit files that bound this process: the hierarchy's top ones (what a
    container sees as its own), and those of the cgroup `proc_cgroup` (the text of
    /proc/self/cgroup) names and of each cgroup above it, since a Slurm job, a systemd
    slice or a cgroup made by hand sits below the top and the tightest limit anywhere up
    the path holds (helper-139: a process in a nested 1.5 GiB cgroup read the machine's
    24 GiB). cgroup v2 ("0::/path", `memory.max`; under `unified/` on a hybrid system) and
    v1 (a line whose controllers include memory, `memory/.../memory.limit_in_bytes`)."""
    files = [os.path.join(root, "memory.max"),
             os.path.join(root, "memory", "memory.limit_in_bytes")]
    for line in proc_cgroup.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3 or not fields[2].startswith("/"):
            continue
        _, controllers, path = fields
        if controllers == "":
            places = [(root, "memory.max"), (os.path.join(root, "unified"), "memory.max")]
        elif "memory" in controllers.split(","):
            places = [(os.path.join(root, "memory"), "memory.limit_in_bytes")]
        else:
            continue
        parts = [p for p in path.split("/") if p and p not in (".", "..")]
        for base, name in places:
            files += [os.path.join(base, *parts[:k], name) for k in range(len(parts), 0, -1)]
    return files


def memory_limit() -> int:
    """The RAM this process may use: the machine's, or the lowest memory limit of the
    cgroups it is in, up their hierarchy (a container's, a job's), if lower."""
    limit = physical_memory()
    try:
        with open(PROC_CGROUP) as fh:
            proc_cgroup = fh.read()
    except OSError:
        proc_cgroup = ""
    for path in cgroup_limit_files(proc_cgroup, CGROUP_FS):
        try:
            with open(path) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
    return limit


def default_host_budget() -> int:
    """`host_budget` when the user gives none: half the RAM this process may use
    (`memory_limit`). Page-locked memory cannot be swapped or reclaimed, so the pool
    never takes all of it."""
    return memory_limit() // 2


# -- links: who copies ------------------------------------------------------------------
class EmulatedLink:
    """A GPU's two copy engines, stood in for on CPU tensors: one worker thread per
    direction copies by memmove (which releases the GIL). The "device" is the CPU, so a
    copy is ordered after the step by construction (ops run synchronously) and a ready
    swap-in is one whose copy finished."""

    device_type = "cpu"
    name = "emulated (CPU threads)"

    def __init__(self, jitter_s: float = 0.0, seed: int = 0):
        """`jitter_s`: each copy first sleeps a random time up to this, so that tests
        widen the races between copies and the step (a copy engine's latency)."""
        self._out = ThreadPoolExecutor(1, thread_name_prefix="outcore-host-out")
        self._in = ThreadPoolExecutor(1, thread_name_prefix="outcore-host-in")
        self.jitter_s = jitter_s
        self._random = random.Random(seed)

    def pin(self, address: int, size: int) -> None:
        """Page-lock a pool segment (nothing to do on the CPU)."""

    def unpin(self, address: int) -> None:
        pass

    def _wait(self) -> None:
        if self.jitter_s:
            time.sleep(self._random.uniform(0.0, self.jitter_s))

    def _copy(self, dst: int, src: int, nbytes: int, keepalive) -> tuple[float, float]:
        self._wait()
        start = time.perf_counter()
        ctypes.memmove(dst, src, nbytes)
        return start, time.perf_counter()

    def copy_out(self, host: int, storage, nbytes: int):
        return self._out.submit(self._copy, host, storage.data_ptr(), nbytes, storage)

    def copy_in(self, storage, host: int, nbytes: int):
        return self._in.submit(self._copy, storage.data_ptr(), host, nbytes, storage)

    def copy_out_now(self, host: int, storage, offset: int, nbytes: int, after=None) -> None:
        """Synchronously, on the calling thread (a spill worker)."""
        self._wait()
        ctypes.memmove(host, storage.data_ptr() + offset, nbytes)

    def copy_in_now(self, storage, offset: int, host: int, nbytes: int, after=None) -> None:
        self._wait()
        ctypes.memmove(storage.data_ptr() + offset, host, nbytes)

    def step_event(self):
        """An event on the step's stream, for a spilled swap-in to wait for (none here)."""
        return None

    def host_storage(self, address: int, nbytes: int):
        """A storage on this link's device whose memory is `nbytes` of host memory at
        `address` (NOTE [Host tier between iterations])."""
        import torch
        return _storage_at(address, torch.device("cpu"), nbytes)

    def free_bytes(self) -> int:
        """What the "device" (RAM) may hold: the RAM this process may use, not what is
        free of it (tests stand in a smaller figure)."""
        return memory_limit()

    def synchronize(self) -> None:
        """Every op the step or the user queued has finished (they ran synchronously)."""

    def own_storage(self, nbytes: int):
        import torch
        return torch.UntypedStorage(nbytes)

    def close(self) -> None:
        self._out.shutdown(wait=True)
        self._in.shutdown(wait=True)
        let_go_of_threads(self._out, self._in)


def _host_tensor(address: int, nbytes: int):
    """A CPU uint8 tensor over `nbytes` of pool memory at `address` (no copy)."""
    import torch
    return torch.frombuffer((ctypes.c_char * nbytes).from_address(address), dtype=torch.uint8)


class CudaTransfer:
    """A copy on a CUDA stream: `done()` polls its event; `result()` waits for it, on the
    host (a swap-out, NOTE [Stream-ordered transfers] 2) or on the step's stream (a
    swap-in, 3). A swap-out holds its storage until the host has waited (its memory is
    released after that, NOTE 2); a swap-in holds only the host tensor, so that a storage
    the step drops dies (its block is protected by record_stream, NOTE 3)."""

    __slots__ = ("event", "device", "on_stream", "keep")

    def __init__(self, event, device, on_stream: bool, keep):
        self.event, self.device, self.on_stream, self.keep = event, device, on_stream, keep

    def done(self) -> bool:
        return self.event.query()

    def result(self):
        import torch
        if self.on_stream:
            torch.cuda.current_stream(self.device).wait_event(self.event)
        else:
            self.event.synchronize()
        self.keep = None      # a swap-in's storage must be free to die (its weakref)
        return None           # no host-clock span: a timeline shows the waits only


class CudaLink:
    """Copies between one CUDA device's storages and page-locked host memory, one copy
    stream per direction (NOTE [Stream-ordered transfers]). Every torch call runs with
    the dispatch modes off: the copies are outcore's, not ops of the step."""

    device_type = "cuda"

    def __init__(self, device=None):
        import torch
        index = None if device is None else torch.device(device).index
        self.device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        self.out_stream = torch.cuda.Stream(self.device)
        self.in_stream = torch.cuda.Stream(self.device)
        # The spill worker's own streams: its per-chunk synchronize() then waits for its
        # own copies only, never for the pool's swaps queued meanwhile (NOTE 5).
        self.spill_out_stream = torch.cuda.Stream(self.device)
        self.spill_in_stream = torch.cuda.Stream(self.device)
        self.name = f"CUDA {torch.cuda.get_device_name(self.device)}"
        # 91: cudaDevAttrCanUseHostPointerForRegisteredMem. Unknown (None) counts as
        # usable: every GPU with unified addressing that PyTorch supports has it.
        self.host_pointer_usable = _device_attribute(91, self.device.index) != 0

    def pin(self, address: int, size: int) -> None:
        """cudaHostRegister with cudaHostRegisterDefault (mapped and portable where
        addressing is unified, as PyTorch's own pinned allocator registers)."""
        import torch
        cudart = torch.cuda.cudart()
        with torch.cuda.device(self.device):
            err = int(cudart.cudaHostRegister(address, size, 0))
        if err:
            _clear_cuda_error(cudart)
            raise OutcoreError(f"page-locking {format_bytes(size)} of host memory for the host tier "
                               f"failed (CUDA error {err}); lower host_budget= (the most the "
                               "pool may lock) or free host memory")

    def unpin(self, address: int) -> None:
        """After every kernel that may still touch the segment (a mapped storage's last
        user) has finished."""
        import torch
        torch.cuda.synchronize(self.device)
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostUnregister(address)):
            _clear_cuda_error(cudart)

    def _bytes(self, storage, offset: int, nbytes: int):
        """A uint8 tensor over bytes [offset, offset + nbytes) of a device storage."""
        import torch
        whole = torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage)
        return whole[offset:offset + nbytes]

    def _async(self, stream, dst, src, keep, on_stream: bool) -> CudaTransfer:
        import torch
        ready = torch.cuda.current_stream(self.device).record_event()
        stream.wait_event(ready)                                  # NOTE 1 and 3
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            if on_stream:
                dst.record_stream(stream)    # a swap-in's storage may die before its use
            # Blocking: a host waiting on it sleeps instead of spinning a core.
            event = stream.record_event(torch.cuda.Event(blocking=True))
        return CudaTransfer(event, self.device, on_stream, keep)

    def copy_out(self, host: int, storage, nbytes: int) -> CudaTransfer:
        import torch
        with _no_modes(), torch.cuda.device(self.device):
            src, dst = self._bytes(storage, 0, nbytes), _host_tensor(host, nbytes)
            return self._async(self.out_stream, dst, src, (storage, dst), False)

    def copy_in(self, storage, host: int, nbytes: int) -> CudaTransfer:
        import torch
        with _no_modes(), torch.cuda.device(self.device):
            dst, src = self._bytes(storage, 0, nbytes), _host_tensor(host, nbytes)
            return self._async(self.in_stream, dst, src, src, True)

    def step_event(self):
        """An event on the step's stream now: where a spilled swap-in's memory is free."""
        import torch
        return torch.cuda.current_stream(self.device).record_event()

    def host_storage(self, address: int, nbytes: int):
        """A CUDA storage over page-locked host memory (NOTE [Host tier between
        iterations]): registered memory is mapped into the device's address space at
        the same address (cudaHostRegisterDefault with unified addressing), and
        `_storage_at` wraps it without a copy."""
        if not self.host_pointer_usable:
            raise OSError(errno.EOPNOTSUPP, "this GPU cannot use host pointers of registered "
                          "memory (cudaDevAttrCanUseHostPointerForRegisteredMem is 0)")
        return _storage_at(address, self.device, nbytes)

    def free_bytes(self) -> int:
        """GPU memory not in use: free on the device, and cached by PyTorch's allocator."""
        import torch
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)

    def synchronize(self) -> None:
        """Every kernel queued on the device has finished, on any stream: user writes to
        mapped state included (NOTE [Host tier between iterations] 6)."""
        import torch
        torch.cuda.synchronize(self.device)

    def own_storage(self, nbytes: int):
        import torch
        return torch.UntypedStorage(nbytes, device=self.device)

    def copy_out_now(self, host: int, storage, offset: int, nbytes: int, after=None) -> None:
        """Synchronously, on the calling thread (a spill worker), after `after` (the
        step's event when the swap-out was asked for: NOTE 1)."""
        import torch
        stream = self.spill_out_stream
        with _no_modes(), torch.cuda.device(self.device), torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            _host_tensor(host, nbytes).copy_(self._bytes(storage, offset, nbytes),
                                             non_blocking=True)
            stream.synchronize()

    def copy_in_now(self, storage, offset: int, host: int, nbytes: int, after=None) -> None:
        import torch
        stream = self.spill_in_stream
        with _no_modes(), torch.cuda.device(self.device), torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            self._bytes(storage, offset, nbytes).copy_(_host_tensor(host, nbytes),
                                                       non_blocking=True)
            stream.synchronize()

    def close(self) -> None:
        for stream in (self.out_stream, self.in_stream, self.spill_out_stream,
                       self.spill_in_stream):
            stream.synchronize()


def _storage_at(address: int, device, nbytes: int):
    """A storage over `nbytes` at `address` on `device` that does not own the memory
    (not resizable): the pool's segment outlives it (NOTE [Host tier between
    iterations] 4). Through `__cuda_array_interface__` where torch lacks the direct call
    (that path needs numpy)."""
    import torch
    make = getattr(torch._C, "_construct_storage_from_data_pointer", None)
    if make is not None:
        return make(address, device, nbytes)
    if device.type == "cpu":
        return _host_tensor(address, nbytes).untyped_storage()
    view = {"data": (address, False), "shape": (nbytes,), "typestr": "|u1", "strides": None,
            "version": 3}
    holder = type("DeviceView", (), {"__cuda_array_interface__": view})()
    with _no_modes(), torch.cuda.device(device):
        return torch.as_tensor(holder, device=device).untyped_storage()


def _runtime():
    """The CUDA runtime library torch loaded (ctypes), or None where it cannot be found:
    for the two calls torch.cuda.cudart() does not offer."""
    import glob
    import torch
    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"]
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    names += sorted(glob.glob(os.path.join(lib_dir, "libcudart*.so*")))
    # The runtime torch loaded first (RTLD_NOLOAD: only one already in the process): a
    # second runtime (a toolkit's libcudart.so on the library path) has last errors of
    # its own, and clearing its error would leave torch's set (_clear_cuda_error).
    for mode in (os.RTLD_NOLOAD | os.RTLD_LAZY, os.RTLD_LAZY):
        for name in names:
            try:
                return ctypes.CDLL(name, mode=mode)
            except OSError:
                continue
    return None


def _device_attribute(attribute: int, index: int) -> int | None:
    runtime = _runtime()
    if runtime is None:
        return None
    value = ctypes.c_int(0)
    if runtime.cudaDeviceGetAttribute(ctypes.byref(value), attribute, index):
        runtime.cudaGetLastError()
        return None
    return value.value


def _clear_cuda_error(cudart) -> None:
    """A failed runtime call leaves the runtime's last error set, and PyTorch's next
    kernel-launch check would report it as its own: take it back (through the runtime
    library itself where torch.cuda.cudart() has no cudaGetLastError)."""
    get_last = getattr(cudart, "cudaGetLastError", None)
    if get_last is None:
        runtime = _runtime()
        get_last = runtime.cudaGetLastError if runtime is not None else None
    if get_last is not None:
        get_last()


@contextlib.contextmanager
def _no_modes():
    """The mover's own torch calls, unseen by the step's dispatch modes (outcore's
    recorder or replayer, the user's) and torch-function modes."""
    import torch
    from torch.utils._python_dispatch import _disable_current_modes
    with _disable_current_modes(), torch._C.DisableTorchFunction():
        yield


def default_link():
    """The link for `offload="host"`: the current CUDA device's, or a clear error."""
    import torch
    if not torch.cuda.is_available():
        raise OutcoreError("offload='host' keeps CUDA tensors in GPU memory under the budget, "
                           "with page-locked host memory as the slow tier, and needs a CUDA "
                           "device: torch.cuda.is_available() is False here. For CPU tensors "
                           "use offload='disk'")
    return CudaLink()


@no_raise      # a finalizer, also between iterations (NOTE [Interrupts] rules 6, 8)
def _released(segment) -> None:
    """A mapped storage let go of its pool segment (HostMapping, rule 4)."""
    segment.release()


class HostMapping:
    """One storage pointed at its host-tier extent between iterations.

    NOTE [Host tier between iterations]
      1. Map (Residency.map_slow, after settle(): no transfer in flight): the storage's
         memory becomes its extent in the pool, through `link.host_storage` (zero-copy:
         on a GPU the kernels read and write page-locked host memory over the link) and
         `UntypedStorage._swap_data_ptr_`, as NOTE [Mapped state] does with the swap
         file. Python identity, views and version counters stay; so does `print(p)`,
         `p.sum()`, `.cpu()`, `torch.save`, `load_state_dict`, and nothing is read into
         GPU memory. The storage is not resizable while so mapped.
      2. Writes go straight into the extent, which is the tier's only copy: there is no
         file behind it to keep unchanged, so nothing is copied on write, and unmapping
         leaves the storage SLOW with the written bytes where the next swap-in reads them.
      3. Unmap (before the next iteration): the storage takes back empty memory of its
         own. With `copy`, a copy of the bytes instead (an orphan adopted after close).
      4. The pool's segment stays (page-locked, mapped) while any storage points at it:
         `close()` of the pool defers it, and a storage that dies or is unmapped lets go.
      5. A spilled (disk-tier) extent is first moved into the pool where it has room
         (`HostMover.promote`). One that still does not fit is read back into the fast
         tier (Residency.map_slow's fallback), over the budget: so a plan whose state
         left on the slow tier between iterations exceeds host_budget is refused
         (`lasting_slow_bytes`, OutOfCore). All are read back on a GPU that cannot use
         host pointers of registered memory, and with a PyTorch that has no
         `UntypedStorage._swap_data_ptr_` (2.11; a warning says so, and a plan whose
         state the GPU has no room to read back is refused: OutOfCore._require_host_budget).
      6. Before unmapping, every kernel queued on the device has finished, whatever
         stream queued it (`link.synchronize()`, from Residency.unmap_all): the next
         iteration's copies read what the user wrote. A segment is unregistered only
         after the same wait.
      7. A mapped storage cannot be resized, nor shared with another process over CUDA
         IPC (its memory is not the caching allocator's).
    """

    __slots__ = ("link", "nbytes", "_release")

    def __init__(self, link, segment, address: int, nbytes: int, storage):
        view = link.host_storage(address, nbytes)
        storage._swap_data_ptr_(view)
        del view
        self.link, self.nbytes = link, nbytes
        segment.use()
        # Released once: at unmap, or when the storage dies mapped (an orphan). Not at
        # interpreter exit, where a storage may still point at the segment.
        self._release = weakref.finalize(storage, _released, segment)
        self._release.atexit = False

    def unmap(self, storage, *, copy: bool = False) -> bool:
        """Rule 3. Returns `copy`: without it nothing is dirty that the extent does not
        hold (rule 2), so the storage goes back to the slow tier as it is."""
        with _no_modes():
            own = self.link.own_storage(self.nbytes if copy else 0)
            if copy:
                own.copy_(storage)
                self.link.synchronize()       # the copy has read the extent: it may go
        storage._swap_data_ptr_(own)
        del own
        self._release()
        return copy

    def page_out(self) -> None:
        """Nothing to page out: the host tier is not a file's page cache."""

    def close(self) -> None:
        """The storage died (Residency._reap_dead): `_release` ran with it."""


def lasting_slow_bytes(trace, schedule) -> int:
    """Bytes (each rounded up to a page) of the arrays that outlive the step and that the
    schedule leaves on the slow tier at its end: what must stay on the host tier between
    iterations."""
    resident = set(schedule.resident_at_end)
    return sum(round_up(a.nbytes) for a in trace.arrays
               if a.freed_after is None and a.nbytes and a.id not in resident)


def host_bytes_needed(trace, schedule, holding=()) -> int:
    """The most host bytes the schedule's extents hold at once, each array's bytes
    rounded up to a page. An array holds an extent from its first swap-out until its
    storage dies, and keeps it while resident again (the executor keeps a clean copy's
    place). So state that lives across iterations, once it has an extent, holds it for
    good: it counts from the step's start when the schedule moves it or starts without
    it, or when it is in `holding` (arrays with an extent already, e.g. from the
    recording iterations). The pool is grown to this once planned (HostMover.reserve),
    so that no segment is page-locked in the middle of a step."""
    n = len(trace.functions)
    first_out: dict[int, int] = {}
    for i, actions in enumerate(schedule.end):
        for act in actions:
            if act.kind == SWAP_OUT:
                first_out.setdefault(act.array, i)
    at_start = set(schedule.resident_at_start)
    for arr in trace.arrays:
        lasting = arr.existed_before or arr.freed_after is None
        if arr.id in holding or (lasting and (arr.id in first_out or arr.id not in at_start
                                              and arr.existed_before)):
            first_out[arr.id] = 0
    delta = [0] * (n + 2)
    for aid, start in first_out.items():
        arr = trace.arrays[aid]
        end = n if arr.freed_after is None else arr.freed_after + 1
        delta[start] += round_up(arr.nbytes)
        delta[max(end, start + 1)] -= round_up(arr.nbytes)
        if not arr.existed_before and arr.freed_after is None:
            # What the step creates and returns (the loss) is usually held by the user
            # through the next step too, with its extent: that one counts throughout.
            delta[0] += round_up(arr.nbytes)
            delta[n] -= round_up(arr.nbytes)
    best = held = 0
    for d in delta:
        held += d
        best = max(best, held)
    return best


# -- the mover ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TierExtent:
    """Where an evicted storage's bytes are: a host pool extent, or a disk extent."""
    tier: str                 # "host" or "disk"
    place: object             # PoolExtent or memory.Extent

    @property
    def length(self) -> int:
        return self.place.length

    @property
    def offset(self) -> int:
        return self.place.offset


class _Done:
    """A transfer with nothing left to do (an empty storage)."""

    @staticmethod
    def done() -> bool:
        return True

    @staticmethod
    def result():
        return None


class HostMover:
    """Moves whole storages between the link's device and the host tier, spilling to a
    disk mover past the pool's limit (module docstring)."""

    name = "host"

    def __init__(self, link, host_budget: int, disk, *, segment_bytes: int | None = None,
                 staging_bytes: int = STAGING_BYTES):
        self.link = link
        self.device_type = link.device_type
        self.device_index = getattr(getattr(link, "device", None), "index", None)
        kw = {} if segment_bytes is None else {"segment_bytes": segment_bytes}
        self.pool = HostPool(host_budget, pin=link.pin, unpin=link.unpin, **kw)
        self.disk = disk
        self.location = f"pinned host memory (up to {format_bytes(host_budget)}), then {disk.location}"
        self.where = "the host tier"              # for messages
        self._last: dict = {}                     # TierExtent -> the last transfer using it
        self._quarantine: list = []               # (TierExtent, transfer): NOTE 4
        self._staging_out = AlignedBuffer(staging_bytes)
        self._staging_in = AlignedBuffer(staging_bytes)
        self._staged_pinned = []            # page-locked like the pool (NOTE 5)
        try:
            for buf in (self._staging_out, self._staging_in):
                link.pin(buf.address, buf.size)
                self._staged_pinned.append(buf.address)
        except BaseException:
            for address in self._staged_pinned:
                link.unpin(address)
            self._staging_out.close()
            self._staging_in.close()
            raise
        self._spill_out = ThreadPoolExecutor(1, thread_name_prefix="outcore-spill-out")
        self._spill_in = ThreadPoolExecutor(1, thread_name_prefix="outcore-spill-in")
        self.busy_write_s = self.busy_read_s = 0.0
        self.spilled_bytes = 0         # bytes written to the disk tier
        self.spill_reads = 0           # bytes read back from it
        self.reserved = 0              # what the last plan needs (host_bytes_needed)
        self.closed = False

    # -- space -------------------------------------------------------------------------
    def reserve(self, nbytes: int) -> None:
        """Grow the pool now to `nbytes` (at most host_budget) in one segment, rather
        than segment by segment during the steps (`host_bytes_needed`)."""
        self.reserved = nbytes
        self.pool.reserve(nbytes)

    def allocate(self, nbytes: int) -> TierExtent:
        """A pool extent, else (the pool at host_budget) a disk extent; raises
        OutcoreError when the disk is full too (nothing was reserved)."""
        self._release_quarantine()
        place = self.pool.allocate(nbytes)
        if place is None and self._quarantine:
            self._release_quarantine(wait=True)
            place = self.pool.allocate(nbytes)
        if place is not None:
            return TierExtent("host", place)
        return TierExtent("disk", self.disk.allocate(nbytes))

    def free(self, extent: TierExtent) -> None:
        transfer = self._last.pop(extent, None)
        if transfer is not None and not transfer.done():
            self._quarantine.append((extent, transfer))        # NOTE 4
            return
        self._give_back(extent)

    def _give_back(self, extent: TierExtent) -> None:
        if extent.tier == "host":
            self.pool.free(extent.place)
        else:
            self.disk.free(extent.place)

    def _release_quarantine(self, wait: bool = False) -> None:
        still = []
        for extent, transfer in self._quarantine:
            if wait or transfer.done():
                if wait and not transfer.done():
                    _settle(transfer)
                self._give_back(extent)
            else:
                still.append((extent, transfer))
        self._quarantine = still

    # The durable-state interface (run/durable.py) is the disk mover's; offload="host"
    # refuses state_dir, so these only answer for an eviction's extent.
    def is_committed(self, extent) -> bool:
        return False

    def head(self, extent) -> int:
        return 0

    def synchronize(self) -> None:
        """Before mapped storages are unmapped (NOTE [Host tier between iterations] 6)."""
        self.link.synchronize()

    def promote(self, extent: TierExtent, nbytes: int) -> TierExtent:
        """A spilled extent's bytes moved into the pool where it has room now (the step's
        transients are dead when an iteration ends), so that the storage can be mapped
        rather than read back (NOTE [Host tier between iterations] 5); the extent as it
        was where the pool is full or the read fails. Host memory to host memory: the
        device is not involved."""
        if extent.tier != "disk":
            return extent
        self._release_quarantine()
        place = self.pool.allocate(nbytes)
        if place is None:
            return extent
        try:
            self.disk.read_at(place.address, nbytes, extent.place.offset)
        except OSError:
            self.pool.free(place)
            return extent
        self.free(extent)
        return TierExtent("host", place)

    def map(self, extent, nbytes: int, storage) -> HostMapping:
        """Point `storage` (resized to 0) at its extent in the pool until the next
        iteration (NOTE [Host tier between iterations]); raises OSError for a spilled
        extent, which the Residency then reads back."""
        if self.closed:
            raise OSError(errno.EBADF, "the host mover is closed")
        if extent.tier != "host" or nbytes == 0:
            raise OSError(errno.EOPNOTSUPP, "a spilled extent is read back, not mapped")
        return HostMapping(self.link, self.pool.segment(extent.place), extent.place.address,
                           nbytes, storage)

    # -- transfers ---------------------------------------------------------------------
    def write(self, address: int, nbytes: int, extent: TierExtent, storage):
        """Copy the storage's first `nbytes` to `extent`, asynchronously."""
        if nbytes == 0:
            transfer = _Done()
        elif extent.tier == "host":
            transfer = self.link.copy_out(extent.place.address, storage, nbytes)
        else:
            transfer = self._spill_out.submit(self._spill_write, storage, nbytes, extent.place,
                                              self.link.step_event())
            self.spilled_bytes += nbytes
        self._last[extent] = transfer
        return _Timed(transfer, self, "write")

    def read(self, address: int, nbytes: int, extent: TierExtent, storage):
        """Copy `nbytes` from `extent` into the storage (allocated already), asynchronously."""
        if nbytes == 0:
            transfer = _Done()
        elif extent.tier == "host":
            transfer = self.link.copy_in(storage, extent.place.address, nbytes)
        else:
            after = self.link.step_event()
            transfer = self._spill_in.submit(self._spill_read, storage, nbytes, extent.place, after)
            self.spill_reads += nbytes
        self._last[extent] = transfer
        return _Timed(transfer, self, "read")

    def _spill_write(self, storage, nbytes: int, place: Extent, after):
        """Device -> staging -> disk, chunk by chunk, on the spill writer (NOTE 5)."""
        start, buf = time.perf_counter(), self._staging_out
        for off in range(0, nbytes, buf.size):
            n = min(buf.size, nbytes - off)
            self.link.copy_out_now(buf.address, storage, off, n, after)
            after = None
            self.disk.write_at(buf.address, n, place.offset + off)
        self.disk.drop_cached(place.offset, place.length)
        return start, time.perf_counter()

    def _spill_read(self, storage, nbytes: int, place: Extent, after):
        start, buf = time.perf_counter(), self._staging_in
        for off in range(0, nbytes, buf.size):
            n = min(buf.size, nbytes - off)
            self.disk.read_at(buf.address, n, place.offset + off)
            self.link.copy_in_now(storage, off, buf.address, n, after)
            after = None
        return start, time.perf_counter()

    def close(self) -> None:
        """Every part is released whatever fails on the way (the first error is raised)."""
        if self.closed:
            return
        self.closed = True
        self._quarantine.clear()
        self._last.clear()
        parts = [lambda: self._spill_out.shutdown(wait=True),
                 lambda: self._spill_in.shutdown(wait=True),
                 lambda: let_go_of_threads(self._spill_out, self._spill_in),
                 self.link.close, self.pool.close]
        parts += [lambda a=a: self.link.unpin(a) for a in self._staged_pinned]
        parts += [self._staging_out.close, self._staging_in.close, self.disk.close]
        error = None
        for part in parts:
            try:
                part()
            except Exception as exc:      # noqa: BLE001 - the rest are still released
                error = error or exc
        if error is not None:
            raise error

    def __repr__(self) -> str:
        pool = self.pool
        return (f"HostMover({self.link.name}; pool {format_bytes(pool.capacity)} of "
                f"{format_bytes(pool.limit)}, in use {format_bytes(pool.in_use)}, peak "
                f"{format_bytes(pool.peak_in_use)}; spilled {format_bytes(self.spilled_bytes)} "
                f"to {self.disk.location})")


def _settle(transfer) -> None:
    """Wait on the host until `transfer` no longer uses its host extent."""
    if isinstance(transfer, CudaTransfer):
        transfer.event.synchronize()
        return
    try:
        transfer.result()
    except Exception:      # noqa: BLE001 - its owner's wait reports it; here it only frees
        pass


class _Timed:
    """What the Residency waits on: the transfer, with the link's busy time accounted
    when its result is first taken (spans from the emulated link and spills only)."""

    __slots__ = ("transfer", "mover", "kind", "taken")

    def __init__(self, transfer, mover: HostMover, kind: str):
        self.transfer, self.mover, self.kind, self.taken = transfer, mover, kind, False

    def done(self) -> bool:
        return self.transfer.done()

    def result(self):
        span = self.transfer.result()
        if span is not None and not self.taken:
            self.taken = True
            if self.kind == "write":
                self.mover.busy_write_s += span[1] - span[0]
            else:
                self.mover.busy_read_s += span[1] - span[0]
        return span
