"""Multi-tensor `_foreach_*` ops are recorded one function per tensor, and splitting them
is bitwise equal to the fused call."""
import pytest
import torch

import outcore

aten = torch.ops.aten


def _tensors(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5 + i, generator=g).abs() + 0.1 for i in range(n)]


CASES = [
    ("add_ List alpha", lambda a, b, c: torch._foreach_add_(a, b, alpha=-0.3)),
    ("add_ Scalar", lambda a, b, c: torch._foreach_add_(a, 0.7)),
    ("mul_ ScalarList", lambda a, b, c: torch._foreach_mul_(a, [0.5, 2.0, 3.0])),
    ("mul_ Tensor", lambda a, b, c: torch._foreach_mul_(a, torch.tensor(0.9))),
    ("lerp_ Scalar", lambda a, b, c: torch._foreach_lerp_(a, b, 0.1)),
    ("addcmul_ Scalar", lambda a, b, c: torch._foreach_addcmul_(a, b, c, value=0.01)),
    ("addcdiv_ ScalarList", lambda a, b, c: torch._foreach_addcdiv_(a, b, c, [0.1, 0.2, 0.3])),
    ("addcdiv_ Tensor", lambda a, b, c: torch._foreach_addcdiv_(a, b, c, torch.tensor([0.1, 0.2, 0.3]))),
    ("sqrt", lambda a, b, c: [x.copy_(y) for x, y in zip(a, torch._foreach_sqrt(b))]),
    ("div_ List", lambda a, b, c: torch._foreach_div_(a, b)),
    ("maximum_", lambda a, b, c: torch._foreach_maximum_(a, b)),
    ("zero_", lambda a, b, c: torch._foreach_zero_(a)),
    ("copy_", lambda a, b, c: torch._foreach_copy_(a, b)),
    ("norm", lambda a, b, c: [x.fill_(n) for x, n in zip(a, torch._foreach_norm(b))]),
]


@pytest.mark.parametrize("name,op", CASES, ids=[c[0] for c in CASES])
def test_split_is_bitwise_equal_and_one_function_per_tensor(name, op):
    plain = [_tensors(s) for s in (1, 2, 3)]
    recorded = [_tensors(s) for s in (1, 2, 3)]
    op(*plain)
    with outcore.record() as rec:
        op(*recorded)
    for p, r in zip(plain, recorded):
        for x, y in zip(p, r):
            assert torch.equal(x, y)
    split = [f for f in rec.trace.functions if f.split is not None]
    assert [f.split for f in split] == [(0, 3), (1, 3), (2, 3)], [f.op for f in rec.trace.functions]
    # The same multi-tensor op on one tensor: the plain op rounds differently on CUDA.
    assert all(f.op.startswith("aten._foreach_") for f in split)


def test_a_split_call_is_the_same_op_on_one_element_lists():
    """Each call of a split takes the k-th element of every list, of tensors and of
    scalars, and the k-th scalar of a `.Tensor` overload's 1-D scalars; shared values
    (a scalar, a 0-dim tensor) are passed as they are."""
    from outcore.aten import split_foreach
    a, b, c = _tensors(1), _tensors(2), _tensors(3)
    op = aten._foreach_addcdiv_.ScalarList
    calls = split_foreach(op, (a, b, c, [0.1, 0.2, 0.3]), {})
    assert [f for f, _, _ in calls] == [op] * 3
    assert all(args[0][0] is a[k] and args[1][0] is b[k] and args[2][0] is c[k]
               and args[3] == [(0.1, 0.2, 0.3)[k]] for k, (_, args, _) in enumerate(calls))
    scalars = torch.tensor([0.1, 0.2, 0.3])
    calls = split_foreach(aten._foreach_addcdiv_.Tensor, (a, b, c, scalars), {})
    assert [args[3].tolist() for _, args, _ in calls] == [[scalars[k].item()] for k in range(3)]
    shared = torch.tensor(0.9)
    calls = split_foreach(aten._foreach_mul_.Tensor, (a, shared), {})
    assert all(args[1] is shared for _, args, _ in calls)
    calls = split_foreach(aten._foreach_add_.List, (a, b), {"alpha": -0.3})
    assert all(kw == {"alpha": -0.3} for _, _, kw in calls)
    assert split_foreach(aten._foreach_add_.List, (a, b[:2]), {}) is None      # lengths differ
    assert split_foreach(aten._foreach_add_.List, ([], []), {}) is None         # nothing to split


