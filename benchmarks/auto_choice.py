"""Which policy `auto` picks, and what the others would have given: simulated iteration
time per screened configuration, auto's choice and its planning time.

    .venv/bin/python benchmarks/auto_choice.py [--fractions 0.75,0.5,0.25] [--recompute] [--traces DIR]
    .venv/bin/python benchmarks/auto_choice.py --measure 2 --only resnet50-64 --fractions 0.25

The workloads and the recording are window_sweep.py's (CPU, after one warm-up step, so
durations are measured); budgets are fractions of the in-core peak, less what OutOfCore
pins (planned_budget). Cells: the simulated iteration on `cpu-disk` as a multiple of the
in-core step; the configuration auto chose is marked with *. "plan" is auto's wall
time (all its screening included). The table in docs/planning.md ("Which policy auto
picks") was made with this script. With --recompute it times OutOfCore's planning with
its defaults instead (recompute.choose; docs/planning.md, "Recompute").

With --measure R it runs instead of simulating: per workload (--only: names like
resnet50-64 or gpt2-256, the model and its image size or sequence length) and budget,
plain PyTorch, OutOfCore with each screened configuration alone (plan_options
{"screen": [i]}) and OutOfCore as users run it (auto, recompute included), each in a
fresh process, R rounds in turn; cells are the median replayed step as a multiple of
plain PyTorch's, with what the same process simulated beside it (the schedule it ran,
on `cpu-disk` with the trace's own durations). So it shows whether the configuration
auto picks by simulated time is the one that runs fastest here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import outcore
from outcore.plan.policies.auto import SCREEN
from outcore.trace import io as trace_io
from outcore.run.ooc import planned_budget
from window_sweep import WORKLOADS, record


def _label(name: str, options: dict) -> str:
    """A column's name: the policy and what its configuration sets."""
    if "k" in options:
        return f"{name} k={options['k']}"
    if "window_factor" in options:
        return f"{name} {options['window_factor']}x budget"
    parts = [name]
    if "wait_order" in options:
        parts.append(f"{options['wait_order']} order")
    if options.get("outputs") == "late":
        parts.append("outputs late")
    return " ".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.75,0.5,0.25")
    parser.add_argument("--traces", metavar="DIR",
                        help="load the recorded traces from DIR, recording and saving there "
                             "those it lacks: compare two commits on the same traces")
    parser.add_argument("--recompute", action="store_true",
                        help="instead of the table: how long OutOfCore's planning takes with "
                             "its defaults (recompute.choose: auto, recompute='auto'), twice "
                             "per workload and budget")
    parser.add_argument("--measure", type=int, metavar="ROUNDS",
                        help="run each configuration in fresh processes, ROUNDS rounds, "
                             "instead of simulating only (module docstring)")
    parser.add_argument("--only", help="with --measure: the workloads, e.g. resnet50-64,gpt2-256")
    parser.add_argument("--child", help=argparse.SUPPRESS)       # one measured process
    args = parser.parse_args()
    if args.child:
        return print(json.dumps(_measure_one(json.loads(args.child))))
    fractions = [float(f) for f in args.fractions.split(",")]
    if args.recompute:
        return planning_times(fractions, args.traces)
    if args.measure:
        return measured(fractions, args.measure, args.only, args.traces)
    print("| workload | budget / peak | " + " | ".join(_label(n, o) for n, o in SCREEN) +
          " | near ties, end_keep_share 1.0 | auto's gain over adaptive | plan |")
    print("|---|---|" + "---|" * (len(SCREEN) + 1) + "---|---|")
    for row, trace, budget in cases(fractions, args.traces):
        try:
            start = time.perf_counter()
            s = outcore.plan(trace, budget)
            took = time.perf_counter() - start
        except outcore.InfeasibleBudget:
            print(f"| {row} | infeasible |")
            continue
        if s.options.get("in_core"):
            print(f"| {row} | fits in-core |")
            continue
        in_core = outcore.simulate(trace, s).in_core_time_s
        times = [seconds for _, _, seconds in s.options["screened"]]
        if times == [None]:                       # one configuration alone: not simulated
            times = [outcore.simulate(trace, s).iteration_time_s]
        chosen = times.index(min(times))          # auto's rule: fastest, ties earliest
        cells = ["not screened"] * len(SCREEN)     # auto screens fewer on long traces
        for i, seconds in enumerate(times[:len(SCREEN)]):
            cells[i] = f"{seconds / in_core:.3f}{'*' if i == chosen else ''}"
        # auto's NOTE [Shares at the end]: the best of the near ties tried again, if any
        again = times[len(SCREEN):]
        best = min(range(len(again)), key=again.__getitem__, default=None)
        cells.append("not tried" if best is None else f"{again[best] / in_core:.3f}"
                     f"{'*' if len(SCREEN) + best == chosen else ''}")
        gain = times[0] / times[chosen]
        print(f"| {row} | " + " | ".join(cells) + f" | {gain:.3f}x | {took:.2f} s |")


def cases(fractions, traces=None):
    """(the row's first two cells, trace, budget) per workload and fraction: budgets are
    fractions of the in-core peak, less what OutOfCore pins. `traces`: a folder that
    keeps the recorded traces (loaded if there, recorded and saved if not)."""
    for name, shape in WORKLOADS:
        trace = _trace(name, shape, traces)
        peak = trace.peak(actual=True)[0]
        shape_s = " ".join(f"{k}={v}" for k, v in shape.items())
        for frac in fractions:
            yield f"{name} {shape_s} | {frac}", trace, planned_budget(trace, int(peak * frac))


