"""How fast local processes exchange bytes through torch.distributed (`outcore bench comm`).

Spawns `ranks` processes (gloo backend, rendezvous through a FileStore in a private
temporary directory), times allreduce, allgather (into one tensor), reduce-scatter (from
one tensor) and point-to-point send/recv at message sizes from 4 KiB to 64 MiB, and fits
each collective's α (seconds per message step) and β (seconds per byte) to the model of
outcore.simulate.comm by least squares on relative error.

What it leaves behind: nothing. The temporary directory (store, result file) is removed,
every process is joined, and one that outlives the timeout is killed and reaped.

How it times: rank 0's wall clock over `iters` back-to-back calls after a barrier (so a
rank leaving the barrier late costs one call's skew divided by `iters`, not a whole
call), median over `repeats` such samples. Sizes are bytes of float32 buffers: for the
allgather the gathered output, for the reduce-scatter the full input, for p2p one way
(half a ping-pong between ranks 0 and 1).

`busy=True` times the same while each rank also computes (a thread multiplying 256 x 256
matrices without pause), as the ranks of a training step do while their collectives run
(DDP's bucketed allreduce beside backward, FSDP's prefetched all-gathers, a pipeline's
sends beside the next microbatch). Where the ranks fill the machine's cores, gloo's
threads then wait for a core: here α rose 1.9-3.3x and bandwidth fell to 0.39-0.65 of
the idle figures (docs/distributed.md). The `loopback-gloo-busy` preset holds these figures.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

KiB, MiB = 1024, 1024**2
DEFAULT_SIZES = tuple(4 * KiB * 4**i for i in range(8))        # 4 KiB, 16 KiB, ..., 64 MiB
QUICK_SIZES = (4 * KiB, 256 * KiB, 4 * MiB)   # spans latency- to bandwidth-bound
OPS = ("allreduce", "allgather", "reduce_scatter", "p2p")
# Back-to-back calls per timed sample: about 1 MiB of traffic per sample for small
# messages (latency-bound; many calls amortize the barrier skew), one call for big ones.
_ITER_BYTES, _MAX_ITERS = 1 * MiB, 64


def sizes_up_to(largest: int, smallest: int = 4 * KiB) -> tuple[int, ...]:
    """Sizes from `smallest` up to `largest`, x4 apart (the last one is `largest`)."""
    out, n = [], smallest
    while n < largest:
        out.append(n)
        n *= 4
    out.append(largest)
    return tuple(out)


def model_coefficients(op: str, ranks: int) -> tuple[float, float]:
    """(steps, bytes factor): the model says time = steps·α + factor·n·β (see
    outcore.simulate.comm: ring allreduce, ring allgather / reduce-scatter, one message)."""
    p = ranks
    if op == "allreduce":
        return 2.0 * (p - 1), 2.0 * (p - 1) / p
    if op in ("allgather", "reduce_scatter"):
        return float(p - 1), (p - 1) / p
    if op == "p2p":
        return 1.0, 1.0
    raise ValueError(op)


def fit_alpha_beta(sizes, times, steps: float, factor: float) -> tuple[float, float, float]:
    """Least squares fit of t = steps·α + factor·n·β, each point weighted by 1/t (relative
    error: small messages fix α, large ones β). Neither may be negative: when the free fit
    makes one negative, that one is set to 0 and the other refitted alone. Returns (α, β,
    the largest relative error of the fit over the points)."""
    rows = [(steps / t, factor * n / t) for n, t in zip(sizes, times)]
    saa = sum(a * a for a, _ in rows)
    sab = sum(a * b for a, b in rows)
    sbb = sum(b * b for _, b in rows)
    sa = sum(a for a, _ in rows)         # target is 1 for every weighted row
    sb = sum(b for _, b in rows)
    det = saa * sbb - sab * sab
    alpha = beta = -1.0
    if det > 0:
        alpha = (sa * sbb - sb * sab) / det
        beta = (saa * sb - sab * sa) / det
    if alpha < 0 or beta < 0:
        if alpha < 0 <= beta or det <= 0:
            alpha, beta = 0.0, sb / sbb
        else:
            alpha, beta = sa / saa, 0.0
    worst = max(abs(steps * alpha + factor * n * beta - t) / t for n, t in zip(sizes, times))
    return alpha, beta, worst


def _worker(rank, world, store_path, out_path, sizes, repeats, busy_compute=False):
    # One rank: rendezvous, time every op at every size, rank 0 writes the medians.
    import threading

    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)           # the ranks share this machine's cores
    stop = threading.Event()
    spinner = [0.0]                    # the compute thread's CPU time so far (0: none)

    def compute():
        a = torch.ones(256, 256)
        while not stop.is_set():
            torch.mm(a, a)             # releases the GIL: the rank's Python keeps going
            spinner[0] = time.thread_time()

    worker = None
    if busy_compute:
        worker = threading.Thread(target=compute, name="outcore-bench-compute", daemon=True)
        worker.start()
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank,
                            world_size=world)
    # torch >= 2.12 names the single-tensor forms *_single; older releases *_tensor.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    try:
        medians = {op: [] for op in OPS}
        # CPU seconds per second of collective of the process's other threads (gloo's),
        # rank 0's, over all sizes: Interconnect.cpu_share.
        busy = {op: [0.0, 0.0] for op in OPS}
        for n in sizes:
            elems = max(world, n // 4 // world * world)     # float32, divisible by world
            full, share = torch.ones(elems), torch.ones(elems // world)
            calls = {
                "allreduce": lambda: dist.all_reduce(full),
                "allgather": lambda: gather(full, share),
                "reduce_scatter": lambda: scatter(share, full),
                "p2p": lambda: _ping_pong(dist, rank, full),
            }
            iters = max(1, min(_MAX_ITERS, _ITER_BYTES // max(n, 1)))
            for op in OPS:
                for _ in range(3):                          # warm-up: connections, buffers
                    calls[op]()
                samples = []
                for _ in range(repeats):
                    dist.barrier()
                    spun = spinner[0]
                    start, cpu, own = time.perf_counter(), time.process_time(), time.thread_time()
                    for _ in range(iters):
                        calls[op]()
                    wall = time.perf_counter() - start
                    samples.append(wall / iters)
                    # Gloo's threads: the process's CPU less this thread's and the
                    # compute thread's (to one matrix product).
                    busy[op][0] += ((time.process_time() - cpu) - (time.thread_time() - own)
                                    - (spinner[0] - spun))
                    busy[op][1] += wall
                one_way = 0.5 if op == "p2p" else 1.0        # a ping-pong is two messages
                medians[op].append(one_way * statistics.median(samples))
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"times_s": medians, "torch": torch.__version__,
                           "cpu_share": {op: c / w if w > 0 else 0.0
                                         for op, (c, w) in busy.items()},
                           "bytes": [max(world, n // 4 // world * world) * 4 for n in sizes]}, f)
        dist.barrier()
    finally:
        stop.set()
        if worker is not None:
            # A daemon thread still inside torch.mm when the process exits can abort it
            # ("terminate called without an active exception", seen under a loaded CI).
            worker.join()
        dist.destroy_process_group()


def _ping_pong(dist, rank, buf):
    # Ranks 0 and 1 bounce one message; any other rank sits it out.
    if rank == 0:
        dist.send(buf, 1)
        dist.recv(buf, 1)
    elif rank == 1:
        dist.recv(buf, 0)
        dist.send(buf, 0)


def measure_comm(sizes=DEFAULT_SIZES, *, repeats: int = 5, ranks: int = 2,
                 timeout_s: float = 120.0, busy: bool = False) -> dict:
    """Time the collectives between `ranks` fresh local gloo processes and fit α, β.

    busy: each rank computes meanwhile (module docstring).

    Returns {"backend", "ranks", "repeats", "busy", "bytes", "seconds", "ops": {op:
    {"times_s", "alpha_s", "beta_s_per_byte", "bandwidth_Bps", "max_rel_error",
    "cpu_share"}}}, cpu_share: CPU seconds of rank 0's gloo threads per second of the
    operation (Interconnect.cpu_share). Raises
    OutcoreError when a rank fails or the run exceeds `timeout_s` (all ranks are then
    killed and reaped). The ranks are plain subprocesses (`python -m
    outcore.bench.comm`), so no caller's __main__ is re-imported."""
    from ..errors import OutcoreError
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 2:
        raise OutcoreError(f"bench comm needs at least 2 ranks, got {ranks!r}")
    if repeats < 1:
        raise OutcoreError(f"repeats must be at least 1, got {repeats!r}")
    if not sizes or min(sizes) < 4 * ranks:
        raise OutcoreError(f"message sizes must be at least {4 * ranks} bytes, got {sizes!r}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="outcore-comm-") as tmp:
        out_path = os.path.join(tmp, "result.json")
        spec = json.dumps({"world": ranks, "store": os.path.join(tmp, "store"), "out": out_path,
                           "sizes": list(sizes), "repeats": repeats, "busy": bool(busy)})
        # The ranks import this very package, wherever it was imported from.
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        procs, logs = [], []
        try:
            for rank in range(ranks):
                # stderr to a file, not a pipe: a chatty rank can never block on it.
                logs.append(open(os.path.join(tmp, f"rank{rank}.err"), "w+b"))
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "outcore.bench.comm", str(rank), spec],
                    env=env, stdout=subprocess.DEVNULL, stderr=logs[-1]))
            failed = None
            while any(p.poll() is None for p in procs):
                failed = next((p for p in procs if p.poll() not in (None, 0)), None)
                if failed is not None:
                    break
                if time.perf_counter() - start > timeout_s:
                    raise OutcoreError(f"bench comm took longer than {timeout_s:.0f} s; "
                                       "try a smaller --size or --quick")
                time.sleep(0.05)
            failed = failed or next((p for p in procs if p.returncode != 0), None)
            if failed is not None:
                log = logs[procs.index(failed)]
                log.seek(0)
                err = log.read().decode(errors="replace").strip().splitlines()
                raise OutcoreError("bench comm: rank %d failed (exit %s): %s" % (
                    procs.index(failed), failed.returncode, err[-1] if err else "no message"))
            with open(out_path) as f:
                raw = json.load(f)
        finally:
            # No rank outlives this call, whatever happened: kill stragglers, reap all.
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            for log in logs:
                log.close()
    result = {"backend": "gloo", "ranks": ranks, "repeats": repeats, "busy": bool(busy),
              "bytes": raw["bytes"],
              "torch": raw["torch"], "ops": {}}
    for op in OPS:
        steps, factor = model_coefficients(op, ranks)
        times = raw["times_s"][op]
        alpha, beta, worst = fit_alpha_beta(raw["bytes"], times, steps, factor)
        result["ops"][op] = {"times_s": times, "alpha_s": alpha, "beta_s_per_byte": beta,
                             "bandwidth_Bps": 1.0 / beta if beta > 0 else float("inf"),
                             "max_rel_error": worst, "cpu_share": raw["cpu_share"][op]}
    result["seconds"] = time.perf_counter() - start
    return result


if __name__ == "__main__":           # one rank: python -m outcore.bench.comm RANK SPEC_JSON
    _spec = json.loads(sys.argv[2])
    _worker(int(sys.argv[1]), _spec["world"], _spec["store"], _spec["out"], _spec["sizes"],
            _spec["repeats"], _spec.get("busy", False))
