"""`share_memory_()`, `.numpy()`, `torch.save` and safetensors of a storage outcore moves.

NOTE [Sharing a storage outcore moves]
  1. `Tensor.share_memory_()`, `Module.share_memory()` and a tensor sent through a
     torch.multiprocessing queue all end in `UntypedStorage._share_fd_cpu_` or
     `_share_filename_cpu_`: a new shared mapping takes the storage's bytes and the old
     memory is freed. None of it is an aten op, so no dispatch mode sees it.
  2. Outcore cannot resize a shared storage (PyTorch lets it try and the process
     crashes: Residency NOTE 7). A storage on the slow tier has no bytes in memory: it
     would be shared empty, and the next read back would resize it (seen: a
     segmentation fault inside the step, torch 2.13). A storage being written or read
     would have its transfer's memory freed under it.
  3. So while an OutOfCore is open, the two methods are wrapped (`install`, undone when
     it is released: `uninstall`). On the thread running the block (or with no block
     open), a tracked storage whose bytes are not in its memory (on the slow tier, in
     a transfer, or dropped for a recompute) is made resident first, with room made
     for it as for an op's input (`evict_lru`, `Residency.ready`), then shared (between
     iterations, what making room sent to the slow tier is mapped again at once,
     `OutOfCore._remap`: left there it had no bytes, and reading it crashed). Like
     every shared storage it stays in RAM from then on: the next eviction that meets it
     pins it (Residency NOTE 7), and a plan that counted on moving it deviates and runs
     on demand (correct, slower) until a step of that shape is recorded again.
     Between iterations that includes a storage mapped from the slow tier (NOTE
     [Mapped state]): shared as it is, its shared pages would look unwritten to the next
     iteration's unmap, which would empty the storage again and end the sharing.
  4. The table is only the step's thread's to change (Residency NOTE 2), and that
     thread may evict a resident storage at any moment of a block: from any other
     thread (once a block has run), sharing a tracked storage outcore may move raises
     OutcoreError before anything changes, whatever its state (a resident one shared
     from another thread raced the step's eviction: wrong values, a freed buffer
     read). Storages outcore does not track, or never moves, are shared as PyTorch
     would share them.
  5. PyTorch copies the bytes with aten ops. They are not the step's: with an OutOfCore
     open, sharing runs with the thread's dispatch modes set aside (the step's trace
     never holds them, so a step that shares is the same step each time, and nothing
     moves between `ready` and the copy; `ready` may remake a dropped storage, whose
     ops must not reach the step either). Without an open OutOfCore the wrappers only
     call PyTorch's methods.
  6. The share is a held section (NOTE [Interrupts]): a Ctrl-C during the read back or
     the copy lands after the share is complete. Between iterations signals are not
     held; a read left waiting there is finished by the next iteration's start
     (`Replayer.start`).

  `.numpy()` hands out a pointer to the storage's memory in the same way:
  7. PyTorch's `Tensor.numpy()` (and `np.asarray(tensor)`, which calls it) is no aten op
     either: inside a step it read whatever the storage's memory was, also a storage
     on the slow tier (seen: garbage values from an activation the plan had dropped,
     bitwise wrong), and between iterations an array of mapped state pointed at a
     mapping the next iteration closes. And it marks the storage unresizable for
     good (Residency NOTE 7): after one TensorBoard histogram of each parameter, none
     of them could ever move again.
  8. So while an OutOfCore is open, `Tensor.numpy` is wrapped too. For a CPU tensor
     (strided, of a dtype numpy has, and which PyTorch would convert) the storage is
     made resident first as in rule 3 (read back, unmapped, remade), refused from
     another thread as in rule 4, and the array is built over the same memory by
     numpy from an `__array_interface__` whose owner holds the tensor: same address,
     shape, strides and dtype as PyTorch's, writable, and the tensor lives while the
     array does. The storage stays resizable, but counts as `exported` while any
     array built over it lives, and outcore never moves an exported storage: its
     next eviction pins it (Residency NOTE 7, `newly_pinned`: a plan that moved it
     deviates, as for a shared one).
  9. When the last such array dies (on any thread: only `_exports` changes, under its
     lock), the storage is no longer exported; the next iteration's start
     (`Residency.end_exports`) unpins it. An array used and dropped between
     iterations therefore costs one read back and nothing else; one kept across
     iterations keeps its storage in RAM, as the user asked. Anything else (the
     tensors PyTorch would refuse, `force=True` on a tensor PyTorch must copy, a storage
     outcore never moves: under `min_move_bytes`, pinned, another library's; no
     OutOfCore open) is PyTorch's own `numpy()`. PyTorch's refuses to resize a storage
     an array points into; outcore's arrays leave it resizable, so `t.resize_()` (or an
     `out=` op that grows `t`) while such an array lives leaves the array on freed
     memory: don't (helper-50). DLPack capsules (`__dlpack__`,
     `to_dlpack`) and `data_ptr()` are not wrapped: such a pointer is valid until
     outcore next moves the storage (the next op, inside a step).

  `torch.save` reads storages' bytes without an aten op too:
  10. Inside a block (an iteration, or `building()`), a storage the plan has on the slow
      tier has no bytes in memory: `torch.save` wrote it as 0 bytes (a checkpoint saved
      inside `with ooc.iteration():` could not be loaded: "Trying to resize storage that
      is not resizable"), and `pickle.dumps(tensor)` (which calls `torch.save`) gave
      garbage. While an OutOfCore is open, `torch.save` (also as
      `torch.serialization.save`) is wrapped: on the thread running the block it first
      finds the storages `obj` pickles (a pickling pass that writes nothing, with the
      same pickle module), lets every transfer in flight finish (`Residency.settle`),
      maps each one on the slow tier in place (NOTE [Mapped state]: its pages are read
      from the swap file as the save reads them, so a state larger than the budget
      saves too) or, where it cannot be mapped, reads it back (then it lingers beside a
      replay's plan: `Replayer.linger`), remakes the ones recompute dropped one at a
      time with all the room there is and writes them out to map them too, saves, and
      unmaps what it mapped. Outside a block, and on
      other threads, it is PyTorch's `torch.save` (between iterations every tracked
      storage is resident or mapped: README, "Between iterations").
  11. Mapping and unmapping are held sections; the save itself is not (a Ctrl-C stops
      it as it would stop PyTorch's, and the mapped storages are unmapped in its
      `finally`). The save's own ops do not reach the step (rule 5).

  safetensors reads them through `data_ptr()`, later:
  12. `safetensors.torch.save_file` and `save` (also as transformers binds `save_file`
      at import) collect every tensor's `data_ptr()` in `_flatten_as_ptr` and write
      the bytes afterwards, in Rust (`serialize_file`, `serialize`). Inside a block a storage on the slow tier had no
      bytes: the save failed ("invalid shape, data type, or offset for tensor"), and
      tensors sharing such a storage were not found shared. While an OutOfCore is open
      and safetensors is installed (imported at `install`: 5 ms beside torch), the
      three functions of `safetensors.torch` are wrapped where they live: `save_file`
      looks them up at each call, however it was imported. On the thread running the
      block, `_flatten_as_ptr` first makes the tensors' storages readable as
      `torch.save` does (rule 10; its own ops, the views safetensors takes to find
      shared tensors, do not reach the step: rule 5), and what it mapped stays mapped
      until the `serialize` that follows returns or raises, which unmaps it. Mapped
      entries left by a `_flatten_as_ptr` no `serialize` followed are taken back by
      the next `_flatten_as_ptr` in the same block, by their next use
      (`Residency.ready`) or by the next iteration's start; a `serialize` after that
      block has ended leaves them alone. A safetensors without `_flatten_as_ptr` (0.8
      has it) is not wrapped.
  13. Savers that look at the storages before `_flatten_as_ptr` does failed earlier:
      transformers' `save_pretrained` drops tied weights by `(device, data_ptr,
      nbytes)` of each storage, and safetensors' `save_model` finds shared tensors the
      same way, so every storage on the slow tier, (0, 0), looked tied to every other
      ("The weights trying to be saved contained shared tensors", helper-54). Both are
      wrapped while an OutOfCore is open: `safetensors.torch.save_model`, and
      `PreTrainedModel.save_pretrained` once transformers is imported (outcore does not
      import it; one imported after the OutOfCore was made is wrapped as the next block
      begins: `install_late`). On the block's thread, every parameter's and buffer's
      storage is made readable for the whole call as for `torch.save` (rule 10), the
      call runs with the dispatch modes set aside (rule 5), and what was mapped is
      unmapped after, also when it raises.

  `copy.deepcopy` and `tolist()` read a storage without an aten op too:
  14. `Tensor.__deepcopy__` of a tensor that is not a parameter (a `state_dict()`'s
      tensors, an optimizer's state) copies its storage with `UntypedStorage.clone()`,
      which sizes the copy by `nbytes()` first: inside a block, a storage on the slow
      tier was copied as 0 bytes and the copy made over it was wrong (seen:
      `copy.deepcopy(model.state_dict())` inside a step differed from plain PyTorch's,
      no error). While an OutOfCore is open, `UntypedStorage.clone` is wrapped: the
      storage is made resident first as in rule 3 (refused from another thread as in
      rule 4), and the copy runs with the dispatch modes set aside (rule 5: the copy is
      new to the step; it binds at its first use there, `set_` in `__deepcopy__`).
      Unlike sharing, the storage is not pinned: it moves again at once. The copy is
      noted as made in the step by no op (`aten.note_made`), and `torch.load` (whose
      storages are made in C++) is wrapped to say the same of what it shows first: both
      were recorded as state the step started from, carried into the next step (NOTE
      [Storages made outside the dispatcher] in aten.py).
  15. `Tensor.tolist()` reads the storage's memory without an aten op: inside a
      block it raised "tolist() shouldn't be called on a tensor with unallocated
      storage" for a tensor on the slow tier. While an OutOfCore is open, it is wrapped:
      inside a block the storage is made resident first as in rule 3 (refused from
      another thread as in rule 4), then PyTorch's runs with the modes set aside
      (rule 5). Between blocks every storage is resident or mapped: PyTorch's own.

  PackedSequence's `batch_sizes` is read in C++ by functions no dispatch mode sees:
  16. NOTE [Read past the dispatcher] in aten.py. The one `pack_padded_sequence` makes
      never moves from the op that makes it. One made otherwise (a PackedSequence
      built by hand in the step, `PackedSequence(data, batch_sizes)`) reaches the
      functions that read it (`torch._VF.gru`, `lstm`, `rnn_tanh`, `rnn_relu`,
      `_pad_packed_sequence`: `aten.READ_PAST_ARGUMENTS`) as any other tensor. While an
      OutOfCore is open those are wrapped (on `torch._VF`, where torch.nn looks them up
      at each call): the storage is made resident first as in rule 3 (refused from
      another thread as in rule 4), then marked as never moving for good
      (`aten.mark_read_past`) and its entry pinned: the function takes its pointer once
      and runs ops that make room while it reads it. A recording counts it held for its
      whole life (`SafeRecording.read_past`), so the plan made from it never moves it;
      a replay whose plan moves it leaves the plan there (`Replayer.read_past`), as for
      a storage shared since it was recorded.
  17. `torch.tensor_split(x, indices)` with a 1-D tensor of indices reads them in C++
      before any op (CompositeImplicitAutograd, helper-117: "data is not allocated yet"
      for indices outcore had moved). While an OutOfCore is open `torch.tensor_split`
      and `Tensor.tensor_split` are wrapped: inside a block the indices are made resident
      first as in rule 3 (refused from another thread as in rule 4); nothing reads them
      after the call begins, so they are not pinned.

  `Tensor.data_ptr()` is an address, read without an aten op:
  18. Inside a block, a tensor whose storage outcore has on the slow tier (or dropped to
      recompute) has no memory: PyTorch's `data_ptr()` says 0 for every such tensor, and
      the idiom that tells parameters apart by it (`{p.data_ptr(): p for p in params}`,
      to skip tied weights) merged different ones and trained on wrong values without an
      error (helper-141). While an OutOfCore is open `Tensor.data_ptr` is wrapped: on
      the block's thread it raises OutcoreError for such a tensor, saying what to do.
      Any other tensor gets PyTorch's answer, an address valid until outcore next moves
      the storage (rule 8); reading it back and keeping it in memory for the rest of the
      block is not done: a plan that moves it would leave its plan at every step.
      PyTorch's own Python code gets PyTorch's answer too: its uses key by identity and
      version beside the address (`allow_mutation_on_saved_tensors`, bitwise with
      outcore before; raising broke it: helper-142). Not covered, and still 0: the
      address of the storage itself (`untyped_storage().data_ptr()`, as its other
      accessors: README), tensor subclasses other than parameters, other threads.
  19. Between blocks a storage on the slow tier is mapped from the swap file (NOTE
      [Mapped state]) and cannot grow: `t.resize_()` past its size raised PyTorch's
      "Trying to resize storage that is not resizable", which names neither outcore nor
      what to do (helper-141: a buffer grown between iterations, which trained without
      outcore), and left the tensor with the new shape over the old storage. `Tensor.resize_`
      and `resize_as_` are wrapped to say both where that error comes from a storage
      outcore has mapped, with the tensor's shape put back. Not covered: an `out=` op
      that grows such a tensor between iterations, which fails in C++ with PyTorch's
      error and the new shape left (helper-142: the next iteration read past the
      storage).
"""
from __future__ import annotations

