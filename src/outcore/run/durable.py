"""`OutOfCore(..., state_dir=...)`: a crash loses at most the iteration in flight.

    ooc = outcore.OutOfCore("2GiB", state_dir="run1/")
    start = ooc.resume(model, optimizer)     # iterations already done (0 the first time)
    for it in range(start, total):
        with ooc.iteration():
            ...

NOTE [Durable state]
  1. The swap file is `state_dir/state-<generation>.swap`, named and kept. The manifest
     `state_dir/manifest.pt` (written by atomic_save: whole or absent) names that file,
     the iterations done, the random number generator's state, and, for every tensor of
     the model's and the optimizer's state_dict, where its storage's bytes are in the
     file and how the tensor views them.
  2. An extent the manifest refers to is never written again (shadow paging): a slow
     copy that must be rewritten gets a fresh extent (`DiskMover.free` defers the
     committed one), and a committed extent is freed only once a newer manifest no
     longer refers to it.
  3. Commit, when an iteration completes: every state tensor's bytes are put in the file
     (resident ones are written now, to fresh extents where theirs is committed), the
     file is fdatasync'ed, the manifest is switched, then the extents it no longer
     refers to are freed. Killed before the switch, the old manifest and every extent
     it names are intact; after it, the new ones are.
  4. Resume reads the manifest's file into the model and the optimizer under
     `building()` (within the budget) and restores torch's CPU generator; training then
     goes on in the next generation's file. A file the manifest does not name is removed
     at construction and, for the previous generation, after the first commit.
  5. One process at a time: the directory is locked (flock) from construction to close,
     so a second OutOfCore on it is refused before it removes anything.
  6. A failed fdatasync of the state file is for good. After an I/O error in writeback
     the kernel may mark the pages it could not write clean, or drop them, so a later
     fdatasync succeeds without them, and a manifest switched after it could name
     bytes that never reached the disk. So once the sync fails (`unsynced`), every later
     commit of this Durable raises before it writes anything: the last durable state
     stays the one before the failure, whose bytes were synced and are never written
     again (rule 2). A new OutOfCore on the directory resumes from it into a new file.
  7. Every write to the state file takes the CRC-32 of the bytes it writes, from memory
     (`DiskMover.crc`), and the manifest keeps it beside each tensor; resume() checks
     it as it reads. A bit the disk flipped, or bytes another writer put there, are an
     error naming the place, never a silently different model.
  8. Under a process group of more than one rank, each rank commits its own directory,
     so a stop between two ranks' commits leaves them one iteration apart. There the
     manifest also keeps the state one commit before (`previous`: its file, iterations,
     generator and refs), whose extents and file are kept as the current ones are, so
     that resume() can bring every rank to the same iteration (`rewind`). That costs one
     more copy of the state on the disk; a single process keeps none.
  9. A DTensor (FSDP2's sharded parameters and the optimizer state made like them) is
     kept as its local shard, the plain tensor whose storage outcore owns (NOTE
     [Storages FSDP owns]); its ref says so (`dtensor`). Resume copies a parameter's
     shard into its local tensor in place, where FSDP's views of it stay valid, and
     makes an optimizer state entry a DTensor again with its parameter's mesh and
     placements. Each rank keeps its own shards in its own directory, so a resume must
     shard the model as it was (same ranks, same `fully_shard` calls): a model shard of
     another shape is refused before anything is copied, an optimizer state shard as
     it is read (the model is then partly loaded, and `failed_note` says so). An
     optimizer state DTensor is assumed to have its parameter's shape and placements
     (true of torch's optimizers that run on DTensors). A tensor whose shape its module
     sets only when it is loaded or first run is loaded by that module's own
     load_state_dict() (`_reshaped_by_module`), not copied: a lazy module's
     uninitialized parameters (`nn.LazyLinear`), a per-channel FakeQuantize's scale
     and zero point, (1,) until its first forward (helper-223: QAT could not resume).
     Its shape is checked once that module has loaded it.
 10. The parameters' gradients are kept too (`grads`, by parameter name), where they
     outlive the iteration: a loop that calls optimizer.step() every n-th iteration
     resumed in the middle of a cycle goes on with the gradients it had accumulated.
     Resume sets them as the parameters' `.grad` (a DTensor like its parameter), and
     None where none was kept: a live model resumed in the same process (a notebook's
     cell run again after an iteration that stopped after its backward) kept the
     stopped iteration's gradients, and the next backward added to them (helper-154).
     Before the first commit there is nothing to go back to: resume() returns 0 and
     changes nothing, so a live model that an iteration changed before any commit
     (gradients, a step) goes on as that iteration left it; rebuild it instead.
     Sparse gradients are not kept.
 11. The count is of iteration blocks that ended, those that raised included, and a
     commit happens only when one completes: a block that raised (a NaN guard after
     optimizer.step(), a failed check, Ctrl-C, an error of outcore's) commits nothing,
     and the next block to complete commits the count with it and the state as it is
     then. So a loop that catches the exception and goes on to the next batch resumes
     at the right one, with whatever the raised block changed (counted only where it
     completed, such a block's optimizer step was kept under a count one too low, and
     the resumed loop trained a batch twice: helper-70); and a run that stops at the
     exception keeps the last completed iteration's state, so a resume does the raised
     iteration again from before it, never from a state it may have spoiled. A loop
     that retries the same batch after an exception is counted one ahead.
 12. A state that can no longer be trusted is never committed, for good, like rule 6
     (`lost`): where the values of a tensor of the state were lost (`Entry.lost`: its
     error said so, and it holds bytes 0xFF; a state file another program shortened), a
     commit would make that NaN durable with valid checksums, and resume() would load it
     silently (helper-203: a loop that caught the error and went on; an activation lost
     with a failed recompute is no state, and stops nothing); where the state file was
     removed or replaced by another program while open (a clean-up script), a commit
     writes into a file no name leads to, and the manifest names one that is gone
     (helper-203: four iterations "committed" with no error, and resume() failed). Each
     commit looks (`_file_gone`: the file's link count, and the name's inode). What a
     failed commit and close() say is left (`broken`) looks at the file the manifest
     names: gone, or shorter than its state, there is none.
 13. No optimizer's state is left out of a commit. resume() names one optimizer, and every
     commit keeps that object's state; a loop that replaced it (a new AdamW with another
     learning rate, a new head with its own optimizer, SGD for AdamW) went on committing
     the old one's, and a resume gave the model the old optimizer's state, without a
     word (helper-208: 41 tensors off; after a head swap, a (10, 256) moment for a (37,
     256) weight). So an optimizer step hook notes every other optimizer that steps
     inside iterations, and between them one that steps the kept model (`stepped`; a
     model trained beside it there is the user's own), and a commit raises before it writes
     anything while one of them lives and holds a state tensor that the kept optimizer's
     state_dict() does not (`_left_out`); the message names `ooc.keep(model,
     optimizer)`, which names the new one between iterations. What the kept optimizer
     keeps decides, not which object steps: a wrapper that shares the stepped one's
     `state` (accelerate's) or whose state_dict() holds its tensors (a Lookahead's) is
     kept whole, one whose state_dict() leaves them out (SAM's base optimizer) is not,
     and a second optimizer without state (plain SGD on another part) loses nothing.
     resume() and keep() name the optimizer inside a wrapper that shares its `state` and
     loads with its class's load_state_dict() (`unwrapped`: Lightning's
     LightningOptimizer; the state resume() loaded into the wrapper never reached the
     optimizer that steps). A loop that steps several optimizers with state (Muon for
     the matrices and AdamW for the rest, a GAN's two, one per parameter stepped in
     backward) names them all, in a list: `ooc.resume(model, [muon, adamw])`; the
     manifest keeps their state_dicts in that order (one optimizer's as it is, for the
     directories kept before), with the names of the model's parameters each one holds
     (`optimizer_params`), and resume() refuses another count, class or order before
     anything is copied: a GAN's two Adams resumed swapped passed the class checks and
     loaded each one's moments into the other's parameters (helper-214). One that is
     not named is refused as above, and one that holds parameters outside the model by
     resume() and keep() (`ooc._optimizers`): their values are not kept, and a resume
     gave its moments to a freshly made head (helper-215).
 14. Resume restores each optimizer state tensor with the dtype it was kept with:
     torch's `Optimizer.load_state_dict` casts floating state to its parameter's dtype,
     so the float32 momentum of a model converted to bfloat16 came back bfloat16, and
     the resumed run was not the uninterrupted one (helper-208).
 15. A ZeroRedundancyOptimizer (ZeRO-1: each rank steps the state of its own part of
     the parameters) is kept as its rank's part, like rule 9's shards: its state_dict()
     raises until `consolidate_state_dict()` gathered every rank's state on one rank (a
     collective, and the whole state in one process), so every commit failed with
     torch's RuntimeError. `_ZeroPart` keeps the local optimizer's state under the
     global parameter indices, with ZeRO's parameter groups and the indices the rank
     owns; resume() refuses a partition that differs (other ranks, other parameters:
     some state would be another rank's, or none) before anything is copied, and loads
     with ZeRO's load_state_dict(), which takes each rank's part.
 16. `extra={name: obj}` in resume() (and keep()) keeps the state_dict() of each object
     beside the model's: a learning-rate scheduler, a GradScaler, a sampler. Only torch's
     CPU generator was kept, and a scheduler's state had a recipe (rebuilt and stepped to
     the count); ReduceLROnPlateau's, which follows a metric, and a GradScaler's scale,
     which follows the gradients, had none. The states go into the manifest whole (they
     are small; a model goes in `model`), taken at each commit, the end of an iteration
     block: one stepped after the block (`sched.step()` between iterations) is kept as it
     was before, a step behind the optimizer, so each iteration's start compares each
     state with the one committed and warns once where one changed in between
     (`changed_between`). A state a manifest cannot hold (its reader takes tensors,
     numbers, strings, lists and dicts: `weights_only`) is refused at the commit, before
     anything is written, naming it; resume() refuses other names before anything is
     copied, and loads each with its load_state_dict() after the optimizers.
 17. What else an iteration changes is told, not kept. A commit keeps the model's
     state_dict(), its gradients, the named optimizers' state and extra=; an EMA model
     kept beside the model (`ema.lerp_(p, 0.01)`), a GradScaler left out of extra=, a
     running sum in a tensor made before the loop are changed in place by every
     iteration, and a resume started them from what the restarted script made, without
     a word (helper-215). So after a recording iteration (`note_unkept`), the storages
     it wrote in place that outlive it (made before it, or by it: a GradScaler makes its
     scale at its first use) are noted with the tensor that last wrote each, and
     followed (`unkept`, at each iteration's end) until that tensor's version moves:
     written again, a state; then, where no commit keeps it, it is named in a warning,
     once per storage, with its shape and the op that first wrote it (a later
     recording that finds others warns again). The model's buffers outside its
     state_dict() (its own choice) and a GradScaler's scale and growth tracker
     (numbers in its state_dict()) count as kept, an extra's other tensors do not.
     Following the version leaves out what only looked like state once (helper-217,
     helper-218): a batch fetched before the block and changed in it (`labels[labels ==
     pad] = -100`), gone or left alone by the next iteration; a loss halved in place and
     kept in a list. Not every write moves a version (batch norm's running statistics, a
     GradScaler's growth tracker): what was made before the recording and not seen
     written again is told after _UNKEPT_WAIT iterations where its bytes changed
     meanwhile (`_Followed.written_again`), and followed by its version alone where they
     had not (DDP's map of the parameters used with static_graph=True, filled by its
     first iterations only: never told; an EMA updated every 10th iteration: told then);
     what the recording made is dropped. Where the tensor that wrote a storage was gone
     by the recording's end (a view; `state_dict()`'s detached values, which timm's EMA
     writes through), a storage made before it is told at the next iteration's end if it
     lives. Not noted: a storage whose first uses in the iteration overwrote it whole
     without reading it (`_ArrayLog.overwritten`: a batch copied into a buffer, in pieces
     too, the pieces copied in read, or the rest copied from them, before the rest is, an
     out= argument not also read, a random fill; DDP writes its gradient buckets so), one
     whose last write reset it whole to a number (`reset_last`: DDP's map of the
     parameters used), and one a library keeps in place itself (`Entry.owner`,
     `Entry.foreign`). A `_foreach_*` op moves no version under a dispatch mode, so
     outcore moves them (`aten.count_foreach_writes`): an EMA's `_foreach_lerp_`. Left:
     an EMA whose first update copies the model (AveragedModel) is told by its counter
     where no later iteration is recorded.
     A state can be carried out of place too: truncated backpropagation through time's
     hidden state (`h = h.detach()`), `ema = 0.9 * ema + 0.1 * x.mean()`; each iteration
     makes a new tensor from the one the last iteration made, and no version moves
     (helper-223: resumed, such a run differed from the uninterrupted one, without a
     word). So what a recording made that outlives it is noted too (`note_carried`),
     and the next replay of its trace says which of them it reads, at which function
     (`watch`, per op of that replay only). One read where the record reads arrays
     other than the model's state (an input, made before the step and only read; or
     what the step made there: a recurrent layer's zeros for `h = None`, helper-224)
     and made from them in the record (`_made_from`: through what each op reads,
     writes and creates) is told (`carried_over`), where no commit keeps it and the
     replay let go of it (one that lives on is carried in place: a GradScaler's scale
     made at its first use is the first part's to tell, not this one's). A batch
     one iteration fetches for the next is not made from the batch before it: not
     told (but one whose first is a view of the dataset, the later ones copies of it,
     is: the record read the dataset where the replay reads the copy). Read by an op
     the record does not have there (a loss logged by `.item()` at the next
     iteration's start), after the replay left its plan, or by no replay of that
     trace, it is not seen.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import io
import os
import re
import sys
import weakref
import zlib
from dataclasses import dataclass, field

import torch

from ..aten import distinct_storages, op_inputs
from ..errors import OutcoreError, SwapSpaceExhausted
from ..units import format_bytes
from .checkpoint import atomic_save
from .compose import _distributed_up
from ..states import FAST, MAPPED
from .residency import ValuesLost

MANIFEST = "manifest.pt"
_UNKEPT_WAIT = 8        # rule 17: iterations a state not written again is followed
_UNKEPT_COPY = 2**20    # ... the most bytes of one whose contents are compared
_UNKEPT_COPIES = 16 * 2**20     # ... and of all the copies held for that at once
_CARRIED_LOOK = 16      # ... the functions a read out of place is looked for from the replay's
FORMAT, VERSION = "outcore.state", 1
_SWAP = re.compile(r"^state-(\d+)\.swap$")


def read_manifest(directory: str) -> dict | None:
    """The manifest of the state directory `directory` (NOTE [Durable state] rule 1), or
    None where it holds none; one outcore did not write, or of another version, is an
    OutcoreError. It is read, never changed: the directory need not be unlocked."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        manifest = torch.load(path, weights_only=True)
    except Exception as exc:
        raise OutcoreError(f"{path} cannot be read ({type(exc).__name__}: {exc}); it was not "
                           "written by outcore, or the disk lost it. Move the directory away "
                           "to start afresh.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise OutcoreError(f"{path} is not an outcore state manifest; pass another state_dir")
    if manifest.get("version") != VERSION:
        raise OutcoreError(f"{path} has version {manifest.get('version')}, this outcore reads "
                           f"version {VERSION}")
    return manifest


def describe(directory) -> tuple[str, bool]:
    """What the state directory `directory` keeps, in words (`outcore state DIR`): the
    iterations done, the state file, the model's tensors, the optimizers and the extra=
    states, so that a loop knows what resume() there takes before it calls it; and
    whether resume() there would refuse it as damaged, which the words then say: its
    state file gone, or shorter than the extents its manifest names (helper-225: said
    "returns 5" of both). Its bytes are not read: a checksum that differs is found by
    resume() alone."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise OutcoreError(f"{directory} is no directory: pass the state_dir an OutOfCore kept")
    manifest = read_manifest(directory)
    if manifest is None:
        return (f"{directory} keeps no committed state: resume() there loads nothing and "
                "returns 0"), False
    kept = _as_list(manifest["optimizer"])
    classes = manifest.get("optimizer_class")
    classes = classes if isinstance(classes, list) else [classes] * len(kept)
    held = manifest.get("optimizer_params") or [None] * len(kept)
    def over(params, state) -> int:
        if params is not None:
            return len(params)
        return sum(len(group.get("params", ())) for group in state.get("param_groups", []))
    optimizers = [f"{name or 'an optimizer'} over {over(params, state)} parameters"
                  for name, params, state in zip(classes, held, kept)]
    try:
        have = os.path.getsize(os.path.join(directory, manifest["file"]))
        size = format_bytes(have)
    except OSError:
        have, size = None, "missing"
    end = max((offset + nbytes for offset, nbytes in _extents(
        [manifest["model"], manifest["optimizer"], manifest.get("grads") or {}]).items()),
        default=0)
    damage = ("its state file is missing" if have is None else
              f"its state file ends at {have:,} B, before the {end:,} B its manifest names"
              if have < end else None)
    extra = sorted(manifest.get("extra") or {})
    before = manifest.get("previous")
    lines = [f"{directory}: the state after {manifest['iterations']} iterations, in "
             f"{manifest['file']} ({size})",
             f"  model: {len(manifest['model'])} tensors, "
             f"{format_bytes(_kept_bytes(manifest['model']))}; "
             f"gradients of {len(manifest.get('grads') or {})} parameters",
             "  optimizers: " + ("; ".join(optimizers) if optimizers else "none"),
             "  their state and the gradients: "
             + format_bytes(_kept_bytes([manifest["optimizer"], manifest.get("grads") or {}])),
             "  extra=: " + (", ".join(extra) if extra else "none")]
    if before is not None:
        lines.append(f"  and the state after {before['iterations']} iterations, in "
                     f"{before['file']} (kept under a process group: rule 8)")
    if damage is not None:
        lines.append(f"resume() there refuses it: {damage}, so the directory is damaged. "
                     "Move it away to start afresh, or resume from a checkpoint (ooc.save)")
        return "\n".join(lines), True
    named = ("None" if not kept else "optimizer" if len(kept) == 1 else
             "[" + ", ".join(f"<{str(name).rsplit('.', 1)[-1]}>" for name in classes) + "]")
    lines.append(f"resume(model, {named}" + (", extra={" + ", ".join(
        f"{name!r}: ..." for name in extra) + "}" if extra else "")
        + f") there returns {manifest['iterations']}")
    return "\n".join(lines), False


def _extents(refs) -> dict:
    """{offset: bytes} in the state file of the tensors `refs` names, each extent once."""
    extents: dict = {}
    _map_refs(refs, lambda ref: extents.setdefault(ref["offset"], ref["nbytes"]))
    return extents


def _kept_bytes(refs) -> int:
    """The bytes in the state file of the tensors `refs` names, each extent once."""
    return sum(_extents(refs).values())


def _swap_name(generation: int) -> str:
    return f"state-{generation}.swap"


def _state_of(manifest: dict) -> dict:
    """The part of a manifest a later one keeps as its `previous` (rule 8)."""
    return {**{key: manifest[key] for key in ("file", "iterations", "rng", "model", "optimizer")},
            **{key: manifest.get(key) for key in ("optimizer_class", "optimizer_params",
                                                  "extra")},
            "grads": manifest.get("grads") or {}}


def _ranks() -> int:
    """The ranks of the default process group, 1 outside one."""
    return torch.distributed.get_world_size() if _distributed_up() else 1


def unwrapped(optimizer):
    """Rule 13: the optimizer inside a wrapper that shares its `state` and loads with the
    wrapped class's own load_state_dict(), which then sets a state of the wrapper's own:
    Lightning's LightningOptimizer subclasses the wrapped class, and the state resume()
    loaded into it never reached the optimizer that steps, which started afresh
    (helper-210). A wrapper with a load_state_dict() of its own (accelerate's, which
    delegates; PostLocalSGDOptimizer, whose state_dict() holds its averager's step too;
    a master-weights wrapper) or a state of its own (a Lookahead's) as it is: its
    state_dict() is what is kept (helper-211)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    zero = _zero_class()
    if zero is not None and isinstance(optimizer, zero):                    # rule 15
        return _ZeroPart(optimizer)
    for name in ("_optimizer", "optimizer", "optim"):
        inner = getattr(optimizer, name, None)
        if (isinstance(inner, torch.optim.Optimizer) and inner is not optimizer
                and getattr(optimizer, "state", None) is inner.state
                and type(optimizer).load_state_dict is type(inner).load_state_dict
                and type(optimizer).state_dict is type(inner).state_dict):
            return inner
    return optimizer


def _unreadable(exc: Exception) -> str:
    """What torch.save or a weights_only torch.load refused, in a few words (rule 16):
    the global the unpickler does not allow (a numpy array's), or the first line of the
    error without its terminal escapes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"an object made by {found.group(1)}, which it does not allow"
    return (text.strip().splitlines() or [type(exc).__name__])[0][:200]


def _class_name(optimizer) -> str | None:
    """The optimizer's class, as the manifest keeps it (None for none; ZeRO's for its
    part, rule 15)."""
    if optimizer is None:
        return None
    optimizer = optimizer.zero if isinstance(optimizer, _ZeroPart) else optimizer
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def _zero_class():
    """torch's ZeroRedundancyOptimizer, where the user's code loaded it, else None."""
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    return getattr(module, "ZeroRedundancyOptimizer", None)


class _ZeroPart:
    """Rule 15: what state_dir keeps of a ZeroRedundancyOptimizer: its rank's part."""

    def __init__(self, zero):
        if getattr(zero, "_overlap_with_ddp", False):
            raise OutcoreError(
                "state_dir cannot keep a ZeroRedundancyOptimizer built with "
                "overlap_with_ddp=True: its state exists only once DDP has rebuilt its "
                "buckets, after the first iterations. Build it without overlap_with_ddp, or "
                "keep checkpoints of your own (consolidate_state_dict() and torch.save)")
        self.zero, self.defaults = zero, zero.defaults

    @property
    def param_groups(self):
        return self.zero.param_groups

    @property
    def state(self):                    # the state this rank steps (and rule 13 looks at)
        return self.zero.optim.state

    def steppers(self) -> tuple:
        """The objects whose step() steps this state (both hooks fire)."""
        return (self, self.zero, self.zero.optim)

    def _owned(self) -> list:
        index, mine = self.zero._param_to_index, self.zero._partition_parameters()
        return sorted(index[p] for group in mine[self.zero.rank] for p in group["params"])

    def state_dict(self) -> dict:
        kept = torch.optim.Optimizer.state_dict(self.zero)    # ZeRO's groups, global indices
        index = self.zero._param_to_index
        kept["state"] = {index[p]: dict(entry) for p, entry in self.zero.optim.state.items()}
        kept["zero_owned"] = self._owned()
        return kept

    def check(self, kept: dict, directory: str) -> None:
        """Before anything is copied: this rank owns the parameters it owned then."""
        if kept.get("zero_owned") != self._owned():
            raise OutcoreError(
                f"the state in {directory} holds the ZeroRedundancyOptimizer state of "
                f"parameters {list(kept.get('zero_owned') or [])[:8]} (this rank's part "
                f"then), and this rank's part is now {self._owned()[:8]}: each rank keeps "
                "its own part, so a resume needs the ranks and the parameters it was trained "
                "with, each rank its own state_dir. Nothing was loaded")

    def load_state_dict(self, kept: dict) -> None:
        kept = {key: value for key, value in kept.items() if key != "zero_owned"}
        self.zero.load_state_dict(kept)


def _held(model, optimizers) -> list:
    """Per optimizer, the names of the model's parameters it holds, in its order (rule
    13); one outside the model by its shape."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [[names[id(p)] if id(p) in names else f"a {_shape(p)} parameter outside the model"
             for group in optimizer.param_groups for p in group["params"]]
            for optimizer in optimizers]


def _shape(tensor) -> str:
    """`tensor`'s shape as a tuple, or "uninitialized" for a lazy module's parameter,
    which has none yet."""
    if isinstance(tensor, torch.nn.parameter.UninitializedTensorMixin):
        return "uninitialized"
    return str(tuple(tensor.shape))


def _reshaped_by_module(model, ours: dict, saved: dict) -> dict:
    """{name: (module, attribute)} of the tensors of `ours` (the model's state_dict, as
    variables) that the module holding them gives their kept shape as it loads them
    (rule 9): a lazy module's uninitialized parameter or buffer, and a buffer of at most
    one element as a placeholder, kept with another shape and the same dtype, in a
    module that loads its own way (overrides `_load_from_state_dict`, or has a pre-hook
    for it: quantization's observers and fake quantizers). Every other shape is checked
    before anything is copied (a batch norm of other features than kept, say)."""
    out = {}
    for name, tensor in ours.items():
        lazy = isinstance(tensor, torch.nn.parameter.UninitializedTensorMixin)
        if not lazy and (isinstance(tensor, torch.nn.Parameter) or tensor.numel() > 1
                         or list(tensor.shape) == list(saved[name]["size"])
                         or str(tensor.dtype) != saved[name]["dtype"]):
            continue
        path, _, attribute = name.rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if getattr(module, attribute, None) is not tensor:     # renamed by a hook: copied
            continue
        if lazy or (type(module)._load_from_state_dict
                    is not torch.nn.Module._load_from_state_dict
                    or module._load_state_dict_pre_hooks):
            out[name] = (module, attribute)
    return out


def identity(optimizer):
    """What makes two named optimizers the same one: the object `unwrapped` keeps, ZeRO's
    for its part (rule 15)."""
    optimizer = unwrapped(optimizer)
    return optimizer.zero if isinstance(optimizer, _ZeroPart) else optimizer


def _steppers(optimizer) -> tuple:
    """The objects whose step() is `optimizer`'s (rule 13; ZeRO's part: rule 15)."""
    return optimizer.steppers() if isinstance(optimizer, _ZeroPart) else (optimizer,)


def _dtensor_class():
    """torch's DTensor class, where the user's code loaded it (outcore imports no
    distributed code), else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _local(tensor, dtensor) -> torch.Tensor:
    """The plain tensor whose bytes are kept for `tensor` (rule 9)."""
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def _storage_key(tensor, dtensor):
    """The `_cdata` of the storage `tensor` views (a DTensor's local one: rule 9), or
    None where it has none (sparse)."""
    try:
        return _local(tensor, dtensor).untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _why_not(exc: OSError) -> str:
    """Why a directory could not be made: a file where it, or a folder above it, should
    be is named (makedirs says only "File exists" or "Not a directory")."""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR) and exc.filename:
        path = os.fspath(exc.filename)
        while path and not os.path.lexists(path):
            path = os.path.dirname(path)
        if path and os.path.islink(path) and not os.path.exists(path):
            return f"{path} is a link to {os.readlink(path)}, which does not exist"
        if path and not os.path.isdir(path):
            return f"{path} is a file, not a directory"
    return exc.strerror or str(exc)


