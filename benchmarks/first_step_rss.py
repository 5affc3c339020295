"""A library's first step against the process bound the report prints: a transformers
GPT-2 (6 layers x 512, vocabulary 8192, batch 4 x 64 tokens, AdamW) built under
`ooc.building()` and trained 4 iterations, each run in a fresh process, cold (nothing of
transformers run before `OutOfCore()`) and warm (one step of a 1-layer GPT-2 first).
Prints, per run, the iterations' peak resident set (VmHWM, reset after building) above
the process's base (NOTE [The process's base] in run/ooc.py) beside the report's
`rss_bound`, the report's own highest `rss+` and `unmanaged`, and the peak above the
resident set when the OutOfCore was made, building included.
Then, in one more fresh process of plain PyTorch, what transformers' first model costs
by itself: the resident set before and after building the same GPT-2 on `meta`.

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
    def peak():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    building = peak()
    with open("/proc/self/clear_refs", "w") as f:      # the iterations' own peak from here
        f.write("5")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i in range(4):
        with ooc.iteration():
            step(model, opt, 1000 + i)
    report = ooc.report()
    ooc.close()
    return {"above_base": peak() - report.rss_start,
            "sampled": max(it.rss_above_start for it in report.iterations),
            "bound": report.rss_bound, "above_made": max(building, peak()) - report.rss_made,
            "unmanaged": max(it.unmanaged for it in report.iterations)}


def first_model() -> dict:
    import gc

    import torch
    import transformers

    from outcore.memory.malloc import resident_bytes
    gc.collect()
    before = resident_bytes()
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=6, n_embd=512, n_head=8, vocab_size=VOCAB, n_positions=SEQ))
    del model
    gc.collect()
    return {"grown": resident_bytes() - before}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="64MiB")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(first_model() if args.child[0] == "meta"
                         else child(args.child[0], args.child[1] == "warm")))
        return 0
    mib = 2 ** 20

    def run(*child_args) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", *child_args],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    print("| budget | first step | iterations' peak above the base | report's bound | within "
          "| report's highest rss+ | unmanaged (report) | peak above OutOfCore(), building included |")
    print("|---|---|---|---|---|---|---|---|")
    for budget in args.budgets.split(","):
        for warmth in ("cold", "warm"):
            r = run(budget, warmth)
            print(f"| {budget} | {warmth} | {r['above_base'] / mib:.0f} MiB | {r['bound'] / mib:.0f} MiB "
                  f"| {'yes' if r['above_base'] <= r['bound'] else 'no'} "
                  f"| {r['sampled'] / mib:.0f} MiB | {r['unmanaged'] / mib:.0f} MiB "
                  f"| {r['above_made'] / mib:.0f} MiB |", flush=True)
    grown = run("meta", "-")["grown"]
    print(f"plain PyTorch, a fresh process: building this GPT-2 on meta (no tensor memory) grew "
          f"the resident set by {grown / mib:.0f} MiB, kept after the model is deleted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
