"""`outcore bench`: measure the disk outcore swaps to, the collectives between local
processes (`comm`), and outcore against what users run today (in-core, checkpointing,
offload hooks), each run in a fresh process."""
from __future__ import annotations

import json
import os
import shlex
import sys

from ..bench.disk import measure_disk
from ..errors import OutcoreError
from ..plan import POLICIES
from ..run.movers.disk import CHUNK_BYTES
from ..units import format_bytes, parse_bytes


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure the disk, collectives, and outcore against the alternatives",
                       description="`disk`: sequential write, read, and both at once through the "
                                   "swap-file path (O_DIRECT where supported, 8 MiB requests, one "
                                   "thread per direction). `comm`: allreduce, allgather, "
                                   "reduce-scatter and send/recv between 2 local gloo processes, "
                                   "4 KiB to 64 MiB, with the α-β model fitted to each. "
                                   "`overhead`: outcore's own cost per op when it replays a "
                                   "plan (the simulator's per_function_s). "
                                   "`curve`: samples/s and peak RSS of "
                                   "in-core, checkpointing, offload hooks and outcore at budgets from "
                                   "the in-core peak down to the smallest feasible, each outcore "
                                   "run with the simulator's prediction (scaled to one more "
                                   "in-core run with huge pages, as outcore runs its ops, plus "
                                   "`overhead`'s cost per op). `batch`: the "
                                   "paper's experiment, the largest batch each variant trains under "
                                   "the in-core peak of a base batch, and its samples/s. Each run is "
                                   "a fresh process; results go to --out as markdown, JSON and PNG.")
    p.add_argument("what", choices=("disk", "comm", "overhead", "curve", "batch"), help="what to measure")
    p.add_argument("--size", default=None, help="disk: bytes per direction (default 1GiB); "
                                                "comm: the largest message (default 64MiB)")
    p.add_argument("--quick", action="store_true",
                   help="comm: 4 KiB, 256 KiB and 4 MiB only, 3 repeats (a few seconds)")
    p.add_argument("--dir", default=None, help="directory of the swap file (default: temp dir)")
    p.add_argument("--json", action="store_true", help="disk, comm, overhead: print the figures as JSON")
    p.add_argument("--busy", action="store_true",
                   help="comm: time the collectives while each rank also computes, as in a "
                        "training step (the loopback-gloo-busy preset)")
    p.add_argument("--model", default="resnet50", help="curve/batch: built-in model (default resnet50)")
    p.add_argument("--batch", type=int, default=64,
                   help="curve: the batch; batch: the base batch (default 64, any model)")
    p.add_argument("--image-size", type=int, default=None, help="image side for CNNs (default 224)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="sequence length for GPT-2 models (default 1024)")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam", "adamw"),
                   help="default sgd")
    p.add_argument("--policies", default=None,
                   help="outcore policies, comma-separated (curve: on-demand,fixed,adaptive; batch: adaptive)")
    p.add_argument("--fractions", default="1,0.5,0.25,0.125",
                   help="curve: budgets as fractions of the in-core peak (default "
                        "1,0.5,0.25,0.125; the smallest feasible is added)")
    p.add_argument("--factors", default="2,4,8",
                   help="batch: outcore batches as multiples of the base (default 2,4,8)")
    p.add_argument("--baselines", default=None,
                   help="comma-separated subset of in-core,in-core-heap,checkpoint,offload-hooks,"
                        "streamed-offload (default: in-core,checkpoint,offload-hooks; in-core-heap "
                        "is plain PyTorch with glibc's heap kept and never trimmed, CPU only; "
                        "streamed-offload is torchtune's way, GPU only)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="curve/batch: where the step runs (default cpu). cuda: outcore runs "
                        "offload='host', offload-hooks is save_on_cpu(pin_memory=True), memory is "
                        "the GPU's peak; no prediction or physical limit is made")
    p.add_argument("--thp", action="store_true",
                   help="run outcore with THP_MEM_ALLOC_ENABLE=1 set in its environment (what "
                        "`import outcore` sets anyway where the environment does not name it)")
    p.add_argument("--no-thp", action="store_true",
                   help="run outcore with THP_MEM_ALLOC_ENABLE=0: no huge pages for PyTorch's "
                        "tensors, as before outcore turned them on (plain-PyTorch baselines "
                        "always run with the user's setting, or PyTorch's default 0)")
    p.add_argument("--memory", default="trim", choices=("trim", "eager", "keep"),
                   help="how outcore returns freed memory to the OS: trim (default), eager "
                        "(every tensor its own mapping), keep (glibc's defaults)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run after warm-up (default 3; "
                   "`bench overhead` times at least 15)")
    p.add_argument("--repeat", type=int, default=1,
                   help="curve/batch: run every config this many times, round-robin, each in a "
                        "fresh process, and report the run with the median step (default 1)")
    p.add_argument("--out", default="bench-results", help="directory for the results (default bench-results)")
    p.add_argument("--name", default=None, help="file name stem of the results (default: experiment_model_batch)")
    p.set_defaults(func=run, defaults={a: p.get_default(a) for a in _EXPERIMENT_ONLY})