@dataclass(eq=False)
class _Carried:
    """Rule 17, out of place: what a recording made that outlived it, by storage (`made`:
    `_cdata` -> (a weakref to it, its array id, (bytes, dtype, shape))), in the trace it
    recorded, and where the next replay of that trace read them (`read`: (array id,
    the function index the replay stood at, how many functions the op was recorded
    as, its name))."""
    trace: object
    made: dict
    read: list = field(default_factory=list)


def _outliving(ref, res):
    """Rule 17: the storage `ref` (a recording's weakref of one alive at its end, or
    None) names, where it still lives and no library keeps it in place itself
    (`Entry.owner`, `Entry.foreign`); else None."""
    storage = ref() if ref is not None else None
    if storage is None:
        return None
    entry = res.entries.get(storage._cdata)
    return None if entry is not None and (entry.owner or entry.foreign) else storage


def _made_from(trace, sources: set, target: int) -> bool:
    """Rule 17: whether `trace` makes array `target` from any of the arrays `sources`:
    what an op that reads one of them writes or creates is made from it, and so on, in
    the trace's order."""
    tainted = set(sources)
    for fn in trace.functions:
        if any(a.kind == "read" and a.array in tainted for a in fn.accesses):
            for a in fn.accesses:
                if a.kind != "read":
                    if a.array == target:
                        return True
                    tainted.add(a.array)
    return False


