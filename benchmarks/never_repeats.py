"""Steps that never repeat: a small attention decoder with teacher forcing by a coin toss
at every time step (the next input is the target token or the model's own argmax) and
lengths drawn per batch, so that no two steps run the same ops and every replay leaves
its plan within its first functions and runs the rest op by op (on demand: docs/executor.md,
"Steps of several shapes"). Plain PyTorch against outcore (and, with --also-src, outcore
from another source tree), each in a fresh process, the runs alternating; per run the
median seconds of an iteration in the last half, the iterations recorded and deviated,
and whether the final parameters are bitwise plain PyTorch's. What it measures is
outcore's own cost per op when it runs a step op by op: the model's ops are small (a
batch of 16, hidden 128), so that cost is most of the difference. The plain child also
times the same iterations under a dispatch mode that only counts ops: what any tool
built on a Python dispatch mode pays per op before it does anything.

    .venv/bin/python benchmarks/never_repeats.py --rounds 3 [--budget 1GiB] [--steps 16]
        [--also-src /tmp/x/src]

`--budget 1GiB` leaves everything resident (the in-core peak is about 13 MiB); `8MiB`
makes the step move storages on demand too.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time

from sidebyside import arguments, counts, side_by_side

STEPS = 16
V, E, H, B = 1000, 64, 128, 16


def child(mode: str, out: str, budget: str, steps: int) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(V, E)
            self.cell = torch.nn.LSTMCell(E + H, H)
            self.attn = torch.nn.Linear(H, H)
            self.out = torch.nn.Linear(2 * H, V)

        def forward(self, enc, tgt, coin):
            h = enc.mean(1)
            c, inp, logits = torch.zeros_like(h), tgt[:, 0], []
            for t in range(1, tgt.shape[1]):
                scores = torch.bmm(enc, self.attn(h).unsqueeze(2)).squeeze(2)
                ctx = torch.bmm(F.softmax(scores, 1).unsqueeze(1), enc).squeeze(1)
                h, c = self.cell(torch.cat([self.emb(inp), ctx], 1), (h, c))
                lo = self.out(torch.cat([h, ctx], 1))
                logits.append(lo)
                inp = tgt[:, t] if torch.rand((), generator=coin) < 0.5 else lo.argmax(1)
            return torch.stack(logits, 1)

    torch.manual_seed(0)
    model = Decoder()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    coin, g = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    data = []
    for _ in range(steps):
        src = int(torch.randint(5, 25, (), generator=g))
        tgt = int(torch.randint(4, 20, (), generator=g))
        data.append((torch.randn(B, src, H, generator=g),
                     torch.randint(0, V, (B, tgt), generator=g)))
    ooc, times = None, []
    with tempfile.TemporaryDirectory() as swap:
        if mode != "plain":
            import outcore
            ooc = outcore.OutOfCore(budget, swap_dir=swap)
        for enc, tgt in data:
            start = time.perf_counter()
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                step(model, opt, enc, tgt, coin)
            times.append(time.perf_counter() - start)
        result = {"mode": mode, "seconds": statistics.median(times[steps // 2:])}
        if ooc is None:
            result["ops"], result["mode_seconds"] = ops_per_iteration(
                model, opt, data[steps // 2:], coin)
        if ooc is not None:
            result.update(counts(ooc), in_core_peak=ooc.report().in_core_peak)
            ooc.close()
    torch.save(model.state_dict(), out)
    print(json.dumps(result))


def step(model, opt, enc, tgt, coin) -> None:
    """One training step of the decoder on a batch (`enc`, `tgt`)."""
    import torch.nn.functional as F
    logits = model(enc, tgt, coin)
    loss = F.cross_entropy(logits.reshape(-1, V), tgt[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()


def ops_per_iteration(model, opt, data, coin) -> tuple[float, float]:
    """The median number of ops the dispatcher sees per iteration of `data`, counted by a
    dispatch mode on copies of the model, the optimizer and the coin (after the timed
    run: the plain run's own state is what is compared), and the median seconds of
    those iterations: what any Python dispatch mode costs, one that does nothing else."""
    import copy

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))
    model, opt = copy.deepcopy(model), copy.deepcopy(opt)
    opt.param_groups[0]["params"] = list(model.parameters())     # the copies' own
    opt.state.clear()
    coin = torch.Generator().set_state(coin.get_state())
    counts, times = [], []
    for enc, tgt in data:
        Count.n = 0
        start = time.perf_counter()
        with Count():
            step(model, opt, enc, tgt, coin)
        times.append(time.perf_counter() - start)
        counts.append(Count.n)
    return statistics.median(counts), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="1GiB")
    ap.add_argument("--steps", type=int, default=STEPS, help="iterations (the last half timed)")
    a = arguments(ap)
    if a.child:
        child(a.child, a.out, a.budget, a.steps)
        return
    runs = side_by_side(__file__, ["--budget", a.budget, "--steps", str(a.steps)], a.rounds,
                        a.also_src)
    plain = statistics.median(x["seconds"] for x in runs["plain"])
    ops = statistics.median(x["ops"] for x in runs["plain"])
    print(f"\nseconds of an iteration, median of the last {a.steps // 2} of {a.steps}; "
          f"median (range) of {a.rounds} rounds; budget {a.budget}; {ops:.0f} ops an iteration")
    counted = statistics.median(x["mode_seconds"] for x in runs["plain"])
    print(f"{'plain, a mode counting':22} {counted:.4f}  {counted / plain:.2f}x plain, "
          f"{(counted - plain) / ops * 1e6:.0f} us per op more (a dispatch mode that does "
          "nothing but count)")
    for mode, results in runs.items():
        secs = [x["seconds"] for x in results]
        extra = "" if mode == "plain" else (
            f"  {statistics.median(secs) / plain:.2f}x plain, "
            f"{(statistics.median(secs) - plain) / ops * 1e6:.0f} us per op more, records "
            f"{[x['records'] for x in results]}, deviations "
            f"{[x['deviations'] for x in results]}, bitwise {all(x['bitwise'] for x in results)}")
        print(f"{mode:22} {statistics.median(secs):.4f} ({min(secs):.4f}-{max(secs):.4f}){extra}")


if __name__ == "__main__":
    main()
