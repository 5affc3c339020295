"""Record one training iteration: a TorchDispatchMode that logs every aten op and the
storages it reads, writes and creates.

    with outcore.record() as rec:
        loss = loss_fn(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
    print(rec.trace)

Autograd runs backward through the same dispatcher, so forward, backward and the
optimizer step land in one flat sequence. Nothing is changed: every op runs exactly as
it would without the recorder (multi-tensor ops run as their per-tensor equivalents,
which is bitwise equal; see aten.py).
"""
from __future__ import annotations

import sys
import threading
import time
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)

from ..aten import (FAST_PATH_OP, FRESH_ARGUMENT_OPS, NO_OVERWRITES, PACKAGE, OutcoreMode,
                    autocast_as_entered, byte_span, call_split, eager_stance, made_outside,
                    covers, note_read_past, op_inputs, output_tensors, outside_dynamo,
                    overwritten_pieces, resets, storage_of, uses_contents, written_tensors)
from ..errors import TraceError
from .estimate import estimate_duration, op_flops, tensor_bytes
from .model import Access, Array, Function, Trace

_PRECEDENCE = {"read": 0, "write": 1, "create": 2}

# torch.compile(module) warns on every call while any global module hook is registered
# (its hooks would fire twice). The recorder's (`Recording._note_module`) only notes
# buffers, once per module, so the warning says nothing true to the user: ignored while
# a recorder's hook is registered, and only it. One filter for all recorders at once
# (they nest, and run on several threads), put in by the first and taken out by the
# last; none where the user has the same filter already (helper-127: taking ours out
# took theirs).
_COMPILED_HOOK_WARNING = r"Using `torch\.compile\(module\)` when there are global hooks"
_warning_lock = threading.Lock()
_warning_users = 0
_warning_added = None           # (the filter list, our entry) while ours is in it


def _hide_compiled_hook_warning() -> None:
    global _warning_users, _warning_added
    with _warning_lock:
        _warning_users += 1
        if _warning_users > 1 or any(
                f[0] == "ignore" and f[1] is not None and f[1].pattern == _COMPILED_HOOK_WARNING
                and f[2] is UserWarning and f[3] is None and not f[4] for f in warnings.filters):
            return
        warnings.filterwarnings("ignore", message=_COMPILED_HOOK_WARNING, category=UserWarning)
        _warning_added = (warnings.filters, warnings.filters[0])


def _show_compiled_hook_warning() -> None:
    """Undo one `_hide_compiled_hook_warning`: the last one takes the filter out of the
    list it went into (a `warnings.catch_warnings` block may have begun or ended since),
    that entry itself: one equal to it that the user put in since took its place."""
    global _warning_users, _warning_added
    with _warning_lock:
        _warning_users -= 1
        if _warning_users or _warning_added is None:
            return
        (filters, entry), _warning_added = _warning_added, None
        for i, f in enumerate(filters):
            if f is entry:
                del filters[i]
                warnings._filters_mutated()     # as warnings.filterwarnings does
                return


class OptimizerSteps:
    """The optimizer steps begun and not ended, innermost last, each with whether it began
    inside a backward (`op_phase`), as the global optimizer step hooks say (`begin` from
    the pre-hook, `end` from the post-hook).

    A step that raises never reaches its post-hook: caught by the user inside the
    iteration, it counted as running for the rest of the iteration, and what came after
    it was named optimizer work (a later Ctrl-C noted as landing inside a step; a failed
    eviction kept for a step's end: helper-149). So each step keeps the frame that
    called its pre-hook (the optimizer's step wrapper, the first frame above outcore's
    own) and its thread: it is running while that frame is on that thread's stack
    (`open`), and an exception came out of it when its traceback passes through that
    frame (`raised_inside`: by the iteration's end the frame has left the stack)."""

    def __init__(self):
        self._steps: list[tuple[bool, int, object]] = []   # (in a backward, thread, frame)

    def begin(self) -> None:
        self._steps = [step for step in self._steps if _on_stack(step[1], step[2])]
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith(PACKAGE):
            frame = frame.f_back
        self._steps.append((torch._C._current_graph_task_id() != -1,
                            threading.get_ident(), frame))

    def end(self) -> None:
        if self._steps:
            self._steps.pop()

    def open(self) -> list[bool]:
        """Per step running now, innermost last: whether it began in a backward."""
        return [step[0] for step in self._steps if _on_stack(step[1], step[2])]

    def __bool__(self) -> bool:
        return bool(self.open())

    def raised_inside(self, exc: BaseException | None) -> bool:
        """Whether `exc`, or an exception it was raised from, came out of a step still
        listed (its traceback passes through the step's frame; `begin` drops the steps
        whose frame has left the stack)."""
        frames = {id(step[2]) for step in self._steps}
        seen: set[int] = set()
        while exc is not None and frames and id(exc) not in seen:
            seen.add(id(exc))
            tb = exc.__traceback__
            while tb is not None:
                if id(tb.tb_frame) in frames:
                    return True
                tb = tb.tb_next
            exc = exc.__cause__
        return False


