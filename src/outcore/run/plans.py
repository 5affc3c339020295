"""Plans by step shape: one plan for each shape of step a loop runs, and which of them
the next iteration replays.

NOTE [Step shapes]
A loop that calls `optimizer.step()` every n-th iteration (gradient accumulation across
iterations) runs steps of three shapes: the first micro-batch makes the gradients, the
middle ones add to them, the last one also steps (and frees them). One plan per shape
lets every iteration replay.
  1. A step's shape is its sequence of functions, each an op's name and the bytes its
     new storages hold (`function_keys`, `shape_of`): what the replayer checks an op
     against. A recording has the shape of its trace; a replay computes the shape of
     the step it ran, the part run on demand after a deviation included
     (`Replayer.shape`), so that a deviation teaches which shape came: on the sizes it
     ran, as a recording of it has them (a step that ran its plan to the end on
     smaller tensors has the plan's shape: rule 10).
  2. The next shape is predicted from the shapes seen (`predict`): by the period
     p <= MAX_PERIOD that the most recent shapes follow longest (for at least a whole
     period), else the last shape. A step's family is the ops it ran without their
     sizes (`family_of`; a replay that ran its plan to the end has the plan's, one that
     left it that of the ops it ran: `Replayer.family`). Where a period holds for the
     families and none for the shapes, or the shapes' predicts another family (two
     middle micro-batches in a row hold a period 1), the sizes vary and the ops repeat:
     text padded to each batch's longest sequence, with gradient accumulation over
     iterations (a first micro-batch that makes the gradients, one that adds to them
     and steps, each of any length). The family predicts, and its plan for the largest
     sizes replays (`_largest`; rule 10 grows such a plan). A family with no plan is
     recorded where its period held for three periods at least and holds at most
     MAX_PLANS families; else rule 3 goes on as for shapes (helper-86: eight families in
     turn recorded every step; a period 3 by chance of LBFGS's rare step that skips its
     history update started chains of warm-up recordings). Before, the last shape
     predicted: the wrong micro-batch, a deviation every other iteration, and shapes
     of new sizes recorded again and again (helper-83: tiny GPT-2, lengths at random,
     a step every second iteration; 18 recordings and 43 deviations in the last 75 of
     150; `test_accumulation_over_lengths_at_random_settles`).
  3. A predicted shape with a plan replays it; one without is recorded, unless no
     period predicted it and it was seen once (a one-off: an epoch's short last batch,
     a shape that follows the data), or the period holds more shapes than MAX_PLANS
     (each recording would drop the plan needed next): then the most recent shape with
     a plan replays. A wrong guess costs a deviation: the rest of that step runs on
     demand, correct. Except where that plan is the only one, its shape was seen only
     at its recording, and that recording made optimizer state (`Plan.made_state`):
     the step recorded was the one-off, a first step that made less state than
     MIN_MOVE_BYTES, none of it in an optimizer's `state` (no second recording was
     asked for: `Recorder.made_optimizer_state`), and the
     shape after it is recorded; once per OutOfCore, and only where no recording was
     made for a warm-up (`warm_up`: state too large to miss asked for one already;
     LBFGS's history, which grows for several steps, had it recorded again and again).
     (A first step that made no state, the micro-batch of an accumulation over
     iterations that does not step, comes back: its plan replays.)
  4. The state a plan starts from (`Plans.carried`): after an iteration that ran its
     plan to the end, outcore knows which storage each of its arrays was at the end
     (`Ending`). A plan that ran after that shape before learnt which of those arrays
     it starts from (`Plans.learn`: the same storage, by identity); the first time, a
     replay of the same shape starts from its persistent arrays. The rest (state the
     shape before never touched, or all of it after a deviation) is the state it
     started from last time, where those storages still live. Arrays it finds no
     storage for bind at their first use (a new storage there is a gradient made
     since: no deviation), counted as strangers till then. A replay that only follows
     the ops (a plan that moves nothing: `Replayer.passive`) binds no storage and
     checks op names only, so it does so only while every plan kept moves nothing and
     the last iterations had one shape (besides those of warm-up recordings, made
     before the optimizer's state); one that deviates learns no shape (it is kept as
     one of its own, so that the next ones track).
  5. A replay that deviates with the shape of its own plan (another tensor where the
     record had state, a storage that can no longer move) drops that plan: the next
     iteration of that shape is recorded again. So does one that took up another plan
     (rule 9), left that one too and found another tensor where a plan had state that
     still lives (replaced by the user, the old one held elsewhere: DDP's list of a
     module's buffers), for each plan that found it so; and a buffer only read found
     so twice for one shape (its own plan's, or after taking up another) takes turns:
     an input from the next recording on (`Replayer._note_replaced`). A step of
     another shape that left its only plan so is another task, not a replacement.
  6. At most MAX_PLANS plans are kept; the least recently used one goes first.
  7. A plan is made for its own shape: state only other shapes touch (Adam's moments,
     in a micro-batch that does not step) is a stranger to it. Where its peak leaves no
     room for such state, the replay starts writing it out at its start, overlapped
     (`Replayer._send_off_lasting`); the report counts those bytes as unplanned.
  8. Storages that never move and that a step does not touch (DDP's buckets, in a
     micro-batch under no_sync(); another shape's small optimizer state; what a
     collective made in the step before, while the user still holds it) are planned
     for beside it (`Plan.held_beside`). Where more of those a replay keeps counting
     appears later (made by a step of another shape: a collective's, FSDP's;
     `Residency.stays`), the plan is dropped and its shape recorded again, once per
     shape (`OutOfCore._outgrown`): a step that leaves a new such storage every time
     is not recorded again and again. Small state the replay lets go of as it starts
     (Residency NOTE 8) is no reason: with sizes that follow the data every shape is
     new, and each was recorded again (helper-85).
  9. Shapes that come at random (mixup or cutmix by a coin toss, a hook that logs an
     activation on some steps) defeat any prediction. Where a replay leaves its record
     at function k, before the op ran, and another plan's record ran the same first k
     functions on the same arrays and goes on with that op (`Plans.continuing`; past
     small functions), the replay takes up that plan at k (`Replayer._switch`) instead
     of deviating: array ids are numbered by first access, so the arrays the step
     touched keep theirs; the state it has not touched yet binds as that plan starts
     from it (rule 4). `_reconcile` then puts the arrays where that plan's actions up
     to k have them: what it has out is written out, what it is writing starts its
     write, what it has in is read back, other fast storages are strangers (a transfer
     the plan left had started for an array this one does not have is finished first).
     A step that ends where another plan's record ends takes that plan up there too
     (`finish`). Again later in the same step, at a later function only. Only to a plan
     whose first k functions recompute what the step's did: calls kept and arrays
     discarded carry over where it recomputes them (`_take_recomputes`); a plan numbers
     the arrays its repeats remake after all of its step's arrays, so the two plans'
     ids of those are paired by their repeats, a temporary copy only with a temporary
     (`_same_arrays`). The iteration counts
     as a replay of the plan it ended on (`IterationStats.switched_at`). A step that
     left its plan at an array larger than the plan's, where the families have held a
     period for three periods at least, takes up no plan of the period's other families
     (`Plans.not_this`, `continuing(not_of=...)`): the period says the step is not one
     of them, and their plans fit its sizes for a while (the first micro-batch's, for
     the second) and deviated further on, while the plan it left never grew (rule 10).
     A plan of ops outside the period (an evaluation step, a rare branch) it may take up.
     Nor one that has the array where the step left smaller than the step has it
     (`continuing(fits=...)`): the step would leave that one there too, and it would
     grow beside the plan left. The first k functions compare by their ops, small ones
     too; one the step's plan has small is small in the other too, while one small in
     the other only is compared by its arrays (which functions are small follows the sizes recorded:
     a labels' slice of 2 x 40 tokens is, of 8 x 56 not).
 10. Sizes that vary from step to step with the same ops (text padded to each batch's
     longest sequence, an epoch's short last batch): a replay accepts an array at most
     as large as the plan's where it binds or makes it (`Replayer.smaller`). Every
     array then holds at most what the plan counted for it, so the count stays under
     the plan's curve and the budget holds; every op still makes its inputs ready, so
     no value depends on the sizes. The step counts as that plan's shape. An array
     larger than the plan's leaves the plan as any deviation; a passive replay, which
     binds nothing, leaves it after the function where what the step made past the
     record passes the room the plan leaves under its budget. Where the
     step then runs the plan's ops one for one to its end, on demand (small ops off the
     record aside: a `loss.item()` the recorded step logged), it outgrew the plan
     (`Replayer.outgrew`: the same step on larger tensors, of the plan's family, not
     another shape that begins the same, as an eval step does): the next iteration
     that a period of the families predicts to be of its family is recorded
     (`Plans.next(growing)`: the iteration after it may be another micro-batch, whose
     record could not grow this plan), or the very next one where the last family
     predicts (`now`; once: helper-86 saw a guess of the family recorded again and
     again, each time another micro-batch; the entry goes with its plan:
     `OutOfCore._growing`), and where
     its record has the same functions on the same arrays as the outgrown plan's, the
     plan is made for the largest size of each array in the two records and in the step
     that outgrew (`Replayer.outgrown_sizes`: what it bound before k, what each op made
     and read from k on, the labels read by the loss too; in a passive replay, which
     binds nothing, what the functions that made more before k made and read: what
     it read elsewhere before k it never saw), each array held until the later of its
     deaths in the two records, and the longer duration of each function of the two
     (`envelope`), and replaces the outgrown one. A record with a small op more or
     less than the plan's (a `loss.item()` every n-th step, in one of the two steps:
     another family) grows it too: its functions paired with the plan's as the ops run
     on demand are (`grown_aside`, `sizes_made`), each array as large as its pair's and
     the outgrowing step's; the plan made has the family it grew
     (`OutOfCore._grown_aside`; helper-89: the entry waited, and the next step of the
     family was recorded again, two recordings for one growth). So the plans grow
     to the largest sizes the data brings, one recording each time a step passes them,
     and a step of any size under them replays. Each array that grew is planned
     1/GROWTH_MARGIN (an eighth) larger than its largest (`with_margin`; a small one up
     to SMALL_OP_BYTES at most), the envelope alone where that does not fit: sizes that
     follow the data (the tokens routed to each of several experts) passed their largest
     on many steps for a long while, a recording each time (helper-190: tiny Mixtral
     with eager experts, 16 recordings and 14 deviations in 40 iterations; with the
     margin 10 and 8). (Where the envelope needs more than the
     budget somewhere, though both records fit, or the record is of another shape, the
     record alone is planned, and a step that outgrows that plan is not followed by a
     recording: no loop of recordings.) Rule 9
     compares the sizes the step made with another plan's: the same first, else no
     smaller. A plan only ever taken up partway (a branch by a coin toss, never
     predicted) grows too: where no plan could be taken up but one whose arrays some of
     the step's are larger than (`Plans.outgrown_by`), and the step then ran that plan's
     functions to its end on demand (`sizes_after`), that plan grows as one its own
     replay outgrew (`_Iteration._outgrew_other`). And a recording asked for one family
     (`Plans.asked`) that caught a step of another with a plan grows that one's largest
     plan (`envelope`) rather than adding a plan beside it that no step takes
     (`_plan_recording(asked=...)`; helper-98's trial: a branch on 30% of steps over
     random sizes, 18 recordings and 80 deviations in 300 iterations, deviations to the
     end; helper-100's fix: 21 and 24, none after iteration 175).
 11. A step whose recording ran op by op within the budget but that no plan can run
     (a plan keeps room for the arrays that never move at their peak throughout: a
     stepping micro-batch near the smallest budget of the others) runs op by op each
     time its shape comes (`unplannable`): predicted, it is recorded, and no plan is
     made. A warning says so once, with the budget a plan needs. Not where the arrays
     that never move fill the budget alone (FSDP2's gathered parameters, which the
     managed peak does not count: the step did pass the budget). Before, the loop
     stopped there (InfeasibleBudget, and every later iteration refused; helper-79:
     tiny Mixtral, a step every second iteration, at 0.3 of its peak).
 12. A shape that came three times at one period longer than MAX_PERIOD, and never
     between (an evaluation inside `ooc.iteration()` every 100 steps, a checkpoint's
     step every 500), is due one more period on: that iteration replays its plan, or is
     recorded where fewer than MAX_PLANS are kept (`Plans._due`, before rule 2's
     prediction; with all kept, its recording would drop the least recently used plan,
     one the loop still runs, and the loop would record again and again). Rule 2 looks
     only MAX_PERIOD back, and such a shape was never predicted, so never recorded:
     helper-172's evaluation every 100 steps deviated all 10 times. Three times,
     equally spaced: a shape that comes at random is seldom absent that long and back
     at one period (helper-174's simulation: ~6 more deviations in 400k steps).
 13. Parts of a model of one size taken in turns (a head per task, one task a step) give
     steps of one shape that read other state: the plan of one head's step read the
     other head's weight where it had its own, deviated (rule 5 dropped it), and the
     loop recorded or deviated every other step for good (helper-182). Where function i
     is the first of the step to read a state array, and reads there another storage
     of its size that the step has not read yet, and no other plan reads it there (rule
     9, tried first), the replay swaps the two storages' arrays and goes on
     (`Replayer._in_turns`, `_take_turns`): where both are movable, the other is tracked
     and is state of the step's too or of none of its arrays (the other head, untouched
     while its gradients are None), the plan's storage goes to the slow tier (dropped
     where read ahead for function i, else written) and the other is read back,
     unplanned, so the count stays on the plan's curve; where the plan's is pinned (a
     head's small bias), one pinned too, tracked, or under min_move_bytes and not tracked
     (a pinned storage no step starts from is let go of between steps, Residency NOTE 8),
     takes its place and the plan's is let go of, so that the two are not counted
     together. Small ops swap too: run off the record instead (rule 4b), a skipped
     layer's small state stood beside the plan's, which the plan still read in, over the
     budget (helper-192, stochastic depth at min_move_bytes=0). Every step after the
     warm-up replays, reading the other head back where it reads it first. Not where the
     step then reads the swapped storages in the record's order (an optimizer over both
     heads, `zero_grad(set_to_none=False)`): it deviates there, later in the step than
     before.
     (Swapping the two back there settled two and three heads, but with a head applied
     twice in a step, three heads in random order, it deviated more than without and
     passed the budget by up to 72 KiB: reverted, CHANGELOG 2026-12-07.)

NOTE [Small ops off the record]
Steps of one loop differ in ops on scalars that no plan needs to know: a logger that
deep-copies its metrics every n-th step (Lightning's ModelCheckpoint), a metric made the
first time a key is logged, `.item()` every hundred steps, per-class counts of a metric.
Each of them in the middle of a step used to leave the plan (the rest of the step on
demand) and start a new shape to record: a Lightning fit with logging and checkpoints
replayed 8 of its 60 iterations (benchmarks/lightning_logging.py, docs/executor.md).
  1. A small op touches only storages of at most SMALL_OP_BYTES (1 KiB: a scalar, or
     per-class counts of up to 128 classes) and makes at most that much in all: as
     recorded, by the sizes of its arrays (`small_functions`); as it runs, by the sizes
     of its input storages (the
     residency's size for one it tracks, whose `nbytes()` reads 0 on the slow tier)
     and by what its meta kernel says it makes, a pointwise op by its elements times
     their width (`Replayer._runs_small`). A collective is never one (compose.py has
     its rules for them), nor a function the planner inserted. A `_foreach_*` op is
     followed by its per-tensor parts, each judged alone.
  2. Storages that small are under min_move_bytes (64 KiB by default, ooc.py): they
     never move, so a small op needs nothing from the plan; the replayer still makes
     any it tracks ready (`Residency.ready`) before running it, as for every op. (With
     min_move_bytes below SMALL_OP_BYTES they may move: one the plan has out is read
     back after room is made for it, the plan's writes under way finished first, and
     lingers beside the plan until the budget needs its room (`_ready_off_plan`,
     `_room_for_remake`, `linger`): read back without room, it passed the budget by its
     size, a head's bias in every other replay (helper-197, helper-198). What a small
     op off the record makes lingers so too, and room is made before each such op, as
     the index stays while they run: kept outputs passed the budget by their sum, and
     AdamW's first step, per parameter, by 2 KiB (helper-209; `Replayer._extra`).)
  3. A step's shape leaves its small functions out (`function_keys`: None), so steps
     that differ only in them share one plan.
  4. Replaying, an op matches the function the step stands at, or the first one after
     small functions only, that has its name and, for an op that is not small, is not
     small itself (`Replayer._skip_small`): a large `div` passes a small `div` the step
     did not run (a small op may match a function that is not small: its arrays
     decide). The functions passed are skipped: their begin- and end-actions run in
     order, each after room is made for tensors beside the plan as before a function's
     own (`_keep_room`: without it, restores passed the budget where the last
     iteration's logits lived on; helper-157). Where none matches, a small op runs as
     it is, unrecorded, and the index stays (`_extra`); so does one that matched by
     name but not by its arrays (before it runs) or by the new bytes it makes (after:
     the function's begin-actions ran; run again at the function, they find their
     arrays where they left them). Any other op leaves the plan, as any deviation. A
     planner-inserted function (a recompute) is never passed.
  5. An op that its meta kernel says makes a storage larger than SMALL_OP_BYTES (a
     factory with no tensor argument: `torch.full((n,), 1.0)`) is no small op: it leaves
     the plan and runs on demand, its room made first, so the budget holds. One whose
     meta kernel cannot tell (an output sized by the data: `nonzero`) and that made one
     all the same leaves the plan after it ran, its outputs counted from there: the
     budget is passed by what it made, as on demand (README). Where the record has a
     small function of its name at that point, such an op is judged by its own call,
     not by what earlier calls of its signature made (remembered to make room on
     demand: `created_bytes(learned=False)`): a rarely chosen expert's `nonzero` was
     judged by the others' and left the plan at every replay (helper-156). Elsewhere
     what its signature made counts, and it leaves the plan before it runs, its room
     made (helper-158: judged by its own call there, a `repeat_interleave` making 4 MiB
     ran beside the plan and passed the budget).
  6. What an extra makes is tracked as it returns (pinned: counted beside the plan, as
     every storage under min_move_bytes); what a skipped function would have made is
     bound where a later function first reads it, as any new storage.
  7. Matching small ops by name can bind a small array to another small storage than
     the record's (two `div`s of scalars, one of them an extra). A function that then
     reads a storage of the same size where its small array was bound to another binds
     the array anew instead of leaving the plan, where the array is under
     min_move_bytes (it never moves, so which storage stands for it changes no action
     and no count) and the plan recomputes nothing (a recomputed array's storage is
     discarded and remade in place: bound to a user's tensor, the remake overwrote it).
  8. In a plan that recomputes, a remake must find its inputs as they were (it checks
     their versions) and must not overwrite a write to its array. Before a small op off
     the record writes, every kept call and every discarded array's remake that reads a
     storage it writes gets a copy of that argument, taken then (`recompute.spare`, as a
     producer's own writes are copied at the capture): the repeat runs on the values
     from before, whether the write bumped a version or went through `.data`. An array
     whose own storage it writes is written out where the plan frees it and read back,
     not discarded (`_discard`). The step keeps its plan. What the op writes is made
     ready first (its bytes are copied). A small write the record has is spared the
     same way (its array may have bound another storage than recorded). One that
     matched a function by name and is found off the record only after it ran (by what
     it made) and wrote leaves the plan (`_writes_beside_repeats`).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

from .compose import DISTRIBUTED_NAMESPACES

MAX_PLANS = 6
MAX_PERIOD = 32
_MAX_COUNTED = 4096
SMALL_OP_BYTES = 1024


def small_functions(trace, sizes: list | None = None) -> list[bool]:
    """Per function of `trace`: whether it is a small op (NOTE [Small ops off the
    record], rule 1). `sizes`: each array's bytes, where not the trace's."""
    sizes = [a.nbytes for a in trace.arrays] if sizes is None else sizes
    return [f.repeats is None and f.op.split(".", 1)[0] not in DISTRIBUTED_NAMESPACES
            and all(sizes[a.array] <= SMALL_OP_BYTES for a in f.accesses)
            and sum(sizes[a.array] for a in f.accesses if a.kind == "create") <= SMALL_OP_BYTES
            for f in trace.functions]


def function_keys(trace, sizes: list | None = None) -> list:
    """Per function of `trace`, what a step of the same shape runs there: its op and the
    bytes of the arrays it creates; None for a function the planner inserted
    (`Function.repeats`), which the step itself does not run, and for a small one
    (NOTE [Small ops off the record], rule 3). `sizes`: each array's bytes, where not
    the trace's (a step that ran its plan on smaller tensors: `Replayer.shape`)."""
    sizes = [a.nbytes for a in trace.arrays] if sizes is None else sizes
    return [None if f.repeats is not None or small else
            (f.op, sum(sizes[a.array] for a in f.accesses if a.kind == "create"))
            for f, small in zip(trace.functions, small_functions(trace, sizes))]