import contextlib
import functools
import pickle
import sys
import threading
import weakref

import torch
from torch.utils._python_dispatch import _disable_current_modes

from ..aten import (READ_PAST_ARGUMENTS, loading, mark_read_past, note_made, read_past,
                    read_past_arguments, storage_of)
from ..errors import OutcoreError
from .compose import (ASYNC_COLLECTIVES, guard_async_collective, guard_comm_hook,
                      guard_future_callbacks)
from .interrupts import critical, held_here, no_raise
from ..states import DISCARDED, FAST, MAPPED, SLOW
from ..units import format_bytes

_METHODS = ("_share_fd_cpu_", "_share_filename_cpu_")
_originals: dict = {}           # (class, method name) -> PyTorch's function, while installed
_lock = threading.Lock()
_exports: dict[int, int] = {}   # storage key -> arrays numpy() built over it that live (NOTE 8)
_exports_lock = threading.Lock()


def exported(storage) -> bool:
    """Whether an array `.numpy()` handed out over `storage` lives (NOTE 8, 9)."""
    return storage._cdata in _exports


def install(open_outofcore) -> None:
    """Wrap the two sharing methods (NOTE 3); `open_outofcore()` returns the OutOfCore
    open in this process, or None. Idempotent; once installed, it wraps only what was
    imported since (`_install_late`: transformers after the OutOfCore was made)."""
    with _lock:
        if _originals:
            _install_late(open_outofcore)
            return
        wrappers = [(torch.UntypedStorage, name, _wrap) for name in _METHODS]
        wrappers.append((torch.UntypedStorage, "clone", _wrap_clone))      # NOTE 14
        wrappers.append((torch.Tensor, "tolist", _wrap_tolist))            # NOTE 15
        wrappers.append((torch.Tensor, "numpy", _wrap_numpy))
        wrappers.append((torch.Tensor, "data_ptr", _wrap_data_ptr))        # NOTE 18
        wrappers += [(torch.Tensor, "resize_", _wrap_resize),              # NOTE 19
                     (torch.Tensor, "resize_as_", _wrap_resize)]
        wrappers += [(torch._VF, name, _wrap_read_past) for name in READ_PAST_ARGUMENTS]  # 16
        wrappers += [(torch, "tensor_split", _wrap_tensor_split),                        # 17
                     (torch.Tensor, "tensor_split", _wrap_tensor_split)]
        wrappers += [(torch, "save", _wrap_save), (torch.serialization, "save", _wrap_save)]
        wrappers += [(torch, "load", _wrap_load), (torch.serialization, "load", _wrap_load)]
        # Future callbacks on another thread: NOTE [Collectives in flight] rule 5.
        wrappers += [(torch._C.Future, "then", guard_future_callbacks),
                     (torch._C.Future, "add_done_callback", guard_future_callbacks)]
        # Asynchronous collectives between iterations: rule 6 there.
        c10d = None
        if torch.distributed.is_available():
            import torch.distributed.distributed_c10d as c10d
            wrappers += [(c10d, name, guard_async_collective) for name in ASYNC_COLLECTIVES]
            # DDP comm hooks registered while an OutOfCore is open: rule 4 there.
            ddp = torch.nn.parallel.DistributedDataParallel
            wrappers += [(ddp, name, guard_comm_hook)
                         for name in ("register_comm_hook", "_register_builtin_comm_hook")]
        safetensors = _safetensors()
        if safetensors is not None and hasattr(safetensors, "_flatten_as_ptr"):    # NOTE 12
            wrappers += [(safetensors, "_flatten_as_ptr", _wrap_flatten),
                         (safetensors, "serialize", _wrap_serialize),
                         (safetensors, "serialize_file", _wrap_serialize),
                         (safetensors, "save_model", _wrap_save_module)]     # NOTE 13
        _wrap_all(wrappers, open_outofcore)
        if c10d is not None:
            _alias(c10d, torch.distributed, ASYNC_COLLECTIVES)
            _traceable(c10d, ASYNC_COLLECTIVES)
        _install_late(open_outofcore)