def _on_stack(thread: int, frame) -> bool:
    """Whether `frame` is on thread `thread`'s Python stack now."""
    top = (sys._getframe() if thread == threading.get_ident()
           else sys._current_frames().get(thread))
    while top is not None:
        if top is frame:
            return True
        top = top.f_back
    return False


def op_phase(steps: OptimizerSteps, inputs) -> str:
    """The phase of an op about to run on `inputs`, inside the optimizer steps begun and
    not ended (`steps`: per step, whether it began in a backward). An optimizer
    stepped from a backward hook (optimizer in backward: a post-accumulate-grad hook per
    parameter) makes optimizer state, not gradients; a backward inside an optimizer's
    step (LBFGS's closure) makes gradients. The replayer names an op run after a
    deviation so too (`Replayer._fallback`)."""
    optimizers = steps.open()
    if optimizers and optimizers[-1]:
        return "optimizer"
    if torch._C._current_graph_task_id() != -1:
        return "backward"
    if optimizers:
        return "optimizer"
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return "forward"
    return "other"


@dataclass
class _ArrayLog:
    """What the recorder learns about one storage while the step runs."""
    id: int
    nbytes: int
    dtype: str
    device: str
    origin: tuple[int, int]
    first_use: int
    existed_before: bool
    parameter: bool            # a leaf requiring grad, or an nn.Parameter (frozen too)
    module_parameter: bool     # an nn.Parameter
    created_phase: str | None
    last_use: int = -1
    freed_after: int | None = None
    write_phases: list = field(default_factory=list)
    read_phases: set = field(default_factory=set)
    # Whether the ops that first used its contents (no view op: `uses_contents`) overwrote
    # them whole without reading them (`overwritten_pieces`: a batch copied into a buffer,
    # an out= argument, a random fill, halves copied in one by one, the first read, or
    # the second copied from it, before the second is in: `_reads_written`, `Overwrites`);
    # None until known.
    # What it held before the step then mattered nothing to the step.
    overwritten: bool | None = None
    pieces: list | None = None      # the byte ranges overwritten so far, while None above
    shape: tuple = ()               # the shape it was first used with (what warnings name)
    written_by: object = None       # a weak reference to the tensor its last write wrote
    reset_last: bool = False        # that write set it whole to a constant (fill_, zero_)


def _reads_written(t: torch.Tensor, pieces: list | None) -> bool:
    """Whether a use of `t` reads only bytes its storage's first uses overwrote in this
    iteration (`pieces`): then not what it held before (`_ArrayLog.overwritten`)."""
    if not pieces:
        return False
    start, end = byte_span(t)
    return covers(pieces, end, start)


def _holds_state(optimizer, p) -> bool:
    """Whether `optimizer.state[p]` holds a tensor (read without making the entry; False
    for an optimizer whose `state` is no mapping of dicts)."""
    state = getattr(optimizer, "state", None)
    entry = state.get(p) if isinstance(state, Mapping) else None
    return isinstance(entry, Mapping) and any(
        isinstance(value, torch.Tensor) for value in entry.values())


