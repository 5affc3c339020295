"""`auto` (the default): the fastest of the window policies for this trace and budget, by
simulated time, so that a user never has to choose.

No window policy wins everywhere. Simulated on cpu-disk, an unlimited window was the
fastest or within 1% on CPU-recorded ResNet and GPT-2 steps, but on meta traces of
the same networks adaptive-belady, a window of 4 functions and the paper's 1.5 x budget
each came first at some budget, by up to 6%, and adaptive-belady on the v100-16gb model
by up to 3%; waiting in completion order (window.py) takes 5-9% less time than adaptive
on v100-16gb for ResNet-50 at batch 256-1024 and is within 1% of it above, and
reserving outputs late takes 2-23% less again there (docs/planning.md, "Which policy
auto picks", "Waiting in completion order", "Reserving outputs late"). So `auto`
plans the trace with each configuration of SCREEN as plan() would plan it by name (api._cycle: the step
starting with the state it ends with), simulates each schedule on `machine` (its
iteration time: the step and the state moved between two steps), and keeps the
fastest; ties go to the earlier configuration. The schedule's options name the choice
and list what each configuration simulated to.

Screening costs one planning per configuration, up to four plans of the trace each. To
keep planning near a second on long traces, configurations are screened in order only
while that work, counted in planned accesses (4 x the trace's accesses each), stays
within SCREEN_ACCESSES; the first is always planned. All seven fit up to 12,500
accesses (about 4,000 functions of a plain network: ResNet-50 has 2,180, GPT-2 small
3,429); a 20,000-function trace gets adaptive alone. Where one configuration is all
that is screened there is nothing to compare: it is not simulated (its seconds in
`screened` are None), which saves a simulation of the whole step (docs/planning.md,
"Measured", has the planning times). A plan with outputs reserved late
(window.py, NOTE [Reserving outputs late]) takes about 1.8 times as long as one without.
The choice depends only on the trace, the budget and the options, never on the clock.

NOTE [Shares at the end]: state kept resident after its last use for the next step
(edges.end_keep_set) may fill 3/4 of the budget beside what each later function needs;
the rest is room the swap-ins of the step's end and of the next forward find free. Where
the state is large against the budget, the whole budget can be faster: on GPT-2 at its
smallest feasible budget (465 MiB, CPU-recorded, cpu-disk) adaptive-belady with 1.0
simulates to 3.245 s a step against 3.389 s for the best with 3/4; on ResNet-50 64x64
at a quarter of its peak, 1.0 is 2.2% slower. Which share wins depends on the
configuration too (there adaptive-belady with 1.0 beat adaptive with 1.0, 3.351 s,
which was tied with it at 3/4). So after screening, the configurations within NEAR of
the fastest (the screen's near ties), fastest first, are planned once more with each
other share of END_KEEP_SHARES, where that share keeps a different set (the same set
plans the same schedule), within what is left of SCREEN_ACCESSES; the user's
`end_keep_share`, or `keep_state=False`, leaves the share alone. The option the
schedule's options name is the share chosen (absent: the default); recompute.choose
plans rewritten traces with it (CHANGELOG, 2026-12-06 fifth session, has the
figures).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import REGISTRY, register
from .edges import END_KEEP_SHARE, end_keep_set

# (policy, options): the configurations auto screens, in order of preference on a tie.
SCREEN = (("adaptive", {}), ("adaptive-belady", {}), ("fixed", {"k": 4}),
          ("adaptive", {"window_factor": 1.5}), ("adaptive", {"wait_order": "completion"}),
          ("adaptive", {"wait_order": "completion", "outputs": "late"}),
          ("adaptive", {"outputs": "late"}))
SCREEN_ACCESSES = 350_000
# The shares of the budget state kept at the step's end may fill (edges.end_keep_set)
# that the near ties of the screen are tried with (NOTE [Shares at the end]).
END_KEEP_SHARES = (END_KEEP_SHARE, 1.0)
NEAR = 0.02
PLANS_PER_CONFIGURATION = 4          # api.CYCLE_ROUNDS, then once more at most


@dataclass(frozen=True)
class _Planned:
    """What simulate() reads of a Schedule, from plan()'s lists and their accounting."""
    begin: list
    end: list
    resident_at_start: list
    resident_at_end: tuple
    bytes_in: int
    bytes_out: int
    peak_bytes: int


