"""Figures per run, as a markdown table, JSON and a PNG per experiment.

Per run: step time (median of the timed steps), samples/s, speed relative to in-core,
peak RSS (VmHWM of the run's own process), bytes read and written per step, time the
step stalled on I/O, the physical limit and the step's ratio to it, and for outcore the
simulator's prediction and its error.

Physical limit = max(compute, read / read speed, written / write speed, (read + written)
/ speed of both at once): compute is the in-core step at the same batch measured in the
same experiment; the speeds are `outcore bench disk`'s, measured at its start. It is the
run's own bound: no faster with these bytes. The cut limit (outcore runs) is the step's:
`outcore.simulate.physical_limit` on the same calibrated machine as the prediction, so
no schedule of the step under that budget is faster in the simulator's model (what
backward reads, forward wrote first; what does not fit beside a function leaves and
comes back)."""
from __future__ import annotations

import json
import os

MiB = 2 ** 20
# NOTE [Unsteady runs]: one run's timed steps, one config's repeats, or plain PyTorch
# and the predictions' compute run of one round (the same step, huge pages aside: they
# differed by at most 1.24x in docs/results.md's runs) that differ by more than this
# factor ran beside something else. A ratio to such a run misleads (helper-195: a tiny
# model's in-core baseline at 1.26 s a step against 0.012 s alone made outcore "16.8x
# faster"), so the tables say so below them, naming the runs and both figures.
UNSTEADY = 1.5


def rows(result: dict) -> list[dict]:
    disk = result["machine"]["disk"]
    compute = result.get("compute", {})
    reference = _reference_step(result)
    out = []
    for run in result["runs"]:
        cfg, r = run["config"], run["result"]
        row = {"variant": _variant(cfg),
               "policy": cfg.get("policy", "-") + _tags(cfg),
               "budget": cfg.get("budget"), "batch": cfg["batch"]}
        if "error" in r:
            row["error"] = r["error"].strip().splitlines()[-1] if r["error"].strip() else "failed"
            out.append(row)
            continue
        step = r["step_s"]
        row.update(step_s=step, samples_per_s=cfg["batch"] / step, peak_rss=r["peak_rss"],
                   peak_gpu=r.get("peak_gpu"),
                   read=r.get("read", 0), written=r.get("written", 0), stalled_s=r.get("stalled", 0.0),
                   page_faults=r.get("page_faults"))
        repeats = [t for t in r.get("step_s_repeats", []) if t is not None]
        if len(repeats) > 1:
            row["step_range"] = (min(repeats), max(repeats))
        if result["experiment"] == "curve" and cfg["batch"] in reference:
            row["vs_in_core"] = reference[cfg["batch"]] / step
        elif "base" in reference:           # samples/s against in-core's samples/s
            row["vs_in_core"] = row["samples_per_s"] * reference["base"]
        comp = compute.get(str(cfg["batch"]))
        if comp:
            limit = max(comp, row["read"] / (disk["read_GBps"] * 1e9), row["written"] / (disk["write_GBps"] * 1e9),
                        (row["read"] + row["written"]) / (disk["both_total_GBps"] * 1e9))
            row["limit_s"] = limit
            row["vs_limit"] = step / limit
        if "cut_limit_s" in r:
            row["cut_limit_s"] = r["cut_limit_s"]
            row["vs_cut_limit"] = step / r["cut_limit_s"]
        if "predicted_s" in r:
            row["predicted_s"] = r["predicted_s"]
            if "predicted_contention_s" in r:
                row["predicted_contention_s"] = r["predicted_contention_s"]
            row["prediction_error"] = r["predicted_s"] / step - 1
        for key in ("planned_in", "planned_out", "lower_bound", "overlap", "deviations"):
            if key in r:
                row[key] = r[key]
        out.append(row)
    return out


