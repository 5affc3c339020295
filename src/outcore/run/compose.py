"""How outcore composes with torch.distributed: collectives in flight, storages FSDP owns.

Each rank runs its own OutOfCore (its own budget, its own swap file); outcore sees a
rank's collectives as functions of its trace, like any op (the recorder logs them with
the buffers they read and write). Two rules make the composition exact:

NOTE [Collectives in flight]
  1. A c10d op returns before its data has moved: gloo runs it on its own thread, NCCL
     on its own stream, and the caller waits on the returned Work (or its Future) when
     it likes: DDP at the end of backward, FSDP before its copy-out.
  2. Waiting does not end the collective's hold on its tensors: with gloo, a second
     `Work.wait()` or `Future.wait()` after the first reads them again (reduce-scatter,
     send/recv, a DDP comm hook's Future: a segmentation fault when their storage was
     resized to 0 in between; checked with torch 2.13). Nobody can tell when the caller's
     last wait comes.
  3. So a storage a collective touched is never moved again: it is disowned (pinned in
     place, `Residency.disown`) as the op returns, with evictions of its storages
     asked for during the op held back until then (`hold_moves`; others, the room for
     its outputs among them, go on), and the plan counts it as pinned for its
     whole life (`held_arrays`, `ooc.planned_budget`). DDP's buckets (as large as the
     gradients; `gradient_as_bucket_view=True` makes the gradients those buckets, and
     halves that) and FSDP's reduce-scatter outputs (the sharded gradients) stay in fast
     memory; the parameters, optimizer state and activations move as planned.
  4. What a callback chained on a collective's Future writes (`fut.then(...)`) is not
     seen: it runs on gloo's thread, outside every dispatch mode of outcore's (they are
     thread-local). DDP's comm hooks other than the default allreduce write the bucket
     there (fp16_compress_hook's `decompress`), a tensor no collective touched, which
     the plan moves: such hooks are refused, before the first iteration changes
     anything (`_refuse_comm_hooks`), and as they are registered while an OutOfCore is
     open (`guard_comm_hook`).
  5. A callback of the user's own (`fut.then(cb)`, `fut.add_done_callback(cb)`) that
     runs on another thread while an iteration is open runs its ops under `_Unseen`
     (`guard_future_callbacks`): an op on a storage outcore may move stops the callback
     with OutcoreError before it runs (helper-96: `avg.copy_(f.value()[0])` in such a
     callback gave other results than without outcore, or a segmentation fault). The
     chained Future's `wait()` raises it wrapped in a RuntimeError (PyTorch's), and the
     step's thread raises it as OutcoreError at its next op
     (`Residency.raise_stopped_callback`): `add_done_callback` drops a callback's
     exception, and so does a `.then` chain nobody waits on (helper-99), and the step
     would go on without the write. Ops on the collective's own tensors (pinned, rule
     3) and on tensors the callback makes run. A callback run on the iteration's
     own thread (a Future already done runs it at once) is seen like any op; one run
     between iterations writes the state where it lies (NOTE [Mapped state]).
  6. No dispatch mode sees a collective issued between iterations. A synchronous one
     is done when it returns; an asynchronous one (`async_op=True`, `isend`, `irecv`,
     `batch_isend_irecv`) goes on on gloo's thread, and the next iteration's start
     moved its tensors under it (local SGD's averaging overlapped with the next step:
     the process aborted, gloo's "writev ... Bad address", helper-173). So while an
     OutOfCore is open, those functions of `torch.distributed` are wrapped
     (`guard_async_collective`, installed with sharing.install): called with no block
     open, their tensors that outcore tracks are read back and disowned first, as in
     rule 3 (`OutOfCore._hold_for_collective`); from then on they never move. One on
     the slow tier is mapped there (NOTE [Mapped state]): disowned as it was, it was
     held empty and gloo sent from address 0 (helper-175), so `Residency.disown` reads back
     every storage it holds for a collective. Only the thread that runs the blocks may
     change the table: from another, between iterations or while a block is open
     (where no mode sees its op), a collective on a tensor outcore moves is refused
     before it starts. Inside a block the block's mode sees the op (rule 3). Each
     function is wrapped once, in `distributed_c10d`, and `torch.distributed` gets that
     same wrapper (`P2POp` requires `dist.isend is c10d.isend`). One taken from
     `torch.distributed` before the OutOfCore was made (`from torch.distributed import
     all_reduce`) is not wrapped, nor are `ProcessGroup`'s own methods
     (`group.allreduce(...)`) and the collectives a `_coalescing_manager(async_ops=True)`
     gathers (each is called synchronously; its Work comes from the manager).

NOTE [Storages FSDP owns]
  1. FSDP2 (`fully_shard`) frees each parameter's unsharded memory after use and
     re-allocates it before the next all-gather by resizing the all-gather output's
     storage itself (`storage.resize_(0)` / `resize_(n)`). outcore's in-place eviction
     resizes storages too; if both managed one storage, each would free the other's
     memory (seen: a segmentation fault in FSDP's all-gather copy-out).
  2. Ownership is split: FSDP owns the unsharded parameters (its all-gather outputs);
     outcore owns everything else: the sharded parameters, gradients, optimizer state,
     activations, buckets and temporaries. outcore *disowns* FSDP's storages
     (`Residency.disown(..., foreign=True)`): never moved, counted at their current
     size (`Residency.owned_bytes`, 0 while FSDP has them freed). The plan sets room
     aside for one only from FSDP's copy-out of it to its last use before the next
     copy-out (`owned_occupancy`, within `ooc.pinned_peak`).
  5. FSDP also reads all-gather buffers whose creation no dispatch mode sees (in a
     recording they look like inputs that existed before the step, first read in
     backward); the plan counts them resident from the step's start, which is more
     than FSDP holds (seen: 4 x 3 MiB on examples/fsdp2.py at batch 4).
  3. They are found three times over: at every iteration start and recording end,
     from the FSDPParams of the FSDP modules alive (`_fsdp_owned`); at every copy-out
     (`fsdp.split_with_sizes_copy`), whose `out` tensors are those storages, before it
     runs, so a storage FSDP creates during the step is disowned before anything could
     move it; and by the executor, which disowns any storage it finds resized behind
     its back instead of moving it (NOTE [Residency invariants], rule 5; FSDP on one
     rank copies out with a plain `copy_`).
  4. FSDP1 (`FullyShardedDataParallel`) keeps flat parameters whose storage it swaps and
     frees by other means; it is refused (`refuse_unsupported`), before anything runs.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import os
import sys
import threading
import warnings
import weakref

import torch

from ..aten import OutcoreMode, distinct_storages, iter_tensors, output_tensors
from ..errors import OutcoreError

# Ops in these namespaces pass through `around` (every other op skips it at the cost of
# one set lookup).
DISTRIBUTED_NAMESPACES = frozenset(("c10d", "_c10d_functional", "fsdp"))
_COPY_OUT = "split_with_sizes_copy"       # fsdp.split_with_sizes_copy(..., out=[...])


def _loaded(module_name: str):
    """A module the user's code imported, or None: outcore imports no distributed code."""
    return sys.modules.get(module_name)