def _alias(source, module, names) -> None:
    """`module.<name>` is `source.<name>`'s wrapper itself, not a second one: torch.distributed
    re-exports c10d's functions, and `P2POp(dist.isend, ...)` is refused unless `dist.isend
    is c10d.isend` (`_check_op`: a pipeline stage's sends raised ValueError)."""
    for name in names:
        original = _originals.get((source, name), (None,))[0]
        if original is not None and getattr(module, name, None) is original:
            _originals[module, name] = (original, name in module.__dict__)
            setattr(module, name, getattr(source, name))


# Our wrappers of c10d's collectives that torch.compile rewrites as PyTorch's own.
_remapped: list = []


def _traceable(source, names) -> None:
    """Dynamo rewrites a call of c10d's `all_reduce` (and others) into a functional
    collective, found by the function's identity (`traceable_collective_remaps`); our
    wrapper, in a file Dynamo skips (NOTE [Dynamo kept out] in aten.py), was a graph
    break, and under `fullgraph=True` an error (helper-179). Each wrapper gets its original's
    rewrite; `uninstall` takes them out."""
    try:
        from torch.distributed._functional_collectives import traceable_collective_remaps
    except ImportError:                 # another PyTorch: the graph breaks, nothing else
        return
    for name in names:
        original = _originals.get((source, name), (None,))[0]
        wrapper = getattr(source, name, None)
        if original in traceable_collective_remaps and wrapper is not original:
            traceable_collective_remaps[wrapper] = traceable_collective_remaps[original]
            _remapped.append(wrapper)