def unsteady(result: dict) -> list[str]:
    """Why each unsteady run is one (NOTE [Unsteady runs]): a line per run whose timed
    steps or repeats, or per batch whose plain and calibration runs, differ by more than
    UNSTEADY."""
    lines = []
    plain, calibration = {}, {}
    for run in result["runs"]:
        cfg, r = run["config"], run["result"]
        if "step_s" not in r:
            continue
        for what, times in (("timed steps", r.get("steps_s", [])),
                            ("repeats", [t for t in r.get("step_s_repeats", []) if t])):
            if len(times) > 1 and min(times) > 0 and max(times) > UNSTEADY * min(times):
                name = _variant(cfg)
                if cfg["variant"] == "outcore":
                    name += f" {cfg.get('policy')}{_tags(cfg)} at {_mib(cfg.get('budget'))} MiB"
                lines.append(f"{name}: its {what} took {min(times):.3f} to "
                             f"{max(times):.3f} s ({max(times) / min(times):.1f}x)")
        if cfg["variant"] == "in-core" and not cfg.get("role"):
            plain[cfg["batch"]] = r
        elif cfg.get("role") == "the predictions' compute":
            calibration[cfg["batch"]] = r
    for batch, r in plain.items():
        c = calibration.get(batch)
        if c is None:
            continue
        # Round by round where both ran in every round, else the reported runs.
        pairs = list(zip(r.get("step_s_repeats", []), c.get("step_s_repeats", []))) or [
            (r["step_s"], c["step_s"])]
        for n, (a, b) in enumerate(pairs):
            if a and b and max(a, b) > UNSTEADY * min(a, b):
                lines.append(f"batch {batch}: plain PyTorch took {a:.3f} s a step and the "
                             f"predictions' compute run (the same step with huge pages) "
                             f"{b:.3f} s" + (f" in round {n + 1}" if len(pairs) > 1 else ""))
    return lines


def _variant(cfg: dict) -> str:
    """A run's variant as the tables name it: with its role, where it has one."""
    return cfg["variant"] + (f" ({cfg['role']})" if cfg.get("role") else "")


def _tags(cfg: dict) -> str:
    """How an outcore run differs from the defaults, for its label."""
    tags = []
    memory = cfg.get("return_freed_memory", True)
    if memory is not True:
        tags.append("eager return" if memory == "eager" else "glibc defaults")
    thp = cfg.get("env", {}).get("THP_MEM_ALLOC_ENABLE")
    if thp is not None:
        tags.append("THP" if thp == "1" else "no THP")
    return f" ({', '.join(tags)})" if tags else ""


def _reference_step(result: dict) -> dict:
    """curve: samples/s relative to in-core at the same batch. batch: samples/s relative
    to in-core at its own largest batch under the budget (the paper's measure)."""
    ref = {}
    for run in result["runs"]:
        cfg, r = run["config"], run["result"]
        if cfg["variant"] != "in-core" or "step_s" not in r:
            continue
        if result["experiment"] == "curve":
            if not cfg.get("role"):             # plain PyTorch as users run it
                ref[cfg["batch"]] = r["step_s"]
        elif cfg.get("role") == "reference":
            ref["base"] = r["step_s"] / cfg["batch"]          # seconds per sample
    return ref


def _ratio(x):
    """A ratio, or '-' where the run had nothing to compare with (no in-core run at its batch)."""
    return "-" if x is None else f"{x:.2f}"


def _mib(n):
    """MiB: whole from 100 MiB on, else to two decimals (two budgets a fraction of a MiB
    apart printed the same)."""
    if n is None:
        return "-"
    return f"{n / MiB:.0f}" if n >= 100 * MiB else f"{n / MiB:.2f}"


def _on_gpu(result: dict) -> bool:
    """Whether the runs trained on a GPU: memory is then the GPU's peak (allocated)."""
    return result["machine"].get("device") == "cuda"


def _memory(result: dict, row: dict):
    return row.get("peak_gpu") if _on_gpu(result) else row["peak_rss"]