def _distributed_up() -> bool:
    dist = _loaded("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def _live(classes: tuple) -> list:
    """Objects of `classes` alive now (a walk over what the garbage collector tracks)."""
    gc.collect()                  # a model dropped in a reference cycle is not in use
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # isinstance() on deprecated torch proxies warns
        return [obj for obj in gc.get_objects() if isinstance(obj, classes)]


# DDP comm hooks whose Future callbacks write no tensor but the collective's own (which
# `around` pins): DDP's default, in C++ and in Python (NOTE [Collectives in flight], rule 4).
_SAFE_COMM_HOOKS = frozenset(("BuiltinCommHookType.ALLREDUCE", "allreduce_hook"))


def _refuse_comm_hooks() -> None:
    """NOTE [Collectives in flight], rule 4: a DDP comm hook other than the default
    (fp16/bf16 compression, PowerSGD, one of the user's) writes the bucket in a callback
    chained on the collective's Future (`fut.then(decompress)`), which runs on gloo's
    thread, where no dispatch mode of outcore's sees it: the bucket was never a
    collective's tensor, so the plan moves it, and the write lands in memory outcore then
    swaps over or swaps out stale (seen: parameters not bitwise equal to DDP alone, in 3
    to 4 runs of 4, and replays over the budget by one bucket). Refused before anything
    runs."""
    parallel = _loaded("torch.nn.parallel")
    ddp = getattr(parallel, "DistributedDataParallel", None) if parallel is not None else None
    if ddp is None or not _distributed_up():
        return
    for module in _live((ddp,)):
        try:
            hook = module._get_ddp_logging_data().get("comm_hook")
        except Exception:               # a DDP without its reducer's logger: no hook known
            continue
        # A Python hook is DDP's default only if it is that function (helper-99: DDP logs
        # the hook's name, and a hook of the user's named `allreduce_hook` passed).
        own = [h for h, _ in getattr(module, "_comm_hooks", ()) if not _default_hook(h)]
        if own:
            hook = _hook_name(own[0])
        if own or hook and hook not in _SAFE_COMM_HOOKS:
            raise _comm_hook_refused(f"DistributedDataParallel has the comm hook {hook!r} "
                                     "(registered with register_comm_hook, or by DDP itself "
                                     "for mixed_precision= or an optimizer in backward)",
                                     "Nothing has run.")


def _default_hook(hook) -> bool:
    hooks_module = _loaded("torch.distributed.algorithms.ddp_comm_hooks.default_hooks")
    return hook is getattr(hooks_module, "allreduce_hook", None)


def _hook_name(hook) -> str:
    return f"{getattr(hook, '__module__', '?')}.{getattr(hook, '__qualname__', repr(hook))}"


def _comm_hook_refused(what: str, done: str) -> OutcoreError:
    return OutcoreError(
        f"{what}: its callback writes the gradient bucket on gloo's thread, after the "
        "allreduce, where outcore cannot see it, so outcore could move the bucket under "
        "that write (a silently different result). Train without the hook (DDP's default "
        f"allreduce composes: docs/distributed.md), or without outcore. {done}")


def guard_comm_hook(original, open_outofcore):
    """`DistributedDataParallel.register_comm_hook` (and `_register_builtin_comm_hook`)
    that refuses a hook other than the default while an OutOfCore is open, before DDP
    takes it (rule 4): the first iteration's check (`_refuse_comm_hooks`) does not see a
    hook registered after it (helper-182: one registered at the second iteration made a
    callback's error that named no hook, at the third replays over the budget)."""
    builtin = original.__name__ == "_register_builtin_comm_hook"

    @functools.wraps(original)
    def register(self, *args, **kwargs):
        ooc = open_outofcore()
        if ooc is not None and not ooc.closed:
            hook = (args or [*kwargs.values()] or [None])[0] if builtin else (
                args[1] if len(args) > 1 else kwargs.get("hook"))
            name = str(hook) if builtin else _hook_name(hook)
            if not (name in _SAFE_COMM_HOOKS if builtin else _default_hook(hook)):
                raise _comm_hook_refused(f"DistributedDataParallel.{original.__name__}"
                                         f"({name}) while an OutOfCore is open (DDP "
                                         "registers one itself for mixed_precision= or "
                                         "an optimizer in backward)",
                                         "The hook was not registered.")
        return original(self, *args, **kwargs)
    return register


FUTURE_CALLBACK = (
    "a callback chained on a torch Future (fut.then(...) or fut.add_done_callback(...)) ran "
    "{op} on a tensor outcore manages ({nbytes:,} B), on a thread outside ooc.iteration()'s "
    "(gloo runs such callbacks on its own), where outcore does not see the op and could "
    "move that tensor under it (a different result, or a crash). The callback was stopped "
    "before that op ran. Do that work on the training thread after the wait instead: "
    "`work = dist.all_reduce(t, async_op=True)`, later `work.wait()` and then the copy "
    "(NOTE [Collectives in flight] rule 5 in outcore/run/compose.py)")


class _Unseen(OutcoreMode):
    """The ops of a Future callback on another thread while an iteration is open (NOTE
    [Collectives in flight] rule 5): each runs unless it touches a storage outcore may
    move. Reads the residency's table only (a dict lookup is atomic; the table belongs to
    the iteration's thread, and a lookup here never changes it)."""

    def __init__(self, residency):
        super().__init__()
        self.entries = residency.entries

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for tensor in iter_tensors((*args, *kwargs.values())):
            entry = self.entries.get(tensor.untyped_storage()._cdata)
            if entry is not None and not (entry.pinned or entry.owner or entry.elsewhere):
                raise OutcoreError(FUTURE_CALLBACK.format(op=func, nbytes=entry.nbytes))
        return func(*args, **kwargs)


# NOTE [Collectives in flight] rule 6: those that may go on after they return.
ASYNC_COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather",
                     "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                     "all_to_all", "all_to_all_single", "gather", "scatter", "isend", "irecv",
                     "batch_isend_irecv", "all_reduce_coalesced", "all_gather_coalesced")
