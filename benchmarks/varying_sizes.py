"""Steps whose sizes vary with the same ops (NOTE [Step shapes] rule 10): a small GPT-2
(transformers, from a config) on batches of 8 sequences padded to each batch's longest,
as `DataCollatorWithPadding` makes them, lengths drawn at random (32 to 256, a long
tail), under a budget of about half its in-core peak at the longest. Plain PyTorch
against outcore (and, with --also-src, outcore from another source tree), each in a
fresh process, the runs alternating; per run the seconds of the last half of the
iterations, the iterations recorded and deviated, those that replayed a plan for
longer sequences, and whether the final parameters are bitwise plain PyTorch's.
`--every n`: gradient accumulation, optimizer.step() every n-th iteration (the loss
divided by n), so that steps of n families (NOTE [Step shapes] rule 2) come in turn.
`--own-labels`: the labels a tensor of their own (a collator's copy of the ids), read
first by the loss, at the end of the forward; else the input ids themselves.

    .venv/bin/python benchmarks/varying_sizes.py --rounds 3 [--every 2] [--steps 32]
        [--own-labels] [--also-src /tmp/x/src]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time

from sidebyside import arguments, counts, side_by_side, summary

STEPS = 32
BUDGET = 256 * 2**20        # the in-core peak is 556 MiB at length 240, 247 at 100


def lengths(n: int) -> list[int]:
    """Per batch, the longest of 8 lengths drawn from a log-normal (median 60)."""
    import random
    rng = random.Random(7)
    return [max(min(int(rng.lognormvariate(4.1, 0.5)), 256) for _ in range(8)) for _ in range(n)]


def child(mode: str, out: str, every: int = 1, steps: int = STEPS,
          own_labels: bool = False) -> None:
    import logging

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=8192,
                                     n_positions=256, bos_token_id=0, eos_token_id=0))
    net.config.use_cache = False
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 8192, (8, n), generator=g) for n in lengths(steps)]
    ooc, times = None, []
    with tempfile.TemporaryDirectory() as swap:
        if mode != "plain":
            import outcore
            ooc = outcore.OutOfCore(BUDGET, swap_dir=swap)
        for it, ids in enumerate(data):
            start = time.perf_counter()
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                labels = ids.clone() if own_labels else ids
                (net(input_ids=ids, labels=labels).loss / every).backward()
                if it % every == every - 1:
                    opt.step()
                    opt.zero_grad()
            times.append(time.perf_counter() - start)
        result = {"mode": mode, "seconds": sum(times[steps // 2:])}
        if ooc is not None:
            result.update(counts(ooc), in_core_peak=ooc.report().in_core_peak)
            ooc.close()
    torch.save(net.state_dict(), out)
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=int, default=1, help="optimizer.step() every n-th iteration")
    ap.add_argument("--steps", type=int, default=STEPS, help="iterations (the last half timed)")
    ap.add_argument("--own-labels", action="store_true",
                    help="labels a copy of the ids, read first by the loss")
    a = arguments(ap)
    if a.child:
        child(a.child, a.out, a.every, a.steps, a.own_labels)
        return
    print("lengths", lengths(a.steps), "step every", a.every, "own labels", a.own_labels)
    runs = side_by_side(__file__, ["--every", str(a.every), "--steps", str(a.steps),
                                   *(["--own-labels"] if a.own_labels else [])], a.rounds,
                        a.also_src)
    summary(runs, a.rounds, a.steps, ["records", "deviations", "late_records", "late_deviations",
                                         "smaller", "over_budget"])


if __name__ == "__main__":
    main()
