"""A real dataset that ships inside a package: scikit-learn's 1,797 handwritten digits
(8x8 grey images, 10 classes). Nothing is downloaded."""
from __future__ import annotations

import torch

from ..errors import OutcoreError


def digit_batches(batch: int, image_size: int = 64, *, seed: int = 0):
    """Endless (images, labels) batches: images upsampled to image_size x image_size,
    standardized, in a fixed shuffled order for `seed`."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise OutcoreError("the demo data comes with scikit-learn: pip install 'outcore[demo]'") from exc
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear",
                                             align_corners=False)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    position = 0
    while True:
        if position + batch > len(order):
            position = 0
        idx = order[position:position + batch]
        position += batch
        yield images[idx].clone(), labels[idx].clone()
