"""`outcore.OutOfCore`: train under a fast-memory budget with one context manager.

    ooc = outcore.OutOfCore(budget="2GiB", offload="disk")
    for x, y in loader:
        with ooc.iteration():
            loss = loss_fn(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
    print(ooc.report())

Iteration 1 records the step while running on-demand (memory-safe); the schedule is
planned once; later iterations replay it. An iteration that deviates from the record
finishes on-demand; a loop whose steps take a few shapes (optimizer.step() every n-th
iteration) gets a plan per shape, and each iteration replays the one its shape is
predicted to have (NOTE [Step shapes] in plans.py).

Between iterations the model and optimizer are plain PyTorch objects with the right
values: state the schedule leaves on the slow tier stays there, mapped in place (NOTE
[Mapped state] in mapped.py; README, "Between iterations"). `with ooc.building():`
creates or loads a model under the budget; `ooc.save(obj, path)` writes a checkpoint
of state larger than memory, atomically.

NOTE [One OutOfCore per process]
The storages a step touches, glibc's allocator settings and the signal handlers are
process-wide, so at most one OutOfCore is open in a process at a time: a second one
raises OutcoreError until the first is closed (or garbage collected). One being made
holds the slot too, against other threads while its builder runs (`_building`: two
threads making one each at once both opened, helper-154), and gives it back if its
construction fails. Closing, and the garbage collection of an object never closed,
give everything back: the swap file, the allocator settings (memory/malloc.py), the
process slot.

NOTE [The process's base]
The whole process is measured against a base: its resident set when the first
iteration begins, as a user reading VmRSS just before `with ooc.iteration():` would
see it (what they hold: data, libraries' code, a library's first-use cost such as
transformers' 135 MiB at its first model, made on `meta` too), less what is outcore's
to bound:
  1. The heap's free pages are handed back first (`hand_back`): what building or
     loading freed is not counted as the user's.
  2. Mapped state is taken back first (`_unpark`): unwritten pages leave the resident
     set, written ones become managed bytes.
  3. The managed bytes in fast memory are subtracted (a RAM budget only): the budget
     counts them.
  4. The trim governor counts its bound from the base (`rebase`: NOTE [Trim at the
     bound] in memory/malloc.py), the pager from the lower of the base and the size at
     OutOfCore() (`_limits_base`): where building left memory behind (the mover's
     buffers, a library's first-use cost), state read between iterations finds that
     much less room.
  5. The state the first iteration takes over is subtracted once a recording says which
     it is (`_take_off_adopted`): an OutOfCore made after the model was built (or loaded)
     finds the parameters in the resident set, unmanaged, and outcore then moves them.
     Counted in the base, they read as the user's for good: on a 3 GiB-state MLP at
     512 MiB, rss+ stayed 0 and the allocator was trimmed once a step (4-7 times in the
     other order) while the process held ~100 MiB more. The first iteration's own rss+
     counts from the base it began with (the parameters were there as it began); the
     batch, which the next iteration replaces, stays counted.
rss+ (`IterationStats.rss_above_start`) is the peak above this base; the report
prints it beside `_rss_bound()`. The resident set when the OutOfCore was made stays
in the report (`rss_made`): building is measured from it (benchmarks/big_state.py).
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import gc
import logging
import os
import threading
import time
import typing
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode_stack

from .. import aten
from ..errors import (STOPPED, HostBudgetTooSmall, InfeasibleBudget, OutcoreError,
                      SwapSpaceExhausted, kept_warnings, no_room)
from ..memory.malloc import (PROCESS_SLACK_BYTES, PROCESS_SLACK_SHARE, make_governor,
                             page_faults, process_slack, resident_bytes)
from ..memory.pages import torch_huge_pages
from ..plan import check, plan
from ..plan.api import check_options, registered
from ..plan.feasibility import min_feasible_budget, occupancy, require_feasible
from ..plan.recompute import check_mode, choose as choose_recompute, remade, rewrite
from ..trace.lifetimes import function_bytes
from ..trace.model import require_trace
from ..trace.recorder import Recording
from ..states import FAST
from ..units import exact_bytes, format_bytes, parse_budget, parse_bytes
from .building import Building
from .checkpoint import atomic_save
from .compose import (Composition, _distributed_up, fsdp_set_up, held_arrays, owned_arrays,
                      owned_occupancy, without_held)
from .durable import Durable, identity, unwrapped
from .interrupts import Shield, critical, held_here, no_raise
from .mapped import Pager
from .movers import host
from .movers.disk import DiskMover
from .movers.host import HostMover, default_host_budget
from .recording import SafeRecording
from . import on_demand, plans, sharing
from .plans import (SMALL_OP_BYTES, Ending, Plan, Plans, envelope, family_of, function_keys,
                    grown_aside, recorded_ops, shape_of, sizes_after, with_margin)
from .replay import ANOTHER_TRACKED, Replayer
from .report import OVER_BUDGET_WHY_WARNED, IterationLog, IterationStats, Report
from .residency import Residency, movable

log = logging.getLogger("outcore")

# Lazily created optimizer state makes the first iteration differ from later ones; a
# step is recorded again (at most this many times in a row) until its state is stable.
# Three one-off events may each fall on an iteration of their own (the optimizer's
# state made, DDP's buckets rebuilt, FSDP set up) after a first that has DDP's rebuild
# pending: with three, a micro-batch under no_sync(), AdamW's first step, then DDP's
# rebuild in the third iteration was planned, and every step of its shape deviated
# from it at its first function (helper-88).
_MAX_RECORDINGS = 4
# DDP rebuilds its buckets in the first forward after a synced backward: with k
# micro-batches under no_sync() before it, k + 2 iterations have the rebuild pending
# (the rebuilding one too), and those are recorded up to this many in a row
# (helper-89: 2 under no_sync() and AdamW's first step needed 5).
_MAX_DDP_WAIT = 8

MIN_MOVE_BYTES = 64 * 1024
# A warning once where this many of the last DEVIATIONS_SEEN replays deviated
# (`OutOfCore._often`): a loop whose steps outcore's plans do not follow.
DEVIATIONS_SEEN, DEVIATIONS_WARNED = 20, 12

# Between iterations, pages read from mapped state may take this much memory beyond what
# the budget leaves free before the pager hands them back (NOTE [Mapped state], rule 2).
PAGER_SLACK = 64 * 2**20


def pinned_peak(trace, min_move_bytes: int = MIN_MOVE_BYTES, held=None, owned=None,
                steady: bool = False) -> int:
    """The most bytes of arrays the executor never moves alive at once: those smaller
    than `min_move_bytes`, and `held` ones (default `compose.held_arrays(trace)`: those
    a collective or FSDP holds), `owned` ones (default `compose.owned_arrays(trace)`:
    FSDP's) only while FSDP has them allocated (`compose.owned_occupancy`); they hold
    that much of the budget at worst. `steady`: in the steps after this one
    (`feasibility.occupancy`)."""
    held = held_arrays(trace) if held is None else held
    owned = owned_arrays(trace) if owned is None else owned
    curve = occupancy(trace, only=lambda a: (a.nbytes < min_move_bytes or a.id in held)
                      and a.id not in owned, steady=steady)
    if owned:
        curve = [c + o for c, o in zip(curve, owned_occupancy(trace, owned))]
    return max(curve, default=0)


def planned_budget(trace, budget: int, min_move_bytes: int = MIN_MOVE_BYTES, held=None,
                   owned=None) -> int:
    """The budget the plan gets: storages below min_move_bytes never move (a transfer
    would cost more than it frees), nor do those of collectives and FSDP, so the rest
    is planned within what they leave at their peak. The plan's arrays then never
    exceed `budget` with the pinned ones beside them: plan(t) <= budget - peak, and the
    pinned ones add at most `peak`."""
    return max(budget - pinned_peak(trace, min_move_bytes, held, owned), 1)


def smallest_budget(trace, min_move_bytes: int | str = MIN_MOVE_BYTES) -> int:
    """The smallest budget (bytes) at which `OutOfCore(budget, min_move_bytes=...)` runs
    the step `trace` recorded (`outcore.record()`, also on the meta device) and the
    steps of its shape after it: what the plan needs of the arrays that move, beside the
    most of those that never move (under `min_move_bytes`: a byte count or a size with
    its unit, as OutOfCore takes it) alive at once.

    Below it, OutOfCore raises InfeasibleBudget; `outcore plan`'s own figure is lower,
    as it counts every array as movable. It is this step's figure:
      * a step of smaller tensors has more arrays under min_move_bytes, so it can need
        more (a Llama at sequence length 24 needed 2.67 MiB, at 48 2.01 MiB);
        min_move_bytes=0 pins nothing for its size;
      * state that grows for a few steps (LBFGS's history, a sparse momentum buffer) or
        a step that changes after a few (RAdam from its sixth, ASGD once averaging
        starts) needs the figure of a later step;
      * so does a first step unlike the rest: one a GradScaler skipped, one before
        gradients kept between steps (`zero_grad(set_to_none=False)`), one in which
        FSDP2 set itself up or DDP rebuilt its buckets (`trace.info["unsteady"]` says
        so, and this function warns);
      * small tensors whose sizes depend on the data (`torch.unique`, a boolean mask,
        `nonzero`) can be a few bytes larger in a later step, whose plan needs that
        much more: at exactly this figure such steps run op by op, correct and slower,
        with a warning naming the budget (helper-223: +80 B to +2 KiB). Leave a few KiB.
    State the step made and keeps (a first step's momentum) counts as the steps after it
    hold it, from their start."""
    # Found by new-user trials: RAdam/ASGD (helper-132), first steps unlike the rest
    # (helper-181, helper-201), momentum made in the first step counted where it was
    # made, a few bytes short of the second step's, at which every step ran op by op
    # (helper-125).
    require_trace(trace, "smallest_budget")
    min_move_bytes = parse_bytes(min_move_bytes)
    unsteady = trace.info.get("unsteady") if isinstance(trace.info, dict) else None
    if unsteady:
        log.warning("smallest_budget: the step recorded is unlike the steps after it: %s. "
                    "They can need more than its figure; record a later step for it",
                    unsteady)
    held = held_arrays(trace)
    return min_feasible_budget(without_held(trace, held)) + pinned_peak(
        trace, min_move_bytes, held, steady=True)


_open_lock = threading.Lock()
_open: weakref.ref | None = None       # the OutOfCore open in this process, if any
_open_pid = 0                          # the process that opened it (a fork's child did not)


def _claim(ooc) -> None:
    global _open, _open_pid
    with _open_lock:
        current = open_outofcore()
        builder = None if current is None else current._building
        if builder is not None and builder != threading.get_ident() and any(
                thread.ident == builder for thread in threading.enumerate()):
            # Closed until its construction completes, yet it holds the slot: two threads
            # making one each at once both opened (helper-154). Only while its builder
            # runs elsewhere: one whose construction a Ctrl-C cut between its last lines
            # is never stuck for its own thread (helper-155).
            raise OutcoreError(
                "another OutOfCore is being made in this process (on another thread); "
                "outcore manages one OutOfCore per process (storages, allocator settings "
                "and signal handlers are process-wide): make one and share it, or close "
                "that one first")
        if current is not None and not current.closed:
            current = None          # a name held here would keep it from the collector
            gc.collect()            # an unreachable one still waiting for the collector
            current = open_outofcore()
        if current is not None and not current.closed:
            raise OutcoreError(
                f"another {current!r} is still open in this process; outcore manages one "
                "OutOfCore per process (storages, allocator settings and signal handlers are "
                "process-wide). close() it first, or use `with outcore.OutOfCore(...) as ooc:`; "
                "where no name of yours holds it any more (a notebook keeps the last "
                "exception's traceback and the cells' outputs, which can), "
                "outcore.open_outofcore().close() closes it")
        _open, _open_pid = weakref.ref(ooc), os.getpid()
    sharing.install(open_outofcore)        # NOTE [Sharing a storage outcore moves]


_forking: tuple | None = None      # (OutOfCore, extents, pipe) while a fork runs


def _before_fork() -> None:
    """NOTE [Mapped state] rule 9 in mapped.py: a fork between iterations leases the
    extents mapped now, for as long as the write end of a pipe made here lives in the
    child or any process it forks (closed at exec: O_CLOEXEC)."""
    global _forking
    _forking = None
    ooc = open_outofcore()
    if ooc is None or ooc.closed or not hasattr(ooc._mover, "set_leased"):
        return
    extents = ooc._res.mapped_extents()
    if extents:
        _forking = (ooc, extents, os.pipe())


def _after_fork_in_parent() -> None:
    global _forking
    forking, _forking = _forking, None
    if forking is None:
        return
    ooc, extents, (read_end, write_end) = forking
    os.close(write_end)                # the children hold it: at EOF, all are gone
    os.set_blocking(read_end, False)   # nothing is ever written: a read says EOF or not
    ooc._leases.append((read_end, extents))
    ooc._mover.set_leased(_union(ooc._leases))


def _after_fork_in_child() -> None:
    global _forking
    if _forking is not None:          # the child keeps the write end, not the read end
        os.close(_forking[2][0])
    _forking = None


def _union(leases) -> dict:
    return {offset: e for _, extents in leases for offset, e in extents.items()}


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


def _user_recording() -> bool:
    """Whether an `outcore.record()` of the user's is open on this thread."""
    return any(isinstance(m, Recording) and not isinstance(m, SafeRecording)
               for m in _get_current_dispatch_mode_stack())


def open_outofcore():
    """The OutOfCore open in this process, or None: for closing one no name holds any
    more (after an exception in a notebook cell, IPython's stored traceback can keep the
    old one open, and a new one is refused while it is). In a child forked while one was
    open (a DataLoader's worker) None: the parent's table, mover threads and swap file
    are not the child's (NOTE [Forked children] in interrupts.py)."""
    # helper-102 met the notebook case.
    ref = _open
    if ref is None or _open_pid != os.getpid():
        return None
    return ref()


def graph_left(trace) -> int:
    """Bytes of the tensors a step's forward made that are still alive at its end, in a
    step that ran a forward (ops on tensors that require grad, grad mode on) and no
    backward: the autograd graph's saved tensors, kept for a backward after the block.
    0 otherwise, and where one such tensor or none is left (the loss, the logits the
    step returns)."""
    functions = trace.functions
    if any(f.phase == "backward" for f in functions):
        return 0
    left = [a.nbytes for a in trace.arrays if not a.existed_before and a.freed_after is None
            and functions[a.origin[0]].phase == "forward"]
    return sum(left) if len(left) > 1 else 0


def _warn_graph_left(ooc, trace, index: int) -> None:
    """Once per OutOfCore: a recorded step built an autograd graph and ran no backward,
    so a backward after the block runs outside the budget."""
    if ooc._warned_graph:
        return
    left = graph_left(trace)
    if left:
        ooc._warned_graph = True
        log.warning("iteration %d ran a forward that built an autograd graph and no backward, "
                    "and %s of the tensors its forward made are still alive at the block's "
                    "end, held by that graph. A loss.backward() and optimizer.step() after "
                    "the block run outside the budget, with nothing planned or moved: put "
                    "them inside `with ooc.iteration():`. For evaluation, run the forward "
                    "under torch.no_grad(): the graph holds that memory for nothing",
                    index, format_bytes(left))


_PHASES = {"forward": "in the forward", "backward": "in the backward",
           "optimizer": "in optimizer.step()",
           "other": "outside the forward, the backward and optimizer.step()"}


def _warn_unkept(ooc, recording) -> None:
    """NOTE [Durable state] rule 17, as an iteration with a state_dir completes: name
    what the last recording changed in place, that still lives and that no commit keeps
    (each storage once), then note what `recording` (this iteration's, or None) changed.
    Judged an iteration later: a batch fetched before the block and changed in it (HF's
    `labels[labels == pad] = -100`) is gone by then, a state is not."""
    durable = ooc._durable
    if durable is None or durable.model is None:
        return
    left, carried = [], []
    try:                    # each part apart: what one cannot do leaves the others to run
        left = durable.unkept(ooc._res)
    except Exception:       # noqa: BLE001 - a user's state_dict(): the commit said it already
        log.debug("state_dir: what the iteration changed could not be compared", exc_info=True)
    try:
        carried = durable.carried_over()
    except Exception:       # noqa: BLE001 - as above
        log.debug("state_dir: what the iteration carried could not be judged", exc_info=True)
    try:
        if recording is not None:
            durable.note_unkept(recording, ooc._res)
    except Exception:       # noqa: BLE001 - as above
        log.debug("state_dir: what the iteration changed could not be noted", exc_info=True)
    try:
        if recording is not None:
            durable.note_carried(recording, ooc._res)
    except Exception:       # noqa: BLE001 - as above
        log.debug("state_dir: what the iteration made could not be noted", exc_info=True)
    if carried:
        _warn_carried(carried)
    if not left:
        return
    nbytes, dtype, shape, op, phase = left[0]
    log.warning(
        "state_dir: the iterations change %d tensor%s in place that no commit keeps, %s "
        "in all (the largest: %s, %s of shape %s, first written by %s %s). A resume "
        "starts %s from what the restarted script makes, not from what training made. "
        "An EMA model or another model trained beside yours: pass them together as the "
        "model, ooc.resume(torch.nn.ModuleDict({'model': model, 'ema': ema}), optimizer) "
        "(a module's state outside its state_dict() is not kept: torchmetrics' metrics need "
        "metric.persistent(True)); a GradScaler or another object with a state_dict(): "
        "ooc.resume(model, optimizer, extra={'scaler': scaler}). A value that needs no "
        "keeping (a running sum you reset) can stay as it is",
        len(left), "s" if len(left) > 1 else "", format_bytes(sum(item[0] for item in left)),
        format_bytes(nbytes), dtype, tuple(shape), op.replace("aten.", "aten::", 1),
        _PHASES.get(phase, phase), "them" if len(left) > 1 else "it")


def _warn_carried(carried) -> None:
    """Rule 17 of NOTE [Durable state], out of place: `carried`, as `carried_over` gives
    it, told."""
    nbytes, dtype, shape, op, phase = carried[0]
    log.warning(
        "state_dir: the iterations carry %d tensor%s from one to the next that no commit "
        "keeps, %s in all (the largest: %s, %s of shape %s, made by %s %s): each "
        "iteration reads what the one before made and makes %s anew from it (a hidden "
        "state carried by truncated backpropagation through time, `ema = 0.9 * ema + "
        "0.1 * x`). A resume starts %s from what the restarted script makes, "
        "not from what training made. Keep %s in a buffer of a module passed with the "
        "model (holder.register_buffer('h', h), then holder.h = new_h in each "
        "iteration; ooc.resume(torch.nn.ModuleDict({'model': model, 'state': holder}), "
        "optimizer)), or in an object with a state_dict() and load_state_dict() passed "
        "as extra=. A value that needs no keeping can stay as it is",
        len(carried), "s" if len(carried) > 1 else "",
        format_bytes(sum(item[0] for item in carried)), format_bytes(nbytes), dtype,
        tuple(shape), op.replace("aten.", "aten::", 1), _PHASES.get(phase, phase),
        "them" if len(carried) > 1 else "it", "them" if len(carried) > 1 else "it",
        "them" if len(carried) > 1 else "it")


def _step_outside(ref):
    """An optimizer step pre-hook for as long as the OutOfCore `ref` names is open: the
    first time an optimizer steps parameters it manages between its iterations, say so
    (once). That step, and the state it makes, run outside the budget and stay
    unmanaged; helper-153 found it silent (a backward after the block is told:
    `_warn_graph_left`). Optimizers of other parameters are left alone. With
    `state_dir` it tells the Durable of every optimizer that steps, inside iterations and
    between them (NOTE [Durable state] rule 13: `Durable.stepped`)."""
    def hook(optimizer, *_):
        ooc = ref()
        if ooc is None or ooc.closed:
            return
        if ooc._durable is not None:
            ooc._durable.stepped(optimizer, inside=bool(ooc._active))
        if ooc._active:
            return
        if ooc._warned_step:
            return
        try:
            res = ooc._res
            managed = any(res.entry_of(storage) is not None
                          for group in optimizer.param_groups for p in group["params"]
                          for storage in [aten.storage_of(p)] if storage is not None)
        except Exception:        # noqa: BLE001 - a warning's check never fails the step
            return
        if managed:
            ooc._warned_step = True
            log.warning("%s.step() ran outside `with ooc.iteration():` on parameters outcore "
                        "manages: the step and the optimizer state it makes run outside the "
                        "budget, with nothing planned or moved (the report counts that state "
                        "as unmanaged). Put the step, and gradient clipping, inside the "
                        "block; a loop that steps every n-th iteration steps inside the n-th "
                        "block", type(optimizer).__name__)
    return hook


@no_raise
def _release(res, mover, governor, pager, durable, hook=None) -> None:
    """Give back what an OutOfCore holds. Runs at close(), or at garbage collection or
    interpreter exit of one never closed (weakref.finalize: no reference to the object).
    Mapped state is handed on first (NOTE [Mapped state], rule 7), so the next OutOfCore
    can move it whether this one was closed or dropped. A signal landing in it where no
    shield is installed (at exit, a second SIGTERM whose handler calls sys.exit: helper-177)
    is noted and handed over after it (NOTE [Interrupts] rule 8): raised there, it
    stopped the release halfway, with a traceback printed at exit. At interpreter exit
    no Python runs after it, and such a signal reaches no handler (helper-180): the process
    ends as it was ending."""
    if hook is not None:
        hook.remove()
    try:
        pager.stop()
        res.release_mappings()
        mover.close()
        if durable is not None:
            durable.close()
    finally:
        if governor is not None:
            governor.stop()


def _policy_label(schedule) -> str:
    """The policy a schedule was made with, and for auto the one it chose (and, for
    adaptive, its options other than the default: completion order, outputs late; and a
    share for state kept at the end other than the default)."""
    chosen = schedule.options.get("chosen")
    if not chosen:
        return schedule.policy
    order = ", completion order" if schedule.options.get("wait_order") == "completion" else ""
    late = ", outputs late" if schedule.options.get("outputs") == "late" else ""
    share = schedule.options.get("end_keep_share")
    kept = f", end_keep_share={share}" if share is not None else ""
    return f"{schedule.policy} ({chosen}{order}{late}{kept})"


class _Replayed(typing.NamedTuple):
    """The iteration `ooc.timeline()` and `ooc.plot()` show: the last that replayed its
    plan to the end (one that left it has a log only up to where it did). `passive`: it
    tracked no op (the budget is above the step's peak: docs/executor.md, "Passive mode"), so its
    managed bytes are the plan's, function by function, unless it made larger tensors
    than the plan's (`more`: then they are not known); `left`: how many iterations
    since left their plans."""
    trace: object
    schedule: object
    log: object
    iteration: int
    passive: bool
    left: int = 0
    more: int = 0       # bytes a passive one made past its plan's (larger tensors that fit)


class OutOfCore:
    """Runs training iterations within `budget` bytes of fast memory.

    budget: bytes or a string such as "2GiB" — the most managed tensor bytes resident at
        once (the recording iteration may exceed it where an op creates more than its
        largest input: on_demand.room).
    offload: "disk" (CPU tensors; the slow tier is a swap file on a local disk) or "host"
        (CUDA tensors under a GPU-memory budget; the slow tier is page-locked host memory,
        and past `host_budget` the swap file: run/movers/host.py).
    swap_dir: where the swap file goes (default: the system temp directory).
    host_budget: with offload="host", the most page-locked host memory the host tier
        takes (bytes or a string; default half the RAM this process may use, its
        cgroup's limit included); what does not fit there spills to the swap file, and
        the state the plan leaves there between iterations must fit in it
        (outcore.HostBudgetTooSmall).
    policy: the planning policy (outcore.plan): "auto" (the fastest of the others for
        the recorded step, by simulated time), "adaptive" (the paper's), "fixed", ...
    min_move_bytes: storages smaller than this stay in fast memory (a transfer would
        cost more than it frees): a byte count or a size with its unit ("64KiB").
    plan_options: extra options for the policy (e.g. policy="adaptive",
        plan_options={"window": "3GiB"}); refused at once if the policy has no such option.
    return_freed_memory: how the C allocator (glibc) hands freed memory back to the OS,
        so that the process's resident memory follows the budget instead of its
        high-water mark; process-wide until close() (README, "Memory and speed"). True
        or "trim" (from the first iteration): every tensor on the reused heap (no page
        faults, unlike glibc's defaults), trimmed when the resident set nears the bound
        the report prints (its base + budget + 128 MiB + budget/5, less room for the
        step's largest tensor), or, while nothing has had to move, past its size at the
        start plus the budget and 64 MiB + budget/5. "eager" (from the
        first eviction): every tensor its own mapping, unmapped on free (closest to the
        budget; page faults on every new tensor). False: glibc's defaults.
    state_dir: keep the state crash-consistent in this directory (run/durable.py): each
        completed iteration's model and optimizer state is made durable there, so a
        process killed at any moment resumes from the last completed iteration with
        `ooc.resume(model, optimizer)`, bitwise. An iteration that raised counts as done
        once a later one completes (the loop went on past it); a run that stops at it
        resumes before it (NOTE [Durable state] rule 11). A loop that replaces its
        optimizer names the new one with `ooc.keep(model, optimizer)` (rule 13). The swap
        file is then kept there.
    recompute: "auto" (drop activations that are cheaper to compute again than to move,
        and make them again before backward, where the plan then simulates faster than
        without; with and without chains, the faster), True (every activation the rules
        allow without chains), or False; a step that fits
        the budget recomputes nothing. Results stay bitwise equal to plain PyTorch (NOTE
        [Recompute rules] in plan/recompute.py: convolutions and batch norms, never
        random ops; on CUDA only with torch.use_deterministic_algorithms(True)).

    One OutOfCore may be open per process (NOTE [One OutOfCore per process]).
    """

    def __init__(self, budget, offload: str = "disk", swap_dir: str | None = None,
                 policy: str = "auto", *, min_move_bytes: int = MIN_MOVE_BYTES,
                 plan_options: dict | None = None, return_freed_memory: bool | str = True,
                 state_dir=None, host_budget=None, recompute="auto"):
        self.closed = True              # until construction completes
        self._blocks = 0                # `with ooc:` blocks open (__enter__)
        self._active = False
        self._active_thread = None      # the thread whose block is open
        # Readers on other threads between iterations (torch.save, deepcopy, ooc.save,
        # between()): a block does not start while one runs (sharing.reading), and a
        # between() does not start while a block is open or waits to start.
        self._gate = threading.Condition()
        self._readers = 0
        self._blocks_waiting = 0
        self._moving = 0                # `_alone` runs
        self._between_threads: collections.Counter = collections.Counter()  # ident: depth
        self._mode = None               # its dispatch mode while pushed (sharing.py reads it)
        try:                    # a bare budget under 64 KiB where smaller storages move
            floor = min(2**16, parse_bytes(min_move_bytes))
        except (OutcoreError, TypeError):       # refused with its own error in _build
            floor = 2**16
        self._budget = parse_budget(budget, "OutOfCore's budget", floor)
        if self.budget <= 0:
            raise OutcoreError(f"the budget must be positive, got {budget!r}")
        if offload not in ("disk", "host"):
            raise OutcoreError(f"unknown offload {offload!r}; use offload='disk' (CPU tensors) or "
                               "offload='host' (CUDA tensors)")
        if host_budget is not None and offload != "host":
            raise OutcoreError(f"host_budget={host_budget!r} sizes the host tier of offload='host'; "
                               "offload='disk' has none: drop host_budget, or pass offload='host'")
        self.host_budget = None
        if offload == "host":
            if state_dir is not None:
                raise OutcoreError("state_dir is not supported with offload='host' yet: the state "
                                   "is kept crash-consistent only in a swap file (offload='disk')")
            try:
                self.host_budget = (default_host_budget() if host_budget is None
                                    else parse_bytes(host_budget))
            except OutcoreError as err:
                raise OutcoreError(f"host_budget must be a byte count >= 0 (bytes or a string "
                                   f"such as '8GiB'): {err}") from None
        self.offload = offload
        if offload == "disk" and self.budget > (ram := host.memory_limit()):
            log.warning("the budget of %s is more than the %s of RAM this process may use (the "
                        "machine's, or its container's limit): it bounds nothing, and a step "
                        "larger than memory would be killed by the operating system instead "
                        "of refused by outcore. Pass a budget below that, with room for the "
                        "rest of the process (the report's rss+ line says how much it took)",
                        format_bytes(self.budget), format_bytes(ram))
        elif offload == "disk" and (need := (held := resident_bytes()) + self.budget
                                    + process_slack(self.budget)) > ram:
            # The process as it is, the budget, and what it took beyond both on the
            # workloads measured (docs/state.md): past the limit, the kernel kills it,
            # most likely in the first iterations (helper-139: 1400 MiB under 1.5 GiB).
            fits = max((ram - held - PROCESS_SLACK_BYTES) * PROCESS_SLACK_SHARE
                       // (PROCESS_SLACK_SHARE + 1), 0)
            log.warning("the budget of %s leaves too little of the %s of RAM this process may "
                        "use (the machine's, or its cgroup's limit): with the %s the process "
                        "holds now and what it took beyond the budget on the workloads "
                        "measured (%s + budget/%d), it may need %s, and the operating system "
                        "would kill it rather than outcore refuse. A budget of at most about "
                        "%s leaves that room", format_bytes(self.budget), format_bytes(ram),
                        format_bytes(held), format_bytes(PROCESS_SLACK_BYTES),
                        PROCESS_SLACK_SHARE, format_bytes(need), format_bytes(fits))
        registered(policy, plan_options or {},          # refused now, not after a recording
                   subject=f"OutOfCore(policy={policy!r})", what="plan option",
                   hint="; a window is adaptive's option (policy='adaptive'), k fixed's")
        check_options(policy, dict(plan_options or {}),
                      subject=f"OutOfCore(policy={policy!r}, plan_options={plan_options!r})")
        check_mode(recompute)
        self.recompute = recompute
        if return_freed_memory not in (True, False, "trim", "eager"):
            raise OutcoreError(f"return_freed_memory must be True (the same as 'trim'), False "
                               f"(keep it: `outcore bench --memory keep`) or 'eager', got "
                               f"{return_freed_memory!r}")
        try:            # a count or a size with its unit, as the budget (helper-122)
            min_move_bytes = parse_bytes(min_move_bytes)
        except OutcoreError as err:
            raise OutcoreError(f"min_move_bytes must be a byte count >= 0 such as 65536 or "
                               f"'64KiB', got {min_move_bytes!r}: {err}") from None
        for name, path in (("swap_dir", swap_dir), ("state_dir", state_dir)):
            if path is not None and (not isinstance(path, (str, os.PathLike))
                                     or not os.fspath(path)):
                raise OutcoreError(f"{name} must be a directory path (a non-empty str or "
                                   f"os.PathLike), got {path!r}")
        # "~/scratch" as a shell would read it: not a directory "~" below the working one.
        swap_dir, state_dir = (None if path is None else os.path.expanduser(os.fspath(path))
                               for path in (swap_dir, state_dir))
        self.policy = policy
        self.plan_options = dict(plan_options or {})
        aten.dynamo_skips_outcore()     # its hooks run under a compiled step: NOTE [Dynamo
        self._mover = self._durable = None                                  # kept out] 4
        self._building = None
        try:
            self._building = threading.get_ident()     # holds the slot while closed (`_claim`)
            _claim(self)
            # The process bound's base (NOTE [The process's base]): the resident set now,
            # and from the first iteration on the one _base() finds then.
            self._rss_made = self._rss_start = resident_bytes()
            self._based = False
            self._rss_adopted = 0        # rule 5: state taken over, taken off the base
            # A RAM budget's freed memory faults back in: 2 MiB at a time with PyTorch's
            # huge pages (NOTE [Huge pages by default]); found once per process, before
            # any tensor moves.
            self._huge_pages = torch_huge_pages() if offload == "disk" else ""
            self._huge_pages_warned = False
            # Building takes descriptors, a directory, threads: held (NOTE [Interrupts]),
            # so a Ctrl-C meanwhile is raised once everything taken is noted, and given
            # back.
            self._shield = shield = Shield()
            shield.enter()
            try:
                shield.install()
                try:
                    self._build(swap_dir, min_move_bytes, return_freed_memory, state_dir)
                finally:
                    shield.uninstall()
            finally:
                shield.exit()            # a Ctrl-C that came meanwhile is raised here
            self.closed = False
        except BaseException as exc:
            self.closed, self._building = True, None
            try:
                self._unbuild()
            except Exception as err:    # noqa: BLE001 - the first error is the user's
                exc.add_note(f"outcore: giving back what was taken also failed: {err}")
            raise
        self._building = None            # (open now: `closed` holds the slot)

    def _unbuild(self) -> None:
        """Give back what a construction that raised took (all of it, the finalizer, if
        it got that far)."""
        try:
            if getattr(self, "_finalizer", None) is not None:
                self._finalizer()
                return
            if self._mover is not None:
                self._mover.close()
            if self._durable is not None:
                self._durable.close()
        finally:
            _release_slot(self)

    def _build(self, swap_dir, min_move_bytes, return_freed_memory, state_dir) -> None:
        self._durable = Durable(state_dir) if state_dir is not None else None
        if self.offload == "host":
            link, disk = host.default_link(), None
            try:
                disk = DiskMover(swap_dir)             # the third tier, past host_budget
                self._mover = HostMover(link, self.host_budget, disk)
            except BaseException:
                link.close()
                if disk is not None:
                    disk.close()
                raise
        else:
            self._mover = DiskMover(swap_dir, path=self._durable.path if self._durable else None)
        self._res = Residency(self._mover, min_move_bytes=min_move_bytes)
        # glibc's settings: claimed by the first iteration, tightened at the first
        # eviction, given back by close() or garbage collection (memory/malloc.py). They
        # keep host memory near a RAM budget: a GPU budget has no use for them.
        self._governor = make_governor(return_freed_memory if self._mover.device_type == "cpu"
                                       else False)
        if self._governor is not None:
            self._res.before_first_eviction = self._governor.tighten
            if self._governor.mode == "trim":      # eager's check() does nothing: no per-op call
                self._res.memory_check = self._governor.check
                self._governor.largest_allocation = self._res.largest_tracked
                self._governor.managed = lambda res=self._res: res.resident
                self._res.memory_follow = self._governor.follow
        self._pager = Pager()
        self._leases: list = []     # (pipe read end, extents) per fork (mapped.py rule 9)
        self._warned_step = False    # once: an optimizer stepped our parameters between iterations
        step_hook = register_optimizer_step_pre_hook(_step_outside(weakref.ref(self)))
        self._finalizer = weakref.finalize(self, _release, self._res, self._mover, self._governor,
                                           self._pager, self._durable, step_hook)
        self.trace = None            # those of the plan the last iteration used
        self.schedule = None
        self._in_core_peak = self._held_peak = 0
        self._largest_peak = 0          # of every step planned (Report.largest_in_core_peak)
        self._plans = Plans()        # NOTE [Step shapes] in plans.py
        self._plan: Plan | None = None       # the plan the last iteration used
        self._ending: Ending | None = None   # how the last iteration left its arrays, if known
        self._carried: dict = {}
        self._inputs: list = []      # entries the last step read as inputs (Replayer._strangers)
        self._recordings_in_a_row = 0
        self._record_next = True
        # NOTE [Step shapes] rule 10: {family: (the plan a step outgrew, that step's
        # sizes)}, till a step of that family is recorded
        self._outgrowing: dict = {}
        self._outgrew_last = None    # ... the family of the step just run, if it outgrew
        self._infeasible: InfeasibleBudget | HostBudgetTooSmall | None = None
        self._last_infeasible: InfeasibleBudget | None = None     # the last one raised
        self._iterations = IterationLog(self.budget)     # bounded however long the run
        self._last_replay: _Replayed | None = None
        self._warned_rss = False     # once: the process grew past _rss_bound()
        self._warned_graph = False   # once: a recorded step left its graph for a backward after it
        self._warned_over = False    # once: an iteration's managed peak passed the budget
        self._deviated_at: dict = {}        # shape -> its last 3 (iteration, reason) that deviated
        self._batch_leaves: set = set()     # Recording.batch_leaves, learnt from replays
        self._said: set = set()             # SafeRecording.said: warnings given once
        self._atexit = None                 # `_say_behind_at_exit`'s hook, once registered
        self._buffer_swaps = collections.Counter()   # (shape, origin): _adopt
        self._between = (0, 0)              # the plan's bytes between iterations: report()
        self._warned_period = False         # once: they did so at a fixed period (_periodic)
        # Whether each of the last DEVIATIONS_SEEN replays deviated where nothing is
        # learnt (_often), and whether that was warned about (once).
        self._deviations: collections.deque = collections.deque(maxlen=DEVIATIONS_SEEN)
        self._unplannable_said = False      # rule 11's warning, given once in full
        self._op_by_op = (0, 0)     # rule 11: (steps run op by op, the most a plan of one needs)
        self._warned_often = False
        self._outgrown_shapes: set = set()  # recorded again once for _outgrown
        self._composition = Composition()     # run/compose.py: torch.distributed around us

    # -- the loop ------------------------------------------------------------------------
    def iteration(self) -> "_Iteration":
        """One training iteration under the budget (see the module docstring):
        `with ooc.iteration(): <the step>`."""
        return _Iteration(self)

    @contextlib.contextmanager
    def _aside(self):
        """Run what is not the step's inside an open iteration, on its thread: the loading
        of a gradient accumulation's next micro-batch (integrations/lightning.py). Its ops
        run as plain PyTorch's, neither recorded nor replayed, with every dispatch mode set
        aside: an in-memory dataset indexed there was an array of the step (8 MiB read back
        from the swap file every step for a batch of 16 KiB, or InfeasibleBudget naming
        the dataset's size; helper-53), and steps differed where the loader's ops did.
        What it makes is new to the step, like a batch made before the block: it binds at
        its first use. It must not read tensors outcore moves (they may be on the slow
        tier). Outside an iteration, or on another thread: nothing set aside."""
        if self._active != "iteration" or self._active_thread != threading.get_ident():
            yield
            return
        # Setting the modes aside and back are held sections (NOTE [Interrupts]): a Ctrl-C
        # there lands after, never with the modes half taken off the stack.
        shield = self._shield if threading.current_thread() is threading.main_thread() else None
        modes, entered = _disable_current_modes(), False
        try:
            if shield is not None:
                shield.enter()
            try:
                modes.__enter__()
                entered = True
            finally:
                if shield is not None:
                    shield.exit()
            yield
        finally:
            if entered:
                if shield is not None:
                    shield.enter()
                try:
                    modes.__exit__(None, None, None)
                finally:
                    if shield is not None:
                        shield.exit()

    def building(self) -> "_Building":
        """`with ooc.building(): model = Net()` creates (or `model.load_state_dict(...)`
        loads) a model under the budget: whatever does not fit goes to the swap file as it
        is made (run/building.py). Initialization is bitwise what it is without outcore."""
        return _Building(self)

    def resume(self, model, optimizer=None, *, extra=None) -> int:
        """With `state_dir`: name the model and optimizer whose state is kept there, load
        the last durable state into them if there is one (under the budget, with the
        random number generator's state), and return how many iterations it had done
        (0 for a fresh directory). Call once, before the first iteration; then continue
        the loop from the returned count (NOTE [Durable state] in durable.py). A loop
        that steps several optimizers with state names them all, in a list, the same
        order each time: `ooc.resume(model, [muon, adamw])` (rule 13). `extra`, a dict
        of objects with a state_dict() (a learning-rate scheduler, a GradScaler), keeps
        their state too, taken at the end of each iteration block: step them inside it
        (rule 16). Under
        torch.distributed every rank calls it (it is a collective): a rank one iteration
        ahead of another (a stop between their commits) resumes from the state it kept one
        commit before; ranks further apart are refused before anything is loaded."""
        if self._durable is None:
            raise OutcoreError("resume() needs OutOfCore(..., state_dir=...): without it nothing "
                               "is kept across processes")
        if self.closed:
            raise OutcoreError("this OutOfCore was closed; create a new one to resume")
        if self._iterations or self._durable.model is not None:
            raise OutcoreError("call ooc.resume(model, optimizer) once, before the first iteration")
        durable = self._durable
        named = _optimizers("resume", model, optimizer)
        extras = _extras("resume", extra) or {}
        optimizers = [unwrapped(o) for o in named]          # NOTE [Durable state] rule 13
        _same_on_every_rank(durable)
        if durable.manifest is not None:
            try:
                with self.building():
                    durable.load_into(model, optimizers, named, extras)
            except BaseException as exc:
                note = durable.failed_note(exc)
                if note is not None:
                    exc.add_note(note)
                raise
        durable.keep(model, optimizers, extras)
        return durable.iterations

    def keep(self, model, optimizer=None, *, extra=None) -> None:
        """With `state_dir`, after resume(): from the next commit on, keep the state of
        `model` and `optimizer` there instead of those named before: a loop that replaced
        its optimizer (or its model) names the new one, between iterations (several in a
        list, as resume() takes them; `extra` as resume() takes it, None for those named
        before). Nothing is
        loaded or written now. Until it is called, a commit after another optimizer with
        state stepped is refused (NOTE [Durable state] rule 13 in durable.py)."""
        durable = self._durable
        if durable is None:
            raise OutcoreError("keep() needs OutOfCore(..., state_dir=...): it names what "
                               "state_dir keeps")
        if self.closed:
            raise OutcoreError("this OutOfCore was closed; create a new one and resume()")
        if durable.model is None:
            raise OutcoreError("call ooc.resume(model, optimizer) first, before the first "
                               "iteration: it loads what state_dir kept, and keep() then "
                               "changes what it keeps")
        if self._active:
            raise OutcoreError("call ooc.keep(model, optimizer) between iterations, not "
                               "inside `with ooc.iteration():`")
        durable.keep(model, _optimizers("keep", model, optimizer), _extras("keep", extra))

    @contextlib.contextmanager
    def between(self):
        """`with ooc.between(): ...` on another thread that reads the model or the
        optimizer's state with tensor ops while this thread trains (a logger, an EMA, a
        watchdog): it waits until no `ooc.iteration()` or `ooc.building()` block is open,
        and the next one waits until it ends. Inside it the tensors are as between
        iterations (README, "Between iterations"): every read is right, and what is on the
        swap file is paged in. Outside such a block another thread's ops run past outcore
        and may read freed memory: outcore's dispatch mode, which brings a storage back
        before an op reads it, is the training thread's alone. Keep it short, as the
        training thread waits for it. On the thread that runs the blocks it is refused
        inside one (it would wait for itself), and a block started inside it is refused."""
        if self._active and self._active_thread == threading.get_ident():
            raise OutcoreError(f"ooc.between() inside ooc.{self._active}() on the thread that "
                               "runs it would wait for itself: on this thread the tensors are "
                               "readable as they are; use ooc.between() on other threads")
        me = threading.get_ident()
        with self._gate:
            # Nested on a thread already inside one: no wait (a block waiting to start
            # waits for the outer one, which would wait for it).
            while ((self._active or self._blocks_waiting) and not self.closed
                   and me not in self._between_threads):
                self._gate.wait()
            self._readers += 1
            self._between_threads[me] += 1
        try:
            yield
        finally:
            with self._gate:
                self._readers -= 1
                self._between_threads[me] -= 1
                if not self._between_threads[me]:
                    del self._between_threads[me]
                self._gate.notify_all()

    def _await_readers(self, new: str) -> None:
        """Before an `ooc.{new}()` block starts (the gate held): until no other thread
        reads between iterations (`between()`, a background save). between() calls that
        would start meanwhile wait for the block instead: a thread that calls them in a
        loop does not starve it. A Ctrl-C while waiting stops the wait: the shield's
        handlers are not installed yet, and nothing of the block is set up."""
        if threading.get_ident() in self._between_threads:
            raise OutcoreError(f"ooc.{new}() cannot start inside ooc.between() on the same "
                               "thread: it would wait for that block to end; end it first")
        self._blocks_waiting += 1
        try:
            while self._readers:
                self._gate.wait()
        finally:
            self._blocks_waiting -= 1

    def _hold_for_collective(self, tensors, what: str) -> None:
        """An asynchronous collective `what` is issued where no mode of outcore's sees it
        (NOTE [Collectives in flight] rule 6 in compose.py): the storages of `tensors`
        that may move are read back as for `.numpy()` (`sharing._prepare`: from another
        thread than the one that runs the blocks, between them or while one is open,
        refused before anything starts) and kept in place from now on, before it starts.
        One held section for all of them, after other threads' reads have ended (NOTE
        [Interrupts] rule 9): a Ctrl-C raised inside left a mapped storage unmapped and
        empty (helper-179: reading it was a segmentation fault), or one read back but
        free to move again under the collective."""
        res = self._res
        storages = [s for s in map(aten.storage_of, tensors) if s is not None
                    and (entry := res.entries.get(s._cdata)) is not None and not entry.pinned]
        if not storages:                 # none that may move: nothing to hold (most calls)
            return
        what = f"torch.distributed.{what}(async_op=True)"
        if self._active_thread not in (None, threading.get_ident()):
            for storage in storages:
                sharing._prepare(self, storage, what)            # refuses one that may move
            return
        with self._alone(), held_here(self._shield):
            for storage in storages:
                sharing._prepare(self, storage, what)      # read back, room made first
                entry = res.entry_of(storage)
                if entry is not None and not (entry.owner or entry.elsewhere):
                    res.disown(storage, entry.nbytes, "collective")

    @contextlib.contextmanager
    def _alone(self):
        """Around what moves storages between iterations on the thread that runs the
        blocks (`sharing._prepare`: a `.numpy()` or `share_memory_()` that reads a storage
        back and makes room for it): other threads' reads (`between()`, a background
        save) end first, and new ones wait until it is done; they would read what it
        frees. The thread's own `between()` blocks do not count."""
        me = threading.get_ident()
        with self._gate:
            self._blocks_waiting += 1       # holds new between() blocks
            self._moving += 1               # and new background reads (sharing.reading)
            try:
                while self._readers - self._between_threads.get(me, 0):
                    self._gate.wait()
            except BaseException:
                self._blocks_waiting -= 1
                self._moving -= 1
                self._gate.notify_all()
                raise
        try:
            yield
        finally:
            with self._gate:
                self._blocks_waiting -= 1
                self._moving -= 1
                self._gate.notify_all()

    def _idle(self) -> None:
        """The open block has ended: other threads' `between()` may go on."""
        aten.forget_made()  # NOTE [Storages made outside the dispatcher], rule 3
        with self._gate:
            self._active = False
            self._gate.notify_all()

    def _on_another_thread(self) -> str:
        """What an error about the open block adds where that block is another thread's
        (helper-133: "after the with block" read as if the caller were inside it)."""
        if self._active_thread in (None, threading.get_ident()):
            return ""
        return (f" (the ooc.{self._active}() block is open on another thread: call this "
                "there after it, or wait for it to end)")

    @property
    def budget(self) -> int:
        """The budget in bytes, fixed once made."""
        return self._budget

    @budget.setter
    def budget(self, value) -> None:
        # helper-133: assigned, it changed the report's figure and nothing else.
        raise OutcoreError(f"OutOfCore.budget cannot change ({format_bytes(self._budget)}): its "
                           "plans, memory governor and checks were made for it. close() this "
                           f"one and make an OutOfCore with the budget {value!r} instead "
                           "(with state_dir=, ooc.resume() goes on from where it is)")

    @property
    def state_dir(self):
        """The directory each completed iteration is made durable in, or None."""
        return self._durable.directory if self._durable is not None else None

    def save(self, obj, path) -> None:
        """`torch.save(obj, path)` between iterations, atomically: `path` holds either its
        old contents or the whole new checkpoint, whatever interrupts the save. State on
        the slow tier streams through memory page by page (NOTE [Mapped state], rule 2)
        instead of being read in whole; the file is an ordinary torch checkpoint. A binary
        file object (torch.save takes one too) is written as torch.save writes it, not
        atomically: only a file named by its path can be replaced whole."""
        if self.closed:
            raise OutcoreError("this OutOfCore was closed; save with torch.save, or before close()")
        if self._active:
            raise OutcoreError("ooc.save() cannot run inside ooc.iteration(); call it between "
                               "iterations" + self._on_another_thread())
        from .sharing import reading
        # The shield's signal handlers are the main thread's; on another thread the save
        # holds its own (install and uninstall there do nothing), and the whole save is a
        # reader the next iteration waits for (it would unmap what the save reads).
        main = threading.current_thread() is threading.main_thread()
        if not isinstance(path, (str, bytes, os.PathLike)):
            if not callable(getattr(path, "write", None)):
                raise OutcoreError(f"ooc.save(obj, path) takes a file path or a binary file "
                                   f"object, got {type(path).__name__}")
            with reading(self, "ooc.save()"):
                torch.save(obj, path)
            return
        try:
            with reading(self, "ooc.save()"):
                atomic_save(obj, path, self._shield if main else None)
        except OSError as exc:
            said = str(exc.strerror or exc)
            said = said if said.startswith("cannot save to ") else (
                f"could not write {os.fspath(path)}: {said}")   # else it names the path
            raise OutcoreError(f"ooc.save() {said}. What was there before is intact, and no "
                               "temporary file is left.") from exc

    @property
    def fast_device(self) -> str:
        """The device type whose tensors the budget manages: "cpu" (offload="disk"), "cuda"
        (offload="host")."""
        return self._mover.device_type

    @property
    def machine(self) -> str:
        """The machine preset `auto` plans on and timelines and plots simulate by default:
        cpu-disk (traced durations, this disk) for offload="disk"; for offload="host" a GPU
        roofline (h100-80gb) on the trace's FLOPs and bytes, since a CUDA step's recorded
        durations are kernel launches, not kernels. Pass plan_options={"machine": ...} for
        another."""
        return "h100-80gb" if self.offload == "host" else "cpu-disk"

    def timeline(self, path, *, simulated: bool = True, machine=None) -> None:
        """Write the last replayed iteration as a Chrome trace JSON file, which Perfetto
        (ui.perfetto.dev) and chrome://tracing open: a compute track (one slice per op), a
        track per transfer direction (one slice per swap), and counters (fast tier, slow
        tier, resident set, budget). With `simulated`, the same schedule simulated on
        `machine` (a preset name or an outcore.simulate.Machine; default `self.machine`,
        cpu-disk with the step's recorded host time counted) is a second process in
        the file, on the same clock, so planned and measured open side by side
        (docs/see.md)."""
        from ..simulate import simulate
        from ..view import timeline as tl
        replayed = self._replayed("ooc.timeline()")
        trace, schedule = replayed.trace, replayed.schedule
        parts = [tl.measured_events(trace, replayed.log, budget=self.budget,
                                    rss_start=self._rss_start, **_shown(replayed))]
        if simulated:
            sim = simulate(trace, schedule, self._shown_on(machine))
            parts.insert(0, tl.simulated_events(trace, schedule, sim, budget=self.budget))
        tl.write(path, tl.chrome_trace(*parts, policy=schedule.policy, budget=self.budget,
                                       functions=len(trace.functions),
                                       iteration=replayed.iteration))

    def plot(self, path, *, machine=None) -> None:
        """Draw the memory picture (outcore.view.plot) of the last replayed iteration to
        `path` (.png or .svg): the plan simulated on `machine` (default `self.machine`,
        cpu-disk with the step's recorded host time counted), stacked by category, and
        below it the measured step: managed bytes, the resident set, the transfers."""
        from ..simulate import simulate
        from ..view.plot import plot_memory
        replayed = self._replayed("ooc.plot()")
        trace, schedule = replayed.trace, replayed.schedule
        sim = simulate(trace, schedule, self._shown_on(machine))
        plot_memory(trace, schedule, sim, path, measured=replayed.log, budget=self.budget,
                    rss_start=self._rss_start, **_shown(replayed))

    def traffic(self):
        """The plan's bytes against those the last replayed iteration moved, per
        direction, every byte of the difference sorted into one cause
        (outcore.view.traffic.compare; docs/see.md, "Planned against measured bytes"):
        `print(ooc.traffic())`."""
        from ..view.traffic import compare
        replayed = self._replayed("ooc.traffic()")
        return compare(replayed.trace, replayed.schedule, replayed.log)

    def _shown_on(self, machine):
        """The machine a timeline or a plot simulates the plan on: `machine`, else
        `self.machine`, where cpu-disk counts the step's recorded host time (the Python
        between its ops, which the replay runs too: without it a small model's predicted
        step was a third of the measured one beside it, helper-170). The executor's own
        cost per op is still left out (`outcore bench overhead` measures it)."""
        if machine is not None:
            return machine
        if self.machine != "cpu-disk":
            return self.machine
        import dataclasses
        from ..simulate.machines import PRESETS
        return dataclasses.replace(PRESETS["cpu-disk"], host_time=True)

    def _replayed(self, api: str) -> _Replayed:
        if self._last_replay is None and self._last_infeasible is not None:
            # helper-162: "call it after one that replayed" where none ever will.
            raise OutcoreError(f"no iteration replayed a plan, and none will under this "
                               f"budget: {self._last_infeasible} Make an OutOfCore with a "
                               f"budget it takes, and call {api} after one of its "
                               "iterations replays")
        if self._last_replay is None and self._op_by_op[0]:
            raise OutcoreError(f"no iteration replayed a plan: the steps run op by op within "
                               f"the budget, as no plan can run them below "
                               f"{format_bytes(self._op_by_op[1])} (the warning logged at the "
                               f"first said so); make an OutOfCore with that budget or more "
                               f"to call {api}")
        if self._last_replay is None:
            raise OutcoreError(f"no iteration has replayed its plan to the end yet: the first "
                               "iterations record the step, and one that left its plan (the "
                               "report says 'deviated') has no whole measured step to show; "
                               f"call {api} after one whose report row says 'replay' and no "
                               "deviation")
        return self._last_replay

    def _park(self, errors: list, commit: bool = False) -> None:
        """Leave state where the step left it: finish every transfer, make the state
        durable (with `commit` and a state_dir), map what is on the slow tier (NOTE
        [Mapped state]). A resident storage is no longer `clean`: the user may change
        it before the next block, and only a mapped one would show it. Errors are
        appended, the rest still happens."""
        res = self._res
        parts = [res.settle, res.map_slow]
        if commit and self._durable is not None:
            parts.insert(1, self._commit)
        for part in parts:
            try:
                part()
            except BaseException as err:  # noqa: BLE001 - kept, raised by the caller
                errors.append(err)
        for entry in res.entries.values():
            if entry.state is FAST:
                entry.clean = False

    def _remap(self) -> None:
        """Between iterations, after room was made for a storage read back (sharing.py:
        `share_memory_()`, `.numpy()`): what that sent to the slow tier is mapped, as an
        iteration leaves it (`_park`), so every tensor stays readable (a storage left on
        the slow tier has no bytes: read, it crashed the process; saved, it was written
        empty). The pager is started again with the mappings there are now."""
        self._pager.stop()
        errors: list = []
        self._park(errors)
        self._page()
        if errors:
            raise errors[0]

    def _behind(self) -> bool:
        """Whether the last iteration completed and its state is not durable: its commit
        failed ("the next iteration tries again"), and close() comes with no next
        iteration. Not after an iteration that raised: the run stopped there keeps the
        last completed one's state (NOTE [Durable state] rule 11)."""
        durable = self._durable
        return durable is not None and durable.failed and durable.done > durable.iterations

    def _say_behind(self, at_exit: bool = False) -> None:
        """close() after `_behind`: a warning that the state_dir is an iteration behind
        (helper-166: it stayed so, unsaid). Not committed here: between the iteration and
        close() the user may have changed the model (loaded other weights, a step run
        outside, an exception halfway through a load_state_dict), and a commit then made
        durable a state no iteration ever had (helper-167)."""
        durable = self._durable
        broken = durable.broken()
        held = (f"{durable.directory} is gone (removed by something else)"
                if not os.path.isdir(durable.directory) else
                f"{durable.directory} holds no durable state: {broken}"
                if broken is not None else
                f"{durable.directory} holds the state of {durable.iterations} of the "
                f"{durable.done} completed iterations (resume() there returns "
                f"{durable.iterations})")
        log.warning("%s: %s: a commit failed, and no later one made it up. To keep the "
                    "rest, save the model and optimizer with torch.save() before they go",
                    "close()" if not at_exit else "at exit (the OutOfCore was never closed)",
                    held)

    def _say_behind_at_exit(self) -> None:
        """After a failed commit: `_say_behind` also where the script ends without close()
        (helper-167), from an atexit hook, not the finalizer (which must not log: it may
        run inside the collector); one hook per OutOfCore, holding it weakly."""
        if self._atexit is not None:
            return
        ref = weakref.ref(self)

        def at_exit():
            ooc = ref()
            if ooc is not None and not ooc.closed and ooc._behind():
                ooc._say_behind(at_exit=True)
        self._atexit = at_exit
        atexit.register(at_exit)

    def _commit(self) -> None:
        durable = self._durable
        durable.done += 1          # completed, whether or not its state becomes durable
        durable.failed = True      # until the commit returns (`_behind`)
        try:
            durable.commit(self._res, self._shield, durable.done)
            durable.failed = False
        except (OutcoreError, OSError) as err:
            kind = no_room(err) if isinstance(err, OSError) else type(err)
            what = err if isinstance(err, OutcoreError) else (      # the manifest's: no path
                f"{getattr(err, 'reason', None) or err.strerror or err}.")     # of the user's
            kept = durable.kept_note()
            then = ("the next iteration tries again." if durable.unsynced is None
                    and durable.lost is None else
                    "no later iteration of this OutOfCore commits there (NOTE [Durable state] "
                    f"rule {6 if durable.unsynced is not None else 12}). Training goes on in "
                    "memory; to keep it, ooc.save() to another disk"
                    + (", or close this OutOfCore and resume from the last durable state with "
                       "a new one." if durable.broken() is None else "."))
            memory = ("Nothing else in memory was lost" if durable.lost is not None
                      and not durable.file_gone else "Nothing in memory was lost")
            self._say_behind_at_exit()
            raise (SwapSpaceExhausted if issubclass(kind, SwapSpaceExhausted) else OutcoreError)(
                f"the iteration completed, but its state could not be made durable in "
                f"{durable.directory}: {what} {memory}, and {kept}; {then}") from err

    def _base(self) -> int:
        """The resident set the first iteration's rss+ counts from (NOTE [The process's
        base]): the freed heap handed back, the managed bytes in fast memory taken off."""
        if self._governor is not None:
            self._governor.hand_back()
        rss = resident_bytes()
        if self._mover.device_type == "cpu":       # a GPU's managed bytes are not in it
            rss -= self._res.resident
        return max(rss, 0)

    def _take_off_adopted(self, recording) -> None:
        """Rule 5 of NOTE [The process's base]: what the first iteration found in RAM and
        took over is managed from then on; the base counts it no more. Known once a
        recording that completed tells which of those storages are state (alive at its end,
        the same from step to step: the model's parameters, an optimizer state loaded
        before the OutOfCore), not the batch, which the next one replaces. Until one
        completes, the recordings go on noting what they take over (helper-142: a first
        iteration that raised early left the rest of the model counted in the base). The
        trim points come down by what was still unmanaged when the budget first needed room
        and they were set (`Residency.adopted_at_first_eviction`): what was taken over
        before that was managed bytes in them already."""
        res = self._res
        if not res.adopting or recording is None:
            return
        adopting, res.adopting = res.adopting, None
        arrays = recording.trace.arrays
        adopted = sum(adopting.get(storage._cdata, 0)
                      for ident, ref in recording.alive_at_end.items()
                      if (storage := ref()) is not None and arrays[ident].existed_before
                      and arrays[ident].kind == "persistent")
        if adopted:
            self._rss_adopted = adopted
            self._rss_start = max(self._rss_start - adopted, 0)
            if self._governor is not None:
                self._governor.rebase(self._rss_start,
                                      taken_off=max(adopted - res.adopted_at_first_eviction,
                                                    0))

    def _limits_base(self) -> int:
        """What the pager counts from: the lower of the size at OutOfCore() and the base
        (NOTE [The process's base], rule 4)."""
        return min(self._rss_made, self._rss_start)

    def _unpark(self) -> None:
        """Take the mapped state back before ops run under a mode (rule 4)."""
        self._pager.stop()
        self._end_leases()
        self._res.unmap_all(self.budget)

    def _end_leases(self) -> None:
        """Rule 9 of NOTE [Mapped state]: a fork's lease ends when every process holding
        its pipe's write end (its child, and any process that child forked) has exited
        or exec'd: its read end is at end of file. The extents no live lease names are
        the swap file's again."""
        if not self._leases:
            return
        live = []
        for read_end, extents in self._leases:
            try:
                gone = os.read(read_end, 1) == b""     # EOF: every holder is gone
            except BlockingIOError:
                gone = False
            if gone:
                os.close(read_end)
            else:
                live.append((read_end, extents))
        if len(live) != len(self._leases):
            self._leases = live
            self._mover.set_leased(_union(live))

    def _page(self) -> None:
        """Between iterations, with state left mapped: keep pages read from mapped state
        within what the budget leaves free plus PAGER_SLACK, and within the pager's floor
        while the whole resident set is above its base plus the budget plus PAGER_SLACK;
        the first time it is, give the step's freed heap back first (NOTE [Mapped
        state], rule 2)."""
        res = self._res
        mappings = res.mappings()
        if self.offload != "disk" or not mappings:   # the host tier has no page cache
            return
        governor, relieve_above = self._governor, self._limits_base() + self.budget
        relieve = (lambda: governor.trim_above(relieve_above)) if governor is not None else None
        self._pager.start(mappings, max(self.budget - res.resident, 0) + PAGER_SLACK,
                          ceiling=relieve_above + PAGER_SLACK, relieve=relieve)

    def _plan_recording(self, recording: SafeRecording, held_before=None,
                        asked=None) -> Plan | None:
        """Plan from a fresh recording, or ask for another one if the step is not steady
        yet (None). After a step outgrew its plan, the plan is made for the larger sizes
        of the two (NOTE [Step shapes] in plans.py, rule 10). `asked`: the family
        `Plans.next` asked a recording of; one of another family that has a plan grows
        that plan (for its largest sizes) where the two have the same functions on the
        same arrays (`envelope`), rather than adding a plan for its own sizes beside it:
        a branch by a coin toss (30% of steps), whose plan waited to grow, had the next
        step recorded, mostly one of the other ops and of a new size, and each such
        recording added a plan that no step would take (the family's largest replays),
        and pushed out those in use (helper-98's trial, helper-100's fix)."""
        trace = recording.trace
        self._recordings_in_a_row += 1
        # Arrays on another device than the fast tier's (a GPU step's CPU tensors) are
        # outside the budget and never move (Residency NOTE 6). A step with none on it
        # would run with the budget bounding nothing: refused.
        elsewhere = {a.id for a in trace.arrays
                     if a.device.split(":")[0] != self.fast_device}
        if trace.arrays and len(elsewhere) == len(trace.arrays):
            raise OutcoreError(
                f"this OutOfCore (offload={self.offload!r}) manages {self.fast_device} tensors, "
                f"and none of the step's {len(trace.arrays)} tensors is on that device (they "
                f"are on {trace.arrays[0].device}): the budget would bound nothing. Run the "
                "step on that device, or create the OutOfCore with the offload for the "
                "step's device (offload='disk' for CPU tensors)")

        # A few small arrays are not worth a recording: a 4-byte loss kept by a framework
        # inside optimizer.step() (Lightning's closure) looks like new optimizer state every
        # time. Many small ones are (a small model's momentum buffers, each under
        # MIN_MOVE_BYTES): what counts is their sum. If state below it does change the
        # next step, that step deviates and is recorded again. Where min_move_bytes lets
        # smaller storages move, the sum counts from there (at least a small op's bytes):
        # a small model's AdamW state, 24 KiB, deviated at the second step and recorded a
        # third with min_move_bytes=0 (helper-209).
        # State an optimizer keeps for a parameter that had none (its `state[p]`: not
        # Lightning's loss) changes the next step's ops whatever its size: Adafactor's
        # factored moments (8 KiB in test_an_optimizers_small_lazy_state_is_recorded_twice)
        # deviated the second step and recorded a third.
        lazy_state = recording.made_optimizer_state or sum(
            a.nbytes for a in trace.arrays if a.category == "optimizer_state"
            and not a.existed_before) >= min(
                MIN_MOVE_BYTES, max(self._res.min_move_bytes, SMALL_OP_BYTES))
        # DDP rebuilds its buckets once, in some iteration after the first (compose.py,
        # ddp_buckets_unbuilt): one recorded before or during it is not the steady step.
        # Only a module the step ran forward with grad does so: one alive that never
        # trains (a leftover, a teacher under no_grad) never rebuilds, and waiting for it
        # recorded 8 iterations instead of 3 (helper-201).
        # (One whose forward was called directly, `ddp.forward(x)`, passes no module hook:
        # it counts once it has rebuilt, in the step that did: helper-202.)
        rebuilding = any(m is not None and (id(m) in recording.ddp_trained
                                            or getattr(m, "_has_rebuilt_buckets", False))
                         for m in (ref() for ref in recording.ddp_unbuilt))
        # FSDP2 sets itself up in its first forward (Composition.fsdp_uninitialized).
        unsteady = lazy_state or rebuilding or fsdp_set_up(recording.fsdp_uninitialized)
        if unsteady and self._recordings_in_a_row < (
                _MAX_DDP_WAIT if rebuilding else _MAX_RECORDINGS):
            log.info("the step %s; recording the next iteration too, to plan the steady state",
                     "created optimizer state" if lazy_state else
                     "ran while DistributedDataParallel had its buckets to rebuild" if rebuilding
                     else "ran FSDP's first forward, where it sets itself up")
            self._record_next = True
            return
        disowned = self._disowned(recording)
        # {array id: entry} of the arrays alive at the end (plans.Ending).
        alive = {aid: e for aid, ref in recording.alive_at_end.items()
                 if (st := ref()) is not None and (e := self._res.entry_of(st)) is not None}
        # What never moves and this step does not touch (DDP's buckets, in a micro-batch
        # under no_sync()) stays resident beside it all the same.
        in_step = set(alive.values())
        # Those there as the step began count too (one it let go of held its memory till
        # then: a tensor a collective made in the step before).
        beside = max(self._held_beside(in_step),
                     sum(n for e, n in (held_before or {}).items() if e not in in_step))
        ops = recorded_ops(trace)
        family = family_of(ops)      # the envelope's is the same
        outgrown, sizes = self._outgrowing.pop(family, (None, None))
        grown = envelope(outgrown.recorded, trace, sizes) if outgrown is not None else None
        padded = with_margin(grown, outgrown.recorded, trace, sizes) if grown is not None else None
        if outgrown is None or grown is None and recorded_ops(outgrown.recorded) != ops:
            outgrown, grown = self._grown_aside(trace, outgrown, sizes)   # small ops aside
            family = family if outgrown is None else outgrown.family
        borrowed = False            # grown though no step outgrew it (`asked`)
        if outgrown is None and asked is not None and asked != family:
            largest = self._plans._largest(family)
            if largest is not None and largest.recorded is not None:
                grown = envelope(largest.recorded, trace)
                if grown is not None:
                    outgrown, borrowed = largest, True
        for trace in [t for t in (padded, grown) if t is not None] + [recording.trace]:
            held = held_arrays(trace, disowned)
            owned = owned_arrays(trace, (aid for aid, foreign in disowned.items() if foreign))
            pinned = pinned_peak(trace, self._res.min_move_bytes, held, owned)
            # The plan gets what those leave (planned_budget), counted whole here: floored
            # at 1 byte, the part past the budget went uncounted, and the smallest budget
            # InfeasibleBudget named was short by it (helper-52: FSDP2's gathered
            # parameters, 6.08 MiB against 6 MiB; a retry at the figure named failed again).
            kept = pinned + beside
            budget = self.budget - kept
            # Held arrays are counted once, in `pinned`; those elsewhere not at all: 0 bytes
            # for the planner, both.
            plannable = without_held(trace, held | elsewhere)
            try:
                self._require_feasible(plannable, budget, kept, recording)
                break
            except InfeasibleBudget:
                if trace is recording.trace:
                    raise
                log.info("the larger sizes of this step and the last do not fit the budget "
                         "together: planning this step's own")
        recorded = trace
        grew = recorded is grown or recorded is padded      # rule 10: a plan of the envelope
        started = time.perf_counter()
        options = dict(self.plan_options)
        chosen, plannable, schedule = choose_recompute(
            plannable, budget, mode=self.recompute, policy=self.policy,
            machine=options.pop("machine", self.machine),
            min_bytes=max(self._res.min_move_bytes, 1), foreign=held | owned, **options)
        # The least any run holds, and what plain PyTorch held (Report.held_peak).
        self._in_core_peak, self._held_peak = trace.peak()[0], trace.peak(actual=True)[0]
        self._largest_peak = max(self._largest_peak, self._in_core_peak)
        trace = rewrite(trace, chosen)          # the same repeats, at the recorded sizes
        check(plannable, schedule, budget)
        if isinstance(self._mover, HostMover):
            self._require_host_budget(plannable, schedule)
        log.info("planned %d functions under %s (%s) in %.2f s: %s in, %s out per iteration, "
                 "peak %s%s", len(trace.functions), format_bytes(budget), _policy_label(schedule),
                 time.perf_counter() - started, format_bytes(schedule.bytes_in),
                 format_bytes(schedule.bytes_out), format_bytes(schedule.peak_bytes),
                 f", {len(chosen)} activations recomputed" if chosen else "")
        if (schedule.bytes_in + schedule.bytes_out and not self._huge_pages_warned
                and self._huge_pages.startswith("off: PyTorch read")):  # NOTE [Huge pages by default]
            self._huge_pages_warned = True          # once per OutOfCore
            log.warning("this plan moves %s per iteration, and freed memory will fault back "
                        "in 4 KiB at a time: huge pages for tensors are %s",
                        format_bytes(schedule.bytes_in + schedule.bytes_out), self._huge_pages)
        self._carried, self._inputs, holding = {}, [], set()
        for aid, entry in alive.items():
            arr = trace.arrays[aid]
            if arr.kind == "persistent" and arr.existed_before:
                self._carried[aid] = entry
            elif arr.kind == "input":
                self._inputs.append(entry)
            if entry.extent is not None:
                holding.add(aid)
        keys = function_keys(trace)
        # What moves between iterations, on the trace the plan was made for: held arrays
        # are 0 bytes there, and never move (Schedule.boundary).
        plan = Plan(shape=shape_of(keys), trace=trace, schedule=schedule, keys=keys,
                    between=schedule.boundary(plannable), in_core_peak=self._in_core_peak,
                    held_peak=self._held_peak,
                    persistent=frozenset(a.id for a in trace.arrays
                                         if a.kind == "persistent" and a.existed_before),
                    started_from=dict(self._carried), held_beside=beside,
                    held_in_step=frozenset(e for e in in_step if e.owner or e.pinned),
                    recorded=recorded, grows=outgrown is None or borrowed or grew,
                    made_state=any(a.category == "optimizer_state" and not a.existed_before
                                   for a in trace.arrays),
                    # of the family it grew (_grown_aside); a record planned alone is
                    # of its own ops' (helper-93)
                    family=family if grew else family_of(ops))
        self._plans.add(plan)
        if grew and outgrown.shape != plan.shape:
            self._plans.drop(outgrown.shape)        # the larger plan covers its steps
        elif outgrown is not None and not grew and not borrowed:
            outgrown.grows = False                  # no loop of recordings (rule 10)
        self._use(plan)
        self._ending = Ending(plan.shape, alive)
        if isinstance(self._mover, HostMover):
            # The pool serves every plan kept: it only grows (host_bytes_needed).
            self._mover.reserve(max(self._mover.reserved,
                                    host.host_bytes_needed(plannable, schedule, holding)))
        self._record_next = False
        self._recordings_in_a_row = 0
        return plan

    def _outgrow(self, plan: Plan, sizes: dict) -> None:
        """A step outgrew `plan`, making arrays of `sizes` ({array id: bytes}): the next
        step of its family is recorded, and its plan made for the larger sizes (NOTE
        [Step shapes] in plans.py, rule 10). Another step that outgrew it before that
        one came adds its sizes."""
        before, known = self._outgrowing.get(plan.family, (None, {}))
        if before is plan:
            sizes = {a: max(n, known.get(a, 0)) for a, n in {**known, **sizes}.items()}
        self._outgrowing[plan.family] = (plan, sizes)
        self._outgrew_last = plan.family

    def _grown_aside(self, trace, outgrown, sizes) -> tuple:
        """Rule 10: (the plan a step outgrew, `trace` grown to the sizes of both records
        and of that step: `plans.grown_aside`) where `trace` is that plan's step, small
        ops aside: the plan `outgrown` of its family if given (that step's `sizes`), else
        one of another family, whose entry is taken. Else (`outgrown`, None). A growth
        recording on a step with a small op more or less than the plan's record (a
        `loss.item()` every n-th step) is of another family: the entry waited, and the
        next step of the plan's family was recorded again (helper-86's sixth; helper-89:
        two recordings for one growth). The plan made has the family it grew: steps of
        either ops replay it to its end (small functions passed: NOTE [Small ops off
        the record] rule 4), as that family; its record has that small op more or less
        than the steps of the family, and grows again so."""
        entries = {None: (outgrown, sizes)} if outgrown is not None else self._outgrowing
        for family, (plan, known) in entries.items():
            grown = grown_aside(plan.recorded, known, trace)
            if grown is not None:
                self._outgrowing.pop(family, None)
                return plan, grown
        return outgrown, None

    def _growing(self) -> tuple[dict, tuple]:
        """For Plans.next: the families whose plans wait to grow (rule 10), those of plans
        still kept, and the family of a step that outgrew its plan in the iteration just
        run (taken once: recorded next where no period predicts another family)."""
        self._outgrowing = {f: grow for f, grow in self._outgrowing.items()
                            if grow[0].shape in self._plans}
        now, self._outgrew_last = self._outgrew_last, None
        return self._outgrowing, () if now is None else (now,)

    def _use(self, plan: Plan) -> None:
        """Make `plan` the one the report, timeline() and plot() show."""
        self._plan, self.trace, self.schedule = plan, plan.trace, plan.schedule
        self._between, self._in_core_peak = plan.between, plan.in_core_peak
        self._held_peak = plan.held_peak

    def _held_beside(self, known, counted: bool = False) -> int:
        """Bytes that storages that never move hold in fast memory now, besides those in
        `known`; `counted`: only those a replay keeps counting (`Residency.stays`)."""
        return sum(n for e, n in self._held_sizes().items()
                   if e not in known and (not counted or self._res.stays(e)))

    def _outgrown(self, plan: Plan, carried: dict) -> bool:
        """Whether storages that never move and that `plan`'s step does not start from
        (the entries `carried` gives it, the inputs, those its record kept) now hold more
        than its plan left for them (NOTE [Step shapes] in plans.py, rule 8): DDP's
        buckets, made after this one was planned. Only those the replay keeps counting
        (`Residency.stays`): the rest it lets go of as it starts (Residency NOTE 8:
        another shape's small optimizer state, the gradients of the micro-batch before
        where the plan has not learnt what it starts from after it), and counting them
        here recorded a step again and again, each time its sizes were new (helper-85).
        Once per shape: a step that keeps a new such storage every time (a tensor a
        collective made, held till the next step) is not recorded again and again."""
        if plan.shape in self._outgrown_shapes:
            return False
        known = plan.held_in_step | set(carried.values()) | set(self._inputs)
        beside = self._held_beside(known, counted=True)
        if beside > plan.held_beside + plan.schedule.budget - plan.schedule.peak_bytes:
            self._outgrown_shapes.add(plan.shape)
            return True
        return False

    def _held_sizes(self, collectives_only: bool = False) -> dict:
        """{entry: bytes} of the storages that never move (kept by collectives or FSDP,
        Residency NOTE 5; unmovable or small, NOTE 7: unless `collectives_only`), resident
        now."""
        out = {}
        for entry in self._res.entries.values():
            if ((entry.owner or (entry.pinned and not collectives_only)) and entry.state is FAST
                    and not entry.elsewhere):       # NOTE 6 of residency.py: in no counter
                storage = entry.ref()
                if storage is not None:
                    out[entry] = storage.nbytes() if entry.foreign else entry.nbytes
        return out

    def _live(self, entry) -> bool:
        """Whether `entry` still stands for a living storage the table tracks."""
        storage = entry.ref()
        return storage is not None and self._res.entry_of(storage) is entry

    def _require_host_budget(self, trace, schedule) -> None:
        """NOTE [Host tier between iterations] 5: the state the plan leaves on the slow
        tier between iterations must fit in host_budget, or it would be read back into
        GPU memory, over the budget; and where PyTorch cannot map it in place
        (aten.SWAPS_DATA_PTR), it is read back anyway, and must fit in what the GPU has
        free."""
        needed = host.lasting_slow_bytes(trace, schedule)
        if needed > self.host_budget:
            raise HostBudgetTooSmall(
                f"the plan leaves {exact_bytes(needed)} of state on the slow tier "
                f"between iterations, more than host_budget={format_bytes(self.host_budget)} "
                f"({self.host_budget:,} B): with offload='host' that state stays in page-locked "
                "host memory between iterations (it cannot be mapped into GPU tensors from "
                f"the disk). Raise host_budget to at least {format_bytes(needed)}, or raise the "
                "budget so that more of it stays in GPU memory. This step completed "
                "correctly; " + STOPPED,
                needed_bytes=needed, host_budget=self.host_budget)
        if not needed or aten.SWAPS_DATA_PTR:
            return
        # Without it the state is read back at every iteration's end (Residency.map_slow),
        # beside the state the plan keeps resident: into what is free now and what the
        # managed tensors resident now leave when only that state stays.
        at_end = set(schedule.resident_at_end)
        kept = sum(a.nbytes for a in trace.arrays if a.freed_after is None and a.id in at_end)
        room = self._mover.link.free_bytes() + max(0, self._res.resident - kept)
        if needed > room:
            raise HostBudgetTooSmall(
                f"the plan leaves {exact_bytes(needed)} of state on the host "
                f"tier between iterations, and this PyTorch ({torch.__version__}) cannot keep it "
                "there usable in place (it has no UntypedStorage._swap_data_ptr_): it would be "
                "read back into the fast tier at every iteration's end, where at most "
                f"{format_bytes(room)} is free. Upgrade PyTorch (2.13 has it), or raise the "
                "budget so that less state leaves the fast tier. This step completed "
                "correctly; " + STOPPED,
                needed_bytes=needed, host_budget=self.host_budget)

    def _disowned(self, recording: SafeRecording) -> dict:
        """{array id: foreign} of the recorded arrays whose storage outcore does not move
        (run/compose.py), FSDP's found once more now that the step has created them, and
        those that cannot move (Residency NOTE 7: from_numpy, `.numpy()`, shared memory),
        which the plan must count resident like the arrays of collectives."""
        res = self._res
        self._composition.disown_fsdp(res)
        out = {}
        for aid, ref in recording.alive_at_end.items():
            storage = ref()
            entry = res.entry_of(storage) if storage is not None else None
            if entry is not None and entry.owner:
                out[aid] = entry.foreign
            elif (entry is not None and entry.pinned and not entry.elsewhere
                  and entry.nbytes >= res.min_move_bytes):
                out[aid] = False
        for aid in recording.unmovable:            # those that died within the step too
            out.setdefault(aid, False)
        return out

    def _stuck_small(self, recording: SafeRecording) -> set:
        """Ids of the arrays alive at the end under min_move_bytes that could not move at
        any min_move_bytes (shared, exported, unresizable: Residency NOTE 7)."""
        res, out = self._res, set()
        for aid, ref in recording.alive_at_end.items():
            storage = ref()
            if (storage is not None and storage.nbytes() < res.min_move_bytes
                    and not movable(storage)):
                out.add(aid)
        return out

    def _require_feasible(self, trace, budget: int, kept: int, recording=None) -> None:
        """`plan.feasibility.require_feasible`, its error restated in the user's terms:
        the budget they passed, and `kept`, what the arrays that never move hold at their
        peak (`budget` is the rest, for the plan: zero or less where they alone fill it).
        The smallest budget named is the worst function's need plus `kept`: a retry at
        it is planned. `recording`: the step's, read only when raising (`_stuck_small`)."""
        try:
            require_feasible(trace, max(budget, 0))
            if budget > 0:
                return
            index, op, phase, need = None, None, None, 0     # nothing of the plan's needs room
        except InfeasibleBudget as err:
            index, op, phase, need = err.function_index, err.op, err.phase, err.needed_bytes
        smallest = need + kept
        unmovable = "arrays under min_move_bytes={:,}, those that cannot be resized or are in " \
            "shared memory (from_numpy, .numpy(), torch.load: .clone() those, or torch.load " \
            "between iterations; a model " \
            "loaded by mapping its file, from_pretrained or torch.load(mmap=True): " \
            "outcore.integrations.make_movable(model, ooc) between iterations, before the " \
            "first that uses those weights (weights an iteration has used as loaded stay " \
            "so for that OutOfCore's life: it says so); " \
            "optimizer " \
            "state loaded with torch.load, by load_state_dict or accelerate's load_state: " \
            "outcore.integrations.make_movable(optimizer, ooc) after loading; " \
            "share_memory_()), and those of collectives and FSDP (its gathered parameters)" \
            .format(self._res.min_move_bytes)
        if index is None:
            what = "The arrays of this step that never move fill the budget alone."
        else:
            pending = need - function_bytes(trace, index)       # feasibility.needs
            unused = ((f" ({format_bytes(pending)} of it tensors that existed before the step "
                       "and that it only reads, such as the batch, LBFGS's history, FSDP's "
                       "all-gather buffers (made where no op shows them) or tables held in "
                       "plain attributes or module buffers that take turns with other "
                       "tensors: they stay in memory until their first use; a table "
                       "registered with module.register_buffer (and kept), or held as "
                       "nn.Parameter(t, requires_grad=False), moves like state)")
                      if pending > 0 else "")
            what = (f"function {index} ({op}, {phase}) needs {exact_bytes(need)} "
                    f"on the fast tier at once{unused}.")
        if budget > 0:
            held = (f"The budget of {exact_bytes(self.budget)} you passed "
                    f"leaves {exact_bytes(budget)} for the plan: {unmovable} "
                    f"never move and hold up to {exact_bytes(kept)} of it.")
        else:
            held = (f"The budget of {exact_bytes(self.budget)} you passed "
                    f"leaves nothing for the plan: {unmovable} never move and hold up to "
                    f"{exact_bytes(kept)} at once in this step, all of it or "
                    "more.")
        # What a lower min_move_bytes would let move (not `stuck`: NOTE 7's reasons too).
        stuck = self._stuck_small(recording) if recording is not None else set()
        small = max(occupancy(trace, only=lambda a: a.nbytes < self._res.min_move_bytes
                              and a.id not in stuck), default=0)
        lower = ("or lower min_move_bytes (OutOfCore(min_move_bytes=...)): storages under it "
                 f"hold up to {format_bytes(small)} of it, and a step of smaller tensors "
                 "(shorter sequences, a smaller batch) has more of its arrays under it than "
                 "a larger one and can need more" if 4 * small >= smallest
                 else "lower the batch" + (", or lower min_move_bytes"
                                           if self._res.min_move_bytes else ""))
        # The recording itself made room op by op and may have stayed within the budget
        # (helper-79: a step with accumulation, four times): then it is the plan, which
        # leaves the arrays that never move their peak throughout, that cannot run it.
        # (Not where the arrays that never move fill the budget alone: FSDP2's gathered
        # parameters, which the managed peak does not count, helper-52.)
        peak = self._res.stats.peak_resident if recording is not None else None
        ran = peak is not None and peak <= self.budget and kept < self.budget
        verdict = ("No schedule can run this step" if not ran else
                   f"This step ran op by op within the budget (its peak {format_bytes(peak)}), "
                   "making room as each op needed it; a plan cannot run it, as it keeps room "
                   "for those arrays at their peak throughout, so steps of its shape go on "
                   "running op by op, correct but slower (NOTE [Step shapes], rule 11)")
        raise InfeasibleBudget(
            f"{what} {held} {verdict}; the "
            f"smallest feasible budget is {exact_bytes(smallest)}: raise "
            f"the budget to that or more, {lower}.",
            function_index=index if index is not None else 0, op=op or "the step",
            phase=phase or "", needed_bytes=need, budget_bytes=self.budget,
            min_feasible_bytes=smallest, ran_within_budget=ran)

    def _often(self) -> None:
        """Warn once where most recent replays deviated with no period for their families
        and no plan that grows (NOTE [Step shapes] rules 2 and 10: those are learnt, as
        an accumulation's micro-batches are in its first periods): each deviation is
        said at INFO while its shape is learnt (`_adopt`), and a loop whose every step
        is a new shape (ops that follow the data, a period past MAX_PERIOD) was never
        warned about (helper-87: 23 of 30 iterations on demand, no warning)."""
        if self._warned_often or sum(self._deviations) < DEVIATIONS_WARNED:
            return
        self._warned_often = True
        log.warning("%d of the last %d replayed iterations deviated from their plans and ran on "
                    "demand: correct, but slower than a plan. The steps change in ways outcore's "
                    "plans do not follow (ops or sizes that follow the data, a period longer "
                    "than %d iterations); the report names each deviation and its reason, and "
                    "docs/executor.md (\"Steps of several shapes\", \"Sizes that vary\") says "
                    "which changes a plan follows", sum(self._deviations), len(self._deviations),
                    plans.MAX_PERIOD)

    def _periodic(self, index: int, reason: str, shape: int) -> None:
        """Note that iteration `index` deviated for `reason` with `shape`; the third
        deviation to one shape at a fixed period, for the same reason, and of a shape seen
        at least twice before, gets one warning with the likely cause. A loop that calls
        optimizer.step() every n-th iteration (gradient accumulation across iterations)
        gets a plan per shape (NOTE [Step shapes] in plans.py), and deviates while it
        learns them, a period past MAX_PERIOD too (rule 12: no warning for it); with more
        than MAX_PLANS shapes it deviates at the same function for ever. (A step whose
        shapes follow the data deviates at every replay, but each time to a new shape:
        not this.) Where each of them read
        another tensor than recorded, the cause named is a tensor the step keeps as state
        that is a new one every step (a batch passed as an nn.Parameter, a parameter
        replaced instead of updated): recorded, replayed, deviating at it, period 2."""
        if len(self._deviated_at) > 64 and shape not in self._deviated_at:
            self._deviated_at.clear()      # shapes that follow the data: each new
        mine = self._deviated_at[shape] = [*self._deviated_at.get(shape, [])[-2:], (index, reason)]
        seen = [i for i, _ in mine]
        if (not self._warned_period and len(seen) == 3
                and len({r for _, r in mine}) == 1
                and seen[2] - seen[1] == seen[1] - seen[0] > 1
                and self._plans.times[shape] >= 3):
            self._warned_period = True
            if ANOTHER_TRACKED in reason:
                # Replay after replay finds a tensor it knows where the record had another:
                # parts of the model taken in turns (helper-182: a head per task, in turn,
                # each a Linear of one size, with an optimizer stepping both: NOTE [Step
                # shapes] rule 13; helper-197: zero_grad(set_to_none=False) before the
                # forward, four heads, small pinned heads beside a moved trunk), or a depth
                # read from the data (helper-190: one block run 1-4 times, each depth's
                # plan recorded only where a recording asked for a depth that comes at
                # random catches it).
                log.warning("iterations %s deviated from their record, one in every %d, each "
                            "time reading another tensor than recorded, one an earlier step "
                            "read (%s): the steps take turns between parts of the model whose "
                            "tensors have the same sizes (a head per task, in turn, with an "
                            "optimizer that steps them all), or run a part of it a number of "
                            "times read from the data (a depth that follows the batch), which "
                            "outcore's plans, one per shape of step, do not tell apart or "
                            "predict, so these record or run on demand (correct, within the "
                            "budget, slower). Run one round of the parts (each once) in one "
                            "ooc.iteration(), or zero the gradients with "
                            "zero_grad(set_to_none=True) so that a part's idle turn leaves it "
                            "untouched; for a depth that follows the data, see "
                            "docs/executor.md, \"Loops that do not settle\"",
                            ", ".join(map(str, seen)), seen[1] - seen[0], reason)
                return
            if "another array than recorded" in reason:
                # Replay after replay finds a new tensor where the record had state.
                log.warning("iterations %s deviated from their record, one in every %d, each "
                            "time reading another tensor than recorded (%s): a tensor the "
                            "step keeps as state (an nn.Parameter, or a tensor it updates) is "
                            "a new one in every step, so no replay follows its record. Update "
                            "it in place (.copy_()) instead of replacing it, or pass a batch "
                            "as a plain tensor (requires_grad=True is fine), not an "
                            "nn.Parameter", ", ".join(map(str, seen)), seen[1] - seen[0], reason)
                return
            period = seen[1] - seen[0]
            if (period > plans.MAX_PERIOD and len(self._plans) < plans.MAX_PLANS
                    and shape not in self._plans and shape not in self._plans.unplannable):
                self._warned_period = False    # rule 12: due next time, recorded then
                return
            if period <= plans.MAX_PERIOD and len(self._plans) < plans.MAX_PLANS:
                # Not a period outcore cannot follow: the steps in between are a new shape
                # each time (helper-51: generate() of a growing length between training
                # steps), so no plan is known to come next.
                log.warning("iterations %s deviated from their record, one in every %d: the "
                            "iterations between them had a new shape of step each time, so "
                            "outcore cannot tell which plan comes next and these run op by op "
                            "(correct, within the budget, slower). Shapes that follow the data "
                            "do this (generate() with a growing length, evaluation on batches "
                            "of varying size): run those steps outside ooc.iteration() "
                            "(reading the model there needs no plan), or give them fixed "
                            "shapes; so does a step changed between them (parameters frozen "
                            "or unfrozen, an iteration that raised), which settles once the "
                            "changes stop", ", ".join(map(str, seen)), period)
                return
            log.warning("iterations %s deviated from their record, one in every %d, each time to "
                        "a shape of step seen before: a step that changes with a period "
                        "(optimizer.step() every %d iterations, gradient accumulation) gets a "
                        "plan per shape, but outcore keeps %d plans and this loop has more "
                        "shapes, so these iterations run op by op. Put the whole cycle in one "
                        "ooc.iteration(): the micro-batches' forward and backward, then "
                        "optimizer.step()", ", ".join(map(str, seen)), period, period,
                        plans.MAX_PLANS)

    def _trims(self) -> tuple[int, int]:
        """The governor's trims so far, and the bytes they gave back."""
        gov = self._governor
        return (gov.trims, gov.given_back) if gov is not None else (0, 0)

    # -- reporting -----------------------------------------------------------------------
    def _rss_bound(self) -> int:
        """How far above its base the process grew at most on the workloads measured
        (malloc.process_slack); 0 where that was not measured: a GPU budget, or
        return_freed_memory other than "trim"."""
        if self._governor is None or self._governor.mode != "trim":
            return 0
        return self.budget + process_slack(self.budget)

    def report(self) -> Report:
        trace, schedule = self.trace, self.schedule
        pinned = sum(min(e.nbytes, s.nbytes()) for e in self._res.entries.values()
                     if e.pinned and not e.elsewhere and (s := e.ref()) is not None)
        # (min: FSDP resizes the storages it owns to nothing between its uses)
        made = remade(trace) if trace else []
        return Report(
            budget=self.budget, policy=_policy_label(schedule) if schedule else self.policy,
            swap=repr(self._mover),
            functions=sum(f.repeats is None for f in trace.functions) if trace else 0,
            in_core_peak=self._in_core_peak if trace else 0,
            held_peak=self._held_peak if trace else 0,
            largest_in_core_peak=self._largest_peak,
            planned_peak=schedule.peak_bytes if schedule else None,
            planned_in=schedule.bytes_in if schedule else None,
            planned_out=schedule.bytes_out if schedule else None,
            planned_between=self._between if schedule else (0, 0),
            planned_budget=schedule.budget if schedule else None,
            pinned_bytes=pinned, iterations=self._iterations.listed(),
            elided=self._iterations.elided,
            rss_start=self._rss_start,
            rss_made=self._rss_made,
            rss_adopted=self._rss_adopted,
            huge_pages=self._huge_pages,
            rss_bound=self._rss_bound(),
            planned_recomputed=sum(trace.arrays[a].nbytes for _, a in made),
            recomputed_arrays=len(made), step_shapes=len(self._plans),
            op_by_op_steps=self._op_by_op[0], op_by_op_plan_needs=self._op_by_op[1])

    # -- lifetime ------------------------------------------------------------------------
    @critical
    def close(self) -> None:
        """Release the swap space and give the allocator settings back. State on the slow
        tier stays readable and writable, mapped from the unnamed swap file, until its
        tensors die (NOTE [Mapped state], rule 7): closing never reads it all in."""
        shield = self._shield
        shield.enter()
        try:
            if self.closed:
                return
            if self._active:
                raise OutcoreError("cannot close an OutOfCore inside its iteration; close it "
                                   "after the `with ooc.iteration():` block (one a framework "
                                   "callback opened, where an exception left it open: "
                                   "`callback.end(exc)` ends it, docs/integrations.md)"
                                   + self._on_another_thread())
            shield.install()
            errors: list = []
            try:
                self._pager.stop()
                self._park(errors)
                if self._behind():
                    self._say_behind()
            finally:
                self.closed = True
                if self._atexit is not None:
                    atexit.unregister(self._atexit)
                    self._atexit = None
                leases, self._leases = self._leases, []
                for read_end, _ in leases:       # the swap file lives while children map it
                    os.close(read_end)
                try:
                    self._finalizer()            # mappings, mover, allocator settings: once
                finally:
                    _release_slot(self)
                    shield.uninstall()
            errors += kept_warnings()            # NOTE [Warnings as errors] rule 2
            if errors:
                raise errors[0]
        finally:
            shield.exit()

    def __enter__(self):
        """`with ooc:` closes it at the block's end. Blocks nest (a helper that opens
        `with ooc:` called inside one): only the outermost closes it. Closing it at an
        inner block's end left the outer block's next iteration refused, naming that line
        rather than the inner `with` (helper-148)."""
        if self.closed:
            raise OutcoreError("this OutOfCore was closed; create a new one to train again")
        self._blocks += 1
        return self

    def __exit__(self, *exc):
        self._blocks -= 1
        if self._blocks == 0:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("planned" if self.schedule else "recording")
        return f"OutOfCore(budget={format_bytes(self.budget)}, policy={self.policy!r}, {state})"


def _optimizers(api: str, model, optimizer) -> list:
    """resume()'s and keep()'s `optimizer` as a list: none, one, or a list or tuple of
    several (NOTE [Durable state] rule 13), each an optimizer and each once; `model` a
    Module."""
    if not isinstance(model, torch.nn.Module):
        raise OutcoreError(f"{api}(model, optimizer): model must be a torch.nn.Module, got "
                           f"{type(model).__name__} (several models: put them in a "
                           "torch.nn.ModuleDict)")
    several = isinstance(optimizer, (list, tuple))
    optimizers = list(optimizer) if several else [] if optimizer is None else [optimizer]
    for item in optimizers:
        if not all(hasattr(item, name) for name in ("state_dict", "load_state_dict",
                                                    "param_groups")):
            raise OutcoreError(f"{api}(model, optimizer): optimizer must be an optimizer, a "
                               f"list of optimizers or None, got {type(item).__name__}"
                               + (" in the list" if several else ""))
    if len({id(identity(item)) for item in optimizers}) != len(optimizers):
        raise OutcoreError(f"{api}(model, [...]): an optimizer is named twice in the list; "
                           "name each once")
    ours = {id(p) for p in model.parameters()}
    for place, item in enumerate(optimizers):
        outside = [p for group in item.param_groups for p in group["params"]
                   if id(p) not in ours]
        if outside:                     # helper-215: kept state, lost parameters
            which = f"optimizer {place + 1} of {len(optimizers)}" if several else "optimizer"
            raise OutcoreError(
                f"{api}(model, optimizer): the {which} ({type(item).__name__}) holds "
                f"{len(outside)} parameter{'s' if len(outside) > 1 else ''} that are not "
                f"the model's ({', '.join(str(tuple(p.shape)) for p in outside[:4])}"
                f"{', ...' if len(outside) > 4 else ''}): "
                "state_dir keeps the model's parameters and would resume that optimizer's "
                "state beside freshly made ones. Put the modules they belong to in the "
                "model (several models: a torch.nn.ModuleDict)")
    return optimizers


def _extras(api: str, extra) -> dict | None:
    """resume()'s and keep()'s `extra`: None, or a dict of names to objects with a
    state_dict() and a load_state_dict() (NOTE [Durable state] rule 16)."""
    if extra is None:
        return None
    if not isinstance(extra, dict):
        raise OutcoreError(f"{api}(..., extra=...): extra must be a dict of names to objects "
                           f"with state_dict() and load_state_dict(), got "
                           f"{type(extra).__name__}")
    for name, obj in extra.items():
        if not isinstance(name, str):
            raise OutcoreError(f"{api}(..., extra=...): its names must be strings, got "
                               f"{name!r}")
        if not (callable(getattr(obj, "state_dict", None))
                and callable(getattr(obj, "load_state_dict", None))):
            raise OutcoreError(f"{api}(..., extra=...): {name!r} is a {type(obj).__name__}, "
                               "which has no state_dict() and load_state_dict()")
        if isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)):
            kind, where = (("a model", "model (several in a torch.nn.ModuleDict)")
                           if isinstance(obj, torch.nn.Module) else
                           ("an optimizer", "optimizer (several in a list)"))
            raise OutcoreError(f"{api}(..., extra=...): {name!r} is {kind}: pass it as "
                               f"{where}, whose state goes to the state file; extra= keeps "
                               "small states, in the manifest")
    return dict(extra)


def _same_on_every_rank(durable) -> None:
    """Under a process group, bring every rank to the same durable iteration before
    anything is loaded: each rank commits on its own, so a stop between two ranks'
    commits leaves them one apart, and resuming each from its own would train on
    diverged weights without any error (a rank ahead averages its gradients with a
    peer's older step). A rank one ahead resumes from the state it kept one commit
    before (NOTE [Durable state] rule 8); ranks further apart are refused."""
    if not _distributed_up():
        return
    dist = torch.distributed
    before = (durable.manifest or {}).get("previous")
    mine = (durable.iterations, before["iterations"] if before else None, durable.directory)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    target = min(count for count, _, _ in every)
    if all(count == target or kept == target for count, kept, _ in every):
        if durable.iterations != target:
            log.warning("ooc.resume(): this rank's state directory holds iteration %d, another "
                        "rank's only %d (a stop between their commits); resuming from the "
                        "state kept one iteration before, %d, so that every rank starts from "
                        "the same step", durable.iterations, target, target)
            durable.rewind()
        return
    kept = ", ".join(f"rank {rank}: {count} in {where}"
                     for rank, (count, _, where) in enumerate(every))
    raise OutcoreError(
        f"ooc.resume(): the ranks' state directories hold different iterations ({kept}), and "
        f"not every rank kept the state of iteration {target}, the earliest. Resuming each "
        "from its own would train every rank on diverged weights. Nothing was loaded. "
        "Resume every rank from checkpoints of one same iteration (ooc.save), or start the "
        "run over in empty state directories.")


def _release_slot(ooc) -> None:
    global _open
    with _open_lock:
        if _open is not None and _open() is ooc:
            _open = None
            sharing.uninstall()


def _shown(replayed: _Replayed) -> dict:
    """What the measured views say of `replayed` beyond its log: which iteration it is,
    how many left their plans since, and for a passive one the plan's bytes."""
    planned = None
    if replayed.passive and not replayed.more:
        from ..view.occupancy import by_category
        planned = [sum(row) for row in by_category(replayed.trace, replayed.schedule).fast]
    return {"iteration": replayed.iteration, "left_since": replayed.left, "planned": planned,
            "untracked": replayed.passive and replayed.more > 0}


# What a signal raised at the end of a block that ran to its end says: outcore held it
# while it ended the block (writing state out, planning from a recording), which changes
# no value.
STEP_TOOK_EFFECT = ("outcore: this came after the block had run to its end, while outcore "
                    "ended it: all the block did took effect (the parameters and the "
                    "optimizer's state are as the block left them), and nothing is lost. "
                    "Training can go on from them.")
# The same for `with ooc.building():`, which builds a model rather than training it.
BUILD_TOOK_EFFECT = ("outcore: this came after the block had run to its end, while outcore "
                     "ended it: all the block did took effect (every tensor it made or "
                     "changed is as the block left it), and nothing is lost.")


class _Iteration:
    """The `with ooc.iteration():` block. A class rather than a generator: its entry and
    exit are held sections from their first bytecode (NOTE [Interrupts], rule 3), and
    its exit runs whatever happened in between.

    Contract, whatever exception ends the step (KeyboardInterrupt included) and
    wherever it lands: the user sees that exception; every storage has its full size and
    the value it had when the exception landed (in RAM, or mapped from the swap file);
    the table's counters are exact; `close()` and the next `iteration()` work."""

    def __init__(self, ooc: OutOfCore):
        self.ooc = ooc
        self.mode = None
        self.entered = False       # the dispatch mode was pushed
        self.kept_full = False     # Residency NOTE 10 kept a tensor in this step
        self.stance = None         # torch.compile's stance while it is (_enter_mode)
        self.recording = False
        self.after = None          # how the iteration before left its arrays (plans.Ending)
        self.held_before = {}      # {entry: bytes} collectives keep, as a recording began
        self.asked = None          # the family Plans.next asked this recording of
        # NOTE [Step shapes] rule 10 with rule 9: (the plan the step would have taken up
        # but for its sizes, {its array id: bytes} of the step's larger arrays there, the
        # function) at the last switch refused (`_others`)
        self.outgrown_other = None
        self.before = None
        self.base = ooc._rss_start  # what this iteration's rss+ counts from (_account)
        self.started = 0.0
        self.under_reported = 0    # on_demand.UNDER_REPORTED's last serial as the step began

    @property
    def open(self) -> bool:
        """Whether the block is entered and not yet ended (its dispatch mode is pushed):
        what a framework callback that enters and exits it by hand asks."""
        return self.entered

    @critical
    @aten.outside_dynamo        # NOTE [Dynamo kept out] rule 2
    def __enter__(self):
        ooc = self.ooc
        shield = ooc._shield
        shield.enter()
        try:
            if ooc.closed:
                raise OutcoreError("this OutOfCore was closed; create a new one to train again")
            if ooc._active:
                new = "building" if isinstance(self, _Building) else "iteration"
                if ooc._active_thread != threading.get_ident():
                    raise OutcoreError(f"ooc.{new}() cannot start while another thread's "
                                       f"ooc.{ooc._active}() block is open: an OutOfCore runs "
                                       "one block at a time; start this one after that ends")
                raise OutcoreError(f"ooc.{new}() cannot start inside an open ooc.{ooc._active}() "
                                   "block: these blocks cannot nest; end that one first")
            if _user_recording():      # helper-130: 45 functions of outcore's own
                raise OutcoreError(
                    "ooc.iteration() cannot start inside outcore.record(): the trace would "
                    "hold outcore's own work around the step. Record the step alone, or "
                    "read ooc.trace after an iteration")
            if ooc._infeasible is not None:
                raise _again(ooc._infeasible)
            if type(self) is _Iteration:
                ooc._composition.check()
            if ooc._durable is not None and ooc._durable.model is None and type(self) is _Iteration:
                raise OutcoreError("with state_dir, call ooc.resume(model, optimizer) before the "
                                   "first iteration: it names the state to keep, and loads it "
                                   "when the directory has some")
            if ooc._durable is not None and type(self) is _Iteration:
                for name in ooc._durable.changed_between():     # NOTE [Durable state] 16
                    log.warning("state_dir: the state of extra %r changed between iterations, "
                                "after the last commit, which kept it as it was before: a "
                                "resume would take it a step behind. Step it inside `with "
                                "ooc.iteration():` (after optimizer.step(); a scheduler that "
                                "follows a metric with the metric computed there or carried "
                                "into the block), where the commit at its end takes it", name)
            with ooc._gate:          # an async checkpoint on another thread finishes first
                ooc._await_readers("building" if isinstance(self, _Building) else "iteration")
                ooc._active = "building" if isinstance(self, _Building) else "iteration"
                ooc._active_thread = threading.get_ident()
            try:
                shield.install()
                self._begin()
            except BaseException as exc:
                self._end(exc)
                raise
        finally:
            # A signal noted here is delivered by the step's first op or by __exit__,
            # when the iteration is fully set up and __exit__ is sure to run.
            shield.depth -= 1
        return ooc

    def _begin(self) -> None:
        ooc = self.ooc
        res = ooc._res
        if ooc._governor is not None:
            ooc._governor.start(ooc.budget, ooc._rss_start)       # once; later calls do nothing
            ooc._governor.begin()
        ooc._pager.stop()           # its trims between iterations are no iteration's
        res.end_exports()           # numpy arrays dropped since (NOTE [Sharing ...], rule 9)
        sharing.install_late(open_outofcore)    # a saver imported since: rule 13
        self.tracked_before = res.tracked   # Residency NOTE 8: what this iteration first tracks
        self.write_failures_before = res.write_failures       # `_over_why`
        self.before = (res.stats.bytes_read, res.stats.bytes_written, res.stats.unplanned_bytes,
                       res.stats.wait_s, ooc._mover.busy_read_s + ooc._mover.busy_write_s,
                       page_faults(), ooc._trims(), res.stats.bytes_recomputed)
        growing, now = ooc._growing()
        plan = None if ooc._record_next else ooc._plans.next(growing, now)
        carried = ooc._plans.carried(ooc._ending, plan, ooc._live) if plan is not None else {}
        if plan is not None and ooc._outgrown(plan, carried):
            log.info("storages that never move (collectives', FSDP's, small ones) now keep "
                     "more memory beside the step than its plan left room for: recording "
                     "it again")
            ooc._plans.drop(plan.shape)
            plan = None
        self.recording = plan is None
        self.asked = ooc._plans.asked if self.recording and not ooc._record_next else None
        if self.recording:       # what collectives keep as it begins: _plan_recording
            self.held_before = ooc._held_sizes(collectives_only=True)
        self.under_reported = on_demand.under_reported_since(0)[0]
        self.started = time.perf_counter()
        ooc._unpark()
        if not ooc._based:
            ooc._rss_start, ooc._based = ooc._base(), True
            if ooc._mover.device_type == "cpu":     # NOTE [The process's base] rule 5
                res.adopting = {}
            if ooc._governor is not None:
                ooc._governor.rebase(ooc._rss_start)
        self.base = ooc._rss_start
        ooc._composition.disown_fsdp(res)
        if self.recording:
            self.mode = SafeRecording(res, ooc.budget, ooc._shield,
                                      label=f"iteration {len(ooc._iterations) + 1}",
                                      fsdp_uninitialized=ooc._composition.fsdp_uninitialized(),
                                      batch_leaves=ooc._batch_leaves, said=ooc._said)
            res.evict_lru(ooc.budget, set())
        else:
            ooc._use(plan)
            self.after, ooc._ending = ooc._ending, None      # known again once it ends (_adopt)
            # Residency NOTE 8 for the plan chosen: the last step let go of the unmovable
            # storages it would not start from itself, and this one may start from fewer
            # (Adam's small moments, in a micro-batch that does not step); its plan left
            # room for them (Plan.held_beside, _outgrown).
            res.let_go(set(carried.values()) | set(ooc._inputs))
            self.mode = Replayer(plan.trace, plan.schedule, res, ooc.budget, carried, ooc._shield,
                                 ooc._inputs, keys=plan.keys, may_follow=ooc._plans.may_follow(),
                                 lasting=ooc._plans.state_of_others(plan), others=self._others)
            if ooc._durable is not None:
                ooc._durable.watch(self.mode)       # NOTE [Durable state] rule 17
            self.mode.start()
        res.stats.peak_resident = res.resident     # the budget holds from here on
        res.stats.peak_rss = res.stats.peak_unmanaged = 0
        res.sample_rss(force=True)
        self._enter_mode()

    def _others(self, keys, expected, nbytes, name, larger=False, reads=None):
        """Replayer._switch: another plan this step turns out to follow, with the state
        it starts from and the other plans' (NOTE [Step shapes] in plans.py, rule 9).
        Where the step left its plan at a larger array, none of the other families of a
        firm period (`Plans.not_this`): the step is the predicted one on larger tensors,
        whose plan grows where it outgrew it (rule 10); another micro-batch's plan that
        fits its sizes for now deviates further on. A plan of ops outside the period (an
        evaluation step, a rare branch) may still be taken up. Where it was an array the
        op reads, (its slot, its bytes): a plan taken up has it no smaller. `reads`:
        (the entries op `name` reads, slot by slot; the step's {array id: entry} so far):
        a plan taken up reads the same there where it knows what it reads (`_reads`)."""
        ooc = self.ooc
        not_of = ooc._plans.not_this if larger else frozenset()
        accept = None if reads is None else functools.partial(self._reads, *reads)
        found = ooc._plans.continuing(ooc._plan, keys, expected, nbytes, name, not_of,
                                      larger if isinstance(larger, tuple) else None, accept)
        self.outgrown_other = None
        if found is None:
            # Rule 10 with rule 9: a step that left its plan for another's ops (not for a
            # larger array: that is its own plan's to grow) where that plan is smaller
            # than the step: it grows if the step then runs its functions (`_adopt`).
            other = None if larger or name is None else ooc._plans.outgrown_by(
                ooc._plan, keys, expected, nbytes, name, accept)
            if other is not None:
                plan, ids = other
                self.outgrown_other = (plan, {
                    theirs: nbytes[aid] for aid, theirs in ids.items()
                    if nbytes[aid] > plan.trace.arrays[theirs].nbytes}, len(keys))
            return None
        plan, ids = found
        ooc._use(plan)
        log.info("iteration %d turned out to have the shape of another plan at function %d "
                 "(%s): it follows that plan from there", len(ooc._iterations) + 1, len(keys),
                 name)
        return (plan, ids, ooc._plans.carried(self.after, plan, ooc._live),
                ooc._plans.state_of_others(plan))

    def _reads(self, reads, bound, plan, j, ids) -> bool:
        """Rule 9: whether `plan`'s function j reads, slot by slot, the entries `reads`
        where the plan knows which storage an array is: one of the first k functions'
        (`ids`: the step's id -> the plan's; `bound`: the step's id -> entry), or state
        the plan starts from. A step of random depth (layers taken at random, then the
        head) left the plan of one depth at the head's weight; the plan of another depth
        goes on with the same op on the next layer's, and taken up by the op's name it
        was left at once, and both plans dropped as replaced state (helper-172)."""
        mine = {theirs: aid for aid, theirs in ids.items()}
        carried = None
        for entry, array in zip(reads, plan.trace.functions[j].arrays()):
            if entry is None:
                continue                        # untracked: a new batch, nothing to compare
            if array in mine:
                want = bound[mine[array]]
            else:
                if carried is None:
                    carried = self.ooc._plans.carried(self.after, plan, self.ooc._live)
                want = carried.get(array)
            if want is not None and want is not entry:
                return False
        return True

    @critical
    @aten.outside_dynamo
    def __exit__(self, exc_type, exc, tb):
        shield = self.ooc._shield
        shield.enter()
        # A signal's exception raised here names the `with` line in its traceback, not
        # whether the block's step took effect: where the block ran to its end, a note
        # says that it did (helper-200).
        try:
            self._end(exc)
        except InfeasibleBudget as err:     # the step's own, or found at its end
            self.ooc._last_infeasible = err
            raise
        except (KeyboardInterrupt, SystemExit) as err:     # while planning: not held
            self._note_signal(err, exc)
            raise
        finally:
            try:
                shield.exit()          # a Ctrl-C that came meanwhile is raised here
            except BaseException as err:
                self._note_signal(err, exc)
                raise
        if isinstance(exc, InfeasibleBudget):
            self.ooc._last_infeasible = exc
        return False

    TOOK_EFFECT = STEP_TOOK_EFFECT

    def _note_signal(self, err, exc) -> None:
        """A signal's exception `err` raised as the block ends: where the block raised
        nothing (`exc`) and outcore's end of it met no error of its own, a note says the
        step took effect (helper-200). Where it did meet some, the note would contradict
        them (a collective that failed says to go on from a checkpoint; helper-202): those
        that `err` cut off before they were raised, or does not carry as its context, are
        noted on it instead, not lost."""
        # (Itself among them where planning caught it, `_adopt`.)
        errors = [e for e in getattr(self, "_end_errors", []) if e is not err]
        if exc is None and not errors:
            err.add_note(self.TOOK_EFFECT)
            return
        carried, context = set(), err.__context__
        while context is not None and id(context) not in carried:
            carried.add(id(context))
            context = context.__context__
        for other in errors:
            if id(other) not in carried:
                err.add_note(f"outcore: while ending the block: {type(other).__name__}: "
                             f"{other}")

    def _end(self, exc) -> None:
        """Undo the iteration's hold on memory whatever happened, then account for it.
        Raises outcore's own errors only when the step itself raised nothing."""
        ooc, res, mode = self.ooc, self.ooc._res, self.mode
        res.sample_rss(force=True)
        stepped, faulted, trimmed = time.perf_counter(), page_faults(), ooc._trims()
        in_step = mode is not None and mode.raised_in_optimizer(exc)
        if (isinstance(exc, OutcoreError) and in_step
                and not getattr(exc, "nothing_trained", False)):
            exc.add_note("outcore: this came inside optimizer.step(), after it had begun: as "
                         "with any exception there, some parameters took this step and the "
                         "others did not. Go on from your last checkpoint (or state_dir) "
                         "rather than from these parameters.")
        elif isinstance(exc, KeyboardInterrupt) and in_step:
            # A Ctrl-C lands anywhere, and its traceback does not say whether the step
            # had begun writing (helper-148). "May": the optimizers' hooks say only that
            # a step began and did not end (its own pre- or post-hooks, or a closure, may
            # have been running; helper-149). The user's own exceptions say where they
            # came from.
            exc.add_note("outcore: this came inside optimizer.step(): some parameters may "
                         "have taken this step and the others not (and an optimizer's "
                         "state made at its first step, Adam's, be half made), as without "
                         "outcore. Go on from your last checkpoint (or state_dir) rather "
                         "than from these parameters.")
        if isinstance(exc, _DEVICE_OOM):
            exc.add_note(_out_of_device_memory(ooc, len(ooc._iterations) + 1))
        errors = self._end_errors = []         # `_note_signal` reads them
        deviation = None
        self._exit_mode(exc, errors)
        try:                          # accounting only: the cleanup below runs whatever it does
            ooc._take_off_adopted(mode if self.recording and exc is None and not errors
                                  else None)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)
        if res.stopped_callback is not None:      # after the step's last op: NOTE
            try:                                  # [Collectives in flight] rule 5
                res.raise_stopped_callback(at_end=True)
            except OutcoreError as err:
                errors.append(err)
        passive = (mode is not None and not self.recording and mode.passive
                   and mode.deviation is None)
        peak = ooc.schedule.peak_bytes if passive else res.stats.peak_resident
        if mode is not None and not self.recording:
            try:
                mode.finish()
            except BaseException as err:  # noqa: BLE001
                errors.append(err)
            finally:
                mode.release()          # nothing of it left to hold this OutOfCore
            deviation = mode.deviation
            number, last = len(ooc._iterations) + 1, ooc._last_replay
            if deviation is None:
                ooc._last_replay = _Replayed(ooc.trace, ooc.schedule, mode.log, number, passive,
                                             more=mode.more if passive else 0)
            elif last is not None:
                ooc._last_replay = last._replace(left=last.left + 1)
        committing = exc is None and not errors
        ooc._park(errors, commit=committing)
        if not committing and ooc._durable is not None and self.before is not None:
            ooc._durable.done += 1     # NOTE [Durable state] rule 11: the next commit keeps it
            ooc._durable.failed = False     # and close() does not commit it (`_behind`)
        ooc._idle()
        ooc._page()                 # held: a Ctrl-C lands after the pager has started
        ooc._shield.uninstall()
        if self.before is not None:
            self._account(stepped, faulted, trimmed, peak, passive, deviation, completed=exc is None)
        if exc is None and not errors and self.recording and mode is not None:
            _warn_graph_left(ooc, mode.trace, len(ooc._iterations))
        if exc is None and not errors:
            _warn_unkept(ooc, mode if self.recording else None)
        if exc is None and not errors and mode is not None:
            adopting = time.perf_counter()
            try:
                self._adopt(deviation)
            except BaseException as err:  # noqa: BLE001
                errors.append(err)
            planned = self.recording and not errors and not ooc._record_next
            if planned and self.before is not None and ooc._iterations:
                ooc._iterations.amend_last(        # the report shows it apart
                    plan_s=time.perf_counter() - adopting)
            if not errors:            # Residency NOTE 8 and 9
                res.let_go(set(ooc._carried.values()) | set(ooc._inputs),
                           also=() if self.recording else mode.left_behind())
        if (exc is not None or errors) and self.before is not None:       # NOTE 8 there
            res.let_go_since(self.tracked_before, set(ooc._carried.values()) | set(ooc._inputs))
        _raise_or_note(exc, errors)

    def _enter_mode(self) -> None:
        """Push the dispatch mode, with torch.compile'd code run eagerly (`eager_stance`)."""
        self.stance = aten.eager_stance()
        self.mode.__enter__()
        self.entered = True
        mode = self.mode
        self.ooc._res.keep_when_full = (       # Residency NOTE 10 (ooc.building() has none)
            lambda: getattr(mode, "in_optimizer", False))
        self.ooc._mode = self.mode
        self.ooc._shield.mode = self.mode      # NOTE [Interrupts] rule 7

    def _exit_mode(self, exc, errors: list) -> None:
        """Pop the dispatch mode if it was pushed, and put torch.compile's stance back;
        an error is kept for after the cleanup."""
        try:
            if self.entered:
                self.entered = False
                self.ooc._mode = None
                self.ooc._shield.mode = None
                self.mode.__exit__(type(exc) if exc is not None else None, exc,
                                   exc.__traceback__ if exc is not None else None)
        except BaseException as err:      # noqa: BLE001 - kept, raised after the cleanup
            errors.append(err)
        finally:
            res = self.ooc._res
            kept, res.kept_error, res.keep_when_full = res.kept_error, None, None
            self.kept_full = kept is not None     # its error says why it passed the budget
            if kept is not None:                  # Residency NOTE 10
                kept.add_note("outcore: this came inside optimizer.step(): the tensors the "
                              "slow tier had no room for stayed in memory, over the budget, "
                              "and the step completed, so every parameter and its optimizer "
                              "state took it, correctly. Make room there (or raise the "
                              "budget) before the next iteration.")
                errors.append(kept)
            if self.stance is not None:
                stance, self.stance = self.stance, None
                stance.__exit__(None, None, None)

    def _over_why(self, peak: int) -> str | None:
        """Where the step passed the budget and writes to the slow tier failed in it, or an
        op in it made more than its meta kernel said (on_demand.learn_created): that, the
        likely cause; else None (the report and the warning give the causes there can
        be)."""
        calls = on_demand.under_reported_since(self.under_reported)[1]
        if peak <= self.ooc.budget:
            return None
        failed = self.ooc._res.write_failures - getattr(self, "write_failures_before", 0)
        if failed:                 # helper-203: the causes listed named none of this
            return (f"{failed} write(s) to the slow tier failed in it (its error says why: a "
                    "full disk, a file size limit), and the tensors they were for stayed in "
                    "memory")
        if not calls:
            return None
        most = {}
        for op, beyond in calls:
            most[op] = max(most.get(op, 0), beyond)
        ops = ", ".join(f"{op} {format_bytes(beyond)}" for op, beyond in most.items())
        return (f"ops made more than their meta kernels said (or, without one, than their "
                f"largest input) and than outcore had learned ({ops} beyond; an LSTM's "
                "workspace does so); their later calls, of this size or others, get that "
                "room")

    def _account(self, stepped, faulted, trimmed, peak, passive, deviation, completed) -> None:
        ooc, before = self.ooc, self.before
        stats, mover = ooc._res.stats, ooc._mover
        ooc._iterations.append(IterationStats(
            index=len(ooc._iterations) + 1, mode="record" if self.recording else "replay",
            seconds=stepped - self.started, bytes_read=stats.bytes_read - before[0],
            bytes_written=stats.bytes_written - before[1],
            unplanned_bytes=stats.unplanned_bytes - before[2], wait_s=stats.wait_s - before[3],
            transfer_s=mover.busy_read_s + mover.busy_write_s - before[4],
            restore_s=time.perf_counter() - stepped, peak_resident=peak,
            deviation=deviation, completed=completed, tracked=not passive,
            skipped_actions=0 if self.recording else getattr(self.mode, "skipped_actions", 0),
            page_faults=faulted - before[5], trims=trimmed[0] - before[6][0],
            trimmed_bytes=trimmed[1] - before[6][1],
            rss_above_start=max(stats.peak_rss - self.base, 0),
            bytes_recomputed=stats.bytes_recomputed - before[7],
            unmanaged=max(stats.peak_unmanaged - self.base, 0),
            switched_at=None if self.recording else getattr(self.mode, "switched_at", None),
            smaller=not self.recording and getattr(self.mode, "smaller", False),
            outgrew=not self.recording and deviation is not None
            and getattr(self.mode, "outgrew", False) and ooc._plan.grows,
            over_why=self._over_why(peak)))
        last, bound = ooc._iterations.last, ooc._rss_bound()
        if (last.peak_resident > ooc.budget and not ooc._warned_over and not self.kept_full
                and getattr(self.mode, "infeasible", None) is None):   # its error says why
            ooc._warned_over = True
            log.warning("iteration %d (%s): %s of managed tensors at its peak, %s over the "
                        "budget: %s (once per OutOfCore; ooc.report() marks each such "
                        "iteration)", last.index, last.mode, format_bytes(last.peak_resident),
                        format_bytes(last.peak_resident - ooc.budget),
                        last.over_why or OVER_BUDGET_WHY_WARNED)
        if bound and last.rss_above_start > bound and not ooc._warned_rss:
            ooc._warned_rss = True
            log.warning("iteration %d: the process grew %s above its size when the first "
                        "iteration began (less the managed bytes), past "
                        "the budget + %s + budget/%d (%s) it stayed within on the workloads "
                        "measured; %s of it was not managed tensors (tensors made or kept "
                        "between iterations, outside the blocks: a list the loop appends to; a "
                        "library's buffers from its first run; heap kept). The budget bounds "
                        "the tensors outcore manages; nothing plans for the rest yet "
                        "(ooc.report(), README)",
                        last.index, format_bytes(last.rss_above_start),
                        format_bytes(PROCESS_SLACK_BYTES), PROCESS_SLACK_SHARE,
                        format_bytes(bound), format_bytes(last.unmanaged))

    def _outgrew_other(self, mode, deviation) -> tuple | None:
        """Rule 10 with rule 9 (`Plans.outgrown_by`): (the plan the step would have taken up
        at the function where it deviated but that it was larger than, {array id: bytes}
        of the step's arrays larger than that plan's) where the step then ran that plan's
        functions to its end on demand (`plans.sizes_after`), and the plan grows; else
        None."""
        if (deviation is None or self.outgrown_other is None or mode.passive
                or mode.log.deviation is None):
            return None
        plan, sizes, k = self.outgrown_other
        if (mode.log.deviation[0] != k or plan.shape not in self.ooc._plans
                or plan.recorded is None or not plan.grows):
            return None
        after = sizes_after(plan.trace, plan.keys, k, mode._made)
        if after is None:
            return None
        sizes = dict(sizes)
        for aid, nbytes in after.items():
            sizes[aid] = max(nbytes, sizes.get(aid, 0))
        return plan, sizes

    def _mark_op_by_op(self) -> None:
        """The report's row of this step says it ran op by op (rule 11): its mode says
        "record", as for any recording (helper-200)."""
        if self.before is not None and self.ooc._iterations:
            self.ooc._iterations.amend_last(op_by_op=True)

    def _adopt(self, deviation) -> None:
        """After a completed step: plan from the recording, or carry the state over."""
        ooc, mode = self.ooc, self.mode
        if self.recording:
            ooc._ending = None
            shape = shape_of(function_keys(mode.trace))
            family = family_of(recorded_ops(mode.trace))
            try:
                if mode.infeasible is not None:
                    raise mode.infeasible
                if shape in ooc._plans.unplannable:      # NOTE [Step shapes] rule 11
                    ooc._plans.seen(shape, family)
                    ooc._op_by_op = (ooc._op_by_op[0] + 1, ooc._op_by_op[1])
                    self._mark_op_by_op()
                    return
                planned = ooc._plan_recording(mode, self.held_before, self.asked)
                # A plan for larger sizes than this step's is the shape it stands for.
                # ... and of the family it grew (_grown_aside).
                ooc._plans.seen(*(shape, family) if planned is None else
                                (planned.shape, planned.family))
                if ooc._record_next:                 # not the steady step yet
                    ooc._plans.warm_up.add(shape)
            except InfeasibleBudget as err:
                if err.ran_within_budget:
                    # Rule 11: the step ran op by op within the budget, a plan cannot run
                    # it (_require_feasible): steps of its shape go on running so
                    # (recorded, never planned).
                    ooc._plans.unplannable.add(shape)
                    ooc._plans.seen(shape, family)
                    ooc._op_by_op = (ooc._op_by_op[0] + 1,       # the report says so
                                     max(ooc._op_by_op[1], err.min_feasible_bytes))
                    self._mark_op_by_op()
                    # Warned once in full; each shape after it (sizes that vary bring a
                    # new one each step) at INFO: helper-92 saw 1.4 KB each iteration.
                    log.log(logging.INFO if ooc._unplannable_said else logging.WARNING,
                            "iteration %d: %s", len(ooc._iterations), err)
                    ooc._unplannable_said = True
                    return
                ooc._infeasible = err        # later iterations raise at once
                raise
            except HostBudgetTooSmall as err:
                ooc._infeasible = err
                raise
        else:
            plan, shape = ooc._plan, mode.shape()
            other = self._outgrew_other(mode, deviation)
            # One that outgrew its plan is the plan's step on larger tensors (rule 10): of
            # its family, small ops aside (helper-88: a `loss.item()` the recorded step
            # logged made the next larger step another family, and its growth waited).
            # ... as one that outgrew the plan it would have taken up (rule 9) is of that one's.
            family = (plan.family if deviation is None or mode.outgrew else
                      other[0].family if other is not None else mode.family())
            # A passive replay checks names only (Replayer._follow): where it deviated, the
            # shape it computes trusts the record's sizes up to there. An unknown shape is
            # kept instead, one of its own: the next replays track (NOTE [Step shapes] 4).
            # Its ops are known: its family is (rule 2).
            known = not (mode.passive and deviation is not None)
            ooc._plans.seen(shape if known else object(), family)
            ooc._carried = mode.persistent_entries()
            ooc._inputs = mode.input_entries()
            grows = False           # the step outgrew its plan, which grows (rule 10)
            if deviation is None:
                ooc._plans.learn(self.after, plan, mode.started_from)
                if not mode.passive:                   # a passive one binds nothing
                    ooc._ending = Ending(plan.shape, mode.ending())
            elif known and shape == plan.shape:
                ooc._plans.drop(plan.shape)        # NOTE [Step shapes] in plans.py, rule 5
            elif mode.outgrew and plan.recorded is not None and plan.grows:   # ... rule 10
                grows = True
                ooc._outgrow(plan, mode.outgrown_sizes)
            elif other is not None:                    # ... with rule 9
                grows = True
                ooc._outgrow(*other)
            if deviation is not None and (known and shape == plan.shape
                                          or mode.switched_at is not None):
                # ... rule 5 also where the step took up another plan (rule 9) and left
                # that one too: each plan that holds state the user replaced (helper-129:
                # the steps of the one it began with left it every time, for good). Not
                # where it left its only plan for a step of another shape: another task
                # with a head of its own (helper-131: that dropped the plan each time).
                for stale in mode.stale:
                    ooc._plans.drop(stale)
                # A buffer found replaced twice for one shape of step takes turns: an
                # input from the next recording on (Replayer._note_replaced).
                for key in mode.swapped:
                    ooc._buffer_swaps[key] += 1
                    if ooc._buffer_swaps[key] >= 2:
                        ooc._batch_leaves.add(key[1])
            ooc._batch_leaves |= mode.replaced        # inputs to the next recording
            if mode.infeasible is not None:            # Replayer._fallback
                ooc._infeasible = mode.infeasible      # later iterations raise at once
                raise mode.infeasible
            if deviation is not None:
                # A shape met for the first or second time is being learnt (NOTE [Step
                # shapes] in plans.py, rule 3), and a plan outgrown grows (rule 10): said.
                # Warned where a shape keeps deviating: not learnt. (Before, the first
                # deviation of a run warned too: every loop with gradient accumulation
                # warned at its second micro-batch, which is learnt there, helper-85.)
                # Nor a step of a family a plan is kept for, that left the plan guessed
                # for it: the periods are learnt in the first few (helper-178: optimizer.step()
                # every 4th iteration warned at iterations 9 and 10, then replayed).
                warn = (ooc._plans.times[shape] > 2 and not grows
                        and not (known and ooc._plans.has_family(family)))
                ooc._deviations.append(not grows and not ooc._plans.families_hold())
                stuck = mode.outgrew and plan.recorded is not None and not plan.grows
                log.log(logging.WARNING if warn else logging.INFO,
                        "iteration %d deviated from the recorded step (%s); it finished "
                        "on-demand, correct but slower%s", len(ooc._iterations), deviation,
                        ", and the next step of the same ops (whenever one comes: an "
                        "optimizer's first step makes state its later ones do not) is "
                        "recorded to plan for the larger sizes" if grows else
                        ", and steps larger than its plan run so: that plan does not grow "
                        "(the recording that was to grow it was of other ops, or the two "
                        "together did not fit the budget; NOTE [Step shapes] rule 10)"
                        if stuck else "" if shape in ooc._plans else
                        ", and a step of its shape is recorded when one is expected")
                if not grows:
                    ooc._periodic(len(ooc._iterations), deviation, shape)
                ooc._often()
            else:
                ooc._deviations.append(False)


class _Building(_Iteration):
    """The `with ooc.building():` block (run/building.py): ops run memory-safe under the
    budget, nothing is recorded or accounted; the same contract as an iteration's."""
    TOOK_EFFECT = BUILD_TOOK_EFFECT

    def _begin(self) -> None:
        ooc = self.ooc
        if ooc._governor is not None:
            ooc._governor.start(ooc.budget, ooc._rss_start)
        ooc._unpark()
        self.mode = Building(ooc._res, ooc.budget, ooc._shield)
        self._enter_mode()

    def _end(self, exc) -> None:
        ooc = self.ooc
        errors = self._end_errors = []         # `_note_signal` reads them
        self._exit_mode(exc, errors)
        ooc._park(errors)
        ooc._idle()
        ooc._page()
        ooc._shield.uninstall()
        _raise_or_note(exc, errors)


def _raise_or_note(exc, errors: list) -> None:
    """Raise our first error when the block raised nothing; else note ours on the user's
    exception, which goes on. The warnings a filter made errors inside the block come
    after ours (NOTE [Warnings as errors] rule 2 in errors.py)."""
    errors = errors + kept_warnings()
    if not errors:
        return
    if exc is None:
        raise errors[0]
    said = {(type(exc), str(exc))}      # one said already, by the exception or a note, once
    for err in errors:                  # (helper-177: a read that failed noted itself twice)
        if (type(err), str(err)) not in said:
            said.add((type(err), str(err)))
            exc.add_note(f"outcore: while ending the interrupted block: {type(err).__name__}: "
                         f"{err}")


def _again(err):
    """The remembered InfeasibleBudget (or HostBudgetTooSmall), raised again before
    anything runs."""
    text = f"{err} (found in an earlier iteration; this one did not start: nothing ran)"
    if isinstance(err, HostBudgetTooSmall):
        return HostBudgetTooSmall(text, needed_bytes=err.needed_bytes, host_budget=err.host_budget)
    return InfeasibleBudget(text, function_index=err.function_index, op=err.op, phase=err.phase,
                            needed_bytes=err.needed_bytes, budget_bytes=err.budget_bytes,
                            min_feasible_bytes=err.min_feasible_bytes,
                            ran_within_budget=err.ran_within_budget)


# torch.OutOfMemoryError (torch.cuda.OutOfMemoryError in older releases): the device's
# allocator refused an allocation.
_DEVICE_OOM = getattr(torch, "OutOfMemoryError", getattr(torch.cuda, "OutOfMemoryError", ()))


def _out_of_device_memory(ooc, iteration: int) -> str:
    """The note added to the device's out-of-memory error raised inside an iteration: the
    budget bounds the tensors outcore manages, not what the device's allocator holds
    beside them (a library's workspaces, blocks the caching allocator keeps)."""
    res = ooc._res
    text = (f"outcore: the device ran out of memory in iteration {iteration}, with "
            f"{format_bytes(res.resident)} of managed tensors resident under the budget of "
            f"{format_bytes(ooc.budget)}.")
    if getattr(ooc._mover, "device_type", "cpu") == "cuda" and torch.cuda.is_available():
        device = ooc._mover.device_index              # the mover's GPU, not the current one
        allocated = torch.cuda.memory_allocated(device)
        reserved = torch.cuda.memory_reserved(device)
        text += (f" The CUDA allocator holds {format_bytes(reserved)}, "
                 f"{format_bytes(allocated)} of it allocated: the rest is blocks it keeps "
                 "cached, and what is allocated beyond the managed tensors is cuDNN/cuBLAS "
                 "workspaces and tensors outcore does not move.")
    return (text + " The budget bounds only the tensors outcore manages: lower it to leave "
            "the device room for the rest (a fifth of its memory is a start), or set "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True against fragmentation.")