_ALWAYS_ASYNC = frozenset({"isend", "irecv", "batch_isend_irecv"})


def guard_async_collective(original, open_outofcore):
    """`torch.distributed.<collective>` that, called asynchronously where no block of
    its thread is open, holds its tensors in place first, or refuses where another
    thread's table has them (NOTE [Collectives in flight] rule 6)."""
    import inspect
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError):
        signature = None
    always = original.__name__ in _ALWAYS_ASYNC

    @functools.wraps(original)
    def collective(*args, **kwargs):
        ooc = open_outofcore()
        if ooc is not None and not ooc.closed and (
                not ooc._active or ooc._active_thread != threading.get_ident()) and (
                always or _async_op(signature, args, kwargs)):
            ooc._hold_for_collective(_collective_tensors(args, kwargs), original.__name__)
        return original(*args, **kwargs)
    return collective


def _async_op(signature, args, kwargs) -> bool:
    if signature is None:
        return bool(kwargs.get("async_op"))
    try:
        return bool(signature.bind_partial(*args, **kwargs).arguments.get("async_op"))
    except TypeError:                      # the call itself is wrong: PyTorch says so
        return False


def _collective_tensors(args, kwargs) -> list:
    """The tensors a collective's arguments hold: in lists too, and P2POps' (their
    `.tensor`)."""
    values = [*args, *kwargs.values()]
    ops = [v for value in values for v in (value if isinstance(value, (list, tuple))
                                           else [value])
           if isinstance(getattr(v, "tensor", None), torch.Tensor)]
    return [*iter_tensors(values), *(op.tensor for op in ops)]


