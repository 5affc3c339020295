"""A real dataset that ships inside a package: scikit-learn's 1,797 handwritten digits
(8x8 grey images, 10 classes). Nothing is downloaded."""
from __future__ import annotations

import gzip
import importlib.util
import os

import torch

from ..errors import OutcoreError


def _shipped_file() -> str:
    """Where scikit-learn keeps the digits, found without importing it."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise OutcoreError("the demo data comes with scikit-learn: pip install 'outcore[demo]'")
    return os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels): float32 1797x8x8 with values 0-16, and int64 1797.

    Read from the file scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`: a row
    per image, 64 pixels then the label) without importing scikit-learn, which takes
    2.9 s here in every process that loads the digits (the demo starts two); through
    `sklearn.datasets.load_digits` where that file is not where this version keeps it.
    Both give the same values (tests/test_workloads.py)."""
    try:
        with gzip.open(_shipped_file(), "rt") as f:
            rows = torch.tensor([[float(v) for v in line.split(",")] for line in f if line.strip()],
                                dtype=torch.float32)
        if rows.shape[1:] == (65,):
            return rows[:, :64].reshape(-1, 8, 8), rows[:, 64].long()
    except (OSError, ValueError):
        pass
    from sklearn.datasets import load_digits as from_sklearn
    data = from_sklearn()
    return torch.tensor(data.images, dtype=torch.float32), torch.tensor(data.target, dtype=torch.long)


def digit_batches(batch: int, image_size: int = 64, *, seed: int = 0):
    """Endless (images, labels) batches: images upsampled to image_size x image_size,
    standardized, in a fixed shuffled order for `seed`."""
    images, labels = load_digits()
    images = images.unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear",
                                             align_corners=False)
    images = (images - images.mean()) / images.std()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    position = 0
    while True:
        if position + batch > len(order):
            position = 0
        idx = order[position:position + batch]
        position += batch
        yield images[idx].clone(), labels[idx].clone()