# Options of `bench curve` and `bench batch` alone: disk, comm and overhead measure
# fixed things of their own and print them, and refuse these rather than ignore them.
_EXPERIMENT_ONLY = ("model", "batch", "image_size", "seq_len", "optimizer", "policies",
                    "fractions", "factors", "baselines", "device", "thp", "no_thp", "memory",
                    "repeat", "name", "out")


def run(args) -> int:
    if args.dir is not None and not os.path.isdir(args.dir):
        what = "is not a directory" if os.path.exists(args.dir) else "does not exist"
        raise OutcoreError(f"--dir {args.dir} {what}: give a directory on the disk to measure "
                           "(the swap file's)")
    if args.busy and args.what != "comm":
        raise OutcoreError(f"--busy is for `bench comm`, not `bench {args.what}`")
    given = [a for a in _EXPERIMENT_ONLY
             if args.what not in ("curve", "batch") and getattr(args, a) != args.defaults[a]]
    if given:
        raise OutcoreError(f"`bench {args.what}` takes no "
                           f"{', '.join('--' + a.replace('_', '-') for a in given)}: those are "
                           "for `bench curve` and `bench batch`")
    if args.what == "disk":
        return run_disk(args)
    if args.what == "comm":
        return run_comm(args)
    if args.what == "overhead":
        return run_overhead(args)
    return run_experiment(args)


