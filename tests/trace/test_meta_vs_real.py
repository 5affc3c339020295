"""A meta recording (no memory, no compute) sees the same functions and array sizes as
a real one, for every built-in model and both optimizers."""
import pytest

import outcore
from outcore import workloads

# Small sizes of every built-in architecture, so the real run is quick here.
SIZES = {"mlp": {}, "resnet18": {"image_size": 32}, "resnet50": {"image_size": 32},
         "gpt2-tiny": {"seq_len": 16}}


def _record(name, device, optimizer):
    w = workloads.build(name, batch=2, device=device, optimizer=optimizer, **SIZES[name])
    w.step()                       # steady state: optimizer state exists
    with outcore.record() as rec:
        w.step()
    return rec.trace


def test_every_builtin_model_is_covered():
    # The others are these at other sizes: the same code, only wider or deeper.
    missing = set(workloads.SPECS) - set(SIZES) - {"gpt2", "gpt2-medium", "gpt2-xl",
                                                   "resnet18-tiny", "mlp-tiny"}
    assert not missing


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("name", sorted(SIZES))
def test_meta_and_real_recordings_agree(name, optimizer):
    meta, real = _record(name, "meta", optimizer), _record(name, "cpu", optimizer)
    assert meta.durations == "estimated" and real.durations == "measured"
    assert [(f.op, f.phase, f.split) for f in meta.functions] == \
           [(f.op, f.phase, f.split) for f in real.functions]
    assert [f.accesses for f in meta.functions] == [f.accesses for f in real.functions]
    assert [(a.nbytes, a.dtype, a.kind, a.category, a.first_use, a.last_use) for a in meta.arrays] == \
           [(a.nbytes, a.dtype, a.kind, a.category, a.first_use, a.last_use) for a in real.arrays]
    assert [f.flops for f in meta.functions] == [f.flops for f in real.functions]
    assert meta.peak() == real.peak()
