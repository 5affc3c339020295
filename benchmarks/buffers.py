"""Module buffers a step only reads, as state against as inputs: the smallest feasible
budget of two models whose buffers are most of their memory, and a few steps at a budget
between the two figures.

- `pruned`: eight 1024x1024 linear layers pruned by `torch.nn.utils.prune` (each holds
  `weight_orig`, a parameter, and `weight_mask`, a buffer of the same size), AdamW.
- `positional`: a two-layer transformer encoder LM as in PyTorch's tutorial, its
  sinusoidal table registered as a buffer (`max_len` 8192 x 512) and sliced per batch.

"As inputs" is the same recorded trace with every read-only module buffer classed an
input (what `trace/recorder._classify` did before buffers were state); the figures are
`outcore.smallest_budget` of each. The steps run under OutOfCore at the budget halfway
between them, against plain PyTorch, bitwise.

    .venv/bin/python benchmarks/buffers.py
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile

import torch

import outcore
from outcore.units import format_bytes


def pruned():
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(1024, 1024),
                                                      torch.nn.GELU()) for _ in range(8)])
    for block in model:
        prune.l1_unstructured(block[0], "weight", amount=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(it):
        x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(it))
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()
    return model, opt, step


class _Positional(torch.nn.Module):
    def __init__(self, d_model=512, max_len=8192):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, 1, d_model)
        pe[:, 0, 0::2] = torch.sin(position * div)
        pe[:, 0, 1::2] = torch.cos(position * div)
        self.register_buffer("pe", pe)

    def forward(self, x):
        return x + self.pe[: x.size(0)]


def positional():
    torch.manual_seed(0)
    vocab, d = 2000, 512

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, d)
            self.pos = _Positional(d)
            layer = torch.nn.TransformerEncoderLayer(d, 8, 1024, dropout=0.0)
            self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = torch.nn.Linear(d, vocab)

        def forward(self, src):
            return self.head(self.encoder(self.pos(self.embed(src) * math.sqrt(d))))

    model = LM()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(it):
        g = torch.Generator().manual_seed(it)
        src = torch.randint(vocab, (128, 8), generator=g)
        loss = torch.nn.functional.cross_entropy(model(src).reshape(-1, vocab),
                                                 src.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()
    return model, opt, step


def read_only_buffers(trace) -> set:
    """Ids of the module buffers that existed before the step and that it only reads."""
    written = {a.array for f in trace.functions for a in f.accesses if a.kind != "read"}
    return {a.id for a in trace.arrays
            if a.category == "buffer" and a.existed_before and a.id not in written}


def as_inputs(trace):
    """The trace with every read-only module buffer classed an input."""
    ids = read_only_buffers(trace)
    arrays = tuple(dataclasses.replace(a, kind="input", category="input") if a.id in ids
                   else a for a in trace.arrays)
    return dataclasses.replace(trace, arrays=arrays)


def main() -> None:
    steps = 6
    print("| model | buffers only read | in-core peak | smallest budget: buffers as state "
          "| as inputs | at the budget between: modes | bitwise |")
    print("|---|---|---|---|---|---|---|")
    for name, make in (("pruned", pruned), ("positional", positional)):
        model, opt, step = make()
        step(0)                                  # the optimizer's state exists
        with outcore.record() as rec:
            step(1)
        trace = rec.trace
        ids = read_only_buffers(trace)
        only_read = sum(a.nbytes for a in trace.arrays if a.id in ids)
        state, inputs = outcore.smallest_budget(trace), outcore.smallest_budget(as_inputs(trace))
        budget = (state + inputs) // 2
        runs = {}
        for use in (False, True):
            model, opt, step = make()
            with tempfile.TemporaryDirectory() as swap:
                ooc = outcore.OutOfCore(budget, swap_dir=swap) if use else None
                with ooc or contextlib.nullcontext():
                    losses = []
                    for it in range(steps):
                        with ooc.iteration() if ooc else contextlib.nullcontext():
                            losses.append(step(it))
                    modes = [i.mode for i in ooc.report().iterations] if ooc else None
            runs[use] = (losses, [t.detach().clone() for t in model.state_dict().values()],
                         modes)
        same = (all(torch.equal(a, b) for a, b in zip(runs[False][0], runs[True][0]))
                and all(torch.equal(a, b) for a, b in zip(runs[False][1], runs[True][1])))
        modes = runs[True][2]
        print(f"| {name} | {format_bytes(only_read)} | {format_bytes(trace.peak()[0])} "
              f"| {format_bytes(state)} | {format_bytes(inputs)} | {format_bytes(budget)}: "
              f"{', '.join(modes)} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
