"""Predicted vs measured step time of outcore under torchrun (2 gloo ranks on this machine).

For each composition of tests/distributed/worker.py (DDP, FSDP2, a 2-stage pipeline; SGD
and Adam), at the budget the tests use: train ITERATIONS iterations under OutOfCore and
take the median of the steady replays (no deviation) per rank; simulate the same rank's
trace and schedule with its collectives on the comm lane at the `loopback-gloo` α-β
(`outcore bench comm`) and the disk measured just before (`outcore bench disk`); print
both, and their ratio.

    .venv/bin/python benchmarks/distributed_fit.py [--disk-size 512MiB]
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
ITERATIONS = 10


def rank_main(out_dir: str, link_in: float, link_out: float) -> None:
    import importlib.util

    import torch.distributed as dist

    import outcore
    from outcore.simulate import simulate
    from outcore.simulate.machines import PRESETS

    spec = importlib.util.spec_from_file_location("worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    machine = dataclasses.replace(PRESETS["cpu-disk"], name="cpu-disk (measured now)",
                                  link_in=link_in, link_out=link_out)
    with_host = dataclasses.replace(machine, host_time=True)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case in worker.CASES:
        kind, opt_name = case.split("-")
        model, step = worker.BUILD[kind](opt_name)
        plain = []
        for i in range(ITERATIONS):
            started = time.perf_counter()
            if i == 1:
                with outcore.record() as rec:
                    step(i)
            else:
                step(i)
            plain.append(time.perf_counter() - started)
        plain_s = statistics.median(plain[2:])
        budget = int(worker.BUDGET_SHARE[kind] * rec.trace.peak(actual=True)[0])
        del model, step, rec
        gc.collect()
        model, step = worker.BUILD[kind](opt_name)
        with tempfile.TemporaryDirectory() as swap, \
                outcore.OutOfCore(budget=budget, swap_dir=swap) as ooc:
            for i in range(ITERATIONS):
                with ooc.iteration():
                    step(i)
            report = ooc.report()
            steady = [it.seconds for it in report.iterations
                      if it.mode == "replay" and it.deviation is None][1:]
            sim = simulate(ooc.trace, ooc.schedule, machine, comm=("loopback-gloo", 2))
            host = simulate(ooc.trace, ooc.schedule, with_host, comm=("loopback-gloo", 2))
            log = ooc._last_replay[2]
            t = log.times          # per function: taken, started, returned, done
            own = sorted((t[4 * k + 1] - t[4 * k]) + (t[4 * k + 3] - t[4 * k + 2])
                         for k in range(len(log)))
            per_op = own[len(own) // 2]
            # The replay, split: host time between ops, outcore's own time per op (waits
            # for transfers included), the ops themselves.
            r_host = sum(max(0.0, t[4 * k] - (t[4 * k - 1] if k else log.origin))
                         for k in range(len(log)))
            r_own = sum(own)
            r_ops = sum(t[4 * k + 2] - t[4 * k + 1] for k in range(len(log)))
        with open(os.path.join(out_dir, f"{case}.rank{rank}.json"), "w") as f:
            json.dump({"measured_s": statistics.median(steady), "replays": len(steady),
                       "predicted_s": sim.iteration_time_s, "comm_s": sim.comm_s,
                       "budget": budget, "plain_s": plain_s, "functions": len(ooc.trace.functions),
                       "in_core_s": sim.in_core_time_s, "with_host_s": host.iteration_time_s,
                       "per_op_s": per_op, "replay_host_s": r_host, "replay_own_s": r_own,
                       "replay_ops_s": r_ops, "host_sum_s": sum(f.host_s for f in ooc.trace.functions)}, f)
        del model, step
        dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        rank_main(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disk-size", default="512MiB")
    args = parser.parse_args()
    from outcore.bench.disk import measure_disk
    from outcore.units import parse_bytes
    disk = measure_disk(parse_bytes(args.disk_size))
    print(f"disk: read {disk['read_GBps']:.2f} GB/s, write {disk['write_GBps']:.2f} GB/s "
          f"(outcore bench disk --size {args.disk_size})")
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", os.path.abspath(__file__), "--rank", out,
                        str(disk["read_GBps"] * 1e9), str(disk["write_GBps"] * 1e9)],
                       check=True, env=env)
        print(f"{'case':16} {'rank':>4} {'fns':>5} {'plain':>9} {'trace':>9} {'host':>8} {'measured':>10} "
              f"{'predicted':>10} {'pred/meas':>9} {'+host':>9} {'pred/meas':>9} {'op cost':>8} {'comm (model)':>12}")
        for name in sorted(os.listdir(out)):
            case, rank = name[:-len(".json")].split(".rank")
            r = json.load(open(os.path.join(out, name)))
            print(f"{case:16} {rank:>4} {r['functions']:5d} {r['plain_s'] * 1e3:7.1f}ms "
                  f"{r['in_core_s'] * 1e3:7.1f}ms {r['host_sum_s'] * 1e3:6.1f}ms {r['measured_s'] * 1e3:8.1f}ms {r['predicted_s'] * 1e3:8.1f}ms "
                  f"{r['predicted_s'] / r['measured_s']:9.2f} {r['with_host_s'] * 1e3:7.1f}ms "
                  f"{r['with_host_s'] / r['measured_s']:9.2f} {r['per_op_s'] * 1e6:6.0f}us "
                  f"{r['comm_s'] * 1e3:10.1f}ms")
            print(f"{'':21} last replay: host {r['replay_host_s'] * 1e3:.1f}ms, outcore "
                  f"{r['replay_own_s'] * 1e3:.1f}ms, ops {r['replay_ops_s'] * 1e3:.1f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
