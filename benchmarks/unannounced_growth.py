"""What lands between two readings of the trim governor beyond the bytes announced to it
(NOTE [Announced outputs] in memory/malloc.py), and which functions of the replayed step
it spans: the growth the margin of a replay's checks must leave room for.

    .venv/bin/python benchmarks/unannounced_growth.py [--model resnet50] [--size 128]
        [--batch 64] [--budget 483MiB] [--replays 2] [--top 8]

The model is built and trained two steps first, then the OutOfCore made (the order of
`outcore bench`). Prints, per replay, the trims and what they gave back, the resident
set's growth above its base against the process bound, and how many ops' growth the
governor has learned (NOTE [Each op's growth]); for the last replay, the largest
growths from a reading told the next op's outputs to the next reading.
"""
from __future__ import annotations

import argparse
import bisect
import tempfile

import outcore
from outcore.memory import malloc
from outcore.units import format_bytes, parse_bytes
from outcore.workloads import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=128, help="image side or sequence length")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--budget", default="483MiB")
    parser.add_argument("--replays", type=int, default=2)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()

    readings: list[tuple[float, int]] = []        # (when, growth beyond what was announced)
    last = {"rss": 0}
    read, check = malloc.resident_bytes, malloc.TrimGovernor.check

    def reading() -> int:
        last["rss"] = read()
        return last["rss"]

    def told_check(self, coming=0, outputs=None, key=malloc.WITHIN_OP):
        before, pending, told = self._read, self._pending, self._read_outputs
        checked = self._checked
        check(self, coming, outputs, key)
        if self._checked != checked and before and told:
            readings.append((self._checked, last["rss"] - before - pending))
    malloc.resident_bytes, malloc.TrimGovernor.check = reading, told_check

    shape = {"image_size": args.size} if args.model.startswith("resnet") else {"seq_len": args.size}
    w = build(args.model, batch=args.batch, **shape)
    for _ in range(2):
        w.step()
    with tempfile.TemporaryDirectory() as swap, \
            outcore.OutOfCore(budget=parse_bytes(args.budget), swap_dir=swap) as ooc:
        for _ in range(1 + args.replays):
            readings.clear()
            with ooc.iteration():
                w.step()
            report = ooc.report()
            it = report.iterations[-1]
            print(f"{it.mode}: {it.trims} trims, {format_bytes(it.trimmed_bytes)} given back, "
                  f"rss+ {format_bytes(it.rss_above_start)} (bound "
                  f"{format_bytes(report.rss_bound)}), the growth of "
                  f"{len(ooc._governor._grown)} ops learned")
        log, trace = ooc._last_replay[2], ooc.trace
    taken = [log.times[4 * k] for k in range(len(log))]
    times = [when for when, _ in readings]
    print(f"largest growths beyond what was announced, last replay ({len(readings)} intervals):")
    for when, grew in sorted(readings, key=lambda r: -r[1])[:args.top]:
        j = times.index(when)
        start = times[j - 1] if j else log.origin
        first = max(bisect.bisect_right(taken, start) - 1, 0)
        fns = [log.index[k] for k in range(first, bisect.bisect_right(taken, when))]
        ops = ", ".join(f"{i} {trace.functions[i].op.split('.')[1]}" for i in fns[:4])
        print(f"  {format_bytes(grew):>12}  functions {ops}{' ...' if len(fns) > 4 else ''}")


if __name__ == "__main__":
    main()