def envelope(old, new, grown=None):
    """Rule 10: the trace `new` with each array as large as the largest of the two and
    of `grown` ({array id: bytes}, the step that outgrew `old`), held as long as the
    later of the two (`freed_after`), and each function as long as the longer, where
    `old` (a recorded trace) has the same functions on the same arrays; else None.
    Where a storage dies can differ between two steps of the same ops: a buffer a
    collective's thread lets go of when its work completes (FSDP2's reduce-scatter input
    under gloo: after function 523 in one recording, 527 in the next, helper-92), so no
    growth took, and the plan of that family never grew again. Held the longer, the
    plan reserves it for both."""
    if len(old.functions) != len(new.functions) or len(old.arrays) != len(new.arrays):
        return None
    if any(f.op != g.op or f.accesses != g.accesses or f.split != g.split or f.peer != g.peer
           for f, g in zip(old.functions, new.functions)):
        return None
    if any((a.kind, a.category, a.dtype, a.device, a.origin, a.first_use, a.last_use,
            a.existed_before) != (b.kind, b.category, b.dtype, b.device, b.origin,
                                  b.first_use, b.last_use, b.existed_before)
           for a, b in zip(old.arrays, new.arrays)):
        return None
    grown = grown or {}
    arrays = tuple(_larger(b, max(a.nbytes, grown.get(b.id, 0)),
                           _later(a.freed_after, b.freed_after))
                   for a, b in zip(old.arrays, new.arrays))
    functions = tuple(dataclasses.replace(
        g, duration_s=max(f.duration_s, g.duration_s), flops=max(f.flops, g.flops),
        bytes_touched=max(f.bytes_touched, g.bytes_touched),
        host_s=max(f.host_s, g.host_s), host_cpu_s=max(f.host_cpu_s, g.host_cpu_s),
        workspace_bytes=max(f.workspace_bytes, g.workspace_bytes))
        for f, g in zip(old.functions, new.functions))
    return dataclasses.replace(new, functions=functions, arrays=arrays)