def run_experiment(args) -> int:
    from ..bench import experiments, output
    from ..workloads import sizes
    if args.steps < 1 or args.batch < 1 or args.repeat < 1:
        raise OutcoreError("--steps, --batch and --repeat must be at least 1")
    sizes(args.model, image_size=args.image_size, seq_len=args.seq_len)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise OutcoreError("--device cuda needs a CUDA device: torch.cuda.is_available() is "
                               "False here. Run `outcore bench` without --device on the CPU")
        if args.thp or args.no_thp or args.memory != "trim":
            raise OutcoreError("--thp, --no-thp and --memory steer the C allocator for a RAM "
                               "budget; with --device cuda the budget is GPU memory: drop them")
    if args.thp and args.no_thp:
        raise OutcoreError("--thp and --no-thp contradict each other: give one of them")
    baselines = tuple(_csv(args.baselines, experiments.BASELINES)) if args.baselines else None
    wrong = [b for b in baselines or () if experiments.ONLY_ON.get(b, args.device) != args.device]
    if wrong:
        raise OutcoreError(f"{', '.join(wrong)} cannot run with --device {args.device}: "
                           "in-core-heap is a CPU baseline, streamed-offload a GPU one")
    # Every list is read before the disk is measured (a minute) and the runs start.
    fractions = _numbers(args.fractions, float, "--fractions", "a budget as a fraction of the peak")
    factors = _numbers(args.factors, int, "--factors", "a batch multiple")
    policies = tuple(_csv(args.policies or ("on-demand,fixed,adaptive" if args.what == "curve"
                                            else "adaptive"), tuple(POLICIES)))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise OutcoreError(f"--out {args.out} is a file; the results go in a directory: name a "
                           "new or existing one")
    def disk():                # measured once the runs are known to fit (a minute)
        print("measuring the disk ...", file=sys.stderr, flush=True)
        return measure_disk(parse_bytes("1GiB"), args.dir)
    common = dict(image_size=args.image_size, seq_len=args.seq_len, steps=args.steps, swap_dir=args.dir,
                  optimizer=args.optimizer, disk=disk, repeat=args.repeat, device=args.device,
                  outcore_env=({"THP_MEM_ALLOC_ENABLE": "1"} if args.thp else
                               {"THP_MEM_ALLOC_ENABLE": "0"} if args.no_thp else None),
                  memory={"trim": True, "eager": "eager", "keep": False}[args.memory])
    if baselines:
        common["baselines"] = baselines
    if args.what == "curve":
        if args.device == "cpu" and policies:
            common["per_function_s"] = lambda: _executor_cost(args.dir)
        result = experiments.curve(args.model, args.batch, fractions=fractions, policies=policies,
                                   **common)
    else:
        common.setdefault("baselines", ("checkpoint", "offload-hooks"))
        common["baselines"] = tuple(b for b in common["baselines"] if b != "in-core")
        result = experiments.batch_sweep(args.model, args.batch, factors=factors, policies=policies,
                                         **common)
    name = args.name or f"{args.what}_{args.model}_b{args.batch}"
    command = "outcore " + " ".join(shlex.quote(a) for a in args.argv)
    files = output.save(result, args.out, name, command)
    print(output.markdown(result, command))
    print("wrote " + ", ".join(files) + ("" if any(f.endswith(".png") for f in files)
                                         else "  (no PNG: pip install matplotlib)"))
    return 0 if all("error" not in r["result"] for r in result["runs"]) else 1


def _numbers(text: str, kind, option: str, what: str) -> tuple:
    """A comma-separated list of positive numbers of `kind` (float or int)."""
    values = []
    for item in _csv(text):
        try:
            value = kind(item)
        except ValueError:
            raise OutcoreError(f"{option}: {item!r} is not {what}") from None
        if not value > 0:
            raise OutcoreError(f"{option}: {item!r} must be more than 0")
        values.append(value)
    return tuple(values)