@dataclass(eq=False)
class _Followed:
    """Rule 17: a storage a recording changed in place, followed by `Durable.unkept`."""
    storage: weakref.ref
    tensor: weakref.ref | None      # the tensor that last wrote it; None: gone by the end
    version: int | None             # ... and its version then
    before: bool                    # the storage was made before the recording
    info: tuple                     # (bytes, dtype, shape, first op, phase) for the warning
    age: int = 0                    # the iterations it was seen not written again
    copy: torch.Tensor | None = None    # its bytes as first seen not written again (CPU)
    same: bool = False              # its bytes were the same _UNKEPT_WAIT iterations on

    def written_again(self, storage, res, kept, room: list) -> bool | None:
        """True: it counts as written since the recording: its tensor's version moved (its
        tensor gone at the recording's end: it lives), or, _UNKEPT_WAIT iterations on,
        where made before the recording, its bytes changed since first compared (or
        could not be: over _UNKEPT_COPY, past `room[0]`, the bytes of copies still
        allowed, which it takes from, or not readable). Where they had not changed, only
        its version is followed from there (an EMA updated every 10th iteration). False:
        not yet, follow on. None: no state to tell: its tensor is gone (a batch the
        loop let go of), or a commit keeps it where its bytes would be copied (`kept()`,
        the keys of what commits keep: no copy of a model's buffers is held)."""
        if self.tensor is None:
            return True                     # noted only where made before the recording
        written = self.tensor()
        if written is None:
            return None
        if written._version != self.version:
            return True
        if self.same or not self.before or self.age < _UNKEPT_WAIT:
            if self.before and self.age == 0:
                if storage._cdata in kept():
                    return None
                if storage.nbytes() <= min(_UNKEPT_COPY, room[0]):
                    self.copy = _bytes_of(storage, res)
                    room[0] -= 0 if self.copy is None else self.copy.numel()
            return False
        was, self.copy = self.copy, None
        now = _bytes_of(storage, res) if was is not None else None
        self.same = now is not None and torch.equal(now, was)
        return not self.same


