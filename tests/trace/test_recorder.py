"""Recording changes nothing and sees storages, views, in-place ops and phases correctly."""
import contextlib

import pytest
import torch
from torch import nn

import outcore
from outcore import workloads

from .helpers import assert_bitwise_equal, run_twins


def _workload_factory(name, optimizer, **sizes):
    def make():
        w = workloads.build(name, batch=4, optimizer=optimizer, **sizes)
        return w.model, w.optimizer, w
    return make


def _step(model, optimizer, w):
    w.step()


SMALL = {"mlp": {}, "resnet18": {"image_size": 32}, "gpt2-tiny": {"seq_len": 16}}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_recording_changes_nothing(name, optimizer):
    # Iteration 0 (lazy optimizer state created) and 1 (steady state) recorded, 2 not.
    plain, recorded, traces = run_twins(_workload_factory(name, optimizer, **SMALL[name]), _step,
                                        iterations=3, record_at=(0, 1))
    assert_bitwise_equal(plain, recorded)
    assert all(len(t.functions) > 10 for t in traces)


def test_phases_are_in_order_and_complete():
    w = workloads.build("mlp", batch=8, optimizer="sgd")
    w.step()
    with outcore.record() as rec:
        w.step()
    phases = [f.phase for f in rec.trace.functions if f.phase != "other"]
    # forward, then backward, then optimizer: each a contiguous run.
    runs = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    assert runs == ["forward", "backward", "optimizer"]
    params = {p.untyped_storage().nbytes() for p in w.model.parameters()}
    written = {rec.trace.arrays[a.array].nbytes for f in rec.trace.functions
               if f.phase == "optimizer" for a in f.accesses if a.kind == "write"}
    assert params <= written


def test_views_and_inplace_share_one_array():
    base = torch.randn(8, 8, requires_grad=True)
    with outcore.record() as rec:
        y = base * 2            # create
        v = y.view(64)          # view: same storage
        v.add_(1)               # in-place through the view: a write to y's array
        t = y.t()               # another view
        loss = (t @ t).sum()
        loss.backward()
    trace = rec.trace
    by_op = {}
    for f in trace.functions:
        by_op.setdefault(f.op, f)     # the first (forward) occurrence of each op
    y_array = by_op["aten.mul.Tensor"].accesses[-1]
    assert y_array.kind == "create"
    view_fn = by_op["aten.view.default"]
    assert [a.array for a in view_fn.accesses] == [y_array.array]
    add_fn = by_op["aten.add_.Tensor"]
    assert add_fn.accesses == (outcore.trace.Access(y_array.array, "write"),)
    assert trace.arrays[y_array.array].nbytes == 64 * 4
    assert trace.arrays[0].category == "parameter"     # `base` is a leaf requiring grad


def test_batchnorm_buffers_are_persistent_and_written():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 8, 8)
    model(x).sum().backward(); opt.step(); opt.zero_grad()   # materialize lazy layer and momentum
    with outcore.record() as rec:
        model(x).sum().backward(); opt.step(); opt.zero_grad()
    trace = rec.trace
    bn = model[1]
    buffers = {bn.running_mean.untyped_storage().nbytes(), bn.num_batches_tracked.untyped_storage().nbytes()}
    found = {a.nbytes for a in trace.arrays if a.category == "buffer" and a.kind == "persistent"}
    assert buffers <= found
    # running_mean and running_var: two 16-byte arrays written by batch norm.
    bn_fn = next(f for f in trace.functions if "batch_norm" in f.op and f.phase == "forward")
    writes = [trace.arrays[a.array].nbytes for a in bn_fn.accesses if a.kind == "write"]
    assert writes == [16, 16]


def test_unused_branch_is_not_in_the_trace():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 1000)      # 16 KB of weights nobody reads

        def forward(self, x):
            return self.used(x)

    model = Branchy()
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(3, 4)
    with outcore.record() as rec:
        model(x).sum().backward(); opt.step(); opt.zero_grad()
    sizes = {a.nbytes for a in rec.trace.arrays}
    assert model.unused.weight.untyped_storage().nbytes() not in sizes
    assert model.used.weight.untyped_storage().nbytes() in sizes


