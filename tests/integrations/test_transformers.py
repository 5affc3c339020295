"""outcore.integrations.transformers: a Trainer with OutcoreCallback trains bitwise as
without it, one outcore iteration per optimizer step (gradient accumulation inside one);
an exception escaping a step ends that iteration and loses nothing; misuse says what to do."""
import warnings
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (GPT2Config, GPT2LMHeadModel, PrinterCallback, ProgressCallback,  # noqa: E402
                          Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments)
from transformers.utils import logging as hf_logging  # noqa: E402

import outcore  # noqa: E402
from outcore.integrations.transformers import OutcoreCallback, train  # noqa: E402

from ..trace.helpers import assert_bitwise_equal, state_of  # noqa: E402

hf_logging.set_verbosity_error()

STEPS, ACCUMULATION, BATCH = 4, 2, 2
# The model's step peaks at about 11 MiB in core (asserted below); min_feasible ~2.7 MiB.
BUDGET = 4 * 2**20


def make_model():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=64, vocab_size=1024,
                        bos_token_id=1023, eos_token_id=1023)
    config._attn_implementation = "eager"      # the same aten ops every step
    return GPT2LMHeadModel(config)


def make_data():
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(STEPS * ACCUMULATION * BATCH):
        ids = torch.randint(0, 1024, (32,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def make_trainer(model, out, callbacks=(), **overrides):
    kwargs = dict(output_dir=str(out), max_steps=STEPS, gradient_accumulation_steps=ACCUMULATION,
                  per_device_train_batch_size=BATCH, use_cpu=True, report_to=[], save_strategy="no",
                  logging_strategy="steps", logging_steps=1, disable_tqdm=True,
                  dataloader_num_workers=0, seed=0,
                  # The per-tensor AdamW; the fused one (Trainer's default with torch >= 2.8)
                  # has its own test below.
                  optim="adamw_torch")
    kwargs.update(overrides)
    trainer = Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=make_data(),
                      callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def full_state(model, trainer) -> dict:
    """Parameters, buffers, optimizer state and gradients (None as an empty tensor)."""
    out = state_of(model, trainer.optimizer.optimizer)
    for name, p in model.named_parameters():
        out[f"grad.{name}"] = p.grad.clone() if p.grad is not None else torch.empty(0)
    return out


def losses(trainer) -> list:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


class Probe(TrainerCallback):
    """Whether the callback's iteration is open at each event (it runs after the callback)."""

    def __init__(self, callback):
        self.callback = callback
        self.seen = {}

    def _note(self, event):
        self.seen.setdefault(event, []).append(self.callback.in_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._note("step_begin")

    def on_substep_end(self, args, state, control, **kwargs):
        self._note("substep_end")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._note("pre_optimizer_step")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._note("optimizer_step")

    def on_step_end(self, args, state, control, **kwargs):
        self._note("step_end")

    def on_epoch_end(self, args, state, control, **kwargs):
        self._note("epoch_end")

    def on_log(self, args, state, control, **kwargs):
        self._note("log")


def test_one_iteration_per_optimizer_step_bitwise(tmp_path):
    plain_model = make_model()
    plain = make_trainer(plain_model, tmp_path / "plain")
    plain_out = plain.train()

    model = make_model()
    with outcore.OutOfCore(budget=BUDGET, swap_dir=tmp_path) as ooc:
        callback = OutcoreCallback(ooc)
        probe = Probe(callback)
        trainer = make_trainer(model, tmp_path / "ooc", [callback, probe])
        forwards = []
        model.register_forward_pre_hook(lambda *_: forwards.append(callback.in_step))
        with callback:
            out = trainer.train()
        report = ooc.report()

    assert trainer.state.global_step == STEPS
    assert_bitwise_equal(full_state(plain_model, plain), full_state(model, trainer))
    assert len(losses(plain)) == STEPS and losses(plain) == losses(trainer)
    assert plain_out.training_loss == out.training_loss

    # One iteration per optimizer step, every micro-batch inside one.
    assert len(report.iterations) == STEPS == callback.steps, str(report)
    assert all(it.completed and it.deviation is None for it in report.iterations), str(report)
    assert forwards == [True] * (STEPS * ACCUMULATION)
    # The probe comes after the callback: open from on_step_begin through the optimizer
    # step; closed at on_step_end (after zero_grad) and while logging.
    inside = ["step_begin", "substep_end", "pre_optimizer_step", "optimizer_step"]
    expected = {event: [True] * STEPS for event in inside}
    expected["substep_end"] = [True] * (STEPS * (ACCUMULATION - 1))
    expected.update(step_end=[False] * STEPS, log=[False] * (STEPS + 1), epoch_end=[False])
    assert probe.seen == expected
    # Under a budget well below the in-core peak, tensors really moved.
    assert report.in_core_peak > 2 * BUDGET, str(report)
    assert sum(it.bytes_written for it in report.iterations) > 0, str(report)
    assert sum(it.bytes_read for it in report.iterations) > 0, str(report)
    replays = [it for it in report.iterations if it.mode == "replay"]
    assert replays and all(it.peak_resident <= BUDGET for it in replays), str(report)
    assert not callback.in_step and not any((tmp_path / "ooc").iterdir())


def test_torch_compile_runs_eagerly_bitwise(tmp_path):
    """TrainingArguments(torch_compile=True) was refused, though a compiled model inside
    ooc.iteration() runs eagerly and exactly: now it trains, bitwise the uncompiled
    Trainer's, replays, and the recording warns that nothing is compiled."""
    plain_model = make_model()
    plain = make_trainer(plain_model, tmp_path / "plain")
    plain.train()
    model = make_model()
    with outcore.OutOfCore(budget=BUDGET, swap_dir=tmp_path) as ooc:
        callback = OutcoreCallback(ooc)
        trainer = make_trainer(model, tmp_path / "ooc", [callback], torch_compile=True)
        with pytest.warns(UserWarning, match="torch.compile'd .* runs inside ooc.iteration"), callback:
            trainer.train()
        report = ooc.report()
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    assert_bitwise_equal(full_state(plain_model, plain), full_state(model, trainer))
    assert losses(plain) == losses(trainer)
    assert [it.mode for it in report.iterations][-1] == "replay", str(report)
    assert sum(it.bytes_written for it in report.iterations) > 0, str(report)


class StopInAccumulation(TrainerCallback):
    """Stops training after the first micro-batch of the given step (1-based)."""

    def __init__(self, step):
        self.step = step

    def on_substep_end(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            control.should_training_stop = True


def test_stop_in_the_middle_of_an_accumulation(tmp_path):
    """A callback stopping training between micro-batches leaves the step without
    on_step_end: its iteration is ended at on_epoch_end, before the epoch's logging."""
    plain_model = make_model()
    plain = make_trainer(plain_model, tmp_path / "plain", [StopInAccumulation(3)])
    plain.train()

    model = make_model()
    with outcore.OutOfCore(budget=BUDGET, swap_dir=tmp_path) as ooc:
        callback = OutcoreCallback(ooc)
        probe = Probe(callback)
        trainer = make_trainer(model, tmp_path / "ooc", [callback, StopInAccumulation(3), probe])
        train(trainer, ooc)
        report = ooc.report()
        assert trainer.state.global_step == 2 and callback.steps == 2
        assert len(report.iterations) == 3 and all(it.completed for it in report.iterations)
        assert probe.seen["epoch_end"] == [False] and not callback.in_step
    assert_bitwise_equal(full_state(plain_model, plain), full_state(model, trainer))
    assert losses(plain) == losses(trainer)
    assert trainer.callback_handler.callbacks.count(callback) == 1   # train() added none


class RaiseAtOptimizerStep(TrainerCallback):
    """Raises after optimizer.step() and before zero_grad, in the given step (1-based)."""

    def __init__(self, step, exc):
        self.step, self.exc = step, exc

    def on_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            raise self.exc("injected")


def raise_in_forward(model, call, exc):
    calls = []

    def hook(*_):
        calls.append(1)
        if len(calls) == call:
            raise exc("injected")
    model.register_forward_pre_hook(hook)


# (where, when, exception, outcore iterations begun). Iterations 1-2 record (Adam's state
# is made lazily), 3-4 replay the plan.
CASES = {
    "forward-recording": ("forward", 4, RuntimeError, 2),    # 2nd micro-batch of step 2
    "forward-replay-ctrl-c": ("forward", 6, KeyboardInterrupt, 3),
    "optimizer-step-replay": ("optimizer", 3, RuntimeError, 3),  # before zero_grad, step 3
}


@pytest.mark.parametrize("case", list(CASES))
def test_exception_in_a_step_ends_its_iteration(tmp_path, case):
    where, when, exc, begun = CASES[case]

    def setup(model, callbacks):
        if where == "forward":
            raise_in_forward(model, when, exc)
        else:
            callbacks.append(RaiseAtOptimizerStep(when, exc))
        return callbacks

    plain_model = make_model()
    plain = make_trainer(plain_model, tmp_path / "plain", setup(plain_model, []))
    with pytest.raises(exc, match="injected"):
        plain.train()

    model = make_model()
    ooc = outcore.OutOfCore(budget=BUDGET, swap_dir=tmp_path)
    callback = OutcoreCallback(ooc)
    trainer = make_trainer(model, tmp_path / "ooc", setup(model, [callback]))
    with pytest.raises(exc, match="injected") as raised:
        train(trainer, ooc)
    assert not getattr(raised.value, "__notes__", None)    # outcore's cleanup went well
    assert not callback.in_step

    assert_bitwise_equal(full_state(plain_model, plain), full_state(model, trainer))
    report = ooc.report()
    assert [it.completed for it in report.iterations] == [True] * (begun - 1) + [False], str(report)
    assert [it.mode for it in report.iterations][-1] == ("record" if begun <= 2 else "replay")
    ooc.close()
    # Mapped state is still readable and equal after close().
    assert_bitwise_equal(full_state(plain_model, plain), full_state(model, trainer))


def test_fused_adamw_trains_under_a_tight_budget_bitwise(tmp_path):
    """The Trainer's default optimizer with torch >= 2.8 is the fused AdamW, one
    `_fused_adamw_` op over every parameter: outcore runs it one parameter at a time
    (aten.FUSED_OPTIMIZERS), so it trains under the budget the per-tensor AdamW does."""
    plain_model = make_model()
    plain = make_trainer(plain_model, tmp_path / "plain", optim="adamw_torch_fused")
    plain.train()
    model = make_model()
    with outcore.OutOfCore(budget=BUDGET, swap_dir=tmp_path) as ooc:
        callback = OutcoreCallback(ooc)
        trainer = make_trainer(model, tmp_path / "ooc", [callback], optim="adamw_torch_fused")
        with callback:
            trainer.train()
        report = ooc.report()
    assert_bitwise_equal(full_state(plain_model, plain), full_state(model, trainer))
    assert losses(plain) == losses(trainer)
    assert all(it.completed and it.deviation is None for it in report.iterations), str(report)
    assert report.in_core_peak > 2 * BUDGET and sum(it.bytes_written for it in report.iterations)


def _events(out):
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], save_strategy="no")
    return args, TrainerState(), TrainerControl()


def test_misuse(tmp_path):
    args, state, control = _events(tmp_path / "args")
    for wrong in (object(), "2GiB", None):
        with pytest.raises(outcore.OutcoreError, match="needs an outcore.OutOfCore"):
            OutcoreCallback(wrong)

    ooc = outcore.OutOfCore(budget=BUDGET, swap_dir=tmp_path)
    callback = OutcoreCallback(ooc)
    try:
        _misuse_while_open(ooc, callback, args, state, control)
    finally:
        callback.end()
        ooc.close()

    with pytest.raises(outcore.OutcoreError, match="closed"), callback:
        callback.on_train_begin(args, state, control)
    with pytest.raises(outcore.OutcoreError, match="closed"):
        OutcoreCallback(ooc)

    # One OutcoreCallback per Trainer; train() will not add a second for another OutOfCore.
    with outcore.OutOfCore(budget=BUDGET, swap_dir=tmp_path) as other:
        trainer = make_trainer(make_model(), tmp_path / "t", [callback])
        with pytest.raises(outcore.OutcoreError, match="another OutOfCore"):
            train(trainer, other)
        with pytest.raises(outcore.OutcoreError, match="needs an outcore.OutOfCore"):
            train(trainer, "2GiB")

    with outcore.OutOfCore(budget=BUDGET, swap_dir=tmp_path, state_dir=tmp_path / "state") as durable:
        with pytest.raises(outcore.OutcoreError, match="state_dir"):
            OutcoreCallback(durable)


def _misuse_while_open(ooc, callback, args, state, control):
    with pytest.raises(outcore.OutcoreError, match="needs a transformers.Trainer"):
        train(object(), ooc)

    # The callback's step under the user's own iteration: iterations cannot nest.
    with ooc.iteration():
        with pytest.raises(outcore.OutcoreError, match="cannot nest"):
            callback.on_step_begin(args, state, control)
    assert not callback.in_step

    # Without the guard: a warning at on_train_begin; a step left open is ended at the next.
    with pytest.warns(RuntimeWarning, match="outside `with callback:`"):
        callback.on_train_begin(args, state, control)
    callback.on_step_begin(args, state, control)
    assert callback.in_step
    # close() there names the way out a Trainer user has (helper-207: only the block's).
    with pytest.raises(outcore.OutcoreError, match=r"inside its iteration.*callback\.end\(exc\)"):
        ooc.close()
    assert not ooc.closed and callback.in_step
    with pytest.warns(RuntimeWarning, match="ended only now"), callback:
        callback.on_train_begin(args, state, control)
    assert not callback.in_step and not ooc.report().iterations[-1].completed
    with callback:                          # end() and the guard with nothing open do nothing
        callback.end()

    for wrong, match in ((SimpleNamespace(device=torch.device("cuda"), torch_compile=False, world_size=1),
                          "offload=.disk. trains on the CPU.*offload=.host."),
                         (SimpleNamespace(device=torch.device("cpu"), torch_compile=False, world_size=2),
                          "one process")):
        with pytest.raises(outcore.OutcoreError, match=match), callback:
            callback.on_train_begin(wrong, state, control)
    assert not callback.in_step


def test_resume_from_the_trainers_checkpoint_at_the_same_budget(tmp_path):
    """`train(resume_from_checkpoint=...)` loads the optimizer's state with torch.load,
    whose storages cannot be resized: kept as loaded, they never moved and the resumed
    run was refused at the budget the run trained with (InfeasibleBudget, advising a
    .clone() a Trainer user cannot make; a new user's report). The callback gives them
    memory of their own at the first step (`make_movable`): the resumed run trains
    within the budget, bitwise as a plain resumed run."""
    plain_model = make_model()
    make_trainer(plain_model, tmp_path / "plain", save_strategy="steps", save_steps=2).train()
    plain_model = make_model()
    plain = make_trainer(plain_model, tmp_path / "plain", save_strategy="steps", save_steps=2)
    plain.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-2"))
    for run in ("first", "resumed"):
        model = make_model()
        with outcore.OutOfCore(budget=BUDGET, swap_dir=tmp_path) as ooc:
            callback = OutcoreCallback(ooc)
            trainer = make_trainer(model, tmp_path / "ooc", [callback], save_strategy="steps",
                                   save_steps=2)
            with callback:
                trainer.train(resume_from_checkpoint=None if run == "first" else
                              str(tmp_path / "ooc" / "checkpoint-2"))
            report = ooc.report()
        assert all(it.peak_resident <= BUDGET for it in report.iterations), str(report)
    assert callback.steps == STEPS - 2
    assert_bitwise_equal(full_state(plain_model, plain), full_state(model, trainer))
    assert losses(plain) == losses(trainer)


def test_make_movable_copies_only_state_outcore_cannot_move(tmp_path):
    """Between iterations the state outcore left on the slow tier is mapped from its swap
    file: unresizable like torch.load's, but outcore's to move. A second train() on one
    Trainer copied all of it into RAM at once (a reviewer's find); only state loaded
    from a checkpoint gets memory of its own."""
    import io

    from outcore.integrations.transformers import make_movable
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    opt = torch.optim.Adam(model.parameters())
    with outcore.OutOfCore(budget=2**20, swap_dir=tmp_path) as ooc:
        for _ in range(3):
            with ooc.iteration():
                model(torch.ones(8, 256)).sum().backward()
                opt.step()
                opt.zero_grad()
        moments = [s["exp_avg"] for s in opt.state.values()]
        assert any(ooc._res.entry_of(m.untyped_storage()).state is outcore.states.MAPPED
                   for m in moments)
        assert make_movable(opt, ooc) == 0
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        opt.load_state_dict(torch.load(buffer))
        assert make_movable(opt, ooc) == 3 * len(opt.state)        # step, exp_avg, exp_avg_sq
        assert all(v.untyped_storage().resizable() for s in opt.state.values() for v in s.values())


def test_a_model_from_pretrained_moves_under_the_callback(tmp_path):
    """transformers 5's from_pretrained maps the safetensors file: its weights are the
    file's pages, which PyTorch cannot resize. The callback names them to the OutOfCore
    at the first step (make_movable(model, ooc), NOTE [Loaded by mapping] in
    run/mapped.py), so they move like any, bitwise (helper-147: a Llama loaded so was
    refused, 26.7 MiB "not resizable")."""
    make_model().save_pretrained(tmp_path / "pretrained")

    def load():
        return GPT2LMHeadModel.from_pretrained(tmp_path / "pretrained",
                                               attn_implementation="eager")
    plain_model = load()
    plain = make_trainer(plain_model, tmp_path / "plain")
    plain.train()
    model = load()
    assert not any(p.untyped_storage().resizable() for p in model.parameters())
    with outcore.OutOfCore(BUDGET, swap_dir=str(tmp_path)) as ooc:
        callback = OutcoreCallback(ooc)
        trainer = make_trainer(model, tmp_path / "ooc", [callback])
        with callback:
            trainer.train()
        replays = [it for it in ooc.report().iterations if it.mode == "replay"]
        assert replays and all(it.peak_resident <= BUDGET for it in replays), ooc.report()
        large = [p for p in model.parameters() if p.nbytes >= ooc._res.min_move_bytes]
        assert large and not any(ooc._res.entry_of(p.untyped_storage()).pinned for p in large)
    assert_bitwise_equal(full_state(model, trainer), full_state(plain_model, plain))
    assert losses(trainer) == losses(plain)