# The machine auto simulates when none is given: RAM over a local disk, with the trace's
# own durations, the only tier pair OutOfCore runs today.
DEFAULT_MACHINE = "cpu-disk"


@register("auto", {"machine", "screen"}, "the fastest of the window policies by simulated time",
          chooses=True)
def choose(trace, budget: int, options: dict, cycle):
    """plan()'s result for the configuration of SCREEN whose schedule simulates fastest,
    or a near tie of it with another share for state kept at the end (module docstring,
    NOTE [Shares at the end]). Option `screen`: indices into SCREEN, the configurations to try
    instead of all (recompute.choose plans a rewritten trace with the one auto chose for
    the trace as recorded, `configuration` in the options it returns)."""
    from ...errors import OutcoreError
    from ...simulate import machine as get_machine, simulate
    from .window import access_table

    keep_state = options.get("keep_state", True)
    m = get_machine(options.get("machine") or DEFAULT_MACHINE)
    indices = options.get("screen")
    if indices is None:
        indices = range(len(SCREEN))
    elif (not indices or not isinstance(indices, (list, tuple))
          or not all(isinstance(i, int) and 0 <= i < len(SCREEN) for i in indices)):
        raise OutcoreError(f"auto: screen must be a non-empty list of indices into "
                           f"auto.SCREEN (0-{len(SCREEN) - 1}), got {indices!r}")
    work = PLANS_PER_CONFIGURATION * len(access_table(trace)[0])
    count = max(1, min(len(indices), SCREEN_ACCESSES // max(work, 1)))    # the first always
    edge = {"keep_state": keep_state}
    if "end_keep_share" in options:          # the user's: every configuration plans with it
        edge["end_keep_share"] = options["end_keep_share"]
    screened, best = [], None

    def screen(i, name, extra):
        nonlocal best
        (begin, end, start), used, acc = cycle(REGISTRY[name], {**extra, **edge})
        seconds = None              # one configuration alone: nothing to compare it with
        if count > 1:
            seconds = simulate(trace, _Planned(begin, end, start, acc.resident_at_end, acc.bytes_in,
                                               acc.bytes_out, acc.peak_bytes), m).iteration_time_s
        screened.append([name, extra, seconds])
        if best is None or (seconds is not None and seconds < best[0]):
            best = (seconds, name, extra, (begin, end, start), used, acc, i)

    for i in list(indices)[:count]:
        name, extra = SCREEN[i]
        if "window_factor" in extra:
            extra = {"window": int(extra["window_factor"] * budget)}
        screen(i, name, extra)
    if count > 1 and keep_state and "end_keep_share" not in options:
        _other_shares(trace, budget, screened, best[0], indices[:count],
                      SCREEN_ACCESSES // max(work, 1) - count, screen)
    _, name, _, lists, used, acc, i = best
    return lists, {"chosen": name, **used, "machine": m.name, "screened": screened,
                   "configuration": i}, acc


def _other_shares(trace, budget, screened, fastest, indices, room, screen):
    """NOTE [Shares at the end]: the configurations within NEAR of the fastest, fastest
    first, once more with each other share of END_KEEP_SHARES that keeps a different set
    at the end (the same set plans the same schedule), while `room` more plans remain
    within SCREEN_ACCESSES."""
    kept = end_keep_set(trace, budget)
    shares = [s for s in END_KEEP_SHARES
              if s != END_KEEP_SHARE and end_keep_set(trace, budget, s) != kept]
    near = sorted((seconds, k) for k, (_, _, seconds) in enumerate(screened)
                  if seconds <= fastest * (1 + NEAR))
    for _, k in near:
        name, extra, _ = screened[k]
        for share in shares:
            if room <= 0:
                return
            screen(indices[k], name, {**extra, "end_keep_share": share})
            room -= 1