def test_a_foreach_matmul_counts_the_flops_of_its_plain_op():
    # `_foreach_mm` has no formula of its own in PyTorch's flop counter; its split calls
    # count mm's per pair, so the simulator does not see a free matmul.
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(4, 6, generator=g), torch.randn(3, 5, generator=g)]
    b = [torch.randn(6, 2, generator=g), torch.randn(5, 7, generator=g)]
    with outcore.record() as rec:
        out = aten._foreach_mm(a, b)
    assert all(torch.equal(o, x @ y) for o, x, y in zip(out, a, b))
    mms = [f for f in rec.trace.functions if f.op.startswith("aten._foreach_mm")]
    assert [f.flops for f in mms] == [2 * 4 * 6 * 2, 2 * 3 * 5 * 7]


def test_foreach_adam_trains_bitwise_equal_and_splits():
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    oa = torch.optim.Adam(a.parameters(), foreach=True)
    ob = torch.optim.Adam(b.parameters(), foreach=True)
    x = torch.randn(4, 8)
    for _ in range(3):
        a(x).sum().backward(); oa.step(); oa.zero_grad()
        with outcore.record() as rec:
            b(x).sum().backward(); ob.step(); ob.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    opt_fns = [f for f in rec.trace.functions if f.phase == "optimizer"]
    # No optimizer function touches more than one parameter.
    params = {x.id for x in rec.trace.arrays if x.category == "parameter"}
    assert all(len(params & set(f.arrays())) <= 1 for f in opt_fns)
    assert sum(1 for f in opt_fns if f.split) > 0


def test_unsplittable_foreach_is_recorded_whole(monkeypatch):
    import outcore.aten
    monkeypatch.setattr(outcore.aten, "split_foreach", lambda *a: None)
    a, b = _tensors(1), _tensors(2)
    expected = [x + y for x, y in zip(a, b)]
    with outcore.record() as rec:
        torch._foreach_add_(a, b)
    assert [f.op for f in rec.trace.functions] == ["aten._foreach_add_.List"]
    assert len(rec.trace.functions[0].accesses) == 6
    assert all(torch.equal(x, y) for x, y in zip(a, expected))


def _twin_mlps():
    """Two equal small MLPs (4 parameters each) and an input."""
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    return a, b, torch.randn(4, 8)


FUSED = [
    ("adam", lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True)),
    ("adam amsgrad", lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, fused=True)),
    ("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True)),
    ("adamw tensor lr", lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-2), fused=True)),
    ("sgd momentum", lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True,
                                                fused=True)),
    ("sgd plain", lambda ps: torch.optim.SGD(ps, lr=1e-2, fused=True)),
    ("adagrad", lambda ps: torch.optim.Adagrad(ps, lr=1e-2, fused=True)),
]


@pytest.mark.parametrize("name,make_opt", FUSED, ids=[c[0] for c in FUSED])
def test_fused_optimizers_split_one_call_per_tensor_bitwise(name, make_opt):
    """`fused=True` steps (one kernel over every parameter) are recorded and run one call
    per parameter, bitwise equal to the whole call: a tight budget then needs one
    parameter's share of the step resident, not all of them."""
    a, b, x = _twin_mlps()
    oa, ob = make_opt(a.parameters()), make_opt(b.parameters())
    for _ in range(3):
        a(x).sum().backward(); oa.step(); oa.zero_grad()
        with outcore.record() as rec:
            b(x).sum().backward(); ob.step(); ob.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    for sa, sb in zip(oa.state.values(), ob.state.values()):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    fused = [f for f in rec.trace.functions if "_fused_" in f.op]
    assert [f.split for f in fused] == [(i, 4) for i in range(4)], [f.op for f in rec.trace.functions]
    params = {x.id for x in rec.trace.arrays if x.category == "parameter"}
    assert all(len(params & set(f.arrays())) == 1 for f in fused)