def _bytes_of(storage, res) -> torch.Tensor | None:
    """A copy of a storage's bytes in CPU memory, or None where they are not readable (not
    in place: outcore moves it, or holds it on the slow tier unmapped) or the copy
    fails (out of memory)."""
    entry = res.entries.get(storage._cdata) if res is not None else None
    if entry is not None and entry.state not in (FAST, MAPPED):
        return None
    try:
        view = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        return view.to("cpu", copy=True)
    except Exception:       # noqa: BLE001 - rule 17 is advice: told as not compared
        return None


class Durable:
    """The state directory of one OutOfCore (NOTE [Durable state])."""

    def __init__(self, directory):
        self.directory = os.path.abspath(os.fspath(directory))
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise OutcoreError(f"cannot use state_dir={self.directory}: {_why_not(exc)}; pass "
                               "a writable directory on a local disk") from exc
        self._lock = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise OutcoreError(f"state_dir={self.directory} is in use by another OutOfCore (this "
                               "process or another), or by a process forked from one while it "
                               "was open (a DataLoader's persistent workers: the lock is "
                               "inherited); close that one or let that process end first, or "
                               "pass another state_dir") from None
        try:
            self._open()
        except OSError as exc:
            os.close(self._lock)
            if isinstance(exc, OutcoreError):
                raise
            raise OutcoreError(f"cannot use state_dir={self.directory}: {exc.strerror or exc}"
                               + (f" ({exc.filename})" if exc.filename else "") + "; pass a "
                               "writable directory on a local disk. The state kept in it "
                               "is unchanged") from exc
        except BaseException:
            os.close(self._lock)
            raise

    def _open(self) -> None:
        self.manifest = self._load()
        previous = self.manifest["generation"] if self.manifest else -1
        self.generation = previous + 1
        self.previous_file = self.manifest["file"] if self.manifest else None
        before = (self.manifest or {}).get("previous")
        self._remove_unnamed({self.previous_file, before["file"] if before else None},
                             sync=False)              # rule 4: not named by the manifest
        # Rule 8: the last durable state, as the next commit keeps it as its `previous`
        # (with its extents in this generation's file: none until this process commits).
        self.last = _state_of(self.manifest) if self.manifest else None
        self.last_extents: dict = {}
        self.path = os.path.join(self.directory, _swap_name(self.generation))
        self.model = None
        self.optimizers: tuple = ()     # those kept, as named (each `unwrapped`; rule 13)
        self._steppers: set = set()     # ... and the ids of the objects whose step() does
        self.extras: dict = {}          # rule 16: {name: object with a state_dict()}
        self._unkept_noted: list = []   # rule 17: `_Followed`, what the last recording
                                        # changed in place
        self._told_unkept: set = set()  # ... and the storages told of so far
        self._carried: _Carried | None = None   # ... what the last recording made
        self._told_carried: set = set()  # ... and (op, shape, dtype) of those told of
        self._extra_bytes: dict = {}    # ... each one's state as this process committed it
        self._warned_between: set = set()
        self.others: dict = {}          # rule 13: {id: weakref} of other optimizers stepped
        self._ours = None               # ... the ids of the kept model's parameters, till a commit
        self.copied = False             # resume() has copied some kept state into the model
        self.iterations = self.manifest["iterations"] if self.manifest else 0   # durable
        self.done = self.iterations     # completed, durable or not (a commit may fail)
        self.failed = False             # the last completed iteration's commit failed
        self.committed = False          # a manifest names this generation's file
        self.unsynced: OSError | None = None    # rule 6: the state file's sync failed
        self.lost: str | None = None            # rule 12: why nothing is committed any more
        self.file_gone = False                  # rule 12: the state file was removed
        self.last_end = 0               # where the committed state's bytes end in its file

    def keep(self, model, optimizers, extras=None) -> None:
        """Rule 13: keep `model` and the sequence `optimizers` from the next commit on
        (`ooc.keep`; a wrapper that is no optimizer is seen through: `unwrapped`), and
        the dict `extras` (rule 16; None: those kept so far)."""
        if extras is not None:
            self.extras, self._extra_bytes = dict(extras), {}
        self.model, self.optimizers = model, tuple(unwrapped(o) for o in optimizers)
        # ids, not objects: one lookup a step however many there are (one per parameter,
        # helper-214); each is held by self.optimizers, so no id is another's meanwhile.
        self._steppers = {id(s) for o in self.optimizers for s in _steppers(o)}
        self.others = {}
        self._ours = None

    def stepped(self, optimizer, inside: bool) -> None:
        """Rule 13: `optimizer` stepped, `inside` an iteration or between two; note it
        where it is not the kept one, and, between iterations, steps the kept model (a
        model trained beside it there, plain PyTorch's for a comparison, is the user's
        own). Whether its state is kept is looked at when a commit comes (`_left_out`).
        Never raises into the step: keyed by id (an optimizer may define __eq__ and no
        hash)."""
        if self.model is None or id(optimizer) in self._steppers:
            return
        if not inside:             # the model's parameters, once per commit at most
            if self._ours is None:
                self._ours = {id(p) for p in self.model.parameters()}
            ours = self._ours
            if not any(id(p) in ours for group in getattr(optimizer, "param_groups", ())
                       for p in group.get("params", ())):
                return
        ref = self.others.get(id(optimizer))
        if ref is None or ref() is not optimizer:           # new, or an id used again
            self.others[id(optimizer)] = weakref.ref(optimizer)

    def _extra_state(self) -> tuple[dict, dict]:
        """Rule 16: each extra's state_dict() as the manifest keeps it, and its bytes
        (torch.save's); one the manifest's reader would refuse is refused now."""
        states, raw = {}, {}
        for name, obj in self.extras.items():
            states[name] = obj.state_dict()
            buffer = io.BytesIO()
            try:
                torch.save(states[name], buffer)        # a lambda: pickle's AttributeError
                raw[name] = buffer.getvalue()
                if raw[name] != self._extra_bytes.get(name):     # read back once a state
                    torch.load(io.BytesIO(raw[name]), weights_only=True)
            except Exception as exc:        # noqa: BLE001 - the pickler's refusal, any kind
                raise OutcoreError(
                    f"the state_dict() of extra={{{name!r}: {type(obj).__name__}}} holds "
                    f"what a state manifest cannot keep ({_unreadable(exc)}; the manifest is "
                    "read back with torch.load(weights_only=True)). Keep tensors, numbers, "
                    "strings, lists and dicts there, or leave it out of extra= and keep it "
                    "yourself. Nothing of this iteration was committed.") from exc
        return states, raw

    def changed_between(self) -> list:
        """Rule 16, as an iteration starts: the extras whose state changed since this
        process committed it (stepped between iterations: the commit kept it a step
        behind), each told once."""
        changed = []
        for name, obj in self.extras.items():
            kept = self._extra_bytes.get(name)
            if kept is None or name in self._warned_between:
                continue
            buffer = io.BytesIO()
            try:
                torch.save(obj.state_dict(), buffer)
            except Exception:               # noqa: BLE001 - the commit will say why
                continue
            if buffer.getvalue() != kept:
                self._warned_between.add(name)
                changed.append(name)
        return changed

    def note_unkept(self, recording, res) -> None:
        """Rule 17, after a recording iteration: what it changed in place and outlives
        it, to follow until a later iteration changes it again (`unkept`). Not what a
        library keeps in place itself, nor what the iteration's last write to it reset
        whole to a constant (DDP's map of the parameters used, with
        find_unused_parameters=True). What it wrote through a tensor gone by its end (a
        view, `state_dict()`'s detached values: timm's EMA) is followed where made before
        it only, and judged at the next iteration's end."""
        noted = []
        for log in recording._logs:
            if not log.write_phases or log.overwritten or log.reset_last:
                continue
            ref = recording.alive_at_end.get(log.id)
            storage = _outliving(ref, res)
            if storage is None:
                continue
            written = log.written_by() if log.written_by is not None else None
            if written is None and not log.existed_before:
                continue
            noted.append((ref, written, log))
        first = {}                          # array -> the op that first wrote it
        if noted:
            for fn in recording.trace.functions:
                for access in fn.accesses:
                    if access.kind == "write":
                        first.setdefault(access.array, fn.op)
        self._unkept_noted += [
            _Followed(ref, None if written is None else weakref.ref(written),
                      None if written is None else written._version, log.existed_before,
                      (log.nbytes, log.dtype, log.shape, first.get(log.id, "?"),
                       log.write_phases[0]))
            for ref, written, log in noted]

    def note_carried(self, recording, res) -> None:
        """Rule 17, out of place, after a recording iteration: the storages it made that
        outlive it, neither a library's own nor kept by commits (asked now, while they
        are where the loop put them: a hidden state assigned to a module's buffer),
        for the next replay of its trace to say which it reads (`watch`)."""
        made, kept = {}, functools.cache(self._kept_storages)
        for log in recording._logs:
            if log.existed_before or not log.nbytes:
                continue
            ref = recording.alive_at_end.get(log.id)
            storage = _outliving(ref, res)
            if storage is None or storage._cdata in kept():
                continue
            made[storage._cdata] = (ref, log.id, (log.nbytes, log.dtype, log.shape))
        self._carried = _Carried(recording.trace, made) if made else None

    def watch(self, mode) -> None:
        """Rule 17, out of place: have `mode`, the Replayer of an iteration beginning,
        say where it reads what the last recording made, where it replays that
        recording's trace (an attribute it calls at every op; None otherwise)."""
        carried = self._carried
        if carried is not None and mode.trace is carried.trace:
            mode.watch = self._saw_read

    def _saw_read(self, func, args, kwargs, mode) -> None:
        """`Replayer.watch`: an op about to run as function `mode.index` of the plan. It
        runs inside the user's step: a failure here ends the watch, never the step."""
        carried = self._carried
        if carried is None or mode.deviation is not None or mode.trace is not carried.trace:
            return
        made = carried.made
        try:
            storages = distinct_storages(op_inputs(func, args, kwargs))
            op = mode._op(func)
            # A `_foreach_*` op is recorded as a function per tensor of its first list
            # (`aten.call_split`).
            width = (len(args[0]) if op.foreach and args and isinstance(args[0], (list, tuple))
                     else 1)
            for storage in storages:
                found = made.get(storage._cdata)
                if found is not None and found[0]() is storage:
                    carried.read.append((found[1], mode.index, width, op.name))
        except Exception:       # noqa: BLE001 - the warning is advice: the step goes on
            self._carried = None

    def carried_over(self) -> list[tuple[int, str, tuple, str, str]]:
        """Rule 17, out of place, as an iteration ends: what the last recording made that
        this iteration, a replay of its trace, read where the record reads arrays other
        than the model's state (an input: an array made before the step and only read;
        or one the step made: zeros a recurrent layer made for `h = None`) and that the
        record made from them (no commit kept it: `note_carried`), and that this
        iteration let go of (it made the next one in its place: one that lives on is
        carried in place, `unkept`'s: a GradScaler's scale), not told before; each once,
        as (bytes, dtype, shape, the op that made it, its phase), largest first. The
        watch ends with the iteration."""
        carried, self._carried = self._carried, None
        if carried is None or not carried.read:
            return []
        trace = carried.trace
        made = {aid: (ref, info) for ref, aid, info in carried.made.values()}
        found, seen = [], set()
        for aid, index, width, name in dict.fromkeys(carried.read):
            if aid in seen or made[aid][0]() is not None:
                continue        # still alive: carried in place (`unkept`'s), not anew
            # The function of that name from where the replay stood: small functions the
            # record has before it may be left out (`h = None` at the first iteration:
            # the recurrent layer made zeros the next iterations do not). None: the op
            # is not the record's (a loss read by `.item()` at the next iteration's
            # start, to log it, runs off the record: helper-224), not judged.
            index = next((k for k in range(index, min(index + _CARRIED_LOOK, len(
                trace.functions))) if trace.functions[k].op == name), None)
            if index is None:
                continue
            # What the record read there, but the model's state (parameters, buffers,
            # optimizer state: what everything is made from).
            sources = {a.array for fn in trace.functions[index:index + width]
                       for a in fn.accesses if a.kind == "read" and not (
                           trace.arrays[a.array].existed_before
                           and trace.arrays[a.array].kind == "persistent")}
            if not sources or not _made_from(trace, sources, aid):
                continue
            maker = trace.functions[trace.arrays[aid].origin[0]]
            nbytes, dtype, shape = made[aid][1]
            info = (nbytes, dtype, shape, maker.op, maker.phase)
            if (maker.op, tuple(shape), dtype) not in self._told_carried:
                seen.add(aid)
                found.append(info)
        self._told_carried.update((op, tuple(shape), dtype) for _, dtype, shape, op, _ in found)
        return sorted(found, key=lambda item: item[0], reverse=True)

    def unkept(self, res) -> list[tuple[int, str, tuple, str, str]]:
        """Rule 17, as an iteration after a recording ends: of what `note_unkept` follows,
        what still lives, was written again since (its tensor's version moved; where that
        tensor was gone at the recording's end, whatever still lives), and no commit
        keeps; each storage once, as (bytes, dtype, shape, the op that first wrote it,
        its phase), largest first. What was not written again is followed for
        _UNKEPT_WAIT iterations (an EMA updated on every n-th only), then told where it
        was made before the recording and its contents changed meanwhile: not every
        write moves a version (batch norm's running statistics, a GradScaler's growth
        tracker). What kept its contents is followed by its version alone from there:
        DDP's map of the parameters used, with static_graph=True, written by its first
        iterations only, is never told; an EMA updated every 10th iteration is, then.
        What the recording made and left alone since (a loss kept in a list) is no state.
        `res`: the Residency, which says whether a storage's bytes can be read."""
        due, waiting, seen = [], [], set()
        room = [_UNKEPT_COPIES - sum(followed.copy.numel() for followed in self._unkept_noted
                                     if followed.copy is not None)]
        kept = functools.cache(self._kept_storages)     # asked once at most: state_dict()s
        for followed in self._unkept_noted:
            storage = followed.storage()
            if storage is None or storage._cdata in self._told_unkept or storage._cdata in seen:
                continue
            written = followed.written_again(storage, res, kept, room)
            if not written:
                if written is not None and (followed.same or followed.age < _UNKEPT_WAIT):
                    followed.age += 1
                    waiting.append(followed)
                continue
            seen.add(storage._cdata)
            due.append((storage._cdata, followed.info))
        self._unkept_noted = waiting
        if not due:
            return []
        left = [(key, info) for key, info in due if key not in kept()]
        self._told_unkept.update(key for key, _ in left)
        return sorted((info for _, info in left), key=lambda item: item[0], reverse=True)

    def _kept_storages(self) -> set:
        """Rule 17: the storages (`_cdata`) a commit keeps, or that count as kept: the
        model's state_dict(), all its buffers (persistent=False ones too: its own choice)
        and its gradients, the optimizers' state, the extras' state_dict() and a
        GradScaler's scale and growth tracker (numbers in its state_dict())."""
        dtensor = _dtensor_class()
        kept: set = set()

        def add(t):
            if isinstance(t, torch.Tensor):
                kept.add(_storage_key(t, dtensor))      # None for one without storage
            return t
        model = self.model
        _map_refs(model.state_dict(keep_vars=True), add)
        for _, buffer in model.named_buffers():
            add(buffer)
        for parameter in model.parameters():
            add(parameter.grad)
        for optimizer in self.optimizers:
            _map_refs(optimizer.state_dict(), add)
        scaler = getattr(torch.amp, "GradScaler", ())
        for obj in self.extras.values():
            _map_refs(obj.state_dict(), add)
            if isinstance(obj, scaler):
                add(getattr(obj, "_scale", None))
                add(getattr(obj, "_growth_tracker", None))
        return kept

    def _left_out(self, kept_states):
        """Rule 13: an optimizer that stepped and lives, with a state tensor that
        `kept_states` (the kept optimizers' state_dict()s) do not hold; or None."""
        if not self.others:
            return None
        dtensor = _dtensor_class()

        def key(t):
            found = _storage_key(t, dtensor)
            return found if found is not None else id(t)     # no storage (sparse): itself
        kept: set = set()           # every tensor of it, wherever it nests them (helper-211:
        _map_refs(kept_states, lambda t: kept.add(key(t)))   # a Lookahead's fast_state)
        for ref in list(self.others.values()):
            other = ref()
            if other is None or id(other) in self._steppers:
                continue
            if any(isinstance(t, torch.Tensor) and key(t) not in kept
                   for entry in getattr(other, "state", {}).values()
                   if isinstance(entry, dict) for t in entry.values()):
                return other
        return None

    def _other_optimizer(self, other) -> str:
        """What a commit refused by rule 13 says."""
        if not self.optimizers:
            kept = ("state_dir keeps no optimizer (ooc.resume() named none): a resume would "
                    "lose its state")
        else:
            names = " and ".join(dict.fromkeys(_class_name(o) for o in self.optimizers))
            kept = (f"the state kept there is that of the {names} that ooc.resume() or "
                    "ooc.keep() named, which does not hold it: a resume would lose it")
        same = any(_class_name(other) == _class_name(o) for o in self.optimizers)
        return (f"{'another ' if same else 'a '}{_class_name(other)} stepped, with optimizer "
                f"state, and {kept}. Where the loop replaced its optimizer (or its model), "
                "name the new ones between iterations, ooc.keep(model, optimizer), and "
                "commits go on from the next iteration; where it steps several with state "
                "(Muon and AdamW, a GAN's two), name them all in a list: "
                "ooc.resume(model, [opt_a, opt_b]) or ooc.keep(model, [opt_a, opt_b]).")

    def _remove_unnamed(self, named: set, sync: bool = True) -> None:
        """Remove the state files of this directory that the manifest does not name."""
        removed = False
        for name in os.listdir(self.directory):
            if _SWAP.match(name) and name not in named:
                try:
                    os.unlink(os.path.join(self.directory, name))
                    removed = True
                except FileNotFoundError:
                    pass
        if removed and sync:
            _fsync_dir(self.directory)

    def failed_note(self, exc: BaseException) -> str | None:
        """What to tell about a resume() that failed with `exc` (rule 4): the directory is
        unchanged, but the model may be partly loaded; a full disk needs room for two files."""
        partly = ("The directory is unchanged, but the model and optimizer are only partly "
                  "loaded: do not train them as they are. " if self.copied else
                  "The directory is unchanged, and nothing was loaded yet. ")
        if isinstance(exc, SwapSpaceExhausted):
            try:
                previous = os.path.getsize(os.path.join(self.directory, self.previous_file))
            except (OSError, TypeError):
                previous = 0
            return (f"outcore: resume() copies the kept state into this process's new state "
                    f"file, {_swap_name(self.generation)}, while the kept one "
                    f"({self.previous_file}, {format_bytes(previous)}) stays until the first "
                    f"iteration is made durable: the disk of {self.directory} needs room for "
                    f"both. {partly}Free space, then call resume() again (on this OutOfCore "
                    "or a new one).")
        if self.copied:
            return (f"outcore: {partly}Call resume() again once the cause is mended, or build "
                    "them afresh.")
        return None

    def close(self) -> None:
        """At close: this generation's file goes if no manifest names it (rule 4), and
        the directory is unlocked (rule 5)."""
        try:
            if not self.committed and not self.file_gone:    # another program's now (rule 12)
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    # A read-only filesystem refuses to unlink a file it never made
                    # (EROFS, not ENOENT: helper-154 got a bare OSError).
                    if os.path.lexists(self.path):
                        raise OutcoreError(
                            f"cannot remove {self.path}, this run's state file, never "
                            f"committed: {exc.strerror}; remove it once you can (the "
                            f"state kept in {self.directory} is unchanged)") from exc
        finally:
            if self._lock >= 0:
                os.close(self._lock)
                self._lock = -1

    def _load(self):
        return read_manifest(self.directory)

    # -- resume --------------------------------------------------------------------------
    def read(self, ref, file: str | None = None) -> torch.Tensor:
        """The tensor `ref` names in `file` (default the manifest's), in fresh memory of
        its own."""
        path = os.path.join(self.directory, file or self.manifest["file"])
        raw = bytearray(ref["nbytes"])
        try:
            with open(path, "rb") as f:
                f.seek(ref["offset"])
                got = f.readinto(raw)
        except OSError as exc:
            raise OutcoreError(f"cannot read {path}, which the manifest names: {exc.strerror}; "
                               "the state directory is damaged. Move it away to start "
                               "afresh.") from exc
        if got != len(raw):
            raise OutcoreError(f"{path} ends before the {ref['nbytes']:,} bytes at offset "
                               f"{ref['offset']:,} that the manifest names; the state directory is "
                               "damaged. Move it away to start afresh.")
        if ref.get("crc32") is not None and zlib.crc32(raw) != ref["crc32"]:       # rule 7
            raise OutcoreError(f"the {ref['nbytes']:,} bytes at offset {ref['offset']:,} of {path} "
                               "are not those written there (their checksum differs): the "
                               "state directory is damaged, by the disk or by another writer. "
                               "Resume from a checkpoint (ooc.save) instead, in another "
                               "state_dir.")
        dtype = getattr(torch, str(ref["dtype"]).removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise OutcoreError(f"the manifest of {self.directory} names a tensor of dtype "
                               f"{ref['dtype']!r}, which is no torch dtype: the state directory "
                               "is damaged. Move it away to start afresh.")
        storage = torch.empty(len(raw), dtype=torch.uint8)
        if raw:                       # through an op, so that the budget sees the copy
            storage.copy_(torch.frombuffer(raw, dtype=torch.uint8))
        return torch.empty(0, dtype=dtype).set_(storage.untyped_storage(), ref["storage_offset"],
                                                ref["size"], ref["stride"])

    def rewind(self) -> None:
        """Resume from the state one commit before the manifest's (rule 8): every rank of
        a process group at the same iteration. Its next commit keeps it as `previous`."""
        state = self.manifest["previous"]
        self.manifest = {**self.manifest, **state, "previous": None}
        self.last = state
        self.iterations = self.done = state["iterations"]

    def load_into(self, model, optimizers, named, extras) -> None:
        """Copy the manifest's state into `model`, the sequence `optimizers` (rule 4) and
        the dict `extras` (rule 16); `named`: what resume() was given for each optimizer,
        the wrapper where the optimizer is what it wraps (rule 13)."""
        file = self.manifest["file"]
        kept_extra = self.manifest.get("extra") or {}
        if kept_extra.keys() != extras.keys():
            lacking = sorted(extras.keys() - kept_extra.keys())
            more = sorted(kept_extra.keys() - extras.keys())
            raise OutcoreError(
                f"the state in {self.directory} keeps extra= states named {sorted(kept_extra)}"
                f", and resume() got {sorted(extras)}"
                + (f": it keeps none of {lacking}" if lacking else "")
                + (f"; pass {more} too, or their state is lost at the next commit" if more
                   else "")
                + ". Pass the extra= it was kept with, or another state_dir. Nothing was "
                "loaded")
        saved = self.manifest["model"]
        ours = model.state_dict(keep_vars=True)
        kept = self._check_optimizers(model, optimizers, named)   # before anything is copied
        if saved.keys() != ours.keys():
            missing, extra = sorted(ours.keys() - saved.keys()), sorted(saved.keys() - ours.keys())
            raise OutcoreError(f"the state in {self.directory} does not match this model: it lacks "
                               f"{missing[:5]} and has {extra[:5]} besides; pass the model it was "
                               "trained with, or another state_dir")
        dtensor = _dtensor_class()
        reshaped = _reshaped_by_module(model, ours, saved)                  # rule 9
        for name, tensor in ours.items():           # every shape, before anything is copied
            if name not in reshaped:
                self._check_shape(name, saved[name], _local(tensor, dtensor),
                                  dtensor is not None and isinstance(tensor, dtensor))
        grads, named = self.manifest.get("grads") or {}, dict(model.named_parameters())
        for name, ref in grads.items():                                      # rule 10
            if name not in named:
                raise OutcoreError(f"the state in {self.directory} holds a gradient of "
                                   f"{name!r}, which is no parameter of this model; pass the "
                                   "model it was trained with, or another state_dir")
            if name in reshaped:                # its parameter's shape is the kept one
                self._check_shape(name + ".grad", ref, torch.empty(
                    saved[name]["size"], dtype=named[name].dtype, device="meta"), False)
            else:
                self._check_shape(name + ".grad", ref, _local(named[name], dtensor),
                                  dtensor is not None and isinstance(named[name], dtensor))
        with torch.no_grad():
            for name, tensor in ours.items():
                value = self.read(saved[name], file)
                self.copied = True          # from here a failure leaves a partial load
                if name in reshaped:
                    self._load_by_module(name, value, *reshaped[name])
                else:
                    _local(tensor, dtensor).copy_(value)         # in place (rule 9)
                del value
            for name, param in named.items():                                # rule 10
                param.grad = (self._state_value(grads[name], file, param, name)
                              if name in grads else None)
        for optimizer, state in zip(optimizers, kept):
            self._load_optimizer(optimizer, state, file)
        for name, obj in extras.items():                                     # rule 16
            obj.load_state_dict(kept_extra[name])
        torch.set_rng_state(self.manifest["rng"])

    def _load_by_module(self, name: str, value, module, attribute: str) -> None:
        """Load `value` into `module`'s `attribute` by the module's own load_state_dict(),
        which gives it its shape (rule 9); then check that it has the kept one."""
        try:
            module.load_state_dict({attribute: value}, strict=False)
        except RuntimeError as exc:         # torch's "Error(s) in loading state_dict"
            raise OutcoreError(
                f"the state in {self.directory} holds {name} as {tuple(value.shape)} "
                f"{value.dtype}, and this model's {type(module).__name__}.load_state_dict() "
                f"refused it ({str(exc).strip().splitlines()[-1].strip()}). Pass the model "
                "it was trained with, or another state_dir") from exc
        now = getattr(module, attribute, None)
        if (not isinstance(now, torch.Tensor)
                or isinstance(now, torch.nn.parameter.UninitializedTensorMixin)
                or now.shape != value.shape or now.dtype != value.dtype):
            have = ("nothing" if not isinstance(now, torch.Tensor) else
                    f"{_shape(now)} {now.dtype}")
            raise OutcoreError(
                f"the state in {self.directory} holds {name} as {tuple(value.shape)} "
                f"{value.dtype}, and this model's {type(module).__name__}.load_state_dict() "
                f"left it {have}. Pass the model it was trained with, or another state_dir")

    def _load_optimizer(self, optimizer, kept: dict, file: str) -> None:
        """Load the state_dict `kept` (its tensors as refs into `file`) into `optimizer`,
        each state tensor in the dtype it was kept with (rule 14)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        loaded = {key: _map_refs(value, lambda ref: self.read(ref, file))
                  for key, value in kept.items() if key != "state"}
        loaded["state"] = {index: _map_refs(entry, lambda ref, i=index: self._state_value(
            ref, file, params[i] if isinstance(i, int) and 0 <= i < len(params) else None,
            i)) for index, entry in kept.get("state", {}).items()}
        optimizer.load_state_dict(loaded)
        for index, entry in loaded["state"].items():                         # rule 14
            if isinstance(index, int) and 0 <= index < len(params):
                now = optimizer.state[params[index]]
                for key, value in entry.items():
                    if isinstance(value, torch.Tensor) and isinstance(
                            now.get(key), torch.Tensor) and now[key].dtype != value.dtype:
                        now[key] = value

    def _check_shape(self, name: str, ref: dict, local: torch.Tensor, sharded: bool) -> None:
        """Refuse a kept tensor whose shape or dtype is not `local`'s, or one kept sharded
        for a plain one and the other way round (rule 9)."""
        if bool(ref.get("dtensor")) != sharded:
            kept, ours = ("an FSDP2 (DTensor) shard", "a plain tensor") if not sharded else (
                "a plain tensor", "an FSDP2 (DTensor) shard")
            raise OutcoreError(
                f"the state in {self.directory} holds {name} as {kept}, this model has "
                f"{ours}; resume with the fully_shard calls it was trained with. Nothing "
                "was loaded.")
        if list(local.shape) == list(ref["size"]) and str(local.dtype) == ref["dtype"]:
            return
        shard = " (the local shard of an FSDP2 DTensor)" if sharded else ""
        raise OutcoreError(
            f"the state in {self.directory} holds {name}{shard} as {tuple(ref['size'])} "
            f"{ref['dtype']}, this model as {tuple(local.shape)} {local.dtype}"
            + ("; resume with the ranks and the fully_shard calls it was trained with"
               if shard else "") + ". Nothing was loaded.")

    def _state_value(self, ref: dict, file: str, param, key) -> torch.Tensor:
        """An optimizer state entry (of state key `key`, parameter `param` or None where
        the key names none): a DTensor again, like its parameter, where it was one
        (rule 9)."""
        value = self.read(ref, file)
        if not ref.get("dtensor"):
            return value
        if param is None:
            raise OutcoreError(f"the state in {self.directory} holds optimizer state under key "
                               f"{key!r}, which names no parameter of this optimizer's groups; "
                               "pass the optimizer it was trained with")
        dtensor = _dtensor_class()
        if dtensor is None or not isinstance(param, dtensor):
            raise OutcoreError(f"the state in {self.directory} holds the optimizer state of "
                               "FSDP2 (DTensor) parameters, and this model's are plain "
                               "tensors; resume with the fully_shard calls it was trained with")
        if list(value.shape) != list(param.to_local().shape):
            raise OutcoreError(f"the state in {self.directory} holds an optimizer state shard "
                               f"of {tuple(value.shape)}, this parameter's local shard is "
                               f"{tuple(param.to_local().shape)}; resume with the ranks and "
                               "the fully_shard calls it was trained with")
        return dtensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())

    def _check_optimizers(self, model, optimizers, named) -> list:
        """The optimizers passed to resume() are those the state was kept with: as many
        (none for none), in the same order, each of the class kept in its place, with
        the hyper-parameters (`optimizer.defaults`) every kept parameter group has, over
        the same parameters of `model` (where the manifest names them: rule 13).
        Resumed without one, its state would be lost at the next commit; into another
        kind, torch would fail later, in step(). A class kept may be the wrapper's
        (`named`: kept before rule 13 saw through it). Returns the kept state_dicts, one
        per optimizer."""
        kept = _as_list(self.manifest["optimizer"])
        classes = self.manifest.get("optimizer_class")
        classes = classes if isinstance(classes, list) else [classes] * len(kept)
        if len(optimizers) != len(kept):
            raise OutcoreError(self._other_count(kept, classes, optimizers))
        held = self.manifest.get("optimizer_params") or [None] * len(kept)
        for place, (optimizer, wrapper, state, saved_class, params, ours) in enumerate(
                zip(optimizers, named, kept, classes, held, _held(model, optimizers))):
            which = f" (optimizer {place + 1} of {len(kept)})" if len(kept) > 1 else ""
            self._check_optimizer(optimizer, wrapper, state, saved_class, which)
            if params is not None and params != ours:
                at = next((i for i, (a, b) in enumerate(zip(params, ours)) if a != b),
                          min(len(params), len(ours)))
                raise OutcoreError(
                    f"the state in {self.directory} was kept by an optimizer{which} over "
                    f"{len(params)} parameters, its number {at} "
                    f"{params[at] if at < len(params) else '(none)'}, and resume() got one "
                    f"over {len(ours)}, its number {at} {ours[at] if at < len(ours) else '(none)'}"
                    ": its state would be loaded into other parameters. Pass the optimizers "
                    "built as in training, over the same parameters in the same order (and "
                    "several in the order they were named), or another state_dir. Nothing "
                    "was loaded")
        return kept

    def _other_count(self, kept, classes, optimizers) -> str:
        """What resume() says when it got another number of optimizers than were kept."""
        if not kept:
            return (f"the state in {self.directory} was kept without an optimizer; "
                    "resume(model) without one, or pass another state_dir")
        if not optimizers:
            return (f"the state in {self.directory} was kept with an optimizer, and resume() "
                    "got none: its state would be dropped at the next commit. Pass it: "
                    "ooc.resume(model, optimizer), or another state_dir")
        return (f"the state in {self.directory} was kept with {len(kept)} optimizer"
                f"{'s' if len(kept) > 1 else ''} ({', '.join(map(str, classes))}), and "
                f"resume() got {len(optimizers)}: pass the optimizers it was trained with, in "
                "the same order (ooc.resume(model, [opt_a, opt_b]) for several), or another "
                "state_dir. Nothing was loaded")

    def _check_optimizer(self, optimizer, named, kept, saved_class, which) -> None:
        """One optimizer of `_check_optimizers`, against its kept state_dict `kept`."""
        if saved_class is not None and saved_class not in (_class_name(optimizer),
                                                           _class_name(named or optimizer)):
            raise OutcoreError(
                f"the state in {self.directory} was kept by a {saved_class}{which}, and "
                f"resume() got a {_class_name(optimizer)}: its state would not be what this "
                "one's step reads. Pass the optimizer it was trained with"
                + (", the several in the order they were named" if which else "")
                + ", or another state_dir")
        if isinstance(optimizer, _ZeroPart):                                 # rule 15
            optimizer.check(kept, self.directory)
        groups = kept.get("param_groups", [])
        lacking = sorted(set(optimizer.defaults) - set().union(*(g.keys() for g in groups)))
        if groups and lacking:
            raise OutcoreError(
                f"the state in {self.directory} was kept by another kind of optimizer than "
                f"this {type(optimizer).__name__}{which}: its parameter groups have no "
                f"{lacking[:5]} (they have {sorted(k for k in groups[0] if k != 'params')[:8]}"
                "). Pass the optimizer it was trained with, or another state_dir")
        # What optimizer.load_state_dict checks, checked here before the model is copied.
        kept_sizes = [len(g.get("params", ())) for g in groups]
        our_sizes = [len(g["params"]) for g in optimizer.param_groups]
        if groups and kept_sizes != our_sizes:
            raise OutcoreError(
                f"the state in {self.directory} was kept by an optimizer{which} with "
                f"parameter groups of {kept_sizes} parameters, and resume() got one with "
                f"{our_sizes}: pass the optimizer built over the same parameters in the same "
                "groups as in training, or another state_dir. Nothing was loaded")

    # -- commit --------------------------------------------------------------------------
    def commit(self, res, shield, iterations: int) -> None:
        """Make the state after `iterations` iterations durable (rule 3)."""
        self.unsynced = self.unsynced or getattr(res.mover, "sync_error", None)
        if self.unsynced is not None:                                      # rule 6
            raise OutcoreError(
                f"an earlier fdatasync of the state file {self.path} failed "
                f"({self.unsynced.strerror or self.unsynced}), and after such a failure the "
                "kernel may drop what it could not write, so nothing written to that file "
                "since can be trusted to be on disk.")
        mover = res.mover
        if self.lost is None and self._file_gone(mover):                   # rule 12
            self.file_gone = True
            self.lost = (f"the state file {self.path} was removed or replaced by another "
                         "program while this OutOfCore had it open (a clean-up of *.swap "
                         "files?), so nothing written to it can be found again.")
        if self.lost is not None:
            raise OutcoreError(self.lost)
        self._ours = None
        kept_states = [optimizer.state_dict() for optimizer in self.optimizers]
        left_out = self._left_out(kept_states)                               # rule 13
        if left_out is not None:
            raise OutcoreError(self._other_optimizer(left_out))
        extra, extra_bytes = self._extra_state()                             # rule 16
        committed: dict = {}
        ends: list = []             # where each tensor's bytes end in the file (`broken`)

        dtensor = _dtensor_class()

        def ref(tensor):
            local = _local(tensor, dtensor)                                  # rule 9
            storage = local.untyped_storage()
            try:
                extent, at, nbytes = res.persist(storage)
            except ValuesLost as err:                                         # rule 12
                self.lost = str(err)
                raise
            committed[extent.offset] = extent
            ends.append(at + nbytes)
            kept = {"offset": at, "nbytes": nbytes, "dtype": str(local.dtype),
                    "size": list(local.shape), "stride": list(local.stride()),
                    "storage_offset": local.storage_offset(), "crc32": mover.crc(extent)}
            return {**kept, "dtensor": True} if local is not tensor else kept

        model = {name: ref(t) for name, t in self.model.state_dict(keep_vars=True).items()}
        grads = {name: ref(p.grad) for name, p in self.model.named_parameters()     # rule 10
                 if p.grad is not None and p.grad.layout == torch.strided}
        optimizer = _one_or_list([_map_refs(kept, ref) for kept in kept_states])
        try:
            mover.sync()
        except OSError as exc:                                               # rule 6
            self.unsynced = exc
            raise
        # Rule 2 before the switch: a save that fails after its rename (the directory's
        # fsync) has put the new manifest in place, so its extents must never be written
        # again either. Until a commit succeeds, both manifests' extents are kept.
        previous = self.last if _ranks() > 1 else None                       # rule 8
        kept = {**committed, **(self.last_extents if previous is not None else {})}
        mover.protect(kept)
        state = {"file": _swap_name(self.generation), "iterations": iterations,
                 "rng": torch.get_rng_state(), "model": model, "optimizer": optimizer,
                 "optimizer_class": _one_or_list([_class_name(o) for o in self.optimizers]),
                 "optimizer_params": _held(self.model, self.optimizers), "grads": grads,
                 "extra": extra}
        try:
            atomic_save({"format": FORMAT, "version": VERSION, "generation": self.generation,
                         **state, "previous": previous},
                        os.path.join(self.directory, MANIFEST), shield)
        except BaseException:
            if self._switched(iterations):
                self.iterations, self.committed = iterations, True   # close() keeps the file
            raise
        mover.commit(kept)
        self.iterations = iterations
        self.committed = True
        self._extra_bytes = extra_bytes
        self.last_end = max(ends, default=0)
        self.last, self.last_extents = state, committed
        named = {state["file"], previous["file"] if previous is not None else None}
        self._remove_unnamed(named)           # rule 4: no manifest names them any more
        if self.previous_file not in named:
            self.previous_file = None

    def _file_gone(self, mover) -> bool:
        """Rule 12: whether the open state file no longer has the name it was opened by
        (removed, or another file put in its place). A removed directory is not this
        case: its commit fails where the manifest is written, and says so."""
        stat = getattr(mover, "file_stat", None)        # the disk mover's (state_dir's)
        if stat is None or not os.path.isdir(self.directory):
            return False
        try:
            open_file = stat()
            named = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (open_file.st_nlink == 0
                or (named.st_dev, named.st_ino) != (open_file.st_dev, open_file.st_ino))

    def broken(self) -> str | None:
        """Why the durable state the manifest in place names cannot be resumed (its file
        removed, replaced or cut short by another program), or None where nothing says
        so. resume() checks every byte (rule 7); this looks only at the file's presence
        and length, for what a failed commit and close() say."""
        if not os.path.isdir(self.directory):
            return "the directory is gone (removed by something else)"
        name = _swap_name(self.generation) if self.committed else self.previous_file
        if name is None:
            return None
        if self.committed and self.file_gone:
            return f"{name}, which the manifest names, was removed or replaced"
        try:
            size = os.stat(os.path.join(self.directory, name)).st_size
        except FileNotFoundError:
            return f"{name}, which the manifest names, is gone"
        except OSError:
            return None
        if self.committed and size < self.last_end:
            return (f"{name}, which the manifest names, is shorter than the state it holds "
                    "(cut by another program)")
        return None

    def kept_note(self) -> str:
        """What durable state the directory keeps after a commit failed, in words."""
        broken = self.broken()
        if broken is not None:
            return (f"{broken}: no durable state is left there (ooc.save() a checkpoint "
                    "elsewhere to keep this training)")
        if self.iterations == self.done:
            return ("the new manifest is in place all the same: the last durable state is "
                    "this iteration's")
        return (f"the last durable state is still that of {self.iterations} completed "
                f"iterations (resume() there returns {self.iterations})")

    def _switched(self, iterations: int) -> bool:
        """Whether the manifest in place is the one a failed commit was writing."""
        try:
            manifest = self._load()
        except Exception:   # noqa: BLE001 - unreadable: not ours as far as we can tell
            return False
        return (manifest is not None and manifest.get("generation") == self.generation
                and manifest.get("iterations") == iterations)


def _one_or_list(items: list):
    """What the manifest keeps of the optimizers (rule 13): None for none, one's as it is
    (as directories kept before several could be named hold it), a list for several."""
    return None if not items else items[0] if len(items) == 1 else items


def _as_list(kept) -> list:
    """The manifest's optimizer entry as a list, one per optimizer (`_one_or_list`)."""
    return [] if kept is None else kept if isinstance(kept, list) else [kept]


_REF = {"offset", "nbytes", "dtype", "size", "stride", "storage_offset"}


def _map_refs(obj, fn):
    """`obj` (an optimizer's state_dict) with every tensor t replaced by fn(t), and back
    (every ref dict, recognized by its keys, replaced by fn(ref))."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        if _REF <= obj.keys() <= _REF | {"crc32", "dtensor"}:     # rules 7 and 9, optional
            return fn(obj)
        return {k: _map_refs(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_refs(v, fn) for v in obj)
    return obj
