"""The benchmark's models and their fixed data, for ``bench.py`` and ``memory.py``.

Every problem is a model, a loss and a fixed list of batches, built from a seed, so that a fresh
process (the memory measurements run in one per call) builds bitwise the same problem:

- ``mlp``: a tanh MLP 784-256-256-10, 4 batches of 128, cross-entropy;
- ``cnn``: a tanh CNN on 1x16x16 images (two strided convolutions and a linear layer), 2 x 64;
- ``resnet20``: the CIFAR ResNet-20 of He et al. (three stages of three basic blocks, 16/32/64
  channels, 1x1 convolutions on the shortcuts that change shape), 3x32x32 inputs, 272,474
  parameters, BatchNorm in **eval** mode (running statistics and affine weights randomized
  away from 0/1, as after training), 2 x 8 images;
- ``resnet18``: ResNet-18 in its CIFAR form (a 3x3 stem without max-pooling, four stages of two
  basic blocks, 64-512 channels), 11,173,962 parameters, BatchNorm in eval mode, 2 x 4 images;
- ``gpt``: a decoder-only transformer (pre-LayerNorm, learned positions, causal attention by
  ``F.scaled_dot_product_attention``, GELU MLP, output head tied to the token embedding): vocab
  2048, d_model 256, 4 layers, 4 heads, context 64, 3,700,224 parameters, 2 x 2 sequences.
  Its loss is the token cross-entropy: the model returns the logits of every position as a
  ``(batch * context, vocab)`` matrix and the targets are the next tokens, flattened alike,
  so all three libraries see a plain ``nn.CrossEntropyLoss`` (and a batch's sample count is
  its number of tokens).

The data is random (Gaussian images, uniform tokens and labels): a curvature product costs the
same whatever the values, and no download is needed. The ResNets and the GPT get little data
(a gradient takes 0.1-0.2 s on one CPU thread), so that the full benchmark, which multiplies
each of them a few thousand times, ends within hours. ``quick=True`` gives smaller data (and the
same models), for ``bench.py --quick``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP_SIZES", "MODELS", "Batches", "Problem", "build", "mlp_data_problem", "split"]

Batches = list[tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    """A model, a loss and fixed batches: everything an operator is built from."""

    name: str
    model: nn.Module
    loss_fn: nn.Module
    batches: Batches

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def num_samples(self) -> int:
        return sum(int(x.shape[0]) for x, _ in self.batches)

    @property
    def layout(self) -> str:
        """The batch sizes, compactly: ``8 × 128``, or ``3 × 512 + 261`` for a short last one."""
        sizes = [int(x.shape[0]) for x, _ in self.batches]
        head = sizes[:-1]
        if len(set(sizes)) == 1:
            return f"{len(sizes)} × {sizes[0]}"
        if len(set(head)) == 1:
            return f"{len(head)} × {head[0]} + {sizes[-1]}"
        return " + ".join(map(str, sizes))

    def to(self, dtype: torch.dtype) -> Problem:
        """The same weights and data in ``dtype`` (a copy; the original is untouched)."""

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        model = copy.deepcopy(self.model).to(dtype)
        batches = [(cast(x), cast(y)) for x, y in self.batches]
        return replace(self, model=model, batches=batches)

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the mean loss over all batches, as a user would write it."""
        params, total = self.params, self.num_samples
        flat = torch.zeros(self.size, dtype=self.dtype)
        for x, y in self.batches:
            loss = self.loss_fn(self.model(x), y) * (x.shape[0] / total)
            grads = torch.autograd.grad(loss, params)
            flat += torch.cat([g.reshape(-1) for g in grads])
        return flat

    def vectors(self, k: int, seed: int) -> torch.Tensor:
        """A fixed ``(n, k)`` block of standard normal columns."""
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(self.size, k, generator=generator, dtype=self.dtype)


def split(x: torch.Tensor, y: torch.Tensor, batches: int) -> Batches:
    """``(x, y)`` in ``batches`` consecutive batches (the last one shorter if it must be)."""
    size = math.ceil(x.shape[0] / batches)
    return list(zip(x.split(size), y.split(size), strict=True))