def _csv(text: str, allowed=None) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise OutcoreError(f"expected a comma-separated list, got {text!r}")
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise OutcoreError(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def run_comm(args) -> int:
    from ..bench.comm import DEFAULT_SIZES, QUICK_SIZES, measure_comm, sizes_up_to
    if args.quick and args.size:
        raise OutcoreError("--quick picks its own sizes: give --quick or --size, not both")
    if args.quick:
        sizes, repeats = QUICK_SIZES, 3
    elif args.size:
        largest = parse_bytes(args.size)
        if largest < 4096:
            raise OutcoreError(f"--size must be at least 4KiB for comm, got {args.size}")
        sizes, repeats = sizes_up_to(largest), 5
    else:
        sizes, repeats = DEFAULT_SIZES, 5
    print(f"timing 2 gloo processes{', each also computing' if args.busy else ''}, "
          f"{len(sizes)} sizes x {repeats} repeats ...", file=sys.stderr, flush=True)
    fig = measure_comm(sizes, repeats=repeats, busy=args.busy)
    if args.json:
        print(json.dumps(fig))
        return 0
    ops = list(fig["ops"])
    print(f"{fig['backend']}, {fig['ranks']} local processes (torch {fig['torch']}), median of "
          f"{fig['repeats']}, {fig['seconds']:.1f} s:")
    print(f"  {'bytes':>10} " + " ".join(f"{op + ' ms':>17}" for op in ops))
    for i, nb in enumerate(fig["bytes"]):
        print(f"  {format_bytes(nb):>10} " + " ".join(
            f"{fig['ops'][op]['times_s'][i] * 1e3:17.3f}" for op in ops))
    print("  fitted to the α-β model (outcore.simulate.comm; largest relative error of the fit):")
    for op in ops:
        f = fig["ops"][op]
        print(f"  {op:<15} α = {f['alpha_s'] * 1e6:8.1f} µs   β⁻¹ = {f['bandwidth_Bps'] / 1e9:6.2f} GB/s"
              f"   (fit error up to {100 * f['max_rel_error']:.0f}%)   "
              f"CPU {f['cpu_share']:.2f} s/s")
    print("  CPU: seconds of CPU gloo's threads spend per second of the operation, rank 0 "
          "(Interconnect.cpu_share)")
    return 0


def run_disk(args) -> int:
    if args.quick:
        raise OutcoreError("--quick is for `bench comm`")
    size = parse_bytes(args.size or "1GiB")
    if size < CHUNK_BYTES:
        raise OutcoreError(f"--size must be at least {format_bytes(CHUNK_BYTES)}, got {args.size}")
    size -= size % 4096
    fig = measure_disk(size, args.dir)
    if args.json:
        print(json.dumps(fig))
        return 0
    mode = "O_DIRECT" if fig["o_direct"] else "buffered, page cache dropped"
    print(f"disk under {fig['directory']} ({fig['filesystem'] or 'unknown fs'}, {mode}), "
          f"{format_bytes(size)} per direction, {format_bytes(CHUNK_BYTES)} requests:")
    print(f"  write alone       {fig['write_GBps']:6.2f} GB/s")
    print(f"  read alone        {fig['read_GBps']:6.2f} GB/s")
    print(f"  write + read      {fig['both_total_GBps']:6.2f} GB/s in total (both at once)")
    print(f"  mover CPU         {fig['transfer_cpu_share']:6.2f} s per s of transfer "
          "(1 MiB transfers; Machine.transfer_cpu_share)")
    return 0


def _executor_cost(directory) -> float:
    """`bench overhead`'s cost per op, for `bench curve`'s predictions (0: not measured)."""
    print("measuring outcore's executor ...", file=sys.stderr, flush=True)
    from ..bench.overhead import measure_overhead
    try:
        fig = measure_overhead(directory=directory)
    except OutcoreError as err:         # the predictions go on without that cost
        print(f"outcore's executor not measured ({err}); the predictions leave its cost per "
              "op out", file=sys.stderr, flush=True)
        return 0.0
    if fig["unsteady"]:
        print(f"outcore's executor measured unsteady ({'; '.join(fig['unsteady'])}): the "
              "predictions' cost per op may be off", file=sys.stderr, flush=True)
    return fig["per_function_s"]


def run_overhead(args) -> int:
    from ..bench.overhead import measure_overhead
    if args.quick or args.size:
        raise OutcoreError("`bench overhead` takes neither --quick (for `bench comm`) nor "
                           "--size (for `bench comm` and `bench disk`)")
    fig = measure_overhead(steps=max(args.steps, 15), directory=args.dir)
    if args.json:
        print(json.dumps(fig))
        return 0
    print(f"outcore's executor: {fig['per_function_s'] * 1e6:.1f} µs per op "
          f"({fig['functions']} functions: plain step {fig['plain_s'] * 1e3:.1f} ms, under "
          f"outcore {fig['outcore_s'] * 1e3:.1f} ms of which {fig['wait_s'] * 1e3:.1f} ms waiting "
          "for transfers; medians)")
    print(f"  simulate with it: `outcore simulate ... --together --per-op-us "
          f"{fig['per_function_s'] * 1e6:.1f}`, or Machine(..., host_time=True, "
          f"per_function_s={fig['per_function_s']:.3g})")
    if fig["unsteady"]:
        print(f"  unsteady: {'; '.join(fig['unsteady'])}. Something else was probably running: "
              "measure again with the machine quiet before using this figure")
    return 0

