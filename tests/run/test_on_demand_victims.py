"""Which storage an op-by-op step evicts when the budget needs room (NOTE [Victims] in
run/residency.py)."""
import torch

import outcore


def _scan(A_log, proj, x):
    """Mamba's slow path in miniature: a (B, D, L, N) decay and input, scanned over L. Its
    backward reads the saved decay (clean once read back) every time step and keeps two
    gradient accumulators of its size (dirty, made anew each step)."""
    delta = torch.nn.functional.softplus(x @ proj)                          # (B, L, D)
    dA = torch.exp(delta.transpose(1, 2)[..., None] * -torch.exp(A_log)[:, None])
    dBu = (delta * x).transpose(1, 2)[..., None] * torch.ones(A_log.shape[1])
    s = torch.zeros(x.shape[0], A_log.shape[0], A_log.shape[1])
    outs = []
    for i in range(x.shape[1]):
        s = dA[:, :, i] * s + dBu[:, :, i]
        outs.append(s.sum(-1))
    return torch.stack(outs, 1).square().mean()


def _step(budget):
    torch.manual_seed(0)
    A_log = torch.randn(64, 8, requires_grad=True)
    proj = (torch.randn(64, 64) / 8).requires_grad_()
    x = torch.randn(4, 32, 64)
    if budget is None:
        loss = _scan(A_log, proj, x)
        loss.backward()
        return (loss, A_log.grad, proj.grad), None
    with outcore.OutOfCore(budget=budget) as ooc:
        with ooc.iteration():
            loss = _scan(A_log, proj, x)
            loss.backward()
        report = ooc.report()
    return (loss, A_log.grad, proj.grad), report.iterations[0]


def test_a_loop_just_over_the_budget_drops_what_is_clean_not_what_the_next_op_reads():
    # 1.46 MiB: the step's in-core peak is 1.65 MiB, each (4, 64, 32, 8) array 256 KiB.
    # LRU evicted the accumulator the next op added to, writing and reading one back twice
    # a time step (17.75 MiB moved); dropping the saved decay (clean) and reading it back
    # once a step moves 6.25 MiB.
    budget = 1500 * 1024
    want, _ = _step(None)
    got, it = _step(budget)
    assert it.mode == "record"                    # the recording runs op by op
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert it.peak_resident <= budget
    assert it.bytes_read + it.bytes_written <= 8 * 2**20, it
