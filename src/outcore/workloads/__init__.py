"""Built-in training steps on real architectures, for the CLI, the demo, tests and
benchmarks. Everything is built from code or configs: nothing is downloaded.

    w = outcore.workloads.build("resnet50", batch=32, device="meta")
    with outcore.record() as rec:
        w.step()
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import OutcoreError


@dataclass(frozen=True, kw_only=True)
class Spec:
    """How to build one named workload."""
    name: str
    description: str
    build_model: Callable[..., nn.Module]
    make_batch: Callable[..., tuple]
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    default_batch: int
    sizes: tuple[str, ...] = ()         # the size arguments it takes: image_size, seq_len


@dataclass
class Workload:
    """A model, its optimizer, one batch, and the training iteration that uses them."""
    spec: Spec
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: tuple
    size: int = field(default=0)

    def loss(self) -> torch.Tensor:
        return self.spec.loss(self.model, self.batch)

    def step(self) -> torch.Tensor:
        """One training iteration: forward, loss, backward, optimizer step, zero_grad."""
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def _image_batch(batch, device, image_size, num_classes, generator):
    x = torch.randn(batch, 3, image_size, image_size, device=device, generator=generator)
    y = torch.randint(0, num_classes, (batch,), device=device, generator=generator)
    return x, y


def _classify_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _gpt2_model(size: str, seq_len: int) -> nn.Module:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as exc:
        raise OutcoreError("the GPT-2 workloads need `transformers`: pip install 'outcore[models]'") from exc
    shapes = {"gpt2-tiny": (2, 64, 4), "gpt2": (12, 768, 12), "gpt2-medium": (24, 1024, 16),
              "gpt2-xl": (48, 1600, 25)}
    n_layer, n_embd, n_head = shapes[size]
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()   # config notices are not the user's concern here
    vocab = 512 if size == "gpt2-tiny" else 50257
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=max(seq_len, 64),
                        vocab_size=vocab, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    # Eager attention: the same aten ops on every device (SDPA picks kernels per device).
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config)


def _token_batch(vocab):
    def make(batch, device, seq_len, generator):
        ids = torch.randint(0, vocab, (batch, seq_len), device=device, generator=generator)
        # An explicit mask keeps transformers from inspecting values (impossible on meta).
        return ids, torch.ones(batch, seq_len, dtype=torch.long, device=device)
    return make


def _lm_loss(model, batch):
    ids, mask = batch
    return model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss


def _mlp(width=1024, depth=4, inputs=512, classes=10) -> nn.Module:
    layers, d = [], inputs
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, classes))


def _resnet(name):
    def build(**_):
        from . import resnet
        return getattr(resnet, name)()
    return build


SPECS: dict[str, Spec] = {}


def _register(spec: Spec):
    SPECS[spec.name] = spec


for _name, _desc, _width in (("mlp", "4-layer MLP, width 1024, 512 inputs, 10 classes", 1024),
                             ("mlp-tiny", "the MLP at a quarter width, 256 (for tests)", 256)):
    _register(Spec(name=_name, description=_desc,
                   build_model=lambda width=_width, **_: _mlp(width=width),
                   make_batch=lambda batch, device, generator, **_: (
                       torch.randn(batch, 512, device=device, generator=generator),
                       torch.randint(0, 10, (batch,), device=device, generator=generator)),
                   loss=_classify_loss, default_batch=256))
for _name, _desc in (("resnet18", "ResNet-18 (torchvision layout), 1000 classes"),
                     ("resnet18-tiny", "ResNet-18 layout at a quarter width, 1000 classes (for tests)"),
                     ("resnet50", "ResNet-50 (torchvision layout), 1000 classes")):
    _register(Spec(name=_name, description=_desc, build_model=_resnet(_name.replace("-", "_")),
                   make_batch=lambda batch, device, generator, image_size=224, **_: _image_batch(
                       batch, device, image_size, 1000, generator),
                   loss=_classify_loss, default_batch=32, sizes=("image_size",)))
for _name, _desc in (("gpt2-tiny", "GPT-2 architecture, 2 layers, width 64 (for tests)"),
                     ("gpt2", "GPT-2 small, 124M parameters"),
                     ("gpt2-medium", "GPT-2 medium, 355M parameters"),
                     ("gpt2-xl", "GPT-2 XL, 1.5B parameters")):
    _register(Spec(name=_name, description=_desc,
                   build_model=(lambda n: lambda seq_len=1024, **_: _gpt2_model(n, seq_len))(_name),
                   make_batch=(lambda v: lambda batch, device, generator, seq_len=1024, **_:
                               _token_batch(v)(batch, device, seq_len, generator))(
                       512 if _name == "gpt2-tiny" else 50257),
                   loss=_lm_loss, default_batch=4, sizes=("seq_len",)))

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3),
}


def sizes(name: str, *, image_size: int | None = None, seq_len: int | None = None) -> dict:
    """The size arguments given for workload `name`, refused where it takes none of that
    name (they were once ignored without a word) or where one is below 1."""
    if name not in SPECS:
        raise OutcoreError(f"unknown model {name!r}; choose one of {', '.join(SPECS)}")
    spec = SPECS[name]
    given = {k: v for k, v in (("image_size", image_size), ("seq_len", seq_len)) if v is not None}
    for key, value in given.items():
        if key not in spec.sizes:
            takes = " and ".join(spec.sizes) or "neither image_size nor seq_len"
            raise OutcoreError(f"{name} takes no {key} (it takes {takes}); drop "
                               f"{key}={value} (--{key.replace('_', '-')} on the command line)")
        if value < 1:
            raise OutcoreError(f"{key} must be at least 1, got {value}")
    return given


def run_step(w: Workload) -> torch.Tensor:
    """`w.step()`, where a step the model cannot take at these sizes (a ResNet's batch
    norm over one value per channel: batch 1 at 32x32 reaches layer 4 at 1x1) is an
    OutcoreError naming the sizes to change, not PyTorch's traceback (helper-204)."""
    try:
        return w.step()
    except (RuntimeError, ValueError) as exc:
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
            raise                  # not the sizes' fault: a larger batch is no advice
        raise OutcoreError(f"{w.spec.name} cannot train a step at batch {len(w.batch[0])} and "
                           f"these sizes: {exc}. A larger batch, image size or sequence "
                           "length may fit it") from exc


def build(name: str, *, batch: int | None = None, device: str = "cpu", optimizer: str = "sgd",
          image_size: int | None = None, seq_len: int | None = None, seed: int = 0) -> Workload:
    """Build workload `name` on `device` ("cpu" or "meta"), deterministic for `seed`."""
    given = sizes(name, image_size=image_size, seq_len=seq_len)
    if optimizer not in OPTIMIZERS:
        raise OutcoreError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    spec = SPECS[name]
    batch = spec.default_batch if batch is None else batch
    if batch < 1:
        raise OutcoreError(f"batch must be at least 1, got {batch}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = spec.build_model(**given)
    generator = torch.Generator(device="cpu" if device == "meta" else device).manual_seed(seed + 1)
    if device == "meta":
        generator = None          # meta tensors have no values to draw
    data = spec.make_batch(batch=batch, device=device, generator=generator, **given)
    return Workload(spec=spec, model=model, optimizer=OPTIMIZERS[optimizer](model.parameters()),
                    batch=data)
