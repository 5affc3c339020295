"""outcore.integrations.lightning: a Lightning Trainer with OutcoreCallback trains bitwise
as without it, one outcore iteration per optimizer step (gradient accumulation inside
one); an exception escaping a step ends that iteration and loses nothing; misuse says
what to do."""
import logging
import signal
import warnings
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lightning", reason="outcore.integrations.lightning needs `lightning` "
                                        "(pip install lightning, or the `test` extra)")

import lightning.pytorch as pl  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import outcore  # noqa: E402
from outcore.integrations.lightning import OutcoreCallback  # noqa: E402

from ..trace.helpers import assert_bitwise_equal, state_of  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)    # no "GPU available: ..."

STEPS, ACCUMULATION, BATCH, WIDTH = 4, 2, 16, 256
# The step peaks at about 2.6 MiB in core (asserted below: more than twice the budget).
BUDGET = 2**20


class Net(pl.LightningModule):
    """A 4-layer MLP; `raise_at`: the forward call (1-based) that raises `exc`."""

    def __init__(self, raise_at=None, exc=RuntimeError, manual=False, fused=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(32, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(),
            torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, 4))
        self.raise_at, self.exc = raise_at, exc
        self.automatic_optimization = not manual
        self.fused = fused
        self.forwards = 0
        self.losses = []
        self.inside = []            # whether each forward ran inside an outcore iteration
        self.callback = None

    def forward(self, x):
        self.forwards += 1
        if self.forwards == self.raise_at:
            raise self.exc("injected")
        if self.callback is not None:
            self.inside.append(self.callback.in_step)
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, fused=self.fused)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def make_data():
    g = torch.Generator().manual_seed(1)
    n = STEPS * ACCUMULATION * BATCH
    ds = TensorDataset(torch.randn(n, 32, generator=g), torch.randint(0, 4, (n,), generator=g))
    return DataLoader(ds, batch_size=BATCH, shuffle=False)


def fit(model, root, callbacks=(), data=None, ckpt_path=None, **overrides):
    kwargs = dict(accelerator="cpu", devices=1, max_steps=STEPS, accumulate_grad_batches=ACCUMULATION,
                  gradient_clip_val=0.5, callbacks=list(callbacks), default_root_dir=str(root),
                  enable_checkpointing=False, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0)
    kwargs.update(overrides)
    trainer = pl.Trainer(**kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, make_data() if data is None else data(), ckpt_path=ckpt_path)
    return trainer


def full_state(model, trainer) -> dict:
    """Parameters, optimizer state, gradients (None as an empty tensor) and learning rate."""
    opt = trainer.optimizers[0]
    out = state_of(model, opt)
    for name, p in model.named_parameters():
        out[f"grad.{name}"] = p.grad.clone() if p.grad is not None else torch.empty(0)
    out["lr"] = torch.tensor([g["lr"] for g in opt.param_groups], dtype=torch.float64)
    return out


def assert_nothing_left(root):
    assert not root.exists() or not any(root.rglob("*")), list(root.rglob("*"))


class Probe(pl.Callback):
    """Whether the callback's iteration is open at each event (it runs after the callback)."""

    def __init__(self, callback):
        self.callback = callback
        self.seen = {}

    def _note(self, event):
        self.seen.setdefault(event, []).append(self.callback.in_step)

    def on_train_batch_start(self, *args):
        self._note("train_batch_start")

    def on_before_zero_grad(self, *args):
        self._note("before_zero_grad")

    def on_before_optimizer_step(self, *args):
        self._note("before_optimizer_step")

    def on_train_batch_end(self, *args):
        self._note("train_batch_end")

    def on_train_epoch_end(self, *args):
        self._note("train_epoch_end")


