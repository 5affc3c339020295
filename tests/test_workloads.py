"""The built-in data: the digits read without scikit-learn are scikit-learn's digits."""
import torch

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
    monkeypatch.setattr(digits.os.path, "join", lambda *parts: str(tmp_path / "nowhere.csv.gz"))
    images, labels = digits.load_digits()
    assert torch.equal(images, ours[0]) and torch.equal(labels, ours[1])