def _wrap_all(wrappers, open_outofcore) -> None:
    for cls, name, wrap in wrappers:
        original = getattr(cls, name, None)     # Tensor.numpy is torch._C.TensorBase's
        if original is None:            # a PyTorch without it: nothing to wrap
            continue
        _originals[cls, name] = (original, name in cls.__dict__)
        setattr(cls, name, wrap(original, open_outofcore))


def _install_late(open_outofcore) -> None:
    """Wrap `PreTrainedModel.save_pretrained` (NOTE 13) once transformers is imported:
    outcore does not import it, and a script may import it after making its OutOfCore.
    Called as each OutOfCore is made and as each block begins (a dictionary lookup when
    there is nothing new). Under `_lock`."""
    modeling = sys.modules.get("transformers.modeling_utils")
    pretrained = getattr(modeling, "PreTrainedModel", None)
    if pretrained is not None and (pretrained, "save_pretrained") not in _originals:
        _wrap_all([(pretrained, "save_pretrained", _wrap_save_module)], open_outofcore)


def install_late(open_outofcore) -> None:
    """`_install_late` where `install` has run (and `uninstall` has not since)."""
    with _lock:
        if _originals:
            _install_late(open_outofcore)


def uninstall() -> None:
    """Put PyTorch's methods back (where ours are still the ones installed)."""
    with _lock:
        if _remapped:
            from torch.distributed._functional_collectives import traceable_collective_remaps
            while _remapped:
                traceable_collective_remaps.pop(_remapped.pop(), None)
        for (cls, name), (original, own) in list(_originals.items()):
            current = cls.__dict__.get(name)
            if getattr(current, "__wrapped__", None) is original:
                if own:
                    setattr(cls, name, original)
                else:
                    delattr(cls, name)      # inherited again
            del _originals[cls, name]


def _wrap(original, open_outofcore):
    @functools.wraps(original)
    def share(storage, *args, **kwargs):
        ooc = open_outofcore()
        if ooc is None or ooc.closed:
            return original(storage, *args, **kwargs)
        shield = _held(ooc)
        if shield is not None:
            shield.enter()
        try:
            with _disable_current_modes():      # NOTE 5
                if not storage.is_shared():
                    _prepare(ooc, storage, "share_memory_()")
                return original(storage, *args, **kwargs)
        finally:
            if shield is not None:
                shield.exit()
    return critical(share)