def test_one_iteration_per_optimizer_step_bitwise(tmp_path):
    plain_model = Net()
    plain = fit(plain_model, tmp_path / "plain")

    model = Net()
    with outcore.OutOfCore(budget=BUDGET, swap_dir=tmp_path) as ooc:
        callback = OutcoreCallback(ooc)
        model.callback = callback
        probe = Probe(callback)
        trainer = fit(model, tmp_path / "ooc", [callback, probe])
        report = ooc.report()

    assert trainer.global_step == plain.global_step == STEPS
    assert_bitwise_equal(full_state(plain_model, plain), full_state(model, trainer))
    assert len(plain_model.losses) == STEPS * ACCUMULATION and model.losses == plain_model.losses

    # One iteration per optimizer step, every micro-batch (and zero_grad) inside one.
    iterations = report.iterations
    assert len(iterations) == STEPS == callback.steps, str(report)
    assert all(it.completed and it.deviation is None for it in iterations), str(report)
    # AdamW creates its state in the first step, so two steps record; the rest replay. (The
    # loss Lightning keeps inside optimizer.step(closure) is 4 bytes: not optimizer state.)
    modes = [it.mode for it in iterations]
    assert modes == ["record", "record"] + ["replay"] * (STEPS - 2), str(report)
    assert model.inside == [True] * (STEPS * ACCUMULATION)
    assert probe.seen == {
        "train_batch_start": [True] * (STEPS * ACCUMULATION),
        "before_zero_grad": [True] * STEPS,
        "before_optimizer_step": [True] * STEPS,
        # Open after the first micro-batch; closed after the one that stepped.
        "train_batch_end": [True, False] * STEPS,
        "train_epoch_end": [False],
    }
    # Under a budget well below the in-core peak, tensors really moved.
    assert report.in_core_peak > 2 * BUDGET, str(report)
    assert sum(it.bytes_written for it in iterations) > 0, str(report)
    assert sum(it.bytes_read for it in iterations) > 0, str(report)
    replays = [it for it in iterations if it.mode == "replay"]
    assert all(it.peak_resident <= BUDGET for it in replays), str(report)
    assert not callback.in_step
    assert_nothing_left(tmp_path / "ooc")


class StopInAccumulation(pl.Callback):
    """Sets trainer.should_stop after the first micro-batch of the given step (1-based)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step + 1 == self.step and batch_idx % ACCUMULATION == 0:
            trainer.should_stop = True


def test_a_compiled_module_runs_eagerly_bitwise(tmp_path):
    """trainer.fit(torch.compile(model)) was refused, though a compiled module inside
    ooc.iteration() runs eagerly and exactly: now it fits, bitwise the uncompiled
    module's, replays, and the recording warns that nothing is compiled."""
    plain_model = Net()
    plain = fit(plain_model, tmp_path / "plain")
    model = Net()
    with outcore.OutOfCore(budget=BUDGET, swap_dir=tmp_path) as ooc:
        callback = OutcoreCallback(ooc)
        with pytest.warns(UserWarning, match="torch.compile'd .* runs inside ooc.iteration"):
            trainer = fit(torch.compile(model), tmp_path / "ooc", [callback])
        report = ooc.report()
    assert_bitwise_equal(full_state(plain_model, plain), full_state(model, trainer))
    assert model.losses == plain_model.losses
    assert report.iterations[-1].mode == "replay", str(report)
    assert sum(it.bytes_written for it in report.iterations) > 0, str(report)


def test_stop_in_the_middle_of_an_accumulation(tmp_path):
    """`should_stop` between micro-batches ends the epoch without a step end: the open
    iteration is ended at on_train_epoch_end, and the accumulated gradients are kept."""
    plain_model = Net()
    plain = fit(plain_model, tmp_path / "plain", [StopInAccumulation(3)])

    model = Net()
    with outcore.OutOfCore(budget=BUDGET, swap_dir=tmp_path) as ooc:
        callback = OutcoreCallback(ooc)
        probe = Probe(callback)
        trainer = fit(model, tmp_path / "ooc", [callback, StopInAccumulation(3), probe])
        report = ooc.report()
    assert trainer.global_step == plain.global_step == 2 and callback.steps == 2
    assert len(report.iterations) == 3 and all(it.completed for it in report.iterations), str(report)
    assert probe.seen["train_epoch_end"] == [False] and not callback.in_step
    assert_bitwise_equal(full_state(plain_model, plain), full_state(model, trainer))
    assert model.losses == plain_model.losses and len(model.losses) == 5


class RaiseBeforeOptimizerStep(pl.Callback):
    """Raises after the step's backward and before its update, in the given step (1-based)."""

    def __init__(self, step, exc):
        self.step, self.exc = step, exc

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step + 1 == self.step:
            raise self.exc("injected")


@pytest.fixture
def sigint_restored():
    """Lightning ignores SIGINT while it shuts down after a KeyboardInterrupt (trainer/call.py)."""
    saved = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, saved)


