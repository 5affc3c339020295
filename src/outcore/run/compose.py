"""Compositions outcore refuses before anything runs.

FSDP (`fully_shard`, FSDP2, and `FullyShardedDataParallel`) frees and re-allocates its
parameters' memory itself, by resizing their storages (`storage.resize_(0)` after
use, back before the next all-gather). outcore's in-place eviction does the same to
the same storages, so the two would free each other's memory: the process crashes in
FSDP's all-gather copy-out (seen: a segmentation fault in the first backward). Until
outcore understands FSDP's resize protocol (the issue on distributed training), an
iteration refuses to start while an FSDP module exists: a clear error, nothing changed.
DDP keeps ordinary parameters and composes (each rank its own OutOfCore).
"""
from __future__ import annotations

import gc
import sys
import warnings

from ..errors import OutcoreError


def _fsdp_classes() -> tuple:
    """FSDP's module classes, if the user's code imported FSDP (never imported here) and
    a process group is up (FSDP cannot shard without one). transformers and accelerate
    import FSDP whenever they load, so the import alone says little."""
    module = sys.modules.get("torch.distributed.fsdp")
    if module is None:
        return ()
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return ()
    return tuple(c for c in (getattr(module, "FSDPModule", None),
                             getattr(module, "FullyShardedDataParallel", None)) if c is not None)


def refuse_unsupported() -> None:
    """Raise OutcoreError when an FSDP-wrapped module is alive in this process. Looks only
    in a distributed run that imported FSDP; then it walks the objects the garbage
    collector tracks, once per OutOfCore."""
    classes = _fsdp_classes()
    if not classes:
        return
    gc.collect()                  # a model dropped in a reference cycle is not in use
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # isinstance() on deprecated torch proxies warns
        found = next((obj for obj in gc.get_objects() if isinstance(obj, classes)), None)
    if found is not None:
        raise OutcoreError(
            f"{type(found).__name__} (FSDP) is in use: FSDP frees and re-allocates its "
            "parameters' memory itself (storage resize_), and outcore would move the same "
            "storages, which crashes the process. outcore does not compose with FSDP yet: "
            "train this model without outcore, or with DistributedDataParallel, which "
            "composes (one OutOfCore per rank). Nothing has run.")