def guard_future_callbacks(original, open_outofcore):
    """`torch.Future.then` / `add_done_callback` with the callback run under `_Unseen`
    where it runs on another thread than the open iteration's (NOTE [Collectives in
    flight] rule 5); installed with sharing.install while an OutOfCore is open."""
    @functools.wraps(original)
    def chain(future, callback, *args, **kwargs):
        if open_outofcore() is None:
            return original(future, callback, *args, **kwargs)

        @functools.wraps(callback)
        def guarded(fut):
            ooc = open_outofcore()
            if (ooc is None or ooc.closed or not ooc._active
                    or ooc._active_thread == threading.get_ident()):
                return callback(fut)
            try:
                with _Unseen(ooc._res):
                    return callback(fut)
            except OutcoreError as err:
                if ooc._res.stopped_callback is None:     # the step's thread raises it too
                    ooc._res.stopped_callback = err
                raise
        return original(future, guarded, *args, **kwargs)
    return chain


def refuse_unsupported() -> None:
    """Raise OutcoreError, before anything runs, when FSDP1 (`FullyShardedDataParallel`)
    is alive in this process, or a DDP model with a comm hook other than the default
    (`_refuse_comm_hooks`). Looks only in a distributed run that imported FSDP
    (transformers and accelerate import it whenever they load: the import alone says
    little); FSDP2 (`fully_shard`) composes (NOTE [Storages FSDP owns])."""
    _refuse_comm_hooks()
    module = _loaded("torch.distributed.fsdp")
    legacy = getattr(module, "FullyShardedDataParallel", None) if module is not None else None
    if legacy is None or not _distributed_up():
        return
    found = _live((legacy,))
    if found:
        raise OutcoreError(
            "FullyShardedDataParallel (FSDP1) is in use: it swaps and frees its flat "
            "parameters' memory itself, and outcore would move the same storages, which "
            "crashes the process. outcore composes with FSDP2 instead: shard the model with "
            "torch.distributed.fsdp.fully_shard (docs/distributed.md), or use "
            "DistributedDataParallel. Nothing has run.")


