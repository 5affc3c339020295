"""Training under OutOfCore is bitwise equal to plain PyTorch, for every policy, at budgets
from everything-fits down to just above the smallest feasible one, and replayed
iterations stay within the budget."""
import contextlib

import pytest
import torch

import outcore

from .twins import assert_same_training, budgets, build, recorded_trace, steady_trace, train_twins

POLICIES = ["adaptive", "fixed", "on-demand", "adaptive-belady"]
_traces = {}


def _budget(name, optimizer, which):
    key = (name, optimizer)
    if key not in _traces:
        _traces[key] = steady_trace(name, optimizer)
    return budgets(_traces[key])[which]


_shared = {}


def _train(name, optimizer, which, policy="adaptive"):
    """Plain and managed twins trained for 4 iterations, the managed one under `policy` at
    the `which` budget: (budget, result, report). Adam at the tight budget with the
    adaptive policy is trained by two tests each (test_bitwise_equal_adaptive, and
    test_bitwise_equal_every_policy_tight or, for the MLP,
    test_model_state_several_times_the_budget): the first of the two trains it, the
    second checks that same run."""
    key = (name, optimizer, which, policy)
    if key in _shared:
        return _shared.pop(key)
    budget = _budget(name, optimizer, which)
    with outcore.OutOfCore(budget=budget, policy=policy, min_move_bytes=0) as ooc:
        result = train_twins(lambda: build(name, optimizer), lambda w: w.step(), ooc, iterations=4)
        report = ooc.report()
    if (optimizer, which, policy) == ("adam", "tight", "adaptive"):
        _shared[key] = (budget, result, report)
    return budget, result, report


