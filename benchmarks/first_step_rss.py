"""A library's first step against the process bound the report prints: a transformers
GPT-2 (6 layers x 512, vocabulary 8192, batch 4 x 64 tokens, AdamW) built under
`ooc.building()` and trained 4 iterations, each run in a fresh process, cold (nothing of
transformers run before `OutOfCore()`) and warm (one step of a 1-layer GPT-2 first).
Prints VmHWM minus the report's `rss_start` beside `rss_bound` and the most unmanaged.

    .venv/bin/python benchmarks/first_step_rss.py
    .venv/bin/python benchmarks/first_step_rss.py --budgets 64MiB,100MiB
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

VOCAB, SEQ, BATCH = 8192, 64, 4


def child(budget: str, warm: bool) -> dict:
    import torch
    import transformers

    import outcore

    def step(model, opt, seed):
        x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()

    def config(layers, width, heads):
        return transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=heads,
                                       vocab_size=VOCAB, n_positions=SEQ)
    if warm:
        tiny = transformers.GPT2LMHeadModel(config(1, 64, 2))
        step(tiny, torch.optim.AdamW(tiny.parameters()), 0)
        del tiny
    torch.manual_seed(0)
    ooc = outcore.OutOfCore(budget)
    with ooc.building():
        model = transformers.GPT2LMHeadModel(config(6, 512, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i in range(4):
        with ooc.iteration():
            step(model, opt, 1000 + i)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    report = ooc.report()
    ooc.close()
    return {"grown": peak - report.rss_start, "bound": report.rss_bound,
            "unmanaged": max(it.unmanaged for it in report.iterations)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="64MiB")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "warm")))
        return 0
    mib = 2 ** 20
    print("| budget | first step | peak RSS - rss_start | report's bound | within | unmanaged (report) |")
    print("|---|---|---|---|---|---|")
    for budget in args.budgets.split(","):
        for warmth in ("cold", "warm"):
            out = subprocess.run([sys.executable, __file__, "--child", budget, warmth],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {budget} | {warmth} | {r['grown'] / mib:.0f} MiB | {r['bound'] / mib:.0f} MiB "
                  f"| {'yes' if r['grown'] <= r['bound'] else 'no'} | {r['unmanaged'] / mib:.0f} MiB |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