def test_two_optimizers_in_one_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    twin = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, 6)

    def make_opts(m):
        return torch.optim.SGD(m[0].parameters(), lr=0.1, momentum=0.9), torch.optim.Adam(m[2].parameters())

    def step(m, opts):
        m(x).pow(2).mean().backward()
        for o in opts:
            o.step(); o.zero_grad()

    opts, twin_opts = make_opts(model), make_opts(twin)
    for it in range(2):
        step(model, opts)
        with outcore.record() as rec:
            step(twin, twin_opts)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    trace = rec.trace
    optimizer_fns = [f for f in trace.functions if f.phase == "optimizer"]
    written = {a.array for f in optimizer_fns for a in f.accesses if a.kind == "write"}
    params = [a.id for a in trace.arrays if a.category == "parameter"]
    assert len(params) == 4 and set(params) <= written
    assert sum(1 for a in trace.arrays if a.category == "optimizer_state") == 2 + 3 * 2


def test_ids_are_stable_across_iterations_of_a_static_step():
    w = workloads.build("resnet18", batch=2, image_size=32, optimizer="adam")
    w.step()
    traces = []
    for _ in range(2):
        with outcore.record() as rec:
            w.step()
        traces.append(rec.trace)
    a, b = traces
    assert [f.op for f in a.functions] == [f.op for f in b.functions]
    assert [f.accesses for f in a.functions] == [f.accesses for f in b.functions]
    assert [(x.kind, x.category, x.origin, x.nbytes) for x in a.arrays] == \
           [(x.kind, x.category, x.origin, x.nbytes) for x in b.arrays]


def test_first_iteration_records_lazy_optimizer_state_as_persistent():
    w = workloads.build("mlp", batch=4, optimizer="adam")
    with outcore.record() as rec:
        w.step()
    state = [a for a in rec.trace.arrays if a.category == "optimizer_state"]
    n_params = len(list(w.model.parameters()))
    assert len(state) == 3 * n_params       # step, exp_avg, exp_avg_sq
    assert all(a.kind == "persistent" and not a.existed_before for a in state)


def test_lifetimes_are_consistent():
    w = workloads.build("gpt2-tiny", batch=2, seq_len=16, optimizer="adamw")
    with outcore.record() as rec:
        w.step()
    trace = rec.trace
    uses = {}
    for f in trace.functions:
        for acc in f.accesses:
            uses.setdefault(acc.array, []).append(f.index)
    for arr in trace.arrays:
        assert (arr.first_use, arr.last_use) == (uses[arr.id][0], uses[arr.id][-1])
        if arr.kind == "transient":
            assert arr.freed_after is not None and arr.freed_after >= arr.last_use
            assert trace.functions[arr.first_use].accesses  # created by a function
        if not arr.existed_before:
            first = next(a for a in trace.functions[arr.first_use].accesses if a.array == arr.id)
            assert first.kind == "create"


def test_a_failed_step_gives_a_clear_error_not_a_trace():
    with pytest.raises(ValueError):
        with outcore.record() as rec:
            torch.ones(2) + 1
            raise ValueError("user bug")
    with pytest.raises(outcore.TraceError, match="user bug"):
        rec.trace


@pytest.mark.parametrize("fails", [False, True])
def test_the_recorder_leaves_no_module_hook_nor_warning_filter_behind(fails):
    """The recorder registers a global module forward pre-hook (a module's buffers are
    state) and a filter for the warning torch.compile gives while one is registered:
    both are gone after the block, also after a step that raised."""
    import warnings

    from torch.nn.modules import module as nn_module
    hooks = dict(nn_module._global_forward_pre_hooks)
    m = nn.Linear(4, 4)
    m.register_buffer("scale", torch.full((4,), 2.0))
    with pytest.raises(ValueError) if fails else contextlib.nullcontext():
        with outcore.record() as rec:
            assert len(nn_module._global_forward_pre_hooks) == len(hooks) + 1
            (m(torch.ones(2, 4)) * m.scale).sum().backward()
            if fails:
                raise ValueError("user bug")
    assert dict(nn_module._global_forward_pre_hooks) == hooks
    # (imports in the block, torch._dynamo's the first time, may add filters of their own)
    assert not [f for f in warnings.filters if f[1] is not None and "global hooks" in f[1].pattern]
    if not fails:
        scale = [a for a in rec.trace.arrays if a.nbytes == 16 and a.existed_before
                 and a.category == "buffer"]
        assert [a.kind for a in scale] == ["persistent"], rec.trace.arrays