def _wrap_clone(original, open_outofcore):
    @functools.wraps(original)
    def clone(storage, *args, **kwargs):
        ooc = open_outofcore()
        if ooc is None or ooc.closed or not ooc._active:
            with reading(ooc, "copy.deepcopy() (UntypedStorage.clone())", [storage]):
                return original(storage, *args, **kwargs)  # between iterations: all readable
        _readied(ooc, storage, "copy.deepcopy() (UntypedStorage.clone())")
        with _disable_current_modes():      # NOTE 5, 14
            copied = original(storage, *args, **kwargs)
        if ooc._active_thread == threading.get_ident():
            note_made(copied, storage)   # NOTE [Storages made outside the dispatcher]
        return copied
    return clone


def _wrap_load(original, open_outofcore):
    @functools.wraps(original)
    def load(*args, **kwargs):
        ooc = open_outofcore()
        if ooc is None or ooc.closed or not ooc._active or \
                ooc._active_thread != threading.get_ident():
            return original(*args, **kwargs)
        with loading():         # NOTE [Storages made outside the dispatcher] in aten.py
            return original(*args, **kwargs)
    return load


def _wrap_tolist(original, open_outofcore):
    @functools.wraps(original)
    def tolist(tensor):
        ooc = open_outofcore()
        if (ooc is None or ooc.closed or not ooc._active or tensor.device.type != "cpu"
                or type(tensor) not in (torch.Tensor, torch.nn.Parameter)
                or tensor.layout is not torch.strided):
            return original(tensor)
        _readied(ooc, tensor.untyped_storage(), ".tolist()")
        with _disable_current_modes():      # NOTE 5, 15
            return original(tensor)
    return tolist


def _wrap_data_ptr(original, open_outofcore):
    @functools.wraps(original)
    def data_ptr(tensor):
        ooc = _block_here(open_outofcore)
        if (ooc is not None and tensor.layout is torch.strided
                and (type(tensor) is torch.Tensor or isinstance(tensor, torch.nn.Parameter))
                and not sys._getframe(1).f_globals.get("__name__", "").startswith("torch.")):
            storage = tensor.untyped_storage()
            entry = ooc._res.entries.get(storage._cdata)
            if entry is not None and entry.ref() is storage and entry.state in (SLOW, DISCARDED):
                raise OutcoreError(
                    f"Tensor.data_ptr() inside `with ooc.{ooc._active}():` of a tensor of "
                    f"shape {list(tensor.shape)} ({format_bytes(entry.nbytes)}) whose memory "
                    "outcore has on the slow tier: it has no address now (PyTorch would "
                    "say 0, as for every such tensor), so code that tells tensors apart by "
                    "it would take different ones for the same. Take addresses between "
                    "iterations, where every tensor has its memory (README, \"Between "
                    "iterations\"), or tell tensors apart by identity (`a is b`, id(a))")
        return original(tensor)
    return data_ptr


def _wrap_resize(original, open_outofcore):
    name = original.__name__

    @functools.wraps(original)
    def resize_(tensor, *args, **kwargs):
        if tensor.layout is not torch.strided or open_outofcore() is None:
            return original(tensor, *args, **kwargs)    # nothing of outcore's to map
        shape = (tensor.size(), tensor.stride(), tensor.storage_offset())
        try:
            return original(tensor, *args, **kwargs)
        except RuntimeError as err:
            ooc = open_outofcore()
            if ooc is None or ooc.closed or "not resizable" not in str(err):
                raise
            storage = tensor.untyped_storage()
            entry = ooc._res.entries.get(storage._cdata)
            if entry is None or entry.ref() is not storage or entry.state is not MAPPED:
                raise
            with torch.no_grad():       # PyTorch's resize_ took the new shape before it failed
                tensor.as_strided_(*shape)
            raise OutcoreError(
                f"Tensor.{name}() of a tensor of shape {list(tensor.shape)} whose "
                f"{format_bytes(entry.nbytes)} outcore keeps on the slow tier between "
                "iterations, mapped from its swap file: a mapping cannot grow (PyTorch: "
                f"{err}). Make a new tensor instead (buf = torch.cat([buf, more]), or "
                "buf.new_empty(...) and a copy): outcore plans it like any. The tensor is "
                "unchanged") from None
    return resize_


def _wrap_read_past(original, open_outofcore):
    name = original.__name__

    @functools.wraps(original)
    def reads_past(*args, **kwargs):
        ooc = open_outofcore()
        if ooc is None or ooc.closed:
            return original(*args, **kwargs)
        for tensor in read_past_arguments(name, args):
            storage = storage_of(tensor)
            if storage is None or read_past(storage):
                continue                    # never moved since it was made (NOTE 16)
            _readied(ooc, storage, f"torch._VF.{name}() (its {READ_PAST_ARGUMENTS[name][1]})")
            mark_read_past(storage)
            if ooc._active and ooc._active_thread == threading.get_ident():
                _pin_read_past(ooc, storage)
        return original(*args, **kwargs)
    return reads_past


def _wrap_tensor_split(original, open_outofcore):
    @functools.wraps(original)
    def tensor_split(tensor, *args, **kwargs):
        ooc = open_outofcore()
        if ooc is not None and not ooc.closed and ooc._active:
            for value in (*args[:1], *kwargs.values()):
                if (type(value) is torch.Tensor and value.device.type == "cpu"
                        and value.layout is torch.strided and value.dim() == 1):
                    _readied(ooc, value.untyped_storage(), "torch.tensor_split()")   # NOTE 17
        return original(tensor, *args, **kwargs)
    return tensor_split