class WorkspaceMeter:
    """NOTE [Workspace from the allocator]: on a CUDA device an op's own scratch memory
    (cuDNN's and cuBLAS's workspaces, taken from PyTorch's caching allocator and given
    back before the op returns) is the allocator's peak during the op above what is
    allocated before or after it: max_memory_allocated - max(before, after), with the
    peak reset just before the op (the allocator counts at allocation time, on the host,
    so no synchronization is needed). Outputs count in `after`, so they are not taken
    for workspace. The recording iterations reset the device's peak statistics per op:
    `torch.cuda.max_memory_allocated()` read after one covers the last op only. On the
    CPU no allocator reports a per-op peak (glibc's, oneDNN's own buffers): 0."""

    def __init__(self, device):
        self.device = device
        self.before = 0

    def start(self) -> None:
        self.before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def bytes(self) -> int:
        after = torch.cuda.memory_allocated(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - max(self.before, after))


def workspace_meter(inputs) -> WorkspaceMeter | None:
    """The meter for an op reading `inputs`: on their CUDA device, else None."""
    for t in inputs:
        if t.is_cuda:
            return WorkspaceMeter(t.device)
    return None


class Recording(OutcoreMode):
    """The recorder. Use through `outcore.record()`; read `.trace` after the block."""

    def __init__(self, *, label: str = "", batch_leaves=frozenset(), watch_first_step=False):
        super().__init__()
        self.label = label
        # (first_step_watch(), at __enter__) where a distributed wrapper's one-off set-up
        # in the step is to be told (`record()`; OutOfCore watches its own recordings).
        self._watch_first_step = watch_first_step
        self._watched = None
        self._unlike: str | None = None     # what of it happened, read at the end
        # Origins (function, slot) of plain leaves requiring grad, read only, that a replay
        # found replaced by a new tensor (batches made with requires_grad=True), and of
        # module buffers, read only, found taking turns with another tensor: inputs
        # (`_classify`; OutOfCore learns them, Replayer.replaced).
        self.batch_leaves = frozenset(batch_leaves)
        self._functions: list[Function] = []
        self._logs: list[_ArrayLog] = []
        self._live: dict[int, tuple[int, weakref.ref]] = {}   # storage key -> (array id, ref)
        self._optimizers = OptimizerSteps()
        # Whether an optimizer's step made tensor state for a parameter that had none
        # (`_enter_optimizer`, `_leave_optimizer`): its next step runs other ops.
        self.made_optimizer_state = False
        self._stateless: dict[int, list] = {}   # id(optimizer) -> [its steps running,
                                                # the parameters without state at the first]
        # Storage keys of the buffers of every module called in the step, and the modules
        # seen (`_note_module`): a buffer the step only reads is state, not an input.
        self._buffer_keys: set[int] = set()
        self._modules_seen: set[int] = set()
        self._module_buffers: set[int] = set()   # their array ids, at the end
        # ids of the DDP modules to watch (SafeRecording: those with buckets to rebuild),
        # and those of them called with grad enabled in the step (`ddp_trained`).
        self._ddp_watch: set[int] = set()
        self.ddp_trained: set[int] = set()
        self._active = False
        self._stance = None             # torch.compile's stance while recording (__enter__)
        self._device: str | None = None
        self._trace: Trace | None = None
        # What the recorded step raised, as text: the exception itself holds its traceback,
        # whose frames hold what the step's callers held (an OutOfCore, a model).
        self._failed: str | None = None
        self._hooks = []
        self._returned = 0.0            # when the latest op returned (perf_counter)
        self._returned_cpu = 0.0        # and its thread's CPU clock then (thread_time)...
        self._cpu_thread = None         # ...and that thread (backward may run on another)
        self._host_s = 0.0              # host time since then, for the next Function
        self._host_cpu_s = 0.0          # of which CPU time

    # -- context management --------------------------------------------------------------
    @outside_dynamo         # NOTE [Dynamo kept out] rule 2: a recording in a compiled loop
    def __enter__(self):
        # The first op dispatched into a mode of PyTorch's making (a FlopCounterMode the
        # step pushes; outcore's own have no Dynamo wrapper: NOTE [Dynamo kept out])
        # imports torch._dynamo (~1.4 s here); imported now, that is not host time.
        import torch._dynamo  # noqa: F401
        if self._watch_first_step:
            from ..run.compose import first_step_watch
            self._watched = first_step_watch()
        self._active = True
        self._hooks = [register_optimizer_step_pre_hook(self._enter_optimizer),
                       register_optimizer_step_post_hook(self._leave_optimizer),
                       register_module_forward_pre_hook(self._note_module)]
        _hide_compiled_hook_warning()
        try:
            # torch.compile'd code runs eagerly while the step is recorded, as in
            # ooc.iteration(): Dynamo meeting it under a dispatch mode marked its frames
            # to be skipped for good, and every later call of that code (and of a new
            # torch.compile(nn.Sequential(...))) ran uncompiled, without a word
            # (helper-181).
            self._stance = eager_stance()
            mode = super().__enter__()
        except BaseException:
            self._unhook()
            raise
        self._returned, self._host_s = time.perf_counter(), 0.0
        self._returned_cpu, self._host_cpu_s = time.thread_time(), 0.0
        self._cpu_thread = threading.get_ident()
        return mode

    @outside_dynamo
    def __exit__(self, exc_type, exc, tb):
        try:
            return super().__exit__(exc_type, exc, tb)
        finally:
            self._unhook()
            # Storages still alive at the end, by array id (the executor carries them over),
            # by plain weak references: the recording's own, whose callbacks hold this
            # Recording, go with `_live`. Kept, each made the Recording a cycle (weakref ->
            # callback -> Recording) with a weakref on every storage it saw, and a closed
            # OutOfCore's recordings left so for the collector crashed the process as the
            # model's storages were freed (SIGSEGV in PyObject_ClearWeakRefs; how, inside
            # CPython and torch, is not known: test_a_closed_outofcore_left_in_a_cycle_is_
            # freed_whole, which crashed every run before and passes every run since).
            self.alive_at_end = {ident: weakref.ref(storage) for ident, ref in self._live.values()
                                 if (storage := ref()) is not None}
            self._module_buffers = {self._live[k][0] for k in self._buffer_keys
                                    if k in self._live and self._live[k][1]() is not None}
            self._buffer_keys.clear()
            if self._watched is not None:   # at the end: `.trace` may be read steps later
                from ..run.compose import first_step_unlike_the_rest
                self._unlike = first_step_unlike_the_rest(self._watched)
                self._watched = None
            self._modules_seen.clear()
            if exc is None:
                self._trace = self._build()
            else:
                self._failed = f"{type(exc).__name__}: {exc}"
            self._live.clear()

    def _unhook(self) -> None:
        """Undo what `__enter__` registered, once; torch.compile's stance put back."""
        hooks, self._hooks = self._hooks, []
        stance, self._stance = self._stance, None
        try:
            for h in hooks:
                h.remove()
            if hooks:
                _show_compiled_hook_warning()
            self._active = False
        finally:
            if stance is not None:
                stance.__exit__(None, None, None)

    def _note_module(self, module, _args):
        """A module is called in the step: note the storages of its buffers and its
        submodules' (a parent may read a child's buffer without calling the child), once
        per module. A hook must not fail the user's forward: a buffer without a storage
        is skipped."""
        if not self._active:
            return None        # (a call on another thread as the recording ends)
        if id(module) in self._ddp_watch and torch.is_grad_enabled():
            self.ddp_trained.add(id(module))
        if id(module) in self._modules_seen:
            return None
        for sub in module.modules():
            if id(sub) in self._modules_seen:
                continue
            self._modules_seen.add(id(sub))
            for buf in sub._buffers.values():
                storage = storage_of(buf) if isinstance(buf, torch.Tensor) else None
                if storage is not None:
                    self._buffer_keys.add(storage._cdata)
        return None

    def _enter_optimizer(self, optimizer=None, *_):
        self._optimizers.begin()
        if optimizer is None or self.made_optimizer_state:
            return
        known = self._stateless.get(id(optimizer))
        if known is not None:           # its step within its own (a subclass's super().step())
            known[0] += 1
            return
        self._stateless[id(optimizer)] = [1, [
            p for group in getattr(optimizer, "param_groups", ())
            for p in group.get("params", ()) if not _holds_state(optimizer, p)]]

    @property
    def in_optimizer(self) -> bool:
        """Whether the step stands inside an optimizer's step() (begun, not returned)."""
        return bool(self._optimizers)

    def raised_in_optimizer(self, exc: BaseException | None) -> bool:
        """Whether `exc` came out of an optimizer's step() (`OptimizerSteps`)."""
        return self._optimizers.raised_inside(exc)

    def _leave_optimizer(self, optimizer=None, *_):
        self._optimizers.end()
        known = self._stateless.get(id(optimizer))
        if known is None:
            return
        known[0] -= 1
        if known[0] == 0:               # the outermost step returned (helper-222)
            del self._stateless[id(optimizer)]
            if any(_holds_state(optimizer, p) for p in known[1]):
                self.made_optimizer_state = True

    @property
    def trace(self) -> Trace:
        if self._trace is None:
            if self._failed is not None:
                raise TraceError(f"no trace: the recorded step raised {self._failed}")
            raise TraceError("no trace yet: read `.trace` after the `with outcore.record()` block ends")
        return self._trace

    # -- interception ----------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "profiler":   # record_function markers: no data, not a function
            return func(*args, **kwargs)
        self._host_s += time.perf_counter() - self._returned      # Function.host_s
        # thread_time() is per thread: on CUDA, autograd runs backward on its device
        # thread, whose clock has nothing to do with the main thread's (a difference
        # across threads came out negative, and such a trace could not be loaded). Where
        # the thread changed, this thread's CPU time since the last op is unknown: 0.
        thread = threading.get_ident()
        if thread == self._cpu_thread:
            self._host_cpu_s += time.thread_time() - self._returned_cpu
        try:
            if func is FAST_PATH_OP:        # NOTE [Fast paths under autocast] in aten.py
                with autocast_as_entered(self):
                    return self._run(func, args, kwargs, None)
            return call_split(func, args, kwargs, self._run)
        finally:
            self._returned_cpu, self._cpu_thread = time.thread_time(), thread
            self._returned = time.perf_counter()

    def _run(self, func, args, kwargs, split):
        inputs = op_inputs(func, args, kwargs)     # NOTE [Storage arguments] in aten.py
        written_list = written_tensors(func, args, kwargs)
        written = {id(t) for t in written_list}
        phase = op_phase(self._optimizers, inputs)
        self._before_op(func, args, kwargs, inputs, len(self._functions))
        meter = workspace_meter(inputs)
        if meter is not None:
            meter.start()
        start = time.perf_counter()
        out = func(*args, **kwargs)
        duration = time.perf_counter() - start
        note_read_past(func, out)       # NOTE [Read past the dispatcher] in aten.py
        workspace = meter.bytes() if meter is not None else 0
        outputs = output_tensors(out)
        used = (None if not uses_contents(func) else
                overwritten_pieces(func, args, kwargs) if written else NO_OVERWRITES)
        self._log(func, phase, inputs, written, outputs, duration, split, args, kwargs, out,
                  workspace, used, written and resets(func))
        self._after_op(func, inputs, written_list, outputs)
        return out

    # Hooks for a subclass that manages memory while recording (outcore.run).
    def _before_op(self, func, args, kwargs, inputs, index) -> None:
        pass

    def _after_op(self, func, inputs, written, outputs) -> None:
        pass

    def _log(self, func, phase, inputs, written, outputs, duration, split, args, kwargs, out,
             workspace, used=None, reset=False):
        index = len(self._functions)
        kinds: dict[int, str] = {}          # array id -> strongest access kind, in order seen
        fresh = func._schema.name in FRESH_ARGUMENT_OPS
        for slot, t in enumerate(inputs):
            kind = "write" if id(t) in written else "read"
            self._touch(t, index, slot, kind, phase, kinds, is_output=fresh, used=used,
                        reset=reset)
        for slot, t in enumerate(outputs):
            self._touch(t, index, slot, "read", phase, kinds, is_output=True)
        flops = op_flops(func, args, kwargs, out)
        nbytes = tensor_bytes(inputs) + tensor_bytes(outputs)
        if self._device is None and (inputs or outputs):
            self._device = (inputs or outputs)[0].device.type
        if self._device == "meta":
            duration = estimate_duration(flops, nbytes)
        self._functions.append(Function(
            index=index, op=str(func), phase=phase,
            accesses=tuple(Access(a, k) for a, k in kinds.items()),
            duration_s=duration, flops=flops, bytes_touched=nbytes, split=split,
            workspace_bytes=workspace,
            host_s=self._host_s, host_cpu_s=min(self._host_cpu_s, self._host_s),
            peer=_peer(func, args)))
        self._host_s = self._host_cpu_s = 0.0

    def _touch(self, t, index, slot, kind, phase, kinds, *, is_output, used=None,
               reset=False):
        """Note that function `index` accesses `t` (`kind`). `used`: where the op uses
        the contents of its inputs (`uses_contents`), what it overwrites without reading
        it (`overwritten_pieces`; `_ArrayLog.overwritten`); None for a view op and for
        outputs. `reset`: the op sets what it writes to a constant (`resets`)."""
        storage = storage_of(t)
        if storage is None:
            return
        nbytes = storage.nbytes()
        key = storage._cdata
        entry = self._live.get(key)
        if entry is None:
            if nbytes == 0:
                return   # empty storages hold nothing to plan for
            ident = len(self._logs)
            # First seen as an output, or made just before by no aten op (NOTE [Storages
            # made outside the dispatcher] in aten.py): the op produced it.
            created = is_output or made_outside(storage)
            self._logs.append(_ArrayLog(
                id=ident, nbytes=nbytes, dtype=str(t.dtype).replace("torch.", ""),
                device=str(t.device), origin=(index, slot), first_use=index,
                existed_before=not created,
                parameter=bool(t.requires_grad and t.is_leaf) or isinstance(t, torch.nn.Parameter),
                module_parameter=isinstance(t, torch.nn.Parameter),
                created_phase=phase if created else None, shape=_shape(t)))
            self._live[key] = (ident, weakref.ref(storage, self._make_finalizer(key, ident)))
            if created:
                kind = "create"
        else:
            ident = entry[0]
        log = self._logs[ident]
        if used is not None and log.overwritten is None:
            pieces = used.pieces.get(key) if kind == "write" else None
            if pieces is None:
                if not _reads_written(t, log.pieces):
                    log.overwritten = False
            elif not all(covers(log.pieces or (), end, start)
                         for start, end in used.reads.get(key, ())):
                log.overwritten = False     # the op reads what it held too
            else:
                log.pieces = (log.pieces or []) + pieces
                if covers(log.pieces, nbytes):
                    log.overwritten, log.pieces = True, None
        log.nbytes = max(log.nbytes, nbytes)
        log.last_use = index
        if kind == "write":
            log.write_phases.append(phase)
            log.written_by = weakref.ref(t)
            log.reset_last = reset and used is not None and covers(used.pieces.get(key, ()), nbytes)
        elif kind == "read":
            log.read_phases.add(phase)
        previous = kinds.get(ident)
        if previous is None or _PRECEDENCE[kind] > _PRECEDENCE[previous]:
            kinds[ident] = kind

    def _make_finalizer(self, key, ident):
        def storage_died(_ref):
            if not self._active:
                return
            if self._live.get(key, (None,))[0] == ident:
                del self._live[key]
            self._logs[ident].freed_after = len(self._functions) - 1
        return storage_died

    # -- building the trace ----------------------------------------------------------------
    def _build(self) -> Trace:
        alive_at_end = set(self.alive_at_end)
        arrays = []
        for log in self._logs:
            alive = log.id in alive_at_end
            kind, category = _classify(log, alive, log.origin in self.batch_leaves,
                                       log.id in self._module_buffers)
            freed = None if alive else max(log.last_use, log.freed_after if log.freed_after is not None
                                           else log.last_use)
            arrays.append(Array(
                id=log.id, nbytes=log.nbytes, dtype=log.dtype, device=log.device, kind=kind,
                category=category, origin=log.origin, first_use=log.first_use,
                last_use=log.last_use, freed_after=freed, existed_before=log.existed_before))
        # The threads compute ran on: with the cores they fill, whether the mover's
        # threads find a core of their own (NOTE [No core to spare] in simulate/engine.py).
        info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
        if self.label:
            info["label"] = self.label
        if self._unlike is not None:
            info["unsteady"] = self._unlike
        return Trace(functions=tuple(self._functions), arrays=tuple(arrays),
                     device=self._device or "cpu",
                     durations="estimated" if self._device == "meta" else "measured", info=info)