def test_nested_recordings_hide_torch_compiles_hook_warning_and_keep_the_users_filter():
    """helper-127: the inner recording's end took out the filter the outer one still
    needed, and the end of a recording took out a user's identical filter, one put in
    before it or while it ran."""
    import warnings

    from outcore.trace.recorder import _COMPILED_HOOK_WARNING

    def ours():
        return [f for f in warnings.filters
                if f[1] is not None and f[1].pattern == _COMPILED_HOOK_WARNING]

    import torch._dynamo  # noqa: F401  (its first import adds filters of its own)
    compiled = torch.compile(nn.Linear(2, 2), backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with outcore.record():
            with outcore.record():
                compiled(torch.ones(2))
            compiled(torch.ones(2))             # the outer recording's hook is still there
        assert not ours()
        warnings.filterwarnings("ignore", message=_COMPILED_HOOK_WARNING, category=UserWarning)
        users = ours()
        with outcore.record():
            compiled(torch.ones(2))
        assert ours() == users
        warnings.filters.remove(users[0])
        with outcore.record():                  # the user's, put in while we record
            warnings.filterwarnings("ignore", message=_COMPILED_HOOK_WARNING,
                                    category=UserWarning)
        assert len(ours()) == 1, ours()         # (helper-129: ours took theirs out)
    assert not [w for w in caught if "global hooks" in str(w.message)], caught


def test_reading_trace_inside_the_block_is_an_error():
    with outcore.record() as rec:
        with pytest.raises(outcore.TraceError, match="after"):
            rec.trace


def test_ops_on_another_thread_give_a_trace_that_loads(tmp_path):
    """On CUDA, autograd runs backward on its own device thread with the mode active;
    the CPU clock (`thread_time`) is per thread, and a difference across threads came
    out negative: the saved trace could not be loaded (helper-67). Here an op runs on a
    second thread after the main thread has spent CPU time."""
    import threading
    import time

    from torch.utils._python_dispatch import _pop_mode, _push_mode

    start = time.thread_time()
    while time.thread_time() - start < 0.05:      # the main thread's clock runs ahead
        pass
    rec = outcore.record()
    with rec:
        x = torch.ones(1000) * 2

        def device_thread():
            _push_mode(rec)
            try:
                x.add(1)
            finally:
                _pop_mode()
        worker = threading.Thread(target=device_thread)
        worker.start()
        worker.join()
        x.mul(3)
    assert all(f.host_cpu_s >= 0 for f in rec.trace.functions)
    path = tmp_path / "trace.json"
    rec.trace.save(str(path))
    assert len(outcore.Trace.load(str(path)).functions) == len(rec.trace.functions) == 4


def test_recording_leaves_torch_compile_compiling():
    """Dynamo met compiled code under the recording's dispatch mode and marked its frames
    skipped for good: after `outcore.record()`, that model (and a new
    `torch.compile(nn.Sequential(...))`: the same code) ran uncompiled, without a word
    (helper-181). The step is recorded eagerly, as ooc.iteration() runs it, and compiling
    goes on after."""
    from torch._dynamo.utils import counters

    def graphs():
        return counters["stats"]["unique_graphs"]
    class Block(nn.Module):         # its own code: no other test's compile touches it
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(16, 16)

        def forward(self, x):
            return torch.relu(self.linear(x))
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    a = torch.compile(Block(), backend="eager")
    with outcore.record() as rec:
        a(x).sum().backward()
    assert any("addmm" in f.op for f in rec.trace.functions)      # recorded, eagerly
    before = graphs()
    a(x)
    assert graphs() - before == 1


def test_a_recording_inside_a_compiled_function_records_and_leaves_nothing_behind():
    """torch.compile's stance cannot be set inside a region Dynamo compiles: set there,
    the recording raised and left its global hooks installed for good (helper-186). It
    runs outside Dynamo (NOTE [Dynamo kept out]) and records; hooks and stance as before."""
    import torch._dynamo.eval_frame as eval_frame
    from torch.nn.modules.module import _global_forward_pre_hooks
    from torch.optim.optimizer import _global_optimizer_pre_hooks
    model = nn.Linear(16, 16)
    hooks = (len(_global_optimizer_pre_hooks), len(_global_forward_pre_hooks))

    @torch.compile(backend="eager")
    def step(x):
        y = x * 2
        with outcore.record() as rec:
            model(y).sum().backward()
        return rec
    rec = step(torch.randn(8, 16))
    assert any("addmm" in f.op for f in rec.trace.functions)
    assert (len(_global_optimizer_pre_hooks), len(_global_forward_pre_hooks)) == hooks
    assert eval_frame._stance.stance == "default"
