"""Speed of training under outcore against plain PyTorch, each variant in a fresh process.

    .venv/bin/python benchmarks/run_speed.py [--batch 64] [--steps 6] [--policies adaptive,fixed]

Workload: the demo's ResNet-50 (1 input channel, 10 classes) on 64x64 digits, SGD with
momentum. Variants: plain PyTorch; outcore with a budget twice the in-core step (nothing
should move); outcore at a quarter of the in-core step, per policy, with and without
returning freed memory to the OS. Figures: median step time of the steps after the
recording ones, throughput ratio to in-core, peak RSS, bytes moved, time waited.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json, statistics, sys, time, torch, outcore
    from outcore.workloads.digits import digit_batches
    from outcore.workloads.resnet import resnet50

    def peak_rss():
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child
        # of a large parent (pytest) would report the parent's size.
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    cfg = json.loads(sys.argv[1])
    torch.manual_seed(0)
    model = resnet50(num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    x, y = next(digit_batches(cfg["batch"], 64))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward(); opt.step(); opt.zero_grad()

    times, out = [], {}
    if cfg["budget"] is None:
        step()
        with outcore.record() as rec:
            step()
        out["held"] = rec.trace.peak(actual=True)[0]
        for _ in range(cfg["steps"]):
            t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
    else:
        with outcore.OutOfCore(budget=cfg["budget"], policy=cfg["policy"],
                               return_freed_memory=cfg["return_memory"]) as ooc:
            for _ in range(cfg["steps"] + 2):
                t = time.perf_counter()
                with ooc.iteration():
                    step()
                times.append(time.perf_counter() - t)
            report = ooc.report()
        replays = [it for it in report.iterations if it.mode == "replay"]
        times = times[-len(replays):]
        last = replays[-1]
        out.update(read=last.bytes_read, written=last.bytes_written, wait=last.wait_s,
                   planned_in=report.planned_in, planned_out=report.planned_out)
    out["step"] = statistics.median(times)
    out["rss"] = peak_rss()
    print(json.dumps(out))
""")


def run(cfg: dict) -> dict:
    from outcore.memory.pages import plain_environment      # plain PyTorch: its own setting
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True,
                          text=True, env=plain_environment() if cfg["budget"] is None else None)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--policies", default="adaptive,fixed,adaptive-belady,on-demand")
    args = parser.parse_args()
    base = dict(batch=args.batch, steps=args.steps, policy="adaptive", return_memory=True)
    incore = run(dict(base, budget=None))
    held = incore["held"]
    rows = [("plain PyTorch", "-", incore)]
    rows.append(("outcore, budget 2x in-core", "adaptive", run(dict(base, budget=2 * held))))
    for policy in args.policies.split(","):
        rows.append(("outcore, budget 1/4", policy, run(dict(base, budget=held // 4, policy=policy))))
    rows.append(("outcore, budget 1/4, glibc defaults", "adaptive",
                 run(dict(base, budget=held // 4, return_memory=False))))
    mib = 2 ** 20
    print(f"ResNet-50 digits 64x64, batch {args.batch}: in-core step holds {held / mib:.0f} MiB")
    print("| variant | policy | step (s) | throughput vs in-core | peak RSS (MiB) | read (MiB) | written (MiB) | waited (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, policy, r in rows:
        print(f"| {name} | {policy} | {r['step']:.3f} | {incore['step'] / r['step']:.2f} | {r['rss'] / mib:.0f} | "
              f"{r.get('read', 0) / mib:.0f} | {r.get('written', 0) / mib:.0f} | {r.get('wait', 0):.2f} |")


if __name__ == "__main__":
    main()
