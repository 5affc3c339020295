"""How many tries a user needs to find a budget OutOfCore takes, starting far too low and
taking each InfeasibleBudget's figure (`min_feasible_bytes`) as the next budget.

    .venv/bin/python benchmarks/budget_retries.py [mlp|bert]

mlp: three Linear layers (1024-2048-2048-10), batch 64; bert: a 2-layer BERT from a
config (hidden 128), batch 8 x 64 tokens; both with Adam, min_move_bytes=0. Each try is a
new OutOfCore (one that raised refuses later iterations); prints each try's figure and
phase, and whether the model was still untouched after it.
"""
import sys
import tempfile

import torch

import outcore


def build(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(),
                                    torch.nn.Linear(2048, 2048), torch.nn.ReLU(),
                                    torch.nn.Linear(2048, 10))
        return model, torch.randn(64, 1024), torch.randint(0, 10, (64,))
    from transformers import BertConfig, BertForSequenceClassification
    model = BertForSequenceClassification(BertConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
        vocab_size=1000))
    return model, torch.randint(0, 1000, (8, 64)), torch.randint(0, 2, (8,))


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "mlp"
    model, x, y = build(kind)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        out = model(x)
        logits = out.logits if hasattr(out, "logits") else out
        torch.nn.functional.cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad()

    before = [p.detach().clone() for p in model.parameters()]
    budget = 64 * 1024
    for tries in range(1, 21):
        try:
            with tempfile.TemporaryDirectory() as swap, \
                    outcore.OutOfCore(budget, swap_dir=swap, min_move_bytes=0) as ooc:
                for _ in range(3):
                    with ooc.iteration():
                        step()
            print(f"trained at {budget:,} B after {tries} tries")
            return
        except outcore.InfeasibleBudget as err:
            same = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
            print(f"try {tries}: {budget:,} B -> at least {err.min_feasible_bytes:,} B "
                  f"({err.phase}); model untouched: {same}")
            budget = err.min_feasible_bytes
    print("no budget found in 20 tries")


if __name__ == "__main__":
    main()