class Composition:
    """What one OutOfCore knows about the distributed code around it: the FSDP2 modules
    alive (found once, at the first iteration; later ones are met at their copy-outs)."""

    def __init__(self):
        self._fsdp_modules: list[weakref.ref] = []
        self._checked = False

    def check(self) -> None:
        """Before the first iteration changes anything: refuse what does not compose,
        and find the FSDP2 modules."""
        if self._checked:
            return
        refuse_unsupported()
        fsdp2 = _class("torch.distributed.fsdp", "FSDPModule")
        if fsdp2 is not None and _distributed_up():
            self._fsdp_modules = [weakref.ref(m) for m in _live((fsdp2,))]
        self._checked = True

    def disown_fsdp(self, residency) -> None:
        """Disown FSDP's unsharded parameters (NOTE [Storages FSDP owns], rule 3): at each
        iteration start, once the state is unmapped, and when a recording ends."""
        for tensor in self._fsdp_owned():
            # Only what the steps touched: another FSDP model alive beside this one
            # (kept for evaluation, say) is not outcore's to count.
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata in residency.entries:
                _disown(residency, tensor)

    def fsdp_uninitialized(self) -> list:
        """The FSDP2 states (weakly) that have not run their first forward yet: FSDP sets
        itself up lazily there (`FSDPState._lazy_init`, which allocates its all-gather
        outputs with ops no later iteration runs), so an iteration in which one did is
        not the steady step, and the next one is recorded too (as for DDP's buckets,
        `ddp_buckets_unbuilt`; `fsdp_set_up`). Reads FSDP's private `_is_root` (None
        until lazy init); a torch without it counts as set up."""
        return _unset_states(ref() for ref in self._fsdp_modules)

    def _fsdp_owned(self):
        """FSDP's all-gather outputs (the unsharded parameters' memory), through its
        FSDPParams. Private FSDP attributes, read defensively: a torch whose FSDP lacks
        them still has the copy-out rule."""
        for ref in self._fsdp_modules:
            module = ref()
            state = module._get_fsdp_state() if module is not None else None
            group = getattr(state, "_fsdp_param_group", None)
            for fsdp_param in getattr(group, "fsdp_params", ()):
                yield from getattr(fsdp_param, "all_gather_outputs", ())
                yield from getattr(fsdp_param, "_unsharded_inner_tensors", ())


def _unset_states(modules) -> list:
    found = []
    for module in modules:
        state = module._get_fsdp_state() if module is not None else None
        if state is not None and getattr(state, "_is_root", False) is None:
            found.append(weakref.ref(state))
    return found


def first_step_watch() -> tuple[list, list]:
    """For a recording of the user's (`outcore.record()`): the FSDP2 states alive that
    have not set themselves up yet, and the DDP modules that have not rebuilt their
    buckets (`ddp_buckets_unbuilt`). A step in which one did is not like the steps after
    it (`first_step_unlike_the_rest`). Empty outside a distributed run."""
    if not _distributed_up():
        return [], []
    fsdp2 = _class("torch.distributed.fsdp", "FSDPModule")
    ddp = _class("torch.nn.parallel.distributed", "DistributedDataParallel")
    classes = tuple(c for c in (fsdp2, ddp) if c is not None)
    # One walk for both (helper-202: 2.9 s a walk on a heap of 4M objects).
    found = _live(classes) if classes else []
    return (_unset_states(m for m in found if fsdp2 is not None and isinstance(m, fsdp2)),
            _unbuilt(m for m in found if ddp is not None and isinstance(m, ddp)))


