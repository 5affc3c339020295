"""Predicted vs measured step time of outcore under torchrun (2 gloo ranks on this machine).

For each composition of tests/distributed/worker.py (DDP, FSDP2, a 2-stage pipeline; SGD
and Adam), at the budget the tests use: train ITERATIONS iterations without outcore
(recording one) and ITERATIONS under OutOfCore, and take the medians of the steady steps
per rank. Both ranks' traces and schedules are then simulated together
(outcore.simulate.simulate_ranks: a collective starts when both ranks issued it) on the
`cpu-disk` machine with the disk measured just before (`outcore bench disk`), host time
(its CPU time: the waits are what the joint simulation models), the executor's cost per
op from `outcore bench overhead`, and collectives at the `loopback-gloo-busy` α-β
(`outcore bench comm --busy`: gloo while the ranks compute). The 2 ranks have no core to spare on this 2-core machine: the
mover's CPU (measured by `bench disk`) and gloo's (the preset's cpu_share) come out of
compute (NOTE [No core to spare] in simulate/engine.py). Printed: measured, predicted,
and their ratio, for the plain step (its in-core trace) and for outcore's replay.

    .venv/bin/python benchmarks/distributed_fit.py [--disk-size 512MiB] [--nproc 1|2]
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "..", "tests", "distributed", "worker.py")
ITERATIONS = 12
# Where the ranks fill the machine's cores their collectives run beside compute, as
# `outcore bench comm --busy` times them; otherwise as `outcore bench comm` does.
BUSY_LINK, IDLE_LINK = "loopback-gloo-busy", "loopback-gloo"


def rank_main(out_dir: str, link_in: float, link_out: float, per_function_s: float,
              transfer_cpu_share: float) -> None:
    import importlib.util

    import torch.distributed as dist

    import outcore
    from outcore.plan import plan
    from outcore.simulate import simulate_ranks
    from outcore.simulate.machines import PRESETS, trace_threads

    spec = importlib.util.spec_from_file_location("worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    machine = dataclasses.replace(PRESETS["cpu-disk"], name="cpu-disk (measured now)",
                                  link_in=link_in, link_out=link_out, host_time=True,
                                  transfer_cpu_share=transfer_cpu_share)
    executor = dataclasses.replace(machine, per_function_s=per_function_s)
    dist.init_process_group("gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()

    def together(trace, schedule, m):
        both = [None] * ranks
        dist.all_gather_object(both, (trace, schedule))
        return simulate_ranks([t for t, _ in both], [s for _, s in both], m,
                              link=BUSY_LINK if m.no_core_to_spare(
                                  ranks, max(trace_threads(t) for t, _ in both))
                              else IDLE_LINK)[rank]

    for case in worker.CASES:
        kind, opt_name = case.split("-")
        if kind == "pipeline" and ranks != 2:
            continue                      # its two stages need two ranks
        model, step = worker.BUILD[kind](opt_name)
        plain = []
        for i in range(ITERATIONS):
            started = time.perf_counter()
            if i == ITERATIONS // 2:          # a steady step, as outcore's replays are
                with outcore.record() as rec:
                    step(i)
            else:
                step(i)
                plain.append(time.perf_counter() - started)
        plain_s = statistics.median(plain[2:])
        peak = rec.trace.peak(actual=True)[0]
        plain_pred = together(rec.trace, plan(rec.trace, peak), machine)
        budget = int(worker.BUDGET_SHARE[kind] * peak)
        del model, step, rec
        gc.collect()
        model, step = worker.BUILD[kind](opt_name)
        with tempfile.TemporaryDirectory() as swap, \
                outcore.OutOfCore(budget=budget, swap_dir=swap) as ooc:
            main_cpu = []                 # this rank's main thread's CPU time per step
            for i in range(ITERATIONS):
                cpu = time.thread_time()
                with ooc.iteration():
                    step(i)
                main_cpu.append(time.thread_time() - cpu)
            report = ooc.report()
            steady = [it.seconds for it in report.iterations
                      if it.mode == "replay" and it.deviation is None][1:]
            sim = together(ooc.trace, ooc.schedule, executor)
            log = ooc._last_replay[2]
            t = log.times          # per function: taken, started, returned, done
            # The last replay, split: host time between ops, outcore's own time per op
            # (waits for transfers included), the ops themselves.
            r_host = sum(max(0.0, t[4 * k] - (t[4 * k - 1] if k else log.origin))
                         for k in range(len(log)))
            r_own = sum((t[4 * k + 1] - t[4 * k]) + (t[4 * k + 3] - t[4 * k + 2])
                        for k in range(len(log)))
            r_ops = sum(t[4 * k + 2] - t[4 * k + 1] for k in range(len(log)))
        fns = ooc.trace.functions
        with open(os.path.join(out_dir, f"{case}.rank{rank}.json"), "w") as f:
            json.dump({"plain_s": plain_s, "plain_pred_s": plain_pred.iteration_time_s,
                       "measured_s": statistics.median(steady), "replays": len(steady),
                       "predicted_s": sim.iteration_time_s, "stall_s": sim.total_stall_s,
                       "comm_s": sim.comm_s, "functions": len(fns),
                       "ops_s": sum(fn.duration_s for fn in fns),
                       "host_s": sum(fn.host_s for fn in fns),
                       "host_cpu_s": sum(fn.host_cpu_s for fn in fns),
                       "replay_host_s": r_host, "replay_own_s": r_own, "replay_ops_s": r_ops,
                       "replay_cpu_s": statistics.median(main_cpu[3:]),
                       # the model's compute before the helpers' share (NOTE [No core
                       # to spare]): what the main thread itself should spend
                       "predicted_compute_s": sim.in_core_time_s}, f)
        del model, step
        dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        rank_main(sys.argv[2], *map(float, sys.argv[3:7]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disk-size", default="512MiB")
    parser.add_argument("--nproc", type=int, default=2, choices=(1, 2),
                        help="ranks (default 2; 1 leaves a core to spare and skips the pipeline)")
    args = parser.parse_args()
    from outcore.bench.disk import measure_disk
    from outcore.bench.overhead import measure_overhead
    from outcore.simulate.machines import host_cores
    from outcore.units import parse_bytes
    disk = measure_disk(parse_bytes(args.disk_size))
    print(f"disk: read {disk['read_GBps']:.2f} GB/s, write {disk['write_GBps']:.2f} GB/s, "
          f"mover CPU {disk['transfer_cpu_share']:.2f} s/s (outcore bench disk --size "
          f"{args.disk_size}); {host_cores()} cores for {args.nproc} ranks")
    overhead = measure_overhead()
    print(f"executor: {overhead['per_function_s'] * 1e6:.1f} us per op (outcore bench overhead)")
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as logs:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", str(args.nproc), "--log-dir", logs,
                        os.path.abspath(__file__), "--rank", out,
                        str(disk["read_GBps"] * 1e9), str(disk["write_GBps"] * 1e9),
                        str(overhead["per_function_s"]), str(disk["transfer_cpu_share"])],
                       check=True, env=env)
        print(f"{'case':14} {'rank':>4} {'fns':>4} | {'plain':>7} {'pred':>7} {'ratio':>5} | "
              f"{'outcore':>7} {'pred':>7} {'ratio':>5} | trace: ops, host (cpu) | "
              "replay: host, outcore, ops | main-thread CPU, simulated compute")
        for name in sorted(os.listdir(out)):
            case, rank = name[:-len(".json")].split(".rank")
            r = json.load(open(os.path.join(out, name)))
            ms = {k: v * 1e3 for k, v in r.items() if k.endswith("_s")}
            print(f"{case:14} {rank:>4} {r['functions']:4d} | {ms['plain_s']:5.1f}ms "
                  f"{ms['plain_pred_s']:5.1f}ms {r['plain_pred_s'] / r['plain_s']:5.2f} | "
                  f"{ms['measured_s']:5.1f}ms {ms['predicted_s']:5.1f}ms "
                  f"{r['predicted_s'] / r['measured_s']:5.2f} | {ms['ops_s']:.1f}, "
                  f"{ms['host_s']:.1f} ({ms['host_cpu_s']:.1f}) ms | {ms['replay_host_s']:.1f}, "
                  f"{ms['replay_own_s']:.1f}, {ms['replay_ops_s']:.1f} ms | "
                  f"{ms['replay_cpu_s']:.1f}, {ms['predicted_compute_s']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
