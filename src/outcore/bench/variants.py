"""What users run today when a step does not fit, set up on a built-in workload.

* `checkpoint_blocks`: `torch.utils.checkpoint` around every residual or transformer
  block (recompute in backward instead of keeping activations).
* `DiskOffload`: a `saved_tensors_hooks` pair that writes every saved activation to the
  swap disk when autograd saves it and reads it back when backward needs it, with no
  prefetch: what `torch.autograd.graph.save_on_cpu` does, pointed at the disk tier. It
  uses outcore's DiskMover (O_DIRECT, aligned buffers), so the two differ only in *when*
  bytes move, not in how fast the disk path is. The "offload-hooks" variant on the CPU.
* `HostOffload`: `torch.autograd.graph.save_on_cpu(pin_memory=True)` itself, the
  "offload-hooks" variant on a GPU.
* `StreamedOffload`: what torchtune's activation offloading does, on a GPU (the
  "streamed-offload" variant).
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import OutcoreError
from ..run.movers.disk import DiskMover

VARIANTS = ("in-core", "checkpoint", "offload-hooks", "streamed-offload", "outcore")


def checkpoint_blocks(model: torch.nn.Module, *, on_meta: bool = False) -> int:
    """Wrap each block of `model` in non-reentrant checkpointing; returns how many.
    On meta tensors there is no RNG state to preserve (nothing has values)."""
    kwargs = {"use_reentrant": False, "preserve_rng_state": not on_meta}
    if hasattr(model, "activation_checkpointing_enable"):        # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        return sum(1 for m in model.modules() if getattr(m, "gradient_checkpointing", False))
    if hasattr(model, "gradient_checkpointing_enable"):          # older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return sum(1 for m in model.modules() if getattr(m, "gradient_checkpointing", False))
    if hasattr(model, "blocks"):
        blocks = model.blocks()
    elif isinstance(model, torch.nn.Sequential):     # the MLPs: every layer a block
        blocks = list(model)
    else:
        raise OutcoreError(f"{type(model).__name__} has no blocks() to checkpoint")
    for block in blocks:
        forward = block.forward

        def checkpointed(x, _forward=forward):
            return checkpoint(_forward, x, use_reentrant=False, preserve_rng_state=not on_meta)
        block.forward = checkpointed
    return len(blocks)


def is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """True when the tensor's elements fill numel() consecutive slots in some dimension
    order (contiguous, transposed, channels-last...): its bytes can move as one block."""
    expected = 1
    for size, stride in sorted((d for d in zip(t.shape, t.stride()) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def step_under(w, hooks) -> None:
    """One training step of workload `w`, inside `hooks.step()` when hooks are given."""
    from ..workloads import run_step
    with hooks.step() if hooks is not None else nullcontext():
        run_step(w)


class _SavedTensorHooks:
    """A `saved_tensors_hooks` pair (`_pack`, `_unpack`) around one step; `_after_step`
    runs however the step ends. `bytes_written`, `bytes_read` and `io_s` (time the
    step spent blocked moving them) accumulate over steps where a subclass counts them."""

    bytes_written = bytes_read = 0
    io_s = 0.0

    @contextmanager
    def step(self):
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._after_step()

    def _after_step(self) -> None:
        pass

    def close(self) -> None:
        pass


class DiskOffload(_SavedTensorHooks):
    """Saved activations go to disk at once and come back when backward reads them.

    Parameters (leaf tensors that require grad) and tensors under `min_bytes` stay in
    memory, as in torchtune's offloading. Each step's swap space is released at the end
    of `step()`. `bytes_written`, `bytes_read` and `io_s` (time the step spent blocked in
    I/O: all of it, since nothing is prefetched) accumulate over steps."""

    def __init__(self, swap_dir: str | None = None, *, min_bytes: int = 64 * 1024, meta: bool = False):
        self.meta = meta
        self.min_bytes = min_bytes
        self.mover = None if meta else DiskMover(swap_dir)
        self.bytes_written = self.bytes_read = 0
        self.io_s = 0.0
        self._extents = []

    def _pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        base = t if t._base is None else t._base
        if nbytes < self.min_bytes or (base.is_leaf and base.requires_grad):
            return t            # small, or a parameter (or a view of one, e.g. weight.t())
        if self.meta:
            return ("meta", t.shape, t.dtype)
        start = time.perf_counter()
        # Keep the layout (a transposed activation comes back transposed): kernels pick
        # their path, and rounding, by strides.
        dense = is_non_overlapping_and_dense(t)
        data = t if dense else t.contiguous()
        extent = self.mover.allocate(nbytes)
        self._extents.append(extent)
        self.mover.write(data.data_ptr(), nbytes, extent, data).result()
        self.bytes_written += nbytes
        self.io_s += time.perf_counter() - start
        return (extent, t.shape, data.stride(), t.dtype, nbytes)

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if packed[0] == "meta":
            return torch.empty(packed[1], dtype=packed[2], device="meta")
        start = time.perf_counter()
        extent, shape, stride, dtype, nbytes = packed
        out = torch.empty_strided(shape, stride, dtype=dtype)
        self.mover.read(out.data_ptr(), nbytes, extent, out).result()
        self.bytes_read += nbytes
        self.io_s += time.perf_counter() - start
        return out

    def _after_step(self) -> None:
        for extent in self._extents:
            self.mover.free(extent)
        self._extents.clear()

    def close(self) -> None:
        if self.mover is not None:
            self.mover.close()


class HostOffload(_SavedTensorHooks):
    """`torch.autograd.graph.save_on_cpu(pin_memory=True)`: every saved activation to
    (pinned) host memory when autograd saves it, back when backward needs it, each copy
    waited for. Counts nothing: PyTorch's hooks do the moving."""

    def __init__(self, pin_memory: bool = True):
        self.pin_memory = pin_memory

    @contextmanager
    def step(self):
        with torch.autograd.graph.save_on_cpu(pin_memory=self.pin_memory):
            yield


