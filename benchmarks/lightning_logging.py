"""A Lightning fit that logs and checkpoints as users' fits do, under outcore and plain,
side by side: how many of its iterations replay their plan, and what the fit costs.

    .venv/bin/python benchmarks/lightning_logging.py [--rounds 3] [--width 1024]
        [--also-src DIR]

The module: an MLP (4 x Linear(width, width) with ReLU, dropout before the head, AdamW,
OneCycleLR stepped per step, gradient clipping), 2 micro-batches per optimizer step,
`self.log` of the loss and accuracy on step and on epoch, ModelCheckpoint every 2 steps,
LearningRateMonitor, and validation every 8 batches; 3 epochs of 20 steps. outcore runs
through `OutcoreCallback` at about half the in-core peak. Each run is a fresh process,
the modes alternating round by round; a mode's figure is the median over rounds of the
fit's wall time. Every outcore run's final parameters and optimizer state are compared
bitwise with the plain run of its round. `--also-src DIR` adds outcore imported from DIR
(another checkout's `src`: `git archive <commit> src | tar -x -C DIR/..`): before and
after in one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from sidebyside import side_by_side


def child(mode: str, width: int, out: str) -> None:
    import logging
    import warnings

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            layers = []
            for _ in range(4):
                layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
            self.body = torch.nn.Sequential(*layers, torch.nn.Dropout(0.1),
                                            torch.nn.Linear(width, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self.body(x)
            loss = torch.nn.functional.cross_entropy(out, y)
            self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
            self.log("train_acc", (out.argmax(1) == y).float().mean(), on_step=True,
                     on_epoch=True)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.body(x), y))

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=100)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        return TensorDataset(torch.randn(n, width, generator=g),
                             torch.randint(0, 10, (n,), generator=g))

    with tempfile.TemporaryDirectory(prefix="pl_logging_") as root:   # checkpoints, logs, swap
        model = Net()
        callbacks = [ModelCheckpoint(dirpath=root + "/ck", every_n_train_steps=2, save_top_k=-1),
                     LearningRateMonitor("step")]
        ooc = None
        if mode != "plain":
            import outcore
            from outcore.integrations.lightning import OutcoreCallback
            # Parameters, gradients and AdamW's two moments of 4 layers: 64 x width^2 bytes
            # and the activations; the budget is half of the former.
            ooc = outcore.OutOfCore(budget=32 * width * width, swap_dir=root)
            callbacks.insert(0, OutcoreCallback(ooc))
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=3, accumulate_grad_batches=2,
                             gradient_clip_val=1.0, callbacks=callbacks, default_root_dir=root,
                             logger=CSVLogger(root), enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0,
                             val_check_interval=8, log_every_n_steps=1, deterministic=True)
        train = DataLoader(data(64 * 40, 1), batch_size=64, shuffle=True,
                           generator=torch.Generator().manual_seed(7))
        t = time.perf_counter()
        trainer.fit(model, train, DataLoader(data(128, 2), batch_size=64))
        fit_s = time.perf_counter() - t
        result = {"mode": mode, "fit_s": fit_s, "steps": trainer.global_step}
        if ooc is not None:
            report = ooc.report()
            its = report.iterations
            result.update(iterations=len(its),
                          records=sum(it.mode == "record" for it in its),
                          deviations=sum(it.deviation is not None for it in its),
                          over_budget=sum(it.peak_resident > ooc.budget for it in its))
            ooc.close()
        state = {f"p.{k}": v for k, v in model.state_dict().items()}
        for i, st in trainer.optimizers[0].state.items():
            state.update({f"o{i}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
        torch.save(state, out)
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--also-src", default=None)
    ap.add_argument("--child", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.width, a.out)
        return
    runs = side_by_side(__file__, ["--width", str(a.width)], a.rounds, a.also_src)
    modes = list(runs.items())
    plain_s = statistics.median(x["fit_s"] for x in runs["plain"])
    print(f"\nwidth {a.width}, {a.rounds} rounds, medians")
    print("| run | fit (s) | x plain's time | iterations | recorded | deviated | over the budget | bitwise |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, xs in modes:
        s = statistics.median(x["fit_s"] for x in xs)
        if mode == "plain":
            print(f"| plain | {s:.2f} | 1.00 | | | | | |")
            continue
        pick = lambda k: "/".join(str(x[k]) for x in xs)    # noqa: E731 - per round
        print(f"| {mode} | {s:.2f} | {s / plain_s:.2f} | {pick('iterations')} | "
              f"{pick('records')} | {pick('deviations')} | {pick('over_budget')} | "
              f"{all(x['bitwise'] for x in xs)} |")


if __name__ == "__main__":
    main()