def _trace(name, shape, folder):
    if folder is None:
        return record(name, shape)
    path = Path(folder) / f"{name}-{'-'.join(f'{k}{v}' for k, v in shape.items())}.json"
    if path.exists():
        return trace_io.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    trace = record(name, shape)
    trace_io.save(trace, path)
    return trace


def _name(name: str, shape: dict) -> str:
    """A workload's name for --only: the model and its image size or sequence length."""
    return f"{name}-{shape.get('image_size', shape.get('seq_len'))}"


def measured(fractions, rounds: int, only: str | None, traces=None) -> None:
    """The --measure table: per workload and budget, plain PyTorch, each configuration of
    SCREEN alone and auto, in fresh processes, `rounds` rounds in turn (module docstring)."""
    wanted = None if only is None else set(only.split(","))
    runs = [("plain", None)] + [(_label(n, o), [i]) for i, (n, o) in enumerate(SCREEN)] \
        + [("auto (as users run it)", "auto")]
    print("| workload | budget / peak | " + " | ".join(label for label, _ in runs[1:]) +
          " | plain step (s) |")
    print("|---|---|" + "---|" * len(runs))
    for name, shape in WORKLOADS:
        if wanted is not None and _name(name, shape) not in wanted:
            continue
        peak = _trace(name, shape, traces).peak(actual=True)[0]
        for frac in fractions:
            results = {label: [] for label, _ in runs}
            for _ in range(rounds):
                for label, screen in runs:
                    results[label].append(_child(dict(model=name, shape=shape, screen=screen,
                                                      budget=int(peak * frac))))
            plain = statistics.median(r["step"] for r in results["plain"])
            cells = []
            for label, _ in runs[1:]:
                step = statistics.median(r["step"] for r in results[label])
                sim = statistics.median(r["simulated"] for r in results[label])
                chose = results[label][0].get("chose", "")
                cells.append(f"{step / plain:.2f} (sim {sim / plain:.2f}){chose}")
            shape_s = " ".join(f"{k}={v}" for k, v in shape.items())
            print(f"| {name} {shape_s} | {frac} | " + " | ".join(cells) + f" | {plain:.2f} |")


def _child(cfg: dict) -> dict:
    """One measured process (`_measure_one`), plain PyTorch in the environment a user
    without outcore has (NOTE [Huge pages by default] rule 3)."""
    from outcore.memory.pages import plain_environment
    env = plain_environment() if cfg["screen"] is None else None
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], env=env,
                         capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent).stdout
    return json.loads(out.splitlines()[-1])


def _measure_one(cfg: dict) -> dict:
    """The median step of one process: plain PyTorch's after a warm-up step, or
    OutOfCore's replayed steps with the screened configurations `cfg["screen"]`
    ("auto": OutOfCore's defaults), and what its schedule simulates to."""
    from outcore.workloads import build
    from outcore.simulate import simulate
    w = build(cfg["model"], **cfg["shape"])
    times = []
    if cfg["screen"] is None:
        for _ in range(6):
            start = time.perf_counter()
            w.step()
            times.append(time.perf_counter() - start)
        return {"step": statistics.median(times[1:])}
    options = {} if cfg["screen"] == "auto" else {"screen": cfg["screen"]}
    with outcore.OutOfCore(budget=cfg["budget"], plan_options=options) as ooc:
        for _ in range(9):
            start = time.perf_counter()
            with ooc.iteration():
                w.step()
            if ooc.report().iterations[-1].mode == "replay":
                times.append(time.perf_counter() - start)
        if not times:
            raise SystemExit("no iteration replayed a plan")
        simulated = simulate(ooc.trace, ooc.schedule, "cpu-disk").iteration_time_s
        options, remade = ooc.schedule.options, ooc.report().recomputed_arrays
    chose = ""
    if cfg["screen"] == "auto":      # what it chose, by the names of the other columns
        chose = f": {_label(options['chosen'], options)}" + (
            f", end_keep_share {options['end_keep_share']}" if "end_keep_share" in options
            else "") + (f", {remade} arrays recomputed" if remade else "")
    return {"step": statistics.median(times), "simulated": simulated, "chose": chose}


def planning_times(fractions, traces=None) -> None:
    """OutOfCore's planning with its defaults, timed: auto on cpu-disk with recompute
    "auto" (the trace as recorded, then each rewritten one)."""
    from outcore.plan import recompute
    print("| workload | budget / peak | recomputed | plan (s), two runs |")
    print("|---|---|---|---|")
    for row, trace, budget in cases(fractions, traces):
        took = []
        try:
            for _ in range(2):
                start = time.perf_counter()
                chosen, _, _ = recompute.choose(trace, budget, mode="auto", machine="cpu-disk")
                took.append(time.perf_counter() - start)
        except outcore.InfeasibleBudget:
            print(f"| {row} | infeasible |")
            continue
        print(f"| {row} | {len(chosen)} | " + ", ".join(f"{t:.2f}" for t in took) + " |")


if __name__ == "__main__":
    main()