class StreamedOffload(_SavedTensorHooks):
    """What torchtune's activation offloading does, in brief (CUDA only): every activation
    autograd saves (not parameters, not under `min_bytes`) is copied to pinned host
    memory on a side stream as forward saves it, its GPU memory kept until that copy is
    done; backward brings each one back on another side stream, the next one (in reverse
    order of saving) prefetched while the current one is used."""

    def __init__(self, device, min_bytes: int = 2**20):
        if torch.device(device).type != "cuda":
            raise OutcoreError("the streamed offload copies on CUDA streams: run it with "
                               "--device cuda")
        self.device, self.min_bytes = torch.device(device), min_bytes
        self.d2h = torch.cuda.Stream(self.device)
        self.h2d = torch.cuda.Stream(self.device)
        self._reset()

    def _reset(self) -> None:
        self.saved: dict = {}            # id -> (host tensor, copy event)
        self.in_flight: list = []        # (GPU tensor, event) until copied
        self.fetched: dict = {}          # id -> (GPU tensor, event), prefetched
        self.next_id = 0

    def _pack(self, t):
        nbytes = t.numel() * t.element_size()
        if t.device.type != "cuda" or nbytes < self.min_bytes or (t.requires_grad and t.is_leaf):
            return t
        self.in_flight = [(g, e) for g, e in self.in_flight if not e.query()]
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h):
            host.copy_(t, non_blocking=True)
            done = self.d2h.record_event()
        self.in_flight.append((t, done))
        ident, self.next_id = self.next_id, self.next_id + 1
        self.saved[ident] = (host, done)
        self.bytes_written += nbytes
        return ident

    def _fetch(self, ident) -> None:
        host, done = self.saved.pop(ident)
        self.h2d.wait_event(done)
        with torch.cuda.stream(self.h2d):
            t = host.to(self.device, non_blocking=True)
            ready = self.h2d.record_event()
        self.fetched[ident] = (t, ready)
        self.bytes_read += t.numel() * t.element_size()

    def _unpack(self, packed):
        if torch.is_tensor(packed):
            return packed
        if packed not in self.fetched:
            self._fetch(packed)
        t, ready = self.fetched.pop(packed)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ready)
        t.record_stream(current)
        if packed - 1 in self.saved:             # backward goes back in saving order
            self._fetch(packed - 1)
        return t

    def _after_step(self) -> None:
        self._reset()