# Rule 10: an array that outgrew its plan is planned this share of its largest size
# larger than that (1/GROWTH_MARGIN): `with_margin`.
GROWTH_MARGIN = 8


def with_margin(grown, old, new, sizes=None):
    """Rule 10: the envelope `grown` of the records `old` and `new` (and of `sizes`, the
    step that outgrew `old`) with each array that outgrew `old` in `new` or `sizes`
    planned 1/GROWTH_MARGIN larger than its largest; None where none did. Sizes that follow
    the data (the tokens routed to each of several experts, `nonzero`'s output) each pass
    their largest so far on many steps for a long while, and each time a recording grew
    the plan to just that (helper-190: tiny Mixtral with eager experts, 16 recordings in
    40 iterations); with room above it, fewer steps pass it (10 recordings). Small arrays
    (SMALL_OP_BYTES at most) grow to SMALL_OP_BYTES at most: their ops stay small (rule
    1 of NOTE [Small ops off the record])."""
    if grown is None:
        return None
    sizes = sizes or {}
    arrays, padded = [], False
    for a, b, g in zip(old.arrays, new.arrays, grown.arrays):
        if max(b.nbytes, sizes.get(b.id, 0)) > a.nbytes:
            nbytes = g.nbytes + g.nbytes // GROWTH_MARGIN
            if g.nbytes <= SMALL_OP_BYTES:
                nbytes = min(nbytes, SMALL_OP_BYTES)
            if nbytes > g.nbytes:
                g, padded = dataclasses.replace(g, nbytes=nbytes), True
        arrays.append(g)
    return dataclasses.replace(grown, arrays=tuple(arrays)) if padded else None