@critical
def _pin_read_past(ooc, storage) -> None:
    """Pin the resident entry of a storage just marked as read past the dispatcher
    (NOTE 16), and tell the block's mode (`read_past`), as a held section."""
    shield = _held(ooc)
    if shield is not None:
        shield.enter()
    try:
        res = ooc._res
        entry = res.entry_of(storage)
        if (entry is None or entry.pinned or entry.elsewhere or entry.owner
                or entry.state is not FAST):
            return
        res.pin_if_unmovable(entry, storage)        # noted in newly_pinned
        note = getattr(ooc._mode, "read_past", None)
        if note is not None:
            note(entry)
    finally:
        if shield is not None:
            shield.exit()


@critical
def _readied(ooc, storage, what: str) -> None:
    """`_prepare` as a held section (NOTE 6)."""
    shield = _held(ooc)
    if shield is not None:
        shield.enter()
    try:
        with _disable_current_modes():
            _prepare(ooc, storage, what)
    finally:
        if shield is not None:
            shield.exit()


def _held(ooc):
    """The shield a held section enters on this thread (NOTE 6: signals reach only the
    main thread, and its shield is its own), or None."""
    return ooc._shield if threading.current_thread() is threading.main_thread() else None


def _beside_the_plan(ooc, entry) -> None:
    """A storage made resident here while a replay runs is one its plan has elsewhere:
    the replay lets it linger beside the plan and makes room from it when the budget
    needs (`Replayer.linger`). Left as it was, it stayed resident beside the plan for
    the rest of the step, over the budget (helper-50)."""
    linger = getattr(ooc._mode, "linger", None)
    if linger is not None:
        linger(entry)


def _prepare(ooc, storage, what: str) -> None:
    """Make a tracked storage's bytes resident before `what` hands out its memory (NOTE
    3, 8), or refuse (NOTE 4). Between iterations, a held section once other threads'
    reads have ended (NOTE [Interrupts] rule 9)."""
    res = ooc._res
    owner = ooc._active_thread
    if owner is not None and owner != threading.get_ident():
        entry = res.entries.get(storage._cdata)       # a read: no change to the table
        if entry is not None and entry.ref() is storage and not entry.pinned:
            raise OutcoreError(
                f"{what} of a {format_bytes(entry.nbytes)} tensor that outcore moves "
                "between RAM and its swap file, from another thread than the one that runs "
                "ooc.iteration(): only that thread may move it, and outcore may be moving it "
                f"right now. Call {what} from that thread (between iterations or inside the "
                f"step), or on a .clone() of it; nothing was changed")
        return
    entry = res.entry_of(storage)
    if entry is None or entry.pinned or entry.elsewhere or entry.owner or entry.state is FAST:
        return
    # Between iterations other threads' reads end first (`_alone`).
    with contextlib.nullcontext() if ooc._active else ooc._alone(), held_here(ooc._shield):
        made_room = res.evict_lru(ooc.budget - entry.nbytes, {entry.key})  # as for an input
        res.ready(entry)
        if ooc._active:
            _beside_the_plan(ooc, entry)
        elif made_room:
            ooc._remap()      # nothing may stay on the slow tier unmapped


# -- .numpy() (NOTE 7-9) ----------------------------------------------------------------
_TYPESTR: dict = {}             # torch dtype -> numpy's type string, as PyTorch converts it


def _typestr(dtype) -> str | None:
    """numpy's name for `dtype` as PyTorch's own numpy() gives it, or None where numpy
    has no such type (bfloat16, float8: PyTorch refuses them)."""
    if dtype not in _TYPESTR:
        try:                           # PyTorch's own, wrapped or not
            _TYPESTR[dtype] = torch._C.TensorBase.numpy(torch.empty(0, dtype=dtype)).dtype.str
        except (TypeError, RuntimeError):
            _TYPESTR[dtype] = None
    return _TYPESTR[dtype]


class _Export:
    """The owner of an array numpy() built over a tensor's memory (NOTE 8): holds the
    tensor, so that its storage lives as long as any array over it."""

    def __init__(self, tensor, interface: dict):
        self.tensor = tensor
        self.__array_interface__ = interface


@no_raise      # a finalizer, also between iterations (NOTE [Interrupts] rules 6, 8)
def _end_export(key: int) -> None:
    """The last array over the storage `key` died (NOTE 9); on any thread."""
    with _exports_lock:
        left = _exports.get(key, 0) - 1
        if left > 0:
            _exports[key] = left
        else:
            _exports.pop(key, None)


def _convertible(tensor) -> bool:
    """Whether PyTorch's numpy() would give an array over this (CPU, strided) tensor's
    own memory. A tensor that requires grad converts where grad mode is off, as PyTorch
    checks it (`torch.no_grad()`, an autograd Function's or a custom op's forward):
    handed to PyTorch's own, a parameter read under no_grad, or a custom op's input
    read through numpy, was unresizable for good (helper-141: every other iteration
    deviated and the next recorded again)."""
    return (not (tensor.requires_grad and torch.is_grad_enabled()) and not tensor.is_conj()
            and not tensor.is_neg() and tensor.numel() > 0 and _typestr(tensor.dtype) is not None)