def first_step_unlike_the_rest(watched: tuple[list, list]) -> str | None:
    """What of `watched` (first_step_watch, at the recording's start) made the recorded
    step unlike the steps after it, or None: FSDP2 set itself up in it (on a 4-layer
    Llama at 2 ranks the steps after it needed 17.92 MiB, that one 16.33: helper-201),
    or DDP rebuilt its buckets."""
    fsdp, ddp = watched
    if fsdp_set_up(fsdp):
        return "FSDP2 set itself up in it (its first forward)"
    if any(getattr(m, "_has_rebuilt_buckets", False) for m in (ref() for ref in ddp)
           if m is not None):
        return "DistributedDataParallel rebuilt its gradient buckets in it"
    return None


def fsdp_set_up(states: list) -> bool:
    """Whether one of `states` (from Composition.fsdp_uninitialized) ran its lazy
    set-up since: a module the step never ran (a second model kept for evaluation)
    stays unset and does not count."""
    return any(s is not None and getattr(s, "_is_root", None) is not None
               for s in (ref() for ref in states))


def ddp_buckets_unbuilt() -> list:
    """Weak references to the DistributedDataParallel modules alive that have not yet
    rebuilt their gradient buckets. DDP does so once, in the first forward with grad
    after a backward (`reducer._rebuild_buckets`, in the order the gradients came),
    allocating new buckets: that iteration runs ops no other does. An iteration recorded
    while such a module exists and ran forward with grad in it (it may rebuild in the next
    one), or in which one rebuilt, is not steady, and the next one is recorded too
    (`OutOfCore._plan_recording`; one never called with grad never rebuilds). Not one
    with `find_unused_parameters=True` (and no static graph): its reducer never rebuilds
    (the condition is `(static_graph or not find_unused_parameters) and not
    has_rebuilt_bucket`), and every recording of it was taken for an unsteady one
    (helper-89). Empty outside a distributed run that imported DDP (no walk over the
    heap then)."""
    ddp = _class("torch.nn.parallel.distributed", "DistributedDataParallel")
    if ddp is None or not _distributed_up():
        return []
    return _unbuilt(_live((ddp,)))


def _class(module: str, name: str):
    """`module.name` where that module is imported already, else None."""
    loaded = _loaded(module)
    return getattr(loaded, name, None) if loaded is not None else None


def _unbuilt(ddp_modules) -> list:
    """Weak references to those of `ddp_modules` that may yet rebuild their buckets."""
    return [weakref.ref(m) for m in ddp_modules if not getattr(m, "_has_rebuilt_buckets", True)
            and not (getattr(m, "find_unused_parameters", False)
                     and not getattr(m, "static_graph", False))]


_COMPILED_WRAPPER = ("compile_wrapper", f"_dynamo{os.sep}eval_frame.py")


def under_torch_compile() -> bool:
    """Whether the op being dispatched runs inside a `torch.compile`d function or module:
    a frame of the wrapper torch.compile puts around it (`compile_wrapper` in
    torch/_dynamo/eval_frame.py, torch 2.13; `torch._disable_dynamo`'s wrapper is
    another) is on the stack. TorchDynamo does not compile a frame while a dispatch mode
    is active ("non-infra torch dispatch mode present"), and outcore records and replays
    through one: such a function runs eagerly, op by op, under outcore. So results are
    bitwise the uncompiled model's, not the compiled one's, and the compile's speed is
    lost; `SafeRecording` warns once. A torch that names the wrapper otherwise is not
    recognized (no warning, the same eager run)."""
    name, file = _COMPILED_WRAPPER
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == name and code.co_filename.endswith(file):
            return True
        frame = frame.f_back
    return False