def _later(a, b):
    """The later of two `freed_after` points (None: held past the step's end)."""
    return None if a is None or b is None else max(a, b)


def _larger(array, nbytes, freed_after):
    """`array` at least `nbytes` large, freed after `freed_after` (`envelope`)."""
    if array.nbytes >= nbytes and array.freed_after == freed_after:
        return array
    return dataclasses.replace(array, nbytes=max(array.nbytes, nbytes), freed_after=freed_after)


def grown_aside(old, sizes, new):
    """Rule 10 for a recording `new` of the step a plan's record `old` is, small ops
    aside (one of the two logged a `loss.item()` the other did not: another family):
    `new` with each array as large as the function it pairs with in `old` has it, or
    the step that outgrew `old` made or read it (`sizes`, {array id: bytes}), its
    functions and `old`'s paired one for one, small ones aside, as `sizes_made` pairs
    the ops a step ran on demand; else None (another step)."""
    grown = [max(a.nbytes, sizes.get(a.id, 0)) for a in old.arrays]
    ran = [Ran(f.op, tuple(grown[a.array] for a in f.accesses if a.kind == "create"),
               tuple(grown[a.array] for a in f.accesses if a.kind != "create"), small)
           for f, small in zip(old.functions, small_functions(old, grown)) if f.repeats is None]
    larger = sizes_made(new, function_keys(new), [i for i, f in enumerate(new.functions)
                                                  if f.repeats is None], ran)
    return None if larger is None else envelope(new, new, larger)