def _images(
    samples: int, shape: tuple[int, ...], classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(samples, *shape, generator=generator)
    return x, torch.randint(0, classes, (samples,), generator=generator)


# ----------------------------------------------------------------------------- MLP and CNN
def mlp(sizes: list[int], activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """Linear layers of ``sizes`` with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), activation()]
    return nn.Sequential(*layers[:-1])


def mlp_data_problem(
    sizes: list[int],
    samples: int,
    batch_size: int,
    seed: int,
    *,
    loss: str = "ce",
) -> Problem:
    """A tanh MLP of ``sizes`` on Gaussian inputs, float32, batches of ``batch_size`` (the last
    one shorter if ``samples`` is not a multiple), cross-entropy (``loss="ce"``, uniform labels)
    or MSE (``"mse"``, Gaussian targets)."""
    torch.manual_seed(seed)
    model = mlp(sizes)
    outputs = sizes[-1]
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(samples, sizes[0], generator=generator)
    if loss == "ce":
        y = torch.randint(0, outputs, (samples,), generator=generator)
        loss_fn: nn.Module = nn.CrossEntropyLoss()
    else:
        y = torch.randn(samples, outputs, generator=generator)
        loss_fn = nn.MSELoss()
    batches = list(zip(x.split(batch_size), y.split(batch_size), strict=True))
    return Problem(f"MLP {'-'.join(map(str, sizes))}", model, loss_fn, batches)


MLP_SIZES = [784, 256, 256, 10]


def mlp_problem(seed: int, quick: bool) -> Problem:
    """MLP 784-256-256-10 (tanh), cross-entropy, 4 batches of 128 (quick: 2 of 64), float32."""
    batches, batch_size = (2, 64) if quick else (4, 128)
    return mlp_data_problem(MLP_SIZES, batches * batch_size, batch_size, seed)


def cnn_problem(seed: int, quick: bool) -> Problem:
    """Two strided tanh convolutions and a linear layer on 1x16x16 images, 2 batches of 64."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )
    batches, batch_size = (2, 32) if quick else (2, 64)
    x, y = _images(batches * batch_size, (1, 16, 16), 10, seed)
    return Problem("CNN 1x16x16 c16-c32", model, nn.CrossEntropyLoss(), split(x, y, batches))


# ----------------------------------------------------------------------------- ResNets
class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (a 1x1 convolution where the shape
    changes)."""

    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR ResNet: a 3x3 stem, stages of basic blocks (the first of each stage but the
    first halves the resolution), global average pooling and a linear classifier."""

    def __init__(self, widths: list[int], blocks_per_stage: int, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks, inputs = [], widths[0]
        for stage, width in enumerate(widths):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(inputs, width, stride))
                inputs = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(self.stem(x))
        return self.head(features.mean(dim=(2, 3)))


def _randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Running statistics and affine weights away from their initial 0/1, as after training
    (so that eval-mode BatchNorm is not the identity), then eval mode."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
            module.running_var.copy_(1 + 0.2 * torch.rand(c, generator=generator))
            with torch.no_grad():
                module.weight.copy_(1 + 0.1 * torch.randn(c, generator=generator))
                module.bias.copy_(0.1 * torch.randn(c, generator=generator))
    model.eval()


def resnet_problem(
    name: str, widths: list[int], blocks: int, batches: int, batch_size: int, seed: int
) -> Problem:
    """A CIFAR ResNet on random 3x32x32 images, BatchNorm in eval mode, cross-entropy."""
    torch.manual_seed(seed)
    model = ResNet(widths, blocks)
    _randomize_batchnorm(model, torch.Generator().manual_seed(seed + 2))
    x, y = _images(batches * batch_size, (3, 32, 32), 10, seed)
    return Problem(name, model, nn.CrossEntropyLoss(), split(x, y, batches))


def resnet20_problem(seed: int, quick: bool) -> Problem:
    """ResNet-20 (16/32/64 channels, 3 blocks per stage), 2 batches of 8 (quick: 2 of 2)."""
    size = 2 if quick else 8
    return resnet_problem("ResNet-20 3x32x32", [16, 32, 64], 3, 2, size, seed)


def resnet18_problem(seed: int, quick: bool) -> Problem:
    """ResNet-18 (64-512 channels, 2 blocks per stage), 2 batches of 4 (quick: 2 of 1)."""
    size = 1 if quick else 4
    return resnet_problem("ResNet-18 3x32x32", [64, 128, 256, 512], 2, 2, size, seed)


# ----------------------------------------------------------------------------- GPT
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attention(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A decoder-only transformer whose output head is tied to the token embedding; returns the
    logits of every position as one ``(batch * context, vocab)`` matrix."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(TransformerBlock(width, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight
        for module in self.modules():  # GPT-2's initialization
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.blocks(self.tokens(tokens) + self.positions(positions))
        return self.head(self.ln(x)).flatten(0, 1)


GPT_SIZES = {"vocab": 2048, "width": 256, "layers": 4, "heads": 4, "context": 64}


def gpt_problem(seed: int, quick: bool) -> Problem:
    """The GPT on random token sequences (next-token targets), 2 batches of 2 sequences of 64
    tokens (quick: 2 of 1)."""
    torch.manual_seed(seed)
    model = GPT(**GPT_SIZES)
    batches, sequences = (2, 1) if quick else (2, 2)
    context = GPT_SIZES["context"]
    generator = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(
        0, GPT_SIZES["vocab"], (batches * sequences, context + 1), generator=generator
    )
    x, y = tokens[:, :-1], tokens[:, 1:]
    data = [
        (xb, yb.reshape(-1)) for xb, yb in zip(x.split(sequences), y.split(sequences), strict=True)
    ]
    name = "GPT {vocab}v d{width} {layers}L {heads}h ctx{context}".format(**GPT_SIZES)
    return Problem(name, model, nn.CrossEntropyLoss(), data)


MODELS: dict[str, Callable[[int, bool], Problem]] = {
    "mlp": mlp_problem,
    "cnn": cnn_problem,
    "resnet20": resnet20_problem,
    "gpt": gpt_problem,
    "resnet18": resnet18_problem,
}


def build(name: str, seed: int = 0, quick: bool = False) -> Problem:
    """The problem ``name`` (a key of :data:`MODELS`), the same bitwise in every process."""
    return MODELS[name](seed, quick)