def _shape(t: torch.Tensor) -> tuple:
    """`t`'s shape, or () where it has none to give (a strided nested tensor's sizes vary
    per element: `t.shape` raises)."""
    try:
        return tuple(t.shape)
    except RuntimeError:
        return ()


def _classify(log: _ArrayLog, alive: bool, batch_leaf: bool = False,
              module_buffer: bool = False) -> tuple[str, str]:
    """(kind, category) of an array from when and how the step used it (docs/trace.md).
    `batch_leaf`: a replay found a new tensor where this plain leaf or buffer was
    (Recording's `batch_leaves`); `module_buffer`: a buffer of a module the step called."""
    if log.existed_before:
        # nn.Parameters (frozen ones too) and leaves requiring grad: the same storage every
        # step, movable (a functional model's weights, read only in a step that does not
        # update them). A plain leaf that the step only reads and that a replay found new
        # (a batch made with requires_grad=True for its gradient) is an input.
        if log.parameter and not (batch_leaf and not log.module_parameter
                                  and not log.write_phases):
            return "persistent", "parameter"
        if not log.write_phases:
            # A module buffer only read (a pruning mask, a positional table) stays from
            # step to step as a frozen parameter does: state, movable; unless a replay
            # found it taking turns with another tensor (Replayer._note_replaced). Other
            # tensors only read (the batch) may be new each step: inputs.
            return (("persistent", "buffer") if module_buffer and not batch_leaf
                    else ("input", "input"))
        first_write = log.write_phases[0]
        category = {"backward": "gradient", "optimizer": "optimizer_state"}.get(first_write, "buffer")
        return "persistent", category
    created = log.created_phase
    if alive:
        category = {"backward": "gradient", "optimizer": "optimizer_state"}.get(created, "output")
        return "persistent", category
    if created == "backward" and "optimizer" in log.read_phases:
        return "transient", "gradient"
    if created == "forward" and "backward" in log.read_phases:
        return "transient", "activation"
    return "transient", "temporary"


def record(*, label: str = "") -> Recording:
    """Record the training iteration run inside the `with` block; read `.trace` after it.

    Works for real tensors (durations measured) and on the meta device (no memory, no
    compute; durations estimated from FLOPs and bytes). Where FSDP2 set itself up or DDP
    rebuilt its buckets in the step, `trace.info["unsteady"]` says so: the steps after it
    differ (`smallest_budget` warns)."""
    return Recording(label=label, watch_first_step=True)


# c10d::send(Tensor[] tensors, ProcessGroup process_group, int dst, int tag) and
# c10d::recv_(..., int src, int tag): the peer is the third argument.
_P2P_OPS = ("send", "recv_")


def _peer(func, args) -> int | None:
    """The other rank of a point-to-point op, as its process group numbers it."""
    if func.namespace != "c10d" or func._schema.name.split("::")[-1] not in _P2P_OPS:
        return None
    peer = args[2] if len(args) > 2 else None
    return peer if type(peer) is int and peer >= 0 else None