class Ran(NamedTuple):
    """An op a step ran on demand after it left its plan, for rule 10 (`sizes_after`)."""
    op: str
    made: tuple                 # the bytes of each storage it made
    read: tuple | None          # those of each distinct storage it read; None: not known
    small: bool                 # run small (NOTE [Small ops off the record]): pairs with none


def sizes_after(trace, keys, k, made) -> dict | None:
    """Rule 10: {array id: bytes} of the arrays that the functions of `trace` from k to
    its end make or read, as a step that left the plan at k ran them on demand (`made`:
    a `Ran` for every op it ran from there), where those ops are the
    plan's functions one for one, small ones aside (`sizes_made`): the same names, and
    as many storages made where the function is not small (`torch.tensor(0.5)` is made
    outside any op, and on demand its `lift_fresh` makes nothing); else None: the step
    was of another shape, not a larger one.

    What a function reads counts too (where it read as many storages as the function
    has arrays not created there, the recorder's order: its inputs' storages, first
    seen first): an input read first after k (the labels, read by the loss; a later
    micro-batch's mask) grew with the step, and a plan grown without it deviated at
    its read the next time, and was recorded again (helper-85: Trainer with gradient
    accumulation of 4 recorded 7 times in the last half of its run)."""
    at = [i for i in range(k, len(trace.functions)) if trace.functions[i].repeats is None]
    return sizes_made(trace, keys, at, made)


def sizes_made(trace, keys, at, made) -> dict | None:
    """`sizes_after` for the functions `at` of `trace`, which ran as `made` (a `Ran` each)
    has them. Small ops off the record (NOTE [Small ops off the record]) pair with
    nothing: a small function the step did not run (a `loss.item()` the recorded step
    logged) is passed over, as is a small op it ran that the record does not have there
    (helper-88: one `.item()` in the recorded step, and no step larger than it ever
    outgrew the plan). As the replayer matches (rule 4
    there, `Replayer._skip_small`), an op that is not small passes small functions for
    one of its name that is not small, and a function that is not small passes small
    ops for one of its name that is not small, before either pairs with a small one of
    its name: paired at once, a large op took a small function of its name that the
    step did not run, or a small op the function of its name that a large op ran
    later, and the scalars grew, the large array not (helper-89's `sizes_made_g.py`).
    Where the ops then do not pair one for one, they pair as they come: a large op
    with the small function of its name it stands at (the same op on larger tensors,
    `Replayer._small_grew`: position ids of a longer sequence), though a large one of
    its name comes later. The first pass fails where a large function pairs with an
    op that made less than it recorded (a grown small function's op taken by a large
    function of its name: helper-93), and the ops pair as they come; where that fails
    too, the first pass is taken without that rule (a step smaller in one op and
    larger in a later one: helper-94)."""
    at = list(at)
    ops_on = _next_large([(r.op, r.small) for r in made])      # from each op on
    fns_on = _next_large([(trace.functions[i].op, keys[i] is None) for i in at])
    for past_small, sized in ((True, True), (False, False), (True, False)):
        sizes = _sizes_made(trace, keys, at, made, (ops_on, fns_on), past_small, sized)
        if sizes is not None:
            return sizes
    return None


def _sizes_made(trace, keys, at, made, ahead, past_small, sized) -> dict | None:
    """`sizes_made`, small ops and functions passed for large ones of their name where
    `past_small` (`ahead`: `_next_large` of the ops and of the functions), failing where
    `sized` and a large function pairs with an op that made less than the function
    recorded."""
    ops_on, fns_on = ahead
    sizes, j = {}, 0
    for pos, i in enumerate(at):
        fn = trace.functions[i]
        while j < len(made) and made[j].small and (made[j].op != fn.op or (
                past_small and keys[i] is not None and ops_on[j + 1] == fn.op)):
            j += 1
        if j == len(made) or made[j].op != fn.op or (
                past_small and keys[i] is None and not made[j].small
                and fns_on[pos + 1] == fn.op):
            if keys[i] is None:
                continue
            return None
        ran = made[j]
        j += 1
        if sized and keys[i] is not None and sum(ran.made) < keys[i][1]:
            return None
        created = [acc.array for acc in fn.accesses if acc.kind == "create"]
        if len(ran.made) == len(created):
            sizes.update((a, n) for a, n in zip(created, ran.made) if n > trace.arrays[a].nbytes)
        elif keys[i] is not None:
            return None
        used = [acc.array for acc in fn.accesses if acc.kind != "create"]
        if ran.read is not None and len(ran.read) == len(used):
            for a, n in zip(used, ran.read):
                if n > max(trace.arrays[a].nbytes, sizes.get(a, 0)):
                    sizes[a] = n
    if any(not ran.small for ran in made[j:]):
        return None
    return sizes