@pytest.mark.parametrize("which", ["fits", "half", "tight"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("name", ["mlp", "resnet18-tiny", "gpt2-tiny"])
def test_bitwise_equal_adaptive(name, optimizer, which):
    budget, result, report = _train(name, optimizer, which)
    assert_same_training(result)
    replays = [it for it in report.iterations if it.mode == "replay"]
    assert replays, str(report)
    for it in replays:
        assert it.peak_resident <= budget, str(report)
        assert it.deviation is None, str(report)
    if which == "fits":
        assert all(it.bytes_written == 0 and it.bytes_read == 0 for it in replays), str(report)
    else:
        assert any(it.bytes_written > 0 for it in replays), str(report)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", ["resnet18-tiny", "gpt2-tiny"])
def test_bitwise_equal_every_policy_tight(name, policy):
    budget, result, report = _train(name, "adam", "tight", policy)
    assert_same_training(result)
    assert all(it.peak_resident <= budget for it in report.iterations if it.mode == "replay")


def test_model_state_several_times_the_budget():
    trace = steady_trace("mlp", "adam")
    state = sum(a.nbytes for a in trace.arrays if a.category in ("parameter", "optimizer_state"))
    budget = int(budgets(trace)["tight"])
    assert state >= 3 * budget
    trained_under, result, report = _train("mlp", "adam", "tight")
    assert trained_under == budget
    assert_same_training(result)
    assert all(it.peak_resident <= budget for it in report.iterations if it.mode == "replay")


def test_foreach_adamw_under_a_tight_budget():
    def make():
        w = build("mlp", "sgd")
        w.optimizer = torch.optim.AdamW(w.model.parameters(), lr=1e-3, foreach=True)
        return w
    budget = budgets(recorded_trace(make, lambda w: w.step()))["tight"]
    with outcore.OutOfCore(budget=budget, min_move_bytes=0) as ooc:
        assert_same_training(train_twins(make, lambda w: w.step(), ooc))


def test_bf16_autocast_step():
    def step(w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = w.loss()
        loss.backward()
        w.optimizer.step()
        w.optimizer.zero_grad()
        return loss
    def make():                 # bfloat16 convolutions are slow on CPU: a small batch
        return build("resnet18-tiny", "sgd", batch=2)
    budget = budgets(recorded_trace(make, step))["half"]
    with outcore.OutOfCore(budget=budget, min_move_bytes=0) as ooc:
        assert_same_training(train_twins(make, step, ooc))
        assert any(it.bytes_written for it in ooc.report().iterations)


@pytest.mark.parametrize("user_mode", [None, "FlopCounterMode", "outcore.record()"])
def test_a_frozen_encoders_fast_path_under_cpu_autocast(user_mode):
    """helper-153: nn.TransformerEncoderLayer in eval takes PyTorch's fast path, one op
    whose kernel runs the linears; under any dispatch mode PyTorch ran it without CPU
    autocast, so the features came out float32 and the head trained on them took other
    numbers (NOTE [Fast paths under autocast] in aten.py). Recorded, replayed at a budget
    that moves, and under outcore.record(); and with a mode of the user's inside the
    step, which gives float32 in plain PyTorch too (helper-155), or outcore.record()
    inside the iteration, which gives what plain PyTorch gives (helper-158)."""
    from torch.utils.flop_counter import FlopCounterMode
    def make():
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(128, 4, 256, batch_first=True)
        encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        attention = torch.nn.MultiheadAttention(128, 4, batch_first=True)
        for frozen in (encoder, attention):
            frozen.requires_grad_(False).eval()
        head = torch.nn.Linear(128, 10)
        return encoder, attention, head, torch.optim.SGD(head.parameters(), lr=0.1)

    def step(encoder, attention, head, opt, i, seen):
        x = torch.randn(8, 16, 128, generator=torch.Generator().manual_seed(i))
        inner = (FlopCounterMode(display=False) if user_mode == "FlopCounterMode"
                 else outcore.record() if user_mode else contextlib.nullcontext())
        with inner, torch.autocast("cpu", dtype=torch.bfloat16):
            encoded = encoder(x)
            feats = attention(encoded, encoded, encoded, need_weights=False)[0]
            loss = head(feats.mean(1)).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        seen.append((encoded.dtype, feats.detach().clone(), loss.detach().clone()))

    plain, plain_seen = make(), []
    for i in range(4):
        step(*plain, i, plain_seen)
    # The fast path cast inside, but not under a mode (the user's).
    assert plain_seen[0][0] == (torch.float32 if user_mode == "FlopCounterMode"
                                else torch.bfloat16)
    ours, seen = make(), []
    with outcore.OutOfCore("1MiB", min_move_bytes=0) as ooc:
        for i in range(4):
            with ooc.iteration():
                step(*ours, i, seen)
        assert any(it.bytes_written for it in ooc.report().iterations)
    recorded, recorded_seen = make(), []
    with outcore.record():
        step(*recorded, 0, recorded_seen)
    for got in (seen, recorded_seen):
        for (dtype, feats, loss), (want_dtype, want_feats, want_loss) in zip(got, plain_seen):
            assert dtype == want_dtype and torch.equal(feats, want_feats)
            assert torch.equal(loss, want_loss)
    assert torch.equal(ours[2].weight, plain[2].weight)


def test_float16_autocast_with_a_grad_scaler_under_a_tight_budget():
    """GradScaler.unscale_ runs one kernel over every gradient: recorded whole, a budget
    below all gradients at once was refused (InfeasibleBudget); split one call per
    gradient (PER_TENSOR_KERNELS in aten.py), it trains bitwise, with gradient clipping,
    and the scale is the same."""
    def make():
        w = build("mlp", "adam")
        w.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        return w

    def step(w):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = w.loss()
        w.scaler.scale(loss).backward()
        w.scaler.unscale_(w.optimizer)
        torch.nn.utils.clip_grad_norm_(w.model.parameters(), 1.0)
        w.scaler.step(w.optimizer)
        w.scaler.update()
        w.optimizer.zero_grad()
        return loss
    trace = recorded_trace(make, step)
    gradients = sum(x.nbytes for x in trace.arrays if x.category == "gradient")
    budget = budgets(trace)["tight"]
    assert budget < gradients          # the unscale whole could not have run
    with outcore.OutOfCore(budget=budget, min_move_bytes=0) as ooc:
        assert_same_training(train_twins(make, step, ooc))
        assert any(it.bytes_written for it in ooc.report().iterations)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_inside_the_step(reentrant):
    """torch.utils.checkpoint per block, as a user who had it on keeps it: the blocks'
    forward runs again inside backward (non-reentrant: from saved-tensor hooks, and
    stopped early by an exception once what backward needs is made; reentrant: under
    no_grad, then again with grad), with dropout, whose masks the recomputation draws
    again from the RNG state checkpoint restores. Bitwise at half the peak and at the
    tightest budget."""
    import types
    from torch.utils.checkpoint import checkpoint

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(128, 512), torch.nn.Linear(512, 128)
            self.drop = torch.nn.Dropout(0.1)

        def forward(self, x):
            return x + self.down(self.drop(torch.relu(self.up(x))))

    def make():
        torch.manual_seed(0)
        blocks = torch.nn.ModuleList(Block() for _ in range(4))
        batch = torch.randn(32, 128, generator=torch.Generator().manual_seed(1),
                            requires_grad=reentrant)     # reentrant needs an input with grad
        return types.SimpleNamespace(model=blocks, batch=batch,
                                     optimizer=torch.optim.Adam(blocks.parameters(), lr=1e-3))

    def step(w):
        x = w.batch
        for block in w.model:
            x = checkpoint(block, x, use_reentrant=reentrant)
        loss = x.square().mean()
        loss.backward()
        w.optimizer.step()
        w.optimizer.zero_grad()
        return loss
    trace = recorded_trace(make, step)
    for which in ("half", "tight"):
        with outcore.OutOfCore(budget=budgets(trace)[which], min_move_bytes=0) as ooc:
            assert_same_training(train_twins(make, step, ooc))
            replays = [it for it in ooc.report().iterations if it.mode == "replay"]
            assert replays and all(it.deviation is None for it in replays), str(ooc.report())
            assert any(it.bytes_written for it in replays), str(ooc.report())


def test_gradient_accumulation_in_one_iteration():
    def step(w):
        x, y = w.batch
        total = 0
        for part in range(2):        # two forward/backward passes, one optimizer step
            sl = slice(part * 4, part * 4 + 4)
            loss = torch.nn.functional.cross_entropy(w.model(x[sl]), y[sl]) / 2
            loss.backward()
            total = total + loss.detach()
        w.optimizer.step()
        w.optimizer.zero_grad()
        return total
    budget = budgets(recorded_trace(lambda: build("resnet18-tiny", "adam"), step))["half"]
    with outcore.OutOfCore(budget=budget, min_move_bytes=0) as ooc:
        assert_same_training(train_twins(lambda: build("resnet18-tiny", "adam"), step, ooc))


@pytest.mark.parametrize("case", ["sgd", "sparse-adam", "bag"])
def test_sparse_gradients_train_bitwise(case):
    """nn.Embedding / nn.EmbeddingBag with sparse=True make sparse gradients, whose
    indices and values outcore sees through the ops on them (aten._parts): unseen, they
    were moved out while the gradient held them, and the next op crashed the process
    (SGD, Adagrad) or SparseAdam failed in sparse_mask ("storage of size 0"). Run in a
    child: the failure was a segmentation fault. Replays follow the record (helper-150:
    the recording's own budget check before the optimizer took a gradient's parts
    through the recorded ops, and every replay left its plan where it did not); they
    may still leave it where a batch has more distinct indices than the recorded one
    (NOTE [Step shapes] rule 10)."""
    child = f"""
import torch, outcore
import torch.nn.functional as F
torch.set_num_threads(1)    # as the suite's own processes: a fork starts with two (zygote.py)
def make():
    torch.manual_seed(0)
    cls = torch.nn.EmbeddingBag if {case!r} == "bag" else torch.nn.Embedding
    e, h = cls(4000, 32, sparse=True), torch.nn.Linear(32, 10)
    if {case!r} == "sparse-adam":
        opts = [torch.optim.SparseAdam(e.parameters()), torch.optim.Adam(h.parameters())]
    else:
        opts = [torch.optim.SGD([*e.parameters(), *h.parameters()], lr=0.1)]
    return e, h, opts
g = torch.Generator().manual_seed(1)
data = [(torch.randint(0, 4000, (2048,), generator=g), torch.randint(0, 10, (2048,), generator=g))
        for _ in range(5)]
def step(e, h, opts, x, y):
    out = e(x.view(256, 8)) if {case!r} == "bag" else e(x)
    loss = F.cross_entropy(h(out), y[:len(out)])
    loss.backward()
    for o in opts:
        o.step(); o.zero_grad()
    return loss.detach()
plain = make()
expected = [step(*plain, x, y) for x, y in data]
with outcore.record() as rec:
    step(*make(), *data[0])
ours = make()
from outcore.plan.feasibility import min_feasible_budget
budget = max(rec.trace.peak(actual=True)[0] // 2, int(min_feasible_budget(rec.trace) * 1.1))
with outcore.OutOfCore(budget=budget, min_move_bytes=0) as ooc:
    got = []
    for x, y in data:
        with ooc.iteration():
            got.append(step(*ours, x, y))
    moved = sum(it.bytes_written for it in ooc.report().iterations)
    other_ops = [it.deviation for it in ooc.report().iterations
                 if it.deviation and "expected" in it.deviation]
print("OTHER OPS", other_ops)
same = all(torch.equal(a, b) for a, b in zip(expected, got))
for a, b in zip(plain[:2], ours[:2]):
    same = same and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
print("SAME", same, "MOVED", moved, "BELOW", budget < rec.trace.peak(actual=True)[0])
"""
    from .. import zygote
    out = zygote.run(["-c", child], timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "SAME True" in out.stdout and "MOVED 0 " not in out.stdout, out.stdout
    assert "BELOW True" in out.stdout, out.stdout
    assert "OTHER OPS []" in out.stdout, out.stdout