# (where, when, exception, what Lightning raises, outcore iterations begun). The first
# two steps record (AdamW makes its state in the first), steps 3 and 4 replay; the forward
# of a step's last micro-batch runs inside optimizer.step(closure).
CASES = {
    "forward-recording": ("forward", 3, RuntimeError, RuntimeError, 2),    # step 2, micro-batch 1
    "forward-in-closure-replay": ("forward", 8, RuntimeError, RuntimeError, 4),
    "ctrl-c-replay": ("forward", 7, KeyboardInterrupt, SystemExit, 4),   # Lightning: sys.exit(1)
    "before-update-replay": ("optimizer", 4, RuntimeError, RuntimeError, 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exception_in_a_step_ends_its_iteration(tmp_path, case, sigint_restored):
    where, when, exc, raised_as, begun = CASES[case]

    def make():
        model = Net(raise_at=when, exc=exc) if where == "forward" else Net()
        callbacks = [] if where == "forward" else [RaiseBeforeOptimizerStep(when, exc)]
        return model, callbacks

    before = signal.getsignal(signal.SIGINT)
    plain_model, callbacks = make()
    with pytest.raises(raised_as):
        fit(plain_model, tmp_path / "plain", callbacks)
    assert signal.getsignal(signal.SIGINT) == before

    model, callbacks = make()
    ooc = outcore.OutOfCore(budget=BUDGET, swap_dir=tmp_path)
    callback = OutcoreCallback(ooc)
    with pytest.raises(raised_as) as raised:
        fit(model, tmp_path / "ooc", [callback, *callbacks])
    assert not getattr(raised.value, "__notes__", None)    # outcore's cleanup went well
    assert not callback.in_step
    # Lightning's handlers, its SIG_IGN after a Ctrl-C included, are left to it: its
    # teardown puts back the handler of before fit(), not outcore's.
    assert signal.getsignal(signal.SIGINT) == before

    assert_bitwise_equal(full_state(plain_model, plain_model.trainer), full_state(model, model.trainer))
    assert model.losses == plain_model.losses
    report = ooc.report()
    assert [it.completed for it in report.iterations] == [True] * (begun - 1) + [False], str(report)
    assert report.iterations[-1].mode == ("record" if begun <= 2 else "replay"), str(report)
    ooc.close()
    # Mapped state is still readable and equal after close().
    assert_bitwise_equal(full_state(plain_model, plain_model.trainer), full_state(model, model.trainer))
    assert_nothing_left(tmp_path / "ooc")


def test_micro_batches_loaded_inside_a_step_are_not_the_steps(tmp_path):
    """Micro-batches 2..k are loaded inside the step's iteration. From an in-memory
    TensorDataset (here 8 MiB, eight times the budget, shuffled) its loader's ops made
    the whole dataset tensor an array of the step: read back from the swap file in every
    step for 16 rows, or InfeasibleBudget naming the dataset's size at a budget the model
    fits (helper-53). The fetch is set aside now (OutOfCore._aside): the dataset is never
    the step's, and training is bitwise the plain Trainer's."""
    rows = 8 * 2**20 // (32 * 4)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(rows, 32, generator=g), torch.randint(0, 4, (rows,), generator=g)

    def data():
        return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                          generator=torch.Generator().manual_seed(2))
    plain_model = Net()
    plain = fit(plain_model, tmp_path / "plain", data=data)
    model = Net()
    with outcore.OutOfCore(budget=BUDGET, swap_dir=tmp_path) as ooc:
        trainer = fit(model, tmp_path / "ooc", [OutcoreCallback(ooc)], data=data)
        report = ooc.report()
        assert ooc._res.entry_of(x.untyped_storage()) is None
        trained = full_state(model, trainer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, data())      # max_steps reached: a fit that runs no step
    assert_bitwise_equal(full_state(plain_model, plain), trained)
    assert model.losses == plain_model.losses
    assert all(it.completed and it.deviation is None for it in report.iterations), str(report)
    assert all(it.peak_resident <= BUDGET for it in report.iterations), str(report)
    # The model's state moves (about 4 MiB a step, AdamW); the dataset (8 MiB) does not.
    assert all(it.bytes_read < x.untyped_storage().nbytes() for it in report.iterations), str(report)
    assert all(it.unplanned_bytes == 0 for it in report.iterations if it.mode == "replay")
    epoch_loop = trainer.fit_loop.epoch_loop      # Lightning's own fetch hooks again
    assert "_on_before_fetch" not in vars(epoch_loop) and "_on_after_fetch" not in vars(epoch_loop)
    assert sum(it.bytes_written for it in report.iterations) > 0, str(report)
    assert_nothing_left(tmp_path / "ooc")


def test_fused_optimizer_trains_under_a_tight_budget_bitwise(tmp_path):
    """`fused=True` is one op over every parameter: outcore runs it one parameter at a
    time (aten.FUSED_OPTIMIZERS), bitwise equal to the plain fused run. One parameter's
    call holds it, its gradient and both moments at once: 1.2 MiB for the widest layer
    here, so the budget is twice the other tests'."""
    plain_model = Net(fused=True)
    plain = fit(plain_model, tmp_path / "plain")
    model = Net(fused=True)
    with outcore.OutOfCore(budget=2 * BUDGET, swap_dir=tmp_path) as ooc:
        trainer = fit(model, tmp_path / "ooc", [OutcoreCallback(ooc)])
        report = ooc.report()
    assert_bitwise_equal(full_state(plain_model, plain), full_state(model, trainer))
    assert all(it.completed and it.deviation is None for it in report.iterations), str(report)
    assert sum(it.bytes_written for it in report.iterations) > 0, str(report)
    assert_nothing_left(tmp_path / "ooc")


def test_a_fit_resumed_from_its_checkpoint_trains_at_the_same_budget_bitwise(tmp_path):
    """`trainer.fit(..., ckpt_path=...)` restores the optimizer with torch.load after
    on_fit_start: unresizable storages, which outcore never moves (Residency NOTE 7).
    Kept so, AdamW's state stayed in RAM and the resumed fit was refused at the budget
    the first one trained with (helper-71: InfeasibleBudget advising .clone(), which a
    Lightning user cannot do). The callback copies such state at the fit's first step
    (`make_movable`); the resumed fit trains bitwise as plain Lightning resumed alike."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root, budget=None):
        def callbacks(ooc):
            return ([OutcoreCallback(ooc)] if ooc is not None else []) + [
                ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=STEPS // 2,
                                save_top_k=-1)]
        model = None
        for steps, ckpt in ((STEPS // 2, None), (STEPS, root / "ckpt" / f"epoch=0-step={STEPS // 2}.ckpt")):
            model = Net()
            ooc = (outcore.OutOfCore(budget=budget, swap_dir=tmp_path)
                   if budget is not None else None)
            try:
                trainer = fit(model, root, callbacks(ooc), max_steps=steps,
                              enable_checkpointing=True, ckpt_path=ckpt)
            finally:
                if ooc is not None:
                    ooc.close()
        return model, trainer

    plain_model, plain = run(tmp_path / "plain")
    model, trainer = run(tmp_path / "ooc", BUDGET)
    assert trainer.global_step == plain.global_step == STEPS
    assert_bitwise_equal(full_state(plain_model, plain), full_state(model, trainer))
    assert not any(p.is_file() for p in tmp_path.iterdir())       # no swap file left


def _fake(device="cpu", world_size=1, global_step=0):
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)),
                           world_size=world_size, global_step=global_step)


def test_misuse(tmp_path):
    for wrong in (object(), "2GiB", None):
        with pytest.raises(outcore.OutcoreError, match="needs an outcore.OutOfCore"):
            OutcoreCallback(wrong)

    ooc = outcore.OutOfCore(budget=BUDGET, swap_dir=tmp_path)
    callback = OutcoreCallback(ooc)
    try:
        # Manual optimization: refused at on_fit_start, through trainer.fit.
        with pytest.raises(outcore.OutcoreError, match="automatic optimization"):
            # (Lightning itself refuses clipping and accumulation with manual optimization.)
            fit(Net(manual=True), tmp_path / "manual", [callback], gradient_clip_val=None,
                accumulate_grad_batches=1)
        assert not ooc.report().iterations and not callback.in_step

        # The callback's step under the user's own iteration: iterations cannot nest.
        with ooc.iteration():
            with pytest.raises(outcore.OutcoreError, match="cannot nest"):
                callback.on_train_batch_start(_fake(), None, None, 0)
        assert not callback.in_step

        # A spawning strategy pickles the callbacks into its processes (helper-206: a bare
        # "cannot pickle '_thread.RLock' object").
        import copy
        import pickle
        for send in (pickle.dumps, copy.deepcopy):
            with pytest.raises(outcore.OutcoreError, match="cannot go to another process .*"
                               "ddp_spawn"):
                send(callback)

        module = Net()
        for trainer, match in ((_fake(device="cuda"), "offload=.disk. trains on the CPU"),
                              (_fake(world_size=2), "one process")):
            with pytest.raises(outcore.OutcoreError, match=match):
                callback.on_fit_start(trainer, module)

        # A step left open (its on_exception never came) is ended at the next on_fit_start.
        callback.on_train_batch_start(_fake(), None, None, 0)
        assert callback.in_step
        with pytest.warns(RuntimeWarning, match="multiple of accumulate_grad_batches"):
            callback.on_validation_start(_fake(), None)
        with pytest.warns(RuntimeWarning, match="ended only now"):
            callback.on_fit_start(_fake(), Net())
        assert not callback.in_step and not ooc.report().iterations[-1].completed
        callback.end()                          # nothing open: does nothing
    finally:
        callback.end()
        ooc.close()

    with pytest.raises(outcore.OutcoreError, match="closed"):
        callback.on_fit_start(_fake(), Net())
    with pytest.raises(outcore.OutcoreError, match="closed"):
        OutcoreCallback(ooc)
    with outcore.OutOfCore(budget=BUDGET, swap_dir=tmp_path, state_dir=tmp_path / "state") as durable:
        with pytest.raises(outcore.OutcoreError, match="state_dir"):
            OutcoreCallback(durable)
    assert_nothing_left(tmp_path / "manual")