def _next_large(items) -> list:
    """Per index k of `items` ((op name, small) each), and one past the end: the name of
    the first item from k on that is not small (None: none), so that `_sizes_made`
    looks past small ones in one step (a rescan each time was quadratic in a run of
    small ones: helper-93)."""
    out = [None] * (len(items) + 1)
    for k in range(len(items) - 1, -1, -1):
        name, small = items[k]
        out[k] = out[k + 1] if small else name
    return out


def _last_copies(fns) -> set:
    """The indices of the functions that make the last copy of a recomputed array."""
    last: dict = {}
    for i, f in enumerate(fns):
        if f.repeats is not None and any(a.kind == "create" for a in f.accesses):
            last[f.repeats] = i
    return set(last.values())


def _same_arrays(ran, fns, expected, nbytes, arrays, k, mine_last, exact) -> dict | None:
    """Rule 9: whether functions `fns[:k]` of another plan touch the arrays `expected` (of
    `nbytes` as the step made them) that the step's functions `ran[:k]` touched, as
    {id in the step's plan: id in the other}, else None; each of the other plan's
    arrays of the same size (`exact`) or no smaller (rule 10), of any size where `exact`
    is None (`Plans.outgrown_by`). Ids are numbered by
    first access, so they agree, but for the arrays a repeat remakes: a plan numbers
    those after all of its step's arrays, so two shapes with different numbers of
    arrays number them apart; the repeats, the same in both (the caller checks),
    pair them, where each copy is a temporary in both or the last copy in both (NOTE
    [Temporaries] in plan/recompute.py: a temporary is discarded again and its array
    remade later, the last copy stays; helper-63 saw a temporary taken for a last
    copy pass the budget)."""
    their_last = _last_copies(fns)        # `mine_last`: `_last_copies(ran)`
    ids: dict = {}
    for i in range(k):
        if ran[i].repeats is not None:
            made = [a.array for a in ran[i].accesses if a.kind == "create"]
            theirs = [a.array for a in fns[i].accesses if a.kind == "create"]
            if len(made) != len(theirs) or (i in mine_last) != (i in their_last):
                return None
            ids.update(zip(made, theirs))
        mine = [ids.get(a, a) for a in expected[i]]
        if mine != list(fns[i].arrays()) or exact is not None and any(
                arrays[b].nbytes != nbytes[a] if exact else arrays[b].nbytes < nbytes[a]
                for a, b in zip(expected[i], mine)):
            return None
    return {a: ids.get(a, a) for arrays_of in expected for a in arrays_of}


def shape_of(keys) -> int:
    """The shape of a step whose functions have `keys` (None: inserted, skipped)."""
    return hash(tuple(k for k in keys if k is not None))


def family_of(ops) -> int:
    """The family of a step that ran `ops` (their names, in order; rule 2): its shape
    without the sizes. Small ops count (which ops are small depends on the sizes: a
    per-token loss of 8 x 16 floats is one, of 8 x 64 not), functions the planner
    inserted do not."""
    return hash(tuple(ops))


def recorded_ops(trace) -> list:
    """The ops of `trace`'s functions that a step runs: those the planner inserted
    (`Function.repeats`) left out."""
    return [f.op for f in trace.functions if f.repeats is None]


def predict(history, max_period: int | None = None, repeats: int = 1) -> tuple[int | None, int]:
    """(The shape the next iteration most likely has, the period that predicts it or 0).

    A period p holds for the last `run` shapes that each equal the one p before; it
    counts once they repeat at least one whole period (run >= p: one shape seen once,
    an epoch's short batch, is no period 2 of the shapes around it), or `repeats`
    whole periods. The period held longest wins, the shortest among equals: a sequence
    that repeats with period p holds with 2p for p fewer shapes."""
    max_period = MAX_PERIOD if max_period is None else max_period
    n = len(history)
    if n == 0:
        return None, 0
    best, longest = 0, 0
    for p in range(1, min(max_period, n - 1) + 1):
        run = 0
        while run < n - p and history[n - 1 - run] == history[n - 1 - run - p]:
            run += 1
        if run >= repeats * p and run > longest:
            best, longest = p, run
    if best:
        return history[n - best], best
    return history[-1], 0


@dataclasses.dataclass(eq=False)
class Plan:
    """A schedule for one shape of step, with what replaying it needs."""
    shape: int
    trace: object               # as rewritten with its repeats (plan/recompute.py)
    schedule: object
    keys: list                  # function_keys(trace)
    between: tuple              # Schedule.boundary: the bytes it moves between iterations
    in_core_peak: int
    persistent: frozenset       # ids of the arrays that are state kept across steps
    started_from: dict          # {array id: entry}: the state it started from last time
    held_peak: int = 0          # its peak as plain PyTorch held it (Report.held_peak)
    held_beside: int = 0        # bytes kept by collectives beside the step, planned for
    held_in_step: frozenset = frozenset()   # entries kept by collectives the step touches
    recorded: object = None     # the trace as recorded (or its envelope): rule 10
    grows: bool = True          # rule 10: False where the recording after it outgrew its
                                # plan could not grow that plan: no recording again
    made_state: bool = False    # its recording made optimizer state (rule 3)
    family: int | None = None   # family_of(recorded_ops(trace)), or that of the plan a
                                # growth recording grew (rule 10, `grown_aside`): rule 2


class Seen(NamedTuple):
    """An iteration in `Plans.history`: its shape and its family (rule 2)."""
    shape: object
    family: object