def _may_move(ooc, storage) -> bool:
    """Whether outcore moves `storage` or may once it tracks it (NOTE 8): not one it
    never moves (small, pinned for another reason, another device's, a collective's or
    FSDP's), which gets PyTorch's own numpy() (and its refusal to resize it after).
    Read only: any thread."""
    res = ooc._res
    entry = res.entries.get(storage._cdata)
    if entry is None or entry.ref() is not storage:     # not tracked (yet): a parameter
        return storage.nbytes() >= res.min_move_bytes  # before the first iteration
    # Pinned for an array of its own (alive, or dropped since: pinned until the next block
    # starts, `end_exports`): outcore's numpy() again. PyTorch's made it unresizable for
    # good: .numpy() twice between iterations and the weights never moved again, and the
    # next step did not fit its budget.
    return not (entry.elsewhere or entry.owner
                or (entry.pinned and not exported(storage) and not res.export_pinned(entry)))


def _wrap_numpy(original, open_outofcore):
    @functools.wraps(original)
    def numpy(tensor, *, force: bool = False):
        ooc = open_outofcore()
        if (ooc is None or ooc.closed or type(tensor) not in (torch.Tensor, torch.nn.Parameter)
                or tensor.device.type != "cpu" or tensor.layout is not torch.strided
                or not _may_move(ooc, tensor.untyped_storage())):
            return original(tensor, force=force)        # first: costs nothing more
        with _disable_current_modes():
            if force:
                tensor = tensor.detach().resolve_conj().resolve_neg()   # as PyTorch's force
            if not _convertible(tensor):
                return original(tensor, force=force)
            return _handed_out(ooc, tensor)
    return numpy


@critical
def _handed_out(ooc, tensor):
    """An array over `tensor`'s memory, made resident first, exported while it lives
    (NOTE 8). Held: a Ctrl-C lands before the read back or after the export."""
    import numpy as np

    shield = _held(ooc)
    if shield is not None:
        shield.enter()
    try:
        storage = tensor.untyped_storage()
        _prepare(ooc, storage, ".numpy()")
        size = tensor.element_size()
        owner = _Export(tensor, {
            "version": 3, "shape": tuple(tensor.shape), "typestr": _typestr(tensor.dtype),
            "data": (tensor.data_ptr(), False),
            "strides": tuple(stride * size for stride in tensor.stride())})
        key = storage._cdata
        with _exports_lock:
            _exports[key] = _exports.get(key, 0) + 1
        weakref.finalize(owner, _end_export, key)
        return np.asarray(owner)
    finally:
        if shield is not None:
            shield.exit()


# -- torch.save (NOTE 10, 11) -------------------------------------------------------------
class _Discard:
    """A file that keeps nothing: the pickling pass that finds the storages."""

    def write(self, data) -> int:
        return len(data)


def _storages_in(obj, pickle_module) -> list:
    """The storages pickling `obj` reaches (persistent ids, as torch.save sees them)."""
    found: dict = {}
    try:
        class Finder(getattr(pickle_module, "Pickler", pickle.Pickler)):
            def persistent_id(self, item):
                if isinstance(item, torch.storage.TypedStorage):
                    item = item._untyped_storage
                if isinstance(item, torch.UntypedStorage):
                    found.setdefault(item._cdata, item)
                    return str(item._cdata)
                return None
        Finder(_Discard(), protocol=2).dump(obj)
    except Exception:       # noqa: BLE001 - torch.save itself raises it, as without outcore
        pass
    return list(found.values())


def _block_here(open_outofcore):
    """The open OutOfCore whose block runs on this thread, or None (NOTE 10)."""
    ooc = open_outofcore()
    if (ooc is None or ooc.closed or not ooc._active
            or ooc._active_thread != threading.get_ident()):
        return None
    return ooc


@contextlib.contextmanager
def reading(ooc, what: str, storages=None):
    """A read of tracked storages' memory on a thread that runs no block: the next block
    waits for it to end (`_Iteration.__enter__`), and while another thread's block is
    open it is refused where `storages` (all, when None) holds one outcore may move."""
    if ooc is None or ooc.closed or ooc._active_thread == threading.get_ident():
        yield
        return
    with ooc._gate:
        # While the training thread moves storages between iterations (`OutOfCore._alone`)
        # a new reader waits, as between() does (helper-116: a background save started
        # then read what it freed).
        while ooc._moving and not ooc.closed:
            ooc._gate.wait()
        if ooc._active:
            res = ooc._res
            found = storages is None or any(
                (e := res.entries.get(s._cdata)) is not None and e.ref() is s and not e.pinned
                for s in storages)
            if found:
                raise OutcoreError(
                    f"{what} on another thread while ooc.{ooc._active}() runs on the training "
                    "thread: outcore may be moving these tensors right now (a tensor on the "
                    "slow tier has no bytes in RAM; saved, it would be empty or garbage). "
                    "Start it between iterations (the next iteration waits for it), or on "
                    "the training thread; nothing was written")
        ooc._readers += 1
    try:
        yield
    finally:
        with ooc._gate:
            ooc._readers -= 1
            ooc._gate.notify_all()


