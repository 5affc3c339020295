"""The memory picture: a step's fast-tier bytes over time, stacked by category.

    plot_memory(trace, schedule, sim, path)                # planned (simulated)
    plot_memory(trace, schedule, sim, path, measured=log)  # and measured, one figure

The top panel is the plan on the simulator's clock: the bytes of each category
(parameter, gradient, optimizer state, activation...) in fast memory while each function
runs, stacked; the budget; what plain PyTorch holds (in-core, on its own, shorter clock);
swap-ins marked below the axis (recomputes below them), swap-outs above the budget line.
With a StepLog of a replayed iteration (run/steplog.py) a second panel shows the
measured step on its own clock: managed tensor bytes, the process's resident set above
its start, the budget and the transfers as the movers ran them. PNG or SVG, by the
path's suffix.

matplotlib is optional (`pip install 'outcore[plot]'`); nothing else imports it.
"""
from __future__ import annotations

import os

from ..errors import OutcoreError
from ..units import format_bytes
from ..plan.recompute import remade
from .occupancy import by_category
from .timeline import budget_label, in_core_clock, measured_label

MIB = 2**20
# One colour per category, stable across figures (tab10, in CATEGORIES order).
_COLOURS = {"parameter": "#1f77b4", "buffer": "#17becf", "gradient": "#ff7f0e",
            "optimizer_state": "#2ca02c", "activation": "#d62728", "temporary": "#9467bd",
            "input": "#8c564b", "output": "#e377c2"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise OutcoreError("the memory picture needs matplotlib: pip install 'outcore[plot]' "
                           "(or pip install matplotlib)") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _steps(times, values, end):
    """A step curve: each value holds from its time to the next (the last to `end`)."""
    xs, ys = [], []
    for k, (t, v) in enumerate(zip(times, values)):
        nxt = times[k + 1] if k + 1 < len(times) else end
        xs += [t, nxt]
        ys += [v, v]
    return xs, ys


def _planned(ax, trace, schedule, sim, budget: int | None = None) -> None:
    occ = by_category(trace, schedule)
    ms = [t * 1e3 for t in sim.start_s]
    end = sim.step_time_s * 1e3
    layers = []
    for k, category in enumerate(occ.categories):
        xs, ys = _steps(ms, [row[k] / MIB for row in occ.fast], end)
        layers.append(ys)
    if layers:
        ax.stackplot(xs, *layers, labels=[c.replace("_", " ") for c in occ.categories],
                     colors=[_COLOURS.get(c, "#7f7f7f") for c in occ.categories], alpha=0.85,
                     linewidth=0)
    line = schedule.budget / MIB          # `budget`: the user's, where the plan got less
    ax.axhline(line, color="black", linestyle="--", linewidth=1.2,
               label=budget_label(schedule.budget, budget))
    clock, end = in_core_clock(sim)
    xs, ys = _steps([t * 1e3 for t in clock], [b / MIB for b in occ.in_core], end * 1e3)
    ax.plot(xs, ys, color="grey", linewidth=1.2,
            label="in-core: what plain PyTorch holds until it frees (its own clock)")
    top = max([sum(row) for row in occ.fast] + list(occ.in_core), default=0) / MIB
    line = _scale(ax, line, top)
    _swap_marks(ax, [(x.start_s * 1e3, x.direction) for x in sim.transfers], line)
    made = [sim.start_s[f] * 1e3 for f, _ in remade(trace)]
    if made:                       # plan/recompute.py: made again instead of read back
        ax.plot(made, [-0.07 * line] * len(made), "|", color="#2ca02c", markersize=8,
                label=f"recompute: {len(made)} arrays made again")
    # "predicted": the simulator's clock from the recording, not a promise (helper-170
    # read it beside the measured panel's 2.5x longer step).
    # Two lines, from the axes' left edge: one line centred spilled past the figure's
    # left edge once the legend beside it narrowed the axes (helper-204).
    ax.set_title(f"planned: {schedule.policy} on {sim.machine}, predicted "
                 f"{sim.step_time_s * 1e3:.0f} ms (in-core {sim.plain_time_s * 1e3:.0f} ms)\n"
                 f"moves {format_bytes(sim.bytes_in)} in, {format_bytes(sim.bytes_out)} out",
                 fontsize=10, loc="left")


# Where the budget is more than this many times the most the panel shows, the axis ends
# above that most, not at the budget: the step would be a sliver along the bottom
# (helper-162: a 2 GiB budget over a 63 MiB step).
_FAR_ABOVE = 2.5


def _scale(ax, line: float, top: float) -> float:
    """The panel's vertical scale: to the budget `line` (MiB), or, far above what the
    panel shows (`top`), to a little above that, the budget named at the top. Returns
    the level the swap marks go at: the budget's, or the axis's top."""
    if top <= 0 or line <= _FAR_ABOVE * top:
        ax.set_ylim(-0.08 * line, max(line, top) * 1.12)
        return line
    level = 1.1 * top
    ax.set_ylim(-0.08 * level, 1.15 * level)
    ax.text(0.5, 0.98, f"the budget, {format_bytes(int(line * MIB))}, is above the scale: "
            f"{line / top:.0f}x the most shown", transform=ax.transAxes, ha="center",
            va="top", fontsize=9)
    return level


def _swap_marks(ax, marks, budget) -> None:
    """Swap-ins as ticks just below zero, swap-outs just above the budget line."""
    ins = [t for t, d in marks if d == "in"]
    outs = [t for t, d in marks if d == "out"]
    if ins:
        ax.plot(ins, [-0.03 * budget] * len(ins), "|", color="#1f77b4", markersize=8,
                label=f"swap-in ({len(ins)})")
    if outs:
        ax.plot(outs, [1.03 * budget] * len(outs), "|", color="#d62728", markersize=8,
                label=f"swap-out ({len(outs)})")


def _measured(ax, log, budget: int, rss_start: int, shown: dict) -> None:
    rows = list(log.rows())
    ms = [(r[4] - log.origin) * 1e3 for r in rows]
    end = (log.end - log.origin) * 1e3
    planned, untracked = shown.get("planned"), shown.get("untracked", False)
    if not untracked:
        managed = [(planned[r[0]] if planned is not None else r[5]) / MIB for r in rows]
        xs, ys = _steps(ms, managed, end)
        ax.fill_between(xs, ys, color="#1f77b4", alpha=0.6, linewidth=0,
                        label="managed tensors" + (" (as planned)" if planned is not None else ""))
    rss = [(t, (r[7] - rss_start) / MIB) for t, r in zip(ms, rows) if r[7]]
    if rss:
        xs, ys = _steps([t for t, _ in rss], [v for _, v in rss], end)
        ax.plot(xs, ys, color="#ff7f0e", linewidth=1.2, label="resident set above its base")
    ax.axhline(budget / MIB, color="black", linestyle="--", linewidth=1.2,
               label=f"budget {format_bytes(budget)}")
    top = max((managed if not untracked else []) + [v for _, v in rss], default=0)
    level = _scale(ax, budget / MIB, top)
    _swap_marks(ax, [((start - log.origin) * 1e3, d) for _, d, _, start, _ in log.transfers],
                level)
    moved_in = sum(n for _, d, n, _, _ in log.transfers if d == "in")
    moved_out = sum(n for _, d, n, _, _ in log.transfers if d == "out")
    # Bytes as the report writes them (format_bytes), the axis in MiB.
    what = measured_label(shown.get("iteration"), shown.get("left_since", 0), planned,
                          untracked)
    ax.set_title(f"measured: {what}, {end:.0f} ms\nmoved {format_bytes(moved_in)} in, "
                 f"{format_bytes(moved_out)} out", fontsize=10, loc="left")


def check_picture_path(path) -> str:
    """The format `path` names (its suffix, .png or .svg), or a clear refusal."""
    if os.path.isdir(path):
        raise OutcoreError(f"{os.fspath(path)!r} is a directory: name the picture's file in "
                           "it, ending in .png or .svg")
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in (".png", ".svg"):
        raise OutcoreError(f"the memory picture is written as PNG or SVG; {os.fspath(path)!r} "
                           "ends in neither .png nor .svg")
    return suffix


def plot_memory(trace, schedule, sim, path, *, measured=None, budget: int | None = None,
                rss_start: int = 0, title: str | None = None, **shown) -> None:
    """Draw the memory picture of `schedule` (simulated as `sim`) to `path` (.png or
    .svg); with `measured`, a StepLog of a replayed iteration under `budget` bytes, a
    second panel on the measured clock; `shown`: `iteration`, `left_since`, `planned`
    and `untracked`, as timeline.measured_events takes them."""
    suffix = check_picture_path(path)
    plt = _pyplot()
    panels = 2 if measured is not None else 1
    fig, axes = plt.subplots(panels, 1, figsize=(11, 4.2 * panels), squeeze=False)
    try:
        _planned(axes[0][0], trace, schedule, sim, budget)
        if measured is not None:
            _measured(axes[1][0], measured, budget or schedule.budget, rss_start, shown)
        for (ax,) in axes:
            ax.set_ylabel("MiB")
            ax.set_xlabel("time in the step (ms)")
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        from ..run.checkpoint import atomic_write
        atomic_write(path, lambda f: fig.savefig(f, format=suffix[1:], dpi=110,
                                                 bbox_inches="tight"))
    finally:
        plt.close(fig)