@dataclasses.dataclass
class Ending:
    """How an iteration that ran its plan (or its recording) to the end left the
    arrays: {array id: entry} of those alive, in the trace of its shape."""
    shape: int
    entries: dict


class Plans:
    """The plans of the shapes seen (at most MAX_PLANS), the shapes of the last
    iterations, and which arrays a shape starts from after another (NOTE [Step shapes])."""

    def __init__(self):
        self._plans: collections.OrderedDict[int, Plan] = collections.OrderedDict()
        self.history: collections.deque[Seen] = collections.deque(maxlen=2 * MAX_PERIOD)
        self._follows: dict[tuple[int, int], dict[int, int]] = {}
        self.times: collections.Counter = collections.Counter()    # iterations per shape
        self.warm_up: set = set()    # shapes of recordings not planned (lazy optimizer state)
        self.took_one_off = False    # rule 3's exception, taken once
        self.unplannable: set = set()    # rule 11: shapes that run op by op, never planned
        self.not_this: frozenset = frozenset()   # rule 9: families a firm period rules out
        self.asked = None    # the family `next` asked a recording of (None: a plan, or none)
        # Rule 12: the iterations seen, the last three a shape came at, and the Seen due
        # at a later one.
        self._count = 0
        self._at: dict = {}
        self._due: dict = {}

    def __len__(self) -> int:
        return len(self._plans)

    def __contains__(self, shape: int) -> bool:
        return shape in self._plans

    def has_family(self, family) -> bool:
        """Whether a plan kept is of `family` (rule 2): a step of it that left another
        plan was guessed wrong, which the periods learn."""
        return any(plan.family == family for plan in self._plans.values())

    def add(self, plan: Plan) -> None:
        self._plans.pop(plan.shape, None)
        self._plans[plan.shape] = plan
        while len(self._plans) > MAX_PLANS:                     # rule 6
            self.drop(next(iter(self._plans)))

    def drop(self, shape: int) -> None:
        """Forget the plan of `shape` (rule 5), and what was learnt about it."""
        self._plans.pop(shape, None)
        for pair in [p for p in self._follows if shape in p]:
            del self._follows[pair]

    def may_follow(self) -> bool:
        """Whether a replay may only follow the ops (rule 4): while every plan kept moves
        nothing and the last iterations all had one shape."""
        return (not any(p.schedule.bytes_moved for p in self._plans.values())
                and len(set(self.shapes()) - self.warm_up) <= 1)

    def shapes(self) -> list:
        """The shapes of the last iterations, oldest first."""
        return [seen.shape for seen in self.history]

    def families_hold(self) -> bool:
        """Whether a period holds for the families of the last iterations (rule 2)."""
        return predict([seen.family for seen in self.history])[1] > 0

    def state_of_others(self, plan: Plan) -> frozenset:
        """The entries other plans started from (rule 7)."""
        return frozenset(e for p in self._plans.values() if p is not plan
                         for e in p.started_from.values())

    def seen(self, shape, family=None) -> None:
        """An iteration ran a step of `shape` and `family` (rule 2; None: a family of
        its own)."""
        seen = Seen(shape, shape if family is None else family)
        self.history.append(seen)
        if shape not in self.times and len(self.times) >= _MAX_COUNTED:
            self.times.clear()             # shapes that follow the data: a new one each time
            self._at.clear()
        self.times[shape] += 1
        self._count += 1
        at = self._at[shape] = (*self._at.get(shape, ())[-2:], self._count)
        if len(at) == 3 and at[2] - at[1] == at[1] - at[0] > MAX_PERIOD:      # rule 12
            self._due[at[2] + at[2] - at[1]] = seen
        self._due.pop(self._count, None)    # passed, also where `next` was not asked

    def next(self, growing=(), now=()) -> Plan | None:
        """The plan the next iteration replays, or None: record it (rules 2, 3 and
        10). `growing`: the families of plans a step outgrew (rule 10), recorded when a
        period predicts them; `now`: those of the step just run, recorded when predicted
        at all (the last family predicts where no period holds)."""
        self.asked = None
        seen, period = predict(list(self.history))
        due = self._due.pop(self._count + 1, None)                     # rule 12
        if (due is not None and due.shape not in self.unplannable
                and (due.shape in self._plans or len(self._plans) < MAX_PLANS)):
            plan = self._plans.get(due.shape)
            if plan is None:
                self.asked = due.family
            else:
                self._plans.move_to_end(due.shape)
            return plan
        if seen is None or seen.shape in self.unplannable:
            return None
        families = [s.family for s in self.history]
        family, family_period = predict(families)
        # Firm where it held for three periods at least: less by chance, as shapes that
        # come by a coin toss hold a period 1 or 2 now and then.
        firm = predict(families, repeats=2) == (family, family_period) != (family, 0)
        # Rule 9: the other families of a firm period are not this step's.
        self.not_this = frozenset(families[-family_period:]) - {family} if firm else frozenset()
        if family_period and family in growing or family in now:
            self.asked = family
            return None
        # Rule 2: the ops repeat, their sizes vary (no period for the shapes, or one that
        # foretells another family: a period 1 of two middle micro-batches in a row).
        by_family = family_period and (not period or seen.family != family)
        plan = self._largest(family) if by_family else None
        if by_family and plan is None and (
                not firm or len(set(families[-family_period:])) > MAX_PLANS):
            by_family = False       # no plan of its family, and none is recorded: rule 3
        if not by_family:
            plan = self._plans.get(seen.shape)
        history = self.shapes()
        if plan is None and not by_family and (
                not period and history.count(seen.shape) == 1
                or period and len(set(history[-period:])) > MAX_PLANS):
            plan = next((self._plans[s] for s in reversed(history) if s in self._plans),
                        None)
            if (plan is not None and plan.made_state and len(self._plans) == 1
                    and self.times[plan.shape] == 1 and not self.warm_up
                    and not self.took_one_off):
                self.took_one_off = True
                plan = None            # rule 3: the recorded step was the one-off
        if plan is not None:
            self._plans.move_to_end(plan.shape)
        else:
            self.asked = family if by_family else seen.family
        return plan

    def _largest(self, family) -> Plan | None:
        """Rule 2: the plan of `family` for the largest step (its in-core peak), the
        most recently used among equals; None if it has none."""
        mine = [p for p in reversed(self._plans.values()) if p.family == family]
        return max(mine, key=lambda p: p.in_core_peak, default=None)

    def continuing(self, current: Plan, keys: list, expected: list, nbytes: list,
                   name: str | None, not_of=frozenset(), fits: tuple | None = None,
                   accept=None) -> tuple[Plan, dict] | None:
        """Rule 9: the most recently used plan but `current` whose record begins with
        functions of the ops of these `keys` on these arrays (`expected`, of
        `nbytes` as the step made them) and goes on with an op named `name`
        (past small functions; `name` None: ends there), with the same functions
        inserted to recompute among the first k and none before that op. (What
        it recomputes later that one of those first functions made, with no call
        kept, is written out and read back instead.) A plan whose arrays there
        have the step's sizes comes first; else one whose are no smaller (rule
        10). The plan found becomes the most recently used; with it, {array id
        here: its id there} for the arrays of those functions (`_same_arrays`).
        `not_of`: families whose plans are passed over (rule 9). `fits`: (slot, bytes) of
        an array op `name` reads, larger than `current` has it, that the plan must have
        no smaller: else the step left it there too, and that plan grew beside the one
        the step left (helper-85: at function 0, where no array is compared yet, a first
        micro-batch's smaller plan was taken up; two or three plans a family). `accept`:
        (plan, j, ids) -> whether op `name` at that plan's function j reads what the
        step's does (`_Iteration._reads`)."""
        k, ran = len(keys), current.trace.functions
        mine_last = _last_copies(ran)
        for exact in (True, False):
            found = self._continuing(current, k, ran, mine_last, keys, expected, nbytes, name,
                                     exact, not_of, fits, accept)
            if found is not None:
                self._plans.move_to_end(found[0].shape)
                return found
        return None

    def outgrown_by(self, current: Plan, keys: list, expected: list, nbytes: list,
                    name: str, accept=None) -> tuple[Plan, dict] | None:
        """Rule 9 with rule 10: where `continuing` found no plan, the most recently used one
        it would have taken up, sizes aside (so some array of the step is larger there),
        with {array id here: its id there}; None where there is none. The step left its
        plan for that one's ops (a rare branch: a step on the plan of the other ops, whose
        plan it could only ever be taken up partway), and where it then runs that plan's
        functions to its end on demand, it outgrew that plan: the plan grows
        (`_Iteration._others`).
        Before, such a plan kept the size of its first recording, as only a replay of it
        that outgrew it grew it, and a branch taken by a coin toss is never predicted:
        every step of the branch larger than that recording deviated (helper-98's trial,
        helper-100's fix)."""
        k, ran = len(keys), current.trace.functions
        return self._continuing(current, k, ran, _last_copies(ran), keys, expected, nbytes,
                                name, None, frozenset(), None, accept)

    def _continuing(self, current, k, ran, mine_last, keys, expected, nbytes, name, exact,
                    not_of, fits, accept):
        """`continuing` for plans whose arrays have the step's sizes (`exact`) or are no
        smaller (of any size: `exact` None), the most recently used first. Their first k
        functions are the same ops; one the step's plan has small (NOTE [Small ops off the
        record]) is small in theirs too, where one small in theirs only is compared by
        its arrays' sizes (`_same_arrays`): which functions are small depends on the
        sizes recorded (the labels' slice of a batch of 2 x 40 tokens, 640 bytes, is
        small, of 8 x 56 not), and a branch's plan recorded on a smaller batch was never
        taken up from a larger plan, though its arrays were no smaller than the step's
        (helper-98's trial, helper-100's fix). (The other way round, the step may have
        passed that function: a small op it did not run.)"""
        for plan in reversed(self._plans.values()):
            fns = plan.trace.functions
            if (plan is current or len(fns) < k or plan.family in not_of
                    or any(f.op != g.op or key is None and theirs is not None
                           for f, g, key, theirs in zip(ran[:k], fns, keys, plan.keys))):
                continue
            j = k
            while (j < len(fns) and plan.keys[j] is None and fns[j].repeats is None
                   and fns[j].op != name):
                j += 1                                  # small functions (rule 4a)
            goes_on = j == len(fns) if name is None else (
                j < len(fns) and fns[j].op == name and fns[j].repeats is None)
            if not goes_on or any(fns[i].repeats != ran[i].repeats for i in range(k)):
                continue
            if fits is not None and (fits[0] >= len(fns[j].accesses) or plan.trace.arrays[
                    fns[j].accesses[fits[0]].array].nbytes < fits[1]):
                continue
            ids = _same_arrays(ran, fns, expected, nbytes, plan.trace.arrays, k, mine_last, exact)
            if ids is not None and (accept is None or name is None or accept(plan, j, ids)):
                return plan, ids
        return None

    def learn(self, ending: Ending | None, plan: Plan, started_from: dict) -> None:
        """`plan` ran to its end after `ending`, starting from `started_from` ({array id:
        entry} of its persistent arrays): note which of the arrays `ending` left it
        started from (rule 4)."""
        plan.started_from = started_from
        if ending is None:
            return
        aid_of = {entry: aid for aid, entry in ending.entries.items()}
        self._follows[ending.shape, plan.shape] = {
            b: aid_of[e] for b, e in started_from.items() if e in aid_of}

    def carried(self, ending: Ending | None, plan: Plan, live) -> dict:
        """{array id: entry} that `plan` starts from after `ending` (rule 4); `live(entry)`
        says whether an entry still stands for a living storage. What the shape before
        never touched (the optimizer's state, in an iteration that does not step) comes
        from where the plan started last time."""
        out = {}
        if ending is not None:
            follows = self._follows.get((ending.shape, plan.shape))
            if follows is not None:
                out = {b: e for b, a in follows.items()
                       if (e := ending.entries.get(a)) is not None and live(e)}
            elif ending.shape == plan.shape:
                out = {a: e for a, e in ending.entries.items()
                       if a in plan.persistent and live(e)}
        taken = set(out.values())
        for a, e in plan.started_from.items():
            if a not in out and e not in taken and live(e):
                out[a] = e
        return out