GRAD_SCALER_CASES = [
    # A fused step takes the scaler's `grad_scale` and `found_inf` (shared by every
    # per-parameter call).
    ("fused step", True, False, "_fused_adamw_"),
    # GradScaler.unscale_ (and scaler.step of an optimizer that is not fused) multiplies
    # every gradient by 1/scale in one multi-tensor kernel that also sets found_inf
    # (aten.PER_TENSOR_KERNELS): one call per gradient, so that a budget needs one
    # gradient at a time resident, not all of them.
    ("unscale, clip", False, True, "_amp_foreach_non_finite"),
]


@pytest.mark.parametrize("name,fused,unscale,split_op", GRAD_SCALER_CASES,
                         ids=[c[0] for c in GRAD_SCALER_CASES])
def test_a_grad_scalers_kernels_split_one_call_per_tensor_bitwise(name, fused, unscale, split_op):
    """With a GradScaler, the multi-tensor kernel of the case runs one call per tensor,
    bitwise equal to the whole call, including a step the scaler skips for an infinite
    gradient (and the scale it halves)."""
    a, b, x = _twin_mlps()
    oa = torch.optim.AdamW(a.parameters(), lr=1e-2, fused=fused or None)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2, fused=fused or None)
    sa, sb = torch.amp.GradScaler("cpu", init_scale=256.0), torch.amp.GradScaler("cpu", init_scale=256.0)
    for step in range(4):
        scale = float("inf") if step == 2 else 1.0          # step 2: skipped, scale halves
        for model, opt, scaler, record in ((a, oa, sa, False), (b, ob, sb, True)):
            def run():
                scaler.scale(model(x).sum() * scale).backward()
                if unscale:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
            if record:
                with outcore.record() as rec:
                    run()
            else:
                run()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert sa.get_scale() == sb.get_scale() < 256.0
    split = [f for f in rec.trace.functions if split_op in f.op]
    assert [f.split for f in split] == [(i, 4) for i in range(4)], [f.op for f in rec.trace.functions]


def test_a_call_whose_whole_list_leaves_the_fast_route_runs_whole(monkeypatch):
    """Off the CPU a `_foreach_*` call takes its multi-tensor kernel only where all its
    tensors share one dtype and device and every element is dense with matching sizes
    and strides; otherwise it runs whole as plain ops per tensor, while a one-element
    call of an element that passes would take the kernel (CUDA rounds the two
    differently). Such a call is not split (`aten._route_differs`). Meta tensors stand
    for CUDA ones here (the meta device itself splits like the CPU: a meta trace stands
    for a CPU step, helper-72). A list whose every position mixes dtypes (fp32
    parameters, bf16 gradients) takes the plain ops whole and split alike, and is
    split; on the CPU a foreach op is the plain op per tensor, and every call is split."""
    from outcore import aten as outcore_aten
    from outcore.aten import split_foreach

    def of(device, *dtypes):
        return [torch.empty(3, device=device, dtype=d) for d in dtypes]

    f32, bf16 = torch.float32, torch.bfloat16
    add = aten._foreach_add_.List
    mixed = (of("meta", f32, bf16), of("meta", f32, bf16))
    assert len(split_foreach(add, mixed, {})) == 2                  # meta: as on the CPU
    monkeypatch.setattr(outcore_aten, "_PLAIN_FOREACH_DEVICES", ("cpu",))
    assert split_foreach(add, mixed, {}) is None
    assert split_foreach(aten._foreach_mul_.Scalar, (of("meta", f32, bf16), 2.0), {}) is None
    strided = [torch.empty(3, device="meta"), torch.empty(6, device="meta")[::2]]
    assert split_foreach(aten._foreach_div_.Scalar, (strided, 3.0), {}) is None
    assert len(split_foreach(add, (of("meta", f32, f32), of("meta", f32, f32)), {})) == 2
    assert len(split_foreach(add, (of("meta", f32, f32), of("meta", bf16, bf16)), {})) == 2
    assert len(split_foreach(add, (of("cpu", f32, bf16), of("cpu", f32, bf16)), {})) == 2
    params = of("meta", f32, bf16)
    with outcore.record() as rec:          # recorded whole: one function
        torch._foreach_add_(params, of("meta", f32, bf16))
    assert [f.split for f in rec.trace.functions if f.op.startswith("aten._foreach_add_")] == [None]
