"""The built-in data: the digits read without scikit-learn are scikit-learn's digits."""
import importlib.util

import pytest
import torch

from outcore.errors import OutcoreError
from outcore.workloads import digits

from . import zygote


def test_the_digits_read_from_the_file_equal_scikit_learns():
    from sklearn.datasets import load_digits
    images, labels = digits.load_digits()
    theirs = load_digits()
    assert images.dtype == torch.float32 and images.shape == (1797, 8, 8)
    assert torch.equal(images, torch.tensor(theirs.images, dtype=torch.float32))
    assert torch.equal(labels, torch.tensor(theirs.target, dtype=torch.long))


def test_the_digits_load_without_importing_scikit_learn():
    code = ("import sys; from outcore.workloads.digits import digit_batches; "
            "x, y = next(digit_batches(4, 16)); "
            "print(tuple(x.shape), tuple(y.shape), 'sklearn' in sys.modules)")
    out = zygote.run(["-c", code], timeout=60)          # a process that has not imported it
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "(4, 1, 16, 16) (4,) False", out


def test_where_the_file_is_missing_scikit_learn_loads_them(monkeypatch, tmp_path):
    """Another scikit-learn version may keep the file elsewhere: its load_digits then."""
    ours = digits.load_digits()
    monkeypatch.setattr(digits, "_shipped_file", lambda: str(tmp_path / "nowhere.csv.gz"))
    images, labels = digits.load_digits()
    assert torch.equal(images, ours[0]) and torch.equal(labels, ours[1])


def test_without_scikit_learn_the_error_says_what_to_install(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "sklearn" else find_spec(name, *args))
    with pytest.raises(OutcoreError, match=r"pip install 'outcore\[demo\]'"):
        digits.load_digits()


def test_the_subpackages_are_reached_after_import_outcore_alone():
    """`outcore.workloads.build(...)`, as its docstring shows, after `import outcore`
    alone, in a process that has imported nothing else of outcore (helper-200: an
    AttributeError); a name outcore lacks is still an AttributeError."""
    code = ("import sys, outcore; w = outcore.workloads.build('mlp-tiny', batch=2); "
            "print(type(w).__name__, outcore.view.__name__, hasattr(outcore, 'nothing'))")
    out = zygote.run(["-c", code], timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "Workload outcore.view False", out