def markdown(result: dict, command: str = "") -> str:
    m = result["machine"]
    disk = m["disk"]
    shape = ", ".join(f"{k} {v}" for k, v in result["shape"].items())
    lines = []
    if result["experiment"] == "curve":
        lines.append(f"**Memory-speed curve**: {result['model']}{f' ({shape})' if shape else ''}, "
                     f"batch {result['batch']}; "
                     f"in-core peak of managed tensors {_mib(result['in_core_peak'])} MiB, smallest "
                     f"feasible budget {_mib(result['min_budget'])} MiB.")
    else:
        largest = ", ".join(f"{k} {v}" for k, v in result["largest"].items())
        lines.append(f"**Largest batch under a fixed budget** (the paper's experiment): {result['model']}"
                     f"{f' ({shape})' if shape else ''}, budget {_mib(result['budget'])} MiB = the "
                     "in-core peak at batch "
                     f"{result['batch']}. Largest batch within it: {largest} (found from "
                     "meta-device traces, not run; the table has the batches run, from "
                     "--factors).")
    lines.append("")
    if _on_gpu(result):
        lines.append(f"GPU: {m.get('gpu')}; outcore runs offload='host'; memory is "
                     "torch.cuda.max_memory_allocated() over the timed steps.")
    lines.append(f"Machine: {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
                 f"{m['date']}; disk ({'O_DIRECT' if disk.get('o_direct') else 'buffered'}, "
                 f"{disk.get('filesystem')}): read {disk['read_GBps']:.2f} GB/s, write "
                 f"{disk['write_GBps']:.2f} GB/s, both at once {disk['both_total_GBps']:.2f} GB/s total.")
    if command:
        lines += ["", f"    {command}"]
    lines.append("")
    speed_col = "vs in-core (same batch)" if result["experiment"] == "curve" else "samples/s vs in-core at its largest batch"
    table = rows(result)
    step_col = "step (s)"
    if any("step_range" in r for r in table):
        step_col = "step (s): median (range)"
    mem_col = "peak GPU (MiB)" if _on_gpu(result) else "peak RSS (MiB)"
    lines.append(f"| variant | policy | budget (MiB) | batch | {step_col} | samples/s | {speed_col} | {mem_col} "
                 "| read (MiB) | written (MiB) | stalled (s) | page faults / step | step / physical limit "
                 "| step / cut limit | predicted (s) | prediction error |")
    lines.append("|" + "---|" * 16)
    for row in table:
        if "error" in row:
            lines.append(f"| {row['variant']} | {row['policy']} | {_mib(row['budget'])} | {row['batch']} | "
                         f"failed: {row['error'][:80]} |" + " |" * 11)
            continue
        pred = f"{row['predicted_s']:.2f}" if "predicted_s" in row else "-"
        if row.get("predicted_contention_s"):
            pred += f" ({row['predicted_contention_s']:.2f} contention)"
        err = f"{100 * row['prediction_error']:+.0f}%" if "prediction_error" in row else "-"
        step = f"{row['step_s']:.2f}"
        if "step_range" in row:
            step += " ({:.2f}-{:.2f})".format(*row["step_range"])
        faults = "-" if row.get("page_faults") is None else f"{row['page_faults'] / 1000:.0f}k"
        lines.append(
            f"| {row['variant']} | {row['policy']} | {_mib(row['budget'])} | {row['batch']} | {step} | "
            f"{row['samples_per_s']:.1f} | {_ratio(row.get('vs_in_core'))} | {_mib(_memory(result, row))} | "
            f"{_mib(row['read'])} | {_mib(row['written'])} | {row['stalled_s']:.2f} | {faults} | "
            f"{_ratio(row.get('vs_limit'))} | {_ratio(row.get('vs_cut_limit'))} | {pred} | {err} |")
    shaky = unsteady(result)
    if shaky:
        lines += ["", f"**Unsteady runs**: the same step differed by more than {UNSTEADY}x, "
                  "so the machine was busy with something else, and the ratios to these runs "
                  "mislead. Run again with nothing else running, or with --repeat 3 (the "
                  "median run is reported):", ""]
        lines += [f"- {line}" for line in shaky]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> str | None:
    """Write the experiment's PNG; returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    data = [r for r in rows(result) if "error" not in r]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: dict = {}
    for r in data:
        name = r["variant"] if r["variant"] != "outcore" else f"outcore {r['policy']}"
        series.setdefault(name, []).append(r)
    markers = iter("osD^v<>p*hX")
    if result["experiment"] == "curve":
        for name, rs in series.items():
            rs = sorted(rs, key=lambda r: _memory(result, r) or 0)
            ax.plot([(_memory(result, r) or 0) / MiB for r in rs], [r["samples_per_s"] for r in rs],
                    marker=next(markers), label=name)
        ax.set_xlabel("peak GPU memory (MiB)" if _on_gpu(result) else "peak RSS of the process (MiB)")
        ax.set_title(f"{result['model']} batch {result['batch']}: speed against memory")
    else:
        for name, rs in series.items():
            rs = sorted(rs, key=lambda r: r["batch"])
            style = "--" if "unbounded" in name else "-"
            ax.plot([r["batch"] for r in rs], [r["samples_per_s"] for r in rs], style,
                    marker=next(markers), label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(f"{result['model']}: throughput against batch, budget {result['budget'] / MiB:.0f} MiB")
    ax.set_ylabel("samples/s")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save(result: dict, out_dir: str, name: str, command: str = "") -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, name)
    with open(base + ".json", "w") as f:
        json.dump({**result, "command": command, "rows": rows(result)}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(result, command))
    written = [base + ".json", base + ".md"]
    png = plot(result, base + ".png")
    if png:
        written.append(png)
    return written