def _disown(residency, tensor) -> None:
    if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
        residency.disown(tensor.untyped_storage(), tensor.numel() * tensor.element_size(), "FSDP",
                         foreign=True)


def around(residency, func, args, kwargs, run):
    """Run a distributed op (`func.namespace in DISTRIBUTED_NAMESPACES`) through `run`:
    FSDP's copy-out targets are disowned before it (NOTE [Storages FSDP owns]); a
    collective's tensors as it returns (NOTE [Collectives in flight])."""
    if func.namespace == "fsdp":
        if func._opname == _COPY_OUT:
            for tensor in iter_tensors((kwargs.get("out", ()),)):
                _disown(residency, tensor)
        return run(func, args, kwargs)
    tensors = list(iter_tensors(args)) + list(iter_tensors(kwargs.values()))
    residency.hold_moves(distinct_storages(tensors))
    out = None
    try:
        out = run(func, args, kwargs)
    finally:
        if out is not None:
            tensors += output_tensors(out)
        residency.release_moves(distinct_storages(tensors), "collective")
    return out


def held_arrays(trace, also=()) -> frozenset:
    """Arrays of `trace` the executor keeps in place for their whole life: those a
    collective touches and FSDP's copy-out targets (NOTE [Collectives in flight],
    NOTE [Storages FSDP owns]), and `also` (the ids of storages found disowned when the
    recording ended: FSDP on one rank copies out with a plain copy_). Counted like small
    arrays: ooc.planned_budget."""
    held = set(also)
    for fn in trace.functions:
        namespace, _, rest = fn.op.partition(".")
        if namespace in ("c10d", "_c10d_functional"):
            held.update(fn.arrays())
        elif namespace == "fsdp" and rest.startswith(_COPY_OUT):
            held.update(a.array for a in fn.accesses if a.kind != "read")
    return frozenset(held)


def owned_arrays(trace, also=()) -> frozenset:
    """Arrays of `trace` FSDP owns (NOTE [Storages FSDP owns]): those its copy-out writes,
    and `also` (found disowned as the recording ended)."""
    owned = set(also)
    for fn in trace.functions:
        namespace, _, rest = fn.op.partition(".")
        if namespace == "fsdp" and rest.startswith(_COPY_OUT):
            owned.update(a.array for a in fn.accesses if a.kind != "read")
    return frozenset(owned)


def owned_occupancy(trace, owned) -> list[int]:
    """Bytes of the `owned` arrays allocated during each function. FSDP allocates an
    unsharded parameter right before its copy-out writes it and frees it after its last
    use before the next copy-out (resharding after forward) or after its last use in the
    step (after backward); one read before any write was allocated from the start."""
    n = len(trace.functions)
    delta = [0] * (n + 1)
    opened: dict[int, int] = {}     # array -> function where its current interval began
    last: dict[int, int] = {}       # array -> its latest access
    nbytes = {a: trace.arrays[a].nbytes for a in owned}

    def close(a):
        delta[opened[a]] += nbytes[a]
        delta[last[a] + 1] -= nbytes[a]

    for fn in trace.functions:
        for acc in fn.accesses:
            a = acc.array
            if a not in nbytes:
                continue
            if a not in opened:
                opened[a] = fn.index if acc.kind != "read" else 0
            elif acc.kind != "read" and last[a] < fn.index:   # a new copy-out: a new interval
                close(a)
                opened[a] = fn.index
            last[a] = fn.index
    for a in opened:
        close(a)
    curve, running = [], 0
    for i in range(n):
        running += delta[i]
        curve.append(running)
    return curve


def without_held(trace, held: frozenset):
    """`trace` with its `held` arrays at 0 bytes, for the planner: the executor keeps
    them in place whatever the plan says, and `ooc.planned_budget` has set their room
    aside (counting them in the plan too would ask for their bytes twice). Array ids,
    and so the schedule's actions, are those of `trace`."""
    if not held:
        return trace
    arrays = tuple(dataclasses.replace(a, nbytes=0) if a.id in held else a for a in trace.arrays)
    return dataclasses.replace(trace, arrays=arrays)