def _wrap_save(original, open_outofcore):
    @functools.wraps(original)
    def save(obj, f, *args, **kwargs):
        ooc = _block_here(open_outofcore)
        if ooc is None:
            other = open_outofcore()
            if other is None or other.closed:
                return original(obj, f, *args, **kwargs)
            module = kwargs.get("pickle_module") or (args[0] if args else pickle)
            storages = None
            if other._active:
                with _disable_current_modes():
                    storages = _storages_in(obj, module)
            with reading(other, "torch.save()", storages):
                return original(obj, f, *args, **kwargs)
        module = kwargs.get("pickle_module") or (args[0] if args else pickle)
        with _disable_current_modes():              # NOTE 5, 11
            storages = _storages_in(obj, module)
        return _while_readable(ooc, storages, lambda: original(obj, f, *args, **kwargs))
    return save


def _while_readable(ooc, storages: list, call):
    """`call()` with every tracked storage in `storages` readable (NOTE 10, 13) and the
    dispatch modes set aside (NOTE 5: its ops, and the unmapping's, are not the step's);
    what was mapped for it is unmapped after, also when it raises."""
    mapped: list = []
    with _disable_current_modes():
        try:
            _readable(ooc, storages, mapped)
            return call()
        finally:
            if mapped:
                _unmapped(ooc, mapped)


def _storages_of(tensors) -> list:
    """The distinct storages of the plain, strided, non-meta tensors among `tensors`."""
    return list({t.untyped_storage()._cdata: t.untyped_storage() for t in tensors
                 if type(t) in (torch.Tensor, torch.nn.Parameter)
                 and t.layout is torch.strided and not t.is_meta}.values())


@critical
def _readable(ooc, storages: list, mapped: list) -> None:
    """Give every tracked storage in `storages` its bytes in memory for a save (NOTE 10);
    the entries mapped here are appended to `mapped` as they are."""
    shield = _held(ooc)
    if shield is not None:
        shield.enter()
    try:
        res = ooc._res
        entries = [e for s in storages if (e := res.entry_of(s)) is not None
                   and not e.elsewhere and not e.owner]
        if not any(e.state is not FAST for e in entries):
            return
        res.settle()
        keep = {e.key for e in entries}
        disk = ooc._mover.device_type == "cpu"
        for entry in entries:
            if entry.state is DISCARDED and disk:
                # Remade (its recompute reads its sources and makes temporaries: all the
                # room there is, first), then written out and mapped like the rest, so
                # that the arrays of one save are never all resident at once.
                res.evict_lru(0, keep)
                res.ready(entry)
                res.evict(entry)
                res.finish(entry)
            if entry.state is SLOW and disk and res.map_one(entry):
                mapped.append(entry)
            elif entry.state is SLOW or entry.state is DISCARDED:
                res.evict_lru(ooc.budget - entry.nbytes, keep)
                res.ready(entry)
                _beside_the_plan(ooc, entry)
    finally:
        if shield is not None:
            shield.exit()


@critical
def _unmapped(ooc, mapped: list) -> None:
    """Back to the slow tier after the save (NOTE 10): nothing wrote them."""
    shield = _held(ooc)
    if shield is not None:
        shield.enter()
    try:
        ooc._res.unmap(mapped)
    finally:
        if shield is not None:
            shield.exit()


# -- safetensors (NOTE 12) ----------------------------------------------------------------
_after_serialize = threading.local()    # .mapped: (ooc, its mode, entries) to unmap


def _safetensors():
    """`safetensors.torch` where it is installed, else None."""
    try:
        import safetensors.torch as module
    except Exception:       # noqa: BLE001 - not installed, or one that does not import
        return None
    return module


def _wrap_flatten(original, open_outofcore):
    @functools.wraps(original)
    def flatten(tensors, *args, **kwargs):
        ooc = _block_here(open_outofcore)
        if ooc is None:
            return original(tensors, *args, **kwargs)
        _unmap_after_serialize()            # one no serialize followed
        mapped: list = []
        with _disable_current_modes():      # NOTE 5, 12
            try:
                values = tensors.values() if isinstance(tensors, dict) else ()
                _readable(ooc, _storages_of(values), mapped)
                flattened = original(tensors, *args, **kwargs)
            except BaseException:
                if mapped:
                    _unmapped(ooc, mapped)
                raise
        if mapped:
            _after_serialize.mapped = (ooc, ooc._mode, mapped)
        return flattened
    return flatten


def _wrap_serialize(original, open_outofcore):
    @functools.wraps(original)
    def serialize(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        finally:
            _unmap_after_serialize()
    return serialize


def _unmap_after_serialize() -> None:
    """Unmap what the last `_flatten_as_ptr` on this thread mapped (NOTE 12), while the
    block it ran in is still open: once that block has ended, its iteration's end or the
    next one's start has taken those entries over (between iterations, mapped state is
    outcore's own: unmapped there, it was left on the slow tier with no bytes, and a read
    crashed the process; helper-54)."""
    pending = getattr(_after_serialize, "mapped", None)
    if pending is None:
        return
    _after_serialize.mapped = None
    ooc, mode, mapped = pending
    if not ooc.closed and ooc._mode is mode and _block_here(lambda: ooc) is ooc:
        with _disable_current_modes():
            _unmapped(ooc, mapped)


def _wrap_save_module(original, open_outofcore):
    @functools.wraps(original)
    def save(model, *args, **kwargs):
        ooc = _block_here(open_outofcore)
        if ooc is None or not isinstance(model, torch.nn.Module):
            return original(model, *args, **kwargs)
        storages = _storages_of([*model.parameters(), *model.buffers()])     # NOTE 13
        return _while_readable(ooc, storages, lambda: original(model, *args, **kwargs))
    return save
