"""Every GPU check of the host tier (`offload="host"`) in one run of a few minutes, so
that a short loan of a GPU machine is enough:

    python benchmarks/gpu_tier_check.py --out docs/gpu/<device>-tier.json

Each section prints one JSON line as it ends (an error is reported and the next section
runs) and rewrites `--out` with all so far. On the lent machine (`run` tool):

    PYTHONPATH=src python3 benchmarks/gpu_tier_check.py --out $OUT/tier.json

Sections:

1. link: the host mover's own copies (a HostPool segment, page-locked by cudaHostRegister,
   and CudaLink's two streams), 1 GiB each way alone and both at once.
2. exact: CUDA in-core against OutOfCore(offload="host") at a quarter of the step's
   in-core peak (or the smallest feasible budget above it), 4 iterations each, compared
   bitwise (parameters, optimizer state, losses, and each parameter's sum computed on the
   GPU between iterations, where state left on the host tier is read in place):
   ResNet-18 (BatchNorm) with SGD, GPT-2 small (dropout) with fused AdamW and with
   AdamW's default (foreach), a bf16 autocast step, an fp16 step with GradScaler (Adam;
   SGD; Adam with outcore's default min_move_bytes, GradScaler's scalars then stay put),
   the host tier capped so that it spills to disk, and two runs with `torch.cuda._sleep`
   queued on the step's stream before every module (transfers race the compute). Each
   case also runs in-core twice (`in_core_twice_differs`): the GPU must be
   deterministic for "bitwise" to mean anything. `--cases` picks some. During the
   replays: torch.cuda.max_memory_allocated() above what was allocated before the model
   was built, against the budget, and reserved - allocated.
3. recorder: ResNet-18 batch 128 224x224 recorded on the GPU, the trace's in-core peak
   (per-op workspaces now measured) against torch.cuda.max_memory_allocated (gpu_check.py).
   allocator: the ResNet-18 case again in a child process with
   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (fragmentation and peak, beside 2's).
4. paper: ResNet-50 fp32 224x224 under a GPU budget B (--paper-budget, default 4 GiB,
   enforced with torch.cuda.set_per_process_memory_fraction): the largest in-core batch
   and its img/s; outcore at 7.5x that batch (budget 0.8 B, the rest for cuDNN/cuBLAS
   workspaces and fragmentation) and its img/s; checkpointing per block,
   save_on_cpu(pin_memory=True) and a streamed offload like torchtune's
   (outcore.bench.variants.StreamedOffload) at the largest batch each fits in B.
5. predict: the simulator's step for outcore's schedule of 4 (a roofline on the trace's
   FLOPs and bytes, scaled so that it gives the measured in-core step, with section 1's
   link speeds) against the measured replay.

--dry-run runs the same code on the CPU with the emulated link and tiny models: it
checks the script, and measures nothing about a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")     # deterministic cuBLAS

import torch  # noqa: E402

import outcore  # noqa: E402
from outcore.plan.feasibility import min_feasible_budget  # noqa: E402
from outcore.bench.variants import StreamedOffload  # noqa: E402
from outcore.run.movers import host  # noqa: E402
from outcore.simulate.machines import machine  # noqa: E402
from outcore.states import MAPPED  # noqa: E402
from outcore.workloads import build  # noqa: E402

GiB = 2**30
STEPS = 4


class Run:
    """The device, the sizes, and the JSON lines so far."""

    def __init__(self, dry: bool, deadline: float, out: str | None = None, head: dict | None = None):
        self.dry = dry
        self.device = "cpu" if dry else "cuda"
        self.deadline = deadline
        self.results: dict = {}
        self.out, self.head = out, head or {}
        self.cases: set = set()            # exact: all cases
        self.paper_batch = 0               # paper: search the in-core batch
        self.paper_modes = ["checkpoint", "save_on_cpu", "streamed-offload"]

    def late(self) -> bool:
        return time.monotonic() > self.deadline

    def save(self) -> None:
        """Written after every section: a run stopped from outside keeps what it did."""
        if self.out:
            with open(self.out, "w") as f:
                json.dump({**self.head, **self.results}, f, indent=1, default=str)

    def section(self, name, fn, *args):
        if time.monotonic() > self.deadline:
            out = {"skipped": "the run's time limit (--minutes) was reached"}
        else:
            start = time.monotonic()
            try:
                out = fn(self, *args)
            except Exception as exc:          # noqa: BLE001 - report it, run the next one
                out = {"error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc(limit=6)}
            out["seconds"] = round(time.monotonic() - start, 1)
        self.results[name] = out
        print(json.dumps({name: out}, default=str), flush=True)
        self.save()
        return out

    def sync(self):
        if not self.dry:
            torch.cuda.synchronize()

    def allocated(self) -> int:
        return 0 if self.dry else torch.cuda.memory_allocated()


# -- 1. the link ---------------------------------------------------------------------------
def link(run: Run) -> dict:
    nbytes = (64 * 2**20) if run.dry else GiB
    link = host.default_link()
    pool = host.HostPool(2 * nbytes, pin=link.pin, unpin=link.unpin, segment_bytes=2 * nbytes)
    try:
        a, b = pool.allocate(nbytes), pool.allocate(nbytes)
        dev_a = torch.empty(nbytes, dtype=torch.uint8, device=run.device)
        dev_b = torch.empty(nbytes, dtype=torch.uint8, device=run.device)
        sa, sb = dev_a.untyped_storage(), dev_b.untyped_storage()

        def once(ins, outs):
            run.sync()
            start = time.perf_counter()
            moves = ([link.copy_in(sa, a.address, nbytes)] if ins else []) + (
                [link.copy_out(b.address, sb, nbytes)] if outs else [])
            for m in moves:
                m.result()
            run.sync()
            return time.perf_counter() - start

        out = {"bytes": nbytes, "pool_capacity": pool.capacity, "link": link.name}
        for label, ins, outs in (("h2d", 1, 0), ("d2h", 0, 1), ("both", 1, 1)):
            once(ins, outs)
            secs = statistics.median(once(ins, outs) for _ in range(5))
            out[f"{label}_GBps"] = round(nbytes * (ins + outs) / secs / 1e9, 2)
        run.link = out
        return out
    finally:
        link.close()
        pool.close()


# -- 2. exactness ----------------------------------------------------------------------------
def _cases(run: Run) -> list[dict]:
    small = run.dry
    resnet = dict(name="resnet18", batch=4 if small else 64, image_size=32 if small else 128)
    gpt = dict(name="gpt2-tiny" if small else "gpt2", batch=2 if small else 4,
               seq_len=32 if small else 512)
    return [
        dict(case="resnet18-sgd", model=resnet, optimizer="sgd"),
        dict(case="gpt2-fused-adamw", model=gpt, optimizer="fused-adamw"),
        # AdamW's default on CUDA: multi-tensor (`_foreach_*`) kernels, split per tensor.
        dict(case="gpt2-adamw-foreach", model=gpt, optimizer="adamw"),
        dict(case="resnet18-bf16-autocast", model=resnet, optimizer="sgd", amp="bf16"),
        dict(case="resnet18-fp16-gradscaler", model=resnet, optimizer="adam", amp="fp16"),
        dict(case="resnet18-fp16-gradscaler-sgd", model=resnet, optimizer="sgd", amp="fp16"),
        # outcore's default min_move_bytes (64 KiB): GradScaler's scalars stay put.
        dict(case="resnet18-fp16-gradscaler-moves-large", model=resnet, optimizer="adam",
             amp="fp16", min_move_bytes=None),
        # host_budget: the state left on the host between iterations plus a quarter of
        # what the step adds there (from resnet18-sgd's plan): the rest spills to disk.
        dict(case="resnet18-sgd-spill", model=resnet, optimizer="sgd", host_budget="spill"),
        dict(case="resnet18-sgd-sleep", model=resnet, optimizer="sgd", sleep=True),
        dict(case="gpt2-fused-adamw-sleep", model=gpt, optimizer="fused-adamw", sleep=True),
    ]


def _workload(run: Run, case: dict):
    m = dict(case["model"])
    name = m.pop("name")
    opt = case["optimizer"]
    w = build(name, device=run.device, optimizer="adamw" if opt == "fused-adamw" else opt, **m)
    if opt == "fused-adamw":
        w.optimizer = torch.optim.AdamW(w.model.parameters(), lr=1e-3, fused=True)
    scaler = None
    if case.get("amp") == "fp16":
        scaler = torch.amp.GradScaler(run.device, init_scale=2.0**10)
    return w, scaler


def _step(run: Run, case: dict, w, scaler):
    amp = case.get("amp")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        return w.step()
    with torch.autocast(run.device, dtype=dtype):
        loss = w.loss()
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(w.optimizer)
        scaler.update()
    else:
        loss.backward()
        w.optimizer.step()
    w.optimizer.zero_grad(set_to_none=True)
    return loss


def _state(w) -> dict:
    out = {f"p.{k}": v.detach().cpu().clone() for k, v in w.model.state_dict().items()}
    for i, st in enumerate(w.optimizer.state.values()):
        for k, v in st.items():
            if torch.is_tensor(v):
                out[f"o.{i}.{k}"] = v.detach().cpu().clone()
    return out


def _train(run: Run, case: dict, ooc=None):
    w, scaler = _workload(run, case)
    handles = []
    if case.get("sleep") and not run.dry:
        for mod in w.model.modules():
            handles.append(mod.register_forward_pre_hook(lambda *_: torch.cuda._sleep(200_000)))
    losses, replay_peaks, sums = [], [], []
    base = run.allocated() - sum(t.nbytes for t in _state(w).values())  # state is managed
    for it in range(STEPS):
        torch.manual_seed(100 + it)
        if ooc is None:
            loss = _step(run, case, w, scaler)
        else:
            if not run.dry:
                torch.cuda.reset_peak_memory_stats()
            with ooc.iteration():
                loss = _step(run, case, w, scaler)
            run.sync()
            if not run.dry and ooc.report().iterations[-1].mode == "replay":
                replay_peaks.append((torch.cuda.max_memory_allocated() - base,
                                     torch.cuda.memory_reserved() - torch.cuda.memory_allocated()))
        losses.append(loss.detach().float().cpu())
        # Between iterations: kernels on the state as it is (on the host tier, mapped:
        # NOTE [Host tier between iterations]), compared with the in-core run's.
        sums.append(torch.stack([p.detach().double().sum() for p in w.model.parameters()]).cpu())
    for h in handles:
        h.remove()
    return _state(w), losses + sums, replay_peaks


def _same(a, b) -> list[str]:
    """Names of what differs (bitwise) between two runs: the losses and per-iteration
    sums first (`loss i` of iteration i, `sums i` after it), then the state."""
    (sa, la, _), (sb, lb, _) = a, b
    names = [f"loss {i}" for i in range(STEPS)] + [f"sums {i}" for i in range(STEPS)]
    order = sorted(range(len(names)), key=lambda i: (i % STEPS, i // STEPS))
    bad = [names[i] for i in order if i < len(la) and not torch.equal(la[i], lb[i])]
    return bad + [k for k in sa if k not in sb or not torch.equal(sa[k], sb[k])]


def _budget(run: Run, case: dict) -> tuple[int, int, int]:
    w, scaler = _workload(run, case)
    torch.manual_seed(99)
    _step(run, case, w, scaler)                       # lazily created state exists now
    with outcore.record() as rec:
        _step(run, case, w, scaler)
    trace = rec.trace
    peak, low = trace.peak(actual=True)[0], min_feasible_budget(trace)
    del w, rec
    return max(peak // 4, int(low * 1.05)), peak, low


def exact(run: Run) -> dict:
    out = {}
    base = {"case": "control"}
    needs = {}                  # case -> (host tier the plan needs, state it keeps there)
    for case in _cases(run):
        if run.cases and case["case"] not in run.cases:
            continue
        try:
            host_budget = case.get("host_budget")
            if host_budget == "spill":
                if "resnet18-sgd" not in needs:
                    raise RuntimeError("needs resnet18-sgd's plan, which did not run")
                need, lasting = needs["resnet18-sgd"]
                host_budget = lasting + (need - lasting) // 4
            budget, peak, low = _budget(run, case)
            plain = _train(run, case)
            control = _same(plain, _train(run, case))[:5]     # determinism of this case
            if case["case"] == "resnet18-sgd":
                base["differs"] = control
                out["control"] = base
            # min_move_bytes=0: every storage may move, the hardest case for exactness.
            small = {} if case.get("min_move_bytes", 0) is None else {"min_move_bytes": 0}
            with outcore.OutOfCore(budget=budget, offload="host", host_budget=host_budget,
                                   **small) as ooc:
                managed = _train(run, case, ooc)
                needs[case["case"]] = (ooc._mover.reserved,
                                       host.lasting_slow_bytes(ooc.trace, ooc.schedule))
                report, mover = ooc.report(), repr(ooc._mover)
                mapped = sum(1 for e in ooc._res.entries.values() if e.state is MAPPED)
                workspace = max((f.workspace_bytes for f in ooc.trace.functions), default=0)
            differs = _same(plain, managed)
            peaks = managed[2]
            out[case["case"]] = {
                "bitwise": not differs, "differs": differs[:5],
                "in_core_twice_differs": control, "budget": budget,
                "in_core_peak": peak, "min_feasible": low,
                "modes": [it.mode for it in report.iterations],
                "deviations": [it.deviation for it in report.iterations if it.deviation],
                "moved_per_replay": [it.bytes_written + it.bytes_read for it in report.iterations
                                     if it.mode == "replay"],
                "wait_s": [round(it.wait_s, 4) for it in report.iterations],
                "allocator_peak_above_base": [p for p, _ in peaks],
                "reserved_minus_allocated": [r for _, r in peaks],
                "allocator_peak_over_budget": (round(max(p for p, _ in peaks) / budget, 3)
                                               if peaks else None),
                "max_workspace_recorded": workspace, "mapped_between_iterations": mapped,
                "mover": mover}
        except Exception as exc:          # noqa: BLE001
            out[case["case"]] = {"error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc(limit=6)}
        print(json.dumps({"exact." + case["case"]: out[case["case"]]}, default=str), flush=True)
        torch.cuda.empty_cache() if not run.dry else None
    return out


# -- 3b. the recorder's peak, workspaces now measured, against the allocator's ---------------
def recorder(run: Run) -> dict:
    """docs/gpu-check.md found ResNet-18's allocator peak 1.27x the trace's (cuDNN
    workspaces); the recorder now measures them (NOTE [Workspace from the allocator])."""
    if run.dry:
        return {"skipped": "needs the CUDA allocator"}
    import gpu_check
    return gpu_check.model_figures("resnet18", dict(batch=128, image_size=224))


# -- 3. the expandable-segments allocator ------------------------------------------------------
def allocator(run: Run) -> dict:
    if run.dry:
        return {"skipped": "CUDA allocator setting"}
    here = os.path.dirname(os.path.abspath(__file__))
    # The child runs in benchmarks/: a relative PYTHONPATH (src) must point at the same place.
    paths = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths.append(os.path.join(os.path.dirname(here), "src"))
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True",
               PYTHONPATH=os.pathsep.join(paths))
    code = ("import json, sys; sys.argv=['x']; import gpu_tier_check as g; r=g.Run(False, 1e18); "
            "print('RESULT', json.dumps(g.exact_one(r, 'resnet18-sgd'), default=str))")
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=240, cwd=here)
    for line in child.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (child.stderr or child.stdout)[-2000:]}


def exact_one(run: Run, name: str) -> dict:
    case = next(c for c in _cases(run) if c["case"] == name)
    budget, peak, _ = _budget(run, case)
    with outcore.OutOfCore(budget=budget, offload="host", min_move_bytes=0) as ooc:
        _, _, peaks = _train(run, case, ooc)
    return {"budget": budget, "allocator_peak_above_base": [p for p, _ in peaks],
            "reserved_minus_allocated": [r for _, r in peaks]}


# -- 4. the paper's experiment ----------------------------------------------------------------
def _resnet50(run: Run, batch: int, mode: str = "plain"):
    size = 32 if run.dry else 224
    w = build("resnet18" if run.dry else "resnet50", batch=batch, image_size=size,
              device=run.device, optimizer="sgd")
    if mode == "checkpoint":
        model = w.model
        from torch.utils.checkpoint import checkpoint

        def forward(x, _m=model):
            x = _m.maxpool(_m.relu(_m.bn1(_m.conv1(x))))
            for layer in (_m.layer1, _m.layer2, _m.layer3, _m.layer4):
                for block in layer:
                    x = checkpoint(block, x, use_reentrant=False)
            return _m.fc(torch.flatten(_m.avgpool(x), 1))
        model.forward = forward
    return w


def _timed(run: Run, step, steps: int = 3) -> float:
    step()
    step()
    run.sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        run.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fits(run: Run, batch: int, mode: str) -> float | None:
    """Seconds per step of `mode` at `batch` within the capped allocator, or None (OOM)."""
    try:
        w = _resnet50(run, batch, mode)
        if mode == "save_on_cpu":
            def step():
                with torch.autograd.graph.save_on_cpu(pin_memory=not run.dry):
                    w.step()
        elif mode == "streamed-offload":
            streamed = StreamedOffload(w.batch[0].device)

            def step():
                with streamed.step():
                    w.step()
        else:
            step = w.step
        return _timed(run, step)
    except torch.OutOfMemoryError:
        return None
    finally:
        w = None
        if not run.dry:
            torch.cuda.empty_cache()
            # save_on_cpu's and the streamed offload's pinned blocks stay cached by
            # PyTorch's host allocator: give them back before the next try.
            getattr(torch._C, "_host_emptyCache", lambda: None)()


def _largest(run: Run, mode: str, start: int = 8, most: int = 1 << 16) -> tuple[int, float]:
    """The largest batch `mode` trains within the cap (doubling, then bisecting), up to
    `most` (then `most` itself is reported)."""
    if run.dry:
        return start, _fits(run, start, mode)
    lo, hi, t_lo = 0, start, None
    while (t := _fits(run, hi, mode)) is not None:
        lo, t_lo, hi = hi, t, hi * 2
        if lo >= most or run.late():
            return lo, t_lo
    while hi - lo > max(1, lo // 16) and not run.late():
        mid = (lo + hi) // 2
        t = _fits(run, mid, mode)
        if t is None:
            hi = mid
        else:
            lo, t_lo = mid, t
    return lo, t_lo


def paper(run: Run, budget: int) -> dict:
    if not run.dry:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(budget / total)
    try:
        out = {"gpu_budget": budget}
        if run.paper_batch:
            batch, secs = run.paper_batch, _fits(run, run.paper_batch, "plain")
            if secs is None:
                raise RuntimeError(f"--paper-batch {batch} does not fit in-core under the cap")
        else:
            batch, secs = _largest(run, "plain")
        out["in_core"] = {"batch": batch, "img_per_s": round(batch / secs, 1)}
        big = -(-batch * 15 // 2)                                  # 7.5x, rounded up
        try:                            # an error here leaves the figures beside it
            out["outcore"] = _paper_outcore(run, budget, big, batch / secs)
        except Exception as exc:          # noqa: BLE001
            out["outcore"] = {"batch": big, "error": f"{type(exc).__name__}: {exc}",
                              "notes": getattr(exc, "__notes__", []),
                              "traceback": traceback.format_exc(limit=6)}
        if not run.dry:
            torch.cuda.empty_cache()
        for mode in run.paper_modes:
            if mode == "streamed-offload" and run.dry:
                continue                                       # CUDA streams
            # Up to outcore's batch: offloading hooks at larger batches pin more host
            # memory than the machine may have.
            b, s = _largest(run, mode, start=max(batch, 8), most=big)
            out[mode] = {"batch": b, "img_per_s": round(b / s, 1) if s else None}
        return out
    finally:
        if not run.dry:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()


def _paper_outcore(run: Run, budget: int, big: int, in_core_rate: float) -> dict:
    w = _resnet50(run, big)
    with outcore.OutOfCore(budget=int(budget * 0.8), offload="host") as ooc:
        def step():
            with ooc.iteration():
                w.step()
        for _ in range(3):                  # recordings until the state is stable
            step()
        secs_ooc = _timed(run, step)
        run.ooc_paper = (ooc.trace, ooc.schedule, secs_ooc)
        report = ooc.report()
        peak_alloc = None if run.dry else torch.cuda.max_memory_allocated()
    return {"batch": big, "img_per_s": round(big / secs_ooc, 1),
            "of_in_core": round((big / secs_ooc) / in_core_rate, 3),
            "modes": [it.mode for it in report.iterations],
            "max_memory_allocated": peak_alloc, "policy": report.policy}


# -- 5. the simulator against the measured step ----------------------------------------------
def predict(run: Run) -> dict:
    if not hasattr(run, "ooc_paper"):
        return {"skipped": "section 4 (paper) measured no outcore step"}
    trace, schedule, measured = run.ooc_paper
    preset = machine("h100-80gb")
    in_core = _fits_in_core_step(run, trace)
    plain = outcore.simulate(trace, schedule, preset)
    scale = in_core / plain.in_core_time_s if plain.in_core_time_s else 1.0
    link_fig = getattr(run, "link", {})
    this_gpu = dataclasses.replace(
        preset, name="this-gpu", peak_flops=preset.peak_flops / scale,
        memory_bandwidth=preset.memory_bandwidth / scale,
        link_in=link_fig.get("h2d_GBps", preset.link_in / 1e9) * 1e9,
        link_out=link_fig.get("d2h_GBps", preset.link_out / 1e9) * 1e9,
        link_both=link_fig.get("both_GBps", preset.link_both / 1e9) * 1e9)
    sim = outcore.simulate(trace, schedule, this_gpu)
    return {"measured_step_s": measured, "predicted_step_s": sim.iteration_time_s,
            "predicted_over_measured": round(sim.iteration_time_s / measured, 3),
            "compute_scale": round(scale, 3), "in_core_step_s_at_this_batch": in_core}


def _fits_in_core_step(run: Run, trace) -> float:
    """The in-core step at the traced batch, measured without a cap (the GPU has room)."""
    batch = run.results["paper"]["outcore"]["batch"]
    secs = _fits(run, batch, "plain")
    if secs is None:
        raise RuntimeError(f"the in-core step at batch {batch} does not fit this GPU either")
    return secs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--paper-budget", default="4GiB")
    parser.add_argument("--minutes", type=float, default=7.5)
    parser.add_argument("--only", default="link,exact,recorder,allocator,paper,predict")
    parser.add_argument("--cases", default="", help="exact: these cases only (comma-separated)")
    parser.add_argument("--paper-batch", type=int, default=0,
                        help="paper: the in-core batch, measured at once instead of searched")
    parser.add_argument("--paper-modes", default="checkpoint,save_on_cpu,streamed-offload",
                        help="paper: the baselines beside outcore (comma-separated, or none)")
    parser.add_argument("--hang-dump", type=float, default=None,
                        help="seconds after which to print every thread's stack and exit "
                             "(default: --minutes + 2 minutes); what ran is in --out")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.hang_dump or 60 * args.minutes + 120, exit=True)
    run = Run(args.dry_run, time.monotonic() + 60 * args.minutes, args.out)
    run.cases = set(filter(None, args.cases.split(",")))
    run.paper_batch = args.paper_batch
    run.paper_modes = [m for m in args.paper_modes.split(",") if m and m != "none"]
    if run.dry:
        host.default_link = host.EmulatedLink
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    head = {"device": "cpu (dry run)" if run.dry else torch.cuda.get_device_name(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(head), flush=True)
    run.head = head
    only = set(args.only.split(","))
    budget = outcore.units.parse_bytes(args.paper_budget) if not run.dry else 64 * 2**20
    for name, fn, extra in (("link", link, ()), ("exact", exact, ()), ("recorder", recorder, ()),
                            ("allocator", allocator, ()),
                            ("paper", paper, (budget,)), ("predict", predict, ())):
        if name in only:
            run.section(name, fn, *extra)


if __name__ == "__main__":
    main()
