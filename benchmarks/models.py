"""The benchmark's models and their fixed data, for ``bench.py``, ``memory.py`` and ``gpu_suite.py``.

Every problem is a model, a loss and a fixed list of batches, built from a seed (on the CPU, then
moved to the device), so that a fresh process (the memory measurements run in one per call)
builds bitwise the same problem:

- ``mlp``: a tanh MLP 784-256-256-10, 4 batches of 128, cross-entropy;
- ``cnn``: a tanh CNN on 1x16x16 images (two strided convolutions and a linear layer), 2 x 64;
- ``convnet``: a plain ReLU conv net on 3x32x32 images (three 3x3 convolutions with 32, 64 and
  64 channels, each followed by 2x2 max-pooling, then Linear 1024-112-10), 172,250 parameters,
  2 x 128 images: activations, not parameters, dominate its memory (the memory section's
  stand-in for a network whose autograd graph is what a budget must bound);
- ``resnet20``: the CIFAR ResNet-20 of He et al. (three stages of three basic blocks, 16/32/64
  channels, 1x1 convolutions on the shortcuts that change shape), 3x32x32 inputs, 272,474
  parameters, BatchNorm in **eval** mode (running statistics and affine weights randomized
  away from 0/1, as after training), 2 x 8 images;
- ``resnet18``: ResNet-18 in its CIFAR form (a 3x3 stem without max-pooling, four stages of two
  basic blocks, 64-512 channels), 11,173,962 parameters, BatchNorm in eval mode, 2 x 4 images
  on the CPU, 2 x 128 at the ``gpu`` scale;
- ``gpt``: a decoder-only transformer (pre-LayerNorm, learned positions, causal attention by
  ``F.scaled_dot_product_attention``, GELU MLP, output head tied to the token embedding): vocab
  2048, d_model 256, 4 layers, 4 heads, context 64, 3,700,224 parameters, 2 x 2 sequences;
- ``gpt30m``: the same transformer at vocab 8192, d_model 512, 8 layers, 8 heads, context 256:
  29,545,472 parameters, 2 x 8 sequences of 256 tokens (a GPU problem);
- ``gpt124m``: GPT-2-small-sized: vocab 50257, d_model 768, 12 layers, 12 heads, context 512:
  124,046,592 parameters, 2 x 4 sequences of 512 tokens (a GPU problem).

The GPTs' loss is the token cross-entropy: the model returns the logits of every position as a
``(batch * context, vocab)`` matrix and the targets are the next tokens, flattened alike, so all
three libraries see a plain ``nn.CrossEntropyLoss`` (and a batch's sample count is its number of
tokens).

The data is random (Gaussian images, uniform tokens and labels): a curvature product costs the
same whatever the values, and no download is needed. Every builder takes a ``scale``
(:data:`SCALES`): ``full`` is the CPU benchmark's data (the ResNets and the GPT get little of it,
a gradient takes 0.1-0.2 s on one CPU thread, so that the full benchmark, which multiplies each
of them a few thousand times, ends within hours); ``quick`` smaller data and the same models,
for ``bench.py --quick``; ``gpu`` the data of a GPU run (larger where the CPU's is too small to
keep a GPU busy); ``tiny`` the ResNets, the conv net and the GPTs shrunk to a few ten
thousand parameters (the MLP and the CNN keep their quick sizes), which exercise the same code
in seconds on a CPU (``gpu_suite.py --tiny``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GPU_MODELS",
    "MLP_SIZES",
    "MODELS",
    "SCALES",
    "Batches",
    "Problem",
    "build",
    "mlp_data_problem",
    "mlp_variant",
    "moved",
    "split",
]

Batches = list[tuple[torch.Tensor, torch.Tensor]]
SCALES = ("tiny", "quick", "full", "gpu")


def sized(scale: str, full: object, **others: object) -> object:
    """A size at ``scale``: ``others[scale]`` where given, else ``full`` (``tiny`` falls back to
    ``quick`` first, the smaller of the two)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if scale in others:
        return others[scale]
    return others.get("quick", full) if scale == "tiny" else full


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
    def device(self) -> torch.device:
        return self.params[0].device

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

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Problem:
        """The same weights and data in ``dtype`` and on ``device`` (a copy; the original is
        untouched). Integer data (labels, tokens) keeps its dtype."""

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        model = copy.deepcopy(self.model).to(device=device, dtype=dtype)
        batches = [(cast(x), cast(y)) for x, y in self.batches]
        return replace(self, model=model, batches=batches)

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the mean loss over all batches, as a user would write it."""
        params, total = self.params, self.num_samples
        flat = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        for x, y in self.batches:
            loss = self.loss_fn(self.model(x), y) * (x.shape[0] / total)
            grads = torch.autograd.grad(loss, params)
            flat += torch.cat([g.reshape(-1) for g in grads])
        return flat

    def vectors(self, k: int, seed: int) -> torch.Tensor:
        """A fixed ``(n, k)`` block of standard normal columns on the problem's device (drawn on
        the CPU: the same on every device)."""
        generator = torch.Generator().manual_seed(seed)
        block = torch.randn(self.size, k, generator=generator, dtype=self.dtype)
        return block.to(self.device)


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


def _image_problem(
    name: str, model: nn.Module, shape: tuple[int, ...], batches: int, size: int, seed: int
) -> Problem:
    """``model`` on ``batches`` x ``size`` random images of ``shape``, 10 classes, cross-entropy."""
    x, y = _images(batches * size, shape, 10, seed)
    return Problem(name, model, nn.CrossEntropyLoss(), split(x, y, batches))


# ----------------------------------------------------------------------------- MLP and CNNs
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


def _mlp_batches(scale: str) -> tuple[int, int]:
    """The MLP's batches and batch size: 4 of 128 (quick: 2 of 64)."""
    return sized(scale, (4, 128), quick=(2, 64))


def mlp_problem(seed: int, scale: str) -> Problem:
    """MLP 784-256-256-10 (tanh), cross-entropy, 4 batches of 128 (quick: 2 of 64), float32."""
    batches, batch_size = _mlp_batches(scale)
    return mlp_data_problem(MLP_SIZES, batches * batch_size, batch_size, seed)


def mlp_variant(seed: int, scale: str, device: str = "cpu", **options: object) -> Problem:
    """The benchmark's MLP with other outputs, loss, samples or batches (the same weights'
    seed): ``outputs``, ``loss`` (``"ce"`` or ``"mse"``), ``samples``, ``batch_size``,
    ``sizes``; on ``device``."""
    batches, batch_size = _mlp_batches(scale)
    sizes = options.pop("sizes", [*MLP_SIZES[:-1], options.pop("outputs", MLP_SIZES[-1])])
    samples = options.pop("samples", batches * batch_size)
    batch_size = options.pop("batch_size", batch_size)
    return moved(mlp_data_problem(sizes, samples, batch_size, seed, **options), device)


def cnn_problem(seed: int, scale: str) -> Problem:
    """Two strided tanh convolutions and a linear layer on 1x16x16 images, 2 batches of 64
    (quick: 2 of 32)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )
    size = sized(scale, 64, quick=32)
    return _image_problem("CNN 1x16x16 c16-c32", model, (1, 16, 16), 2, size, seed)


def convnet(channels: list[int], hidden: int) -> nn.Sequential:
    """3x3 convolutions (padding 1) of ``channels``, each with ReLU and 2x2 max-pooling, on
    3x32x32 inputs; then Linear(flattened, ``hidden``), ReLU, Linear(``hidden``, 10)."""
    layers: list[nn.Module] = []
    for a, b in zip([3, *channels[:-1]], channels, strict=True):
        layers += [nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    side = 32 // 2 ** len(channels)
    flat = channels[-1] * side * side
    return nn.Sequential(
        *layers, nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )


def convnet_problem(seed: int, scale: str) -> Problem:
    """The plain ReLU conv net (32/64/64 channels, hidden 112; tiny: 4/8/8, hidden 16) on
    3x32x32 images, 2 batches of 128 (quick: 2 of 32, tiny: 2 of 8)."""
    torch.manual_seed(seed)
    channels, hidden = sized(scale, ([32, 64, 64], 112), tiny=([4, 8, 8], 16))
    size = sized(scale, 128, quick=32, tiny=8)
    name = f"ConvNet 3x32x32 c{'-c'.join(map(str, channels))} fc{hidden}"
    return _image_problem(name, convnet(channels, hidden), (3, 32, 32), 2, size, seed)


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
    return _image_problem(name, model, (3, 32, 32), batches, batch_size, seed)


def _resnet_name(depth: int, widths: list[int], tiny: bool) -> str:
    return f"ResNet-{depth} 3x32x32" + (f" (tiny: {widths[0]}-{widths[-1]} channels)" * tiny)


def resnet20_problem(seed: int, scale: str) -> Problem:
    """ResNet-20 (16/32/64 channels, 3 blocks per stage; tiny: 4/8/16), 2 batches of 8 (quick
    and tiny: 2 of 2)."""
    widths = sized(scale, [16, 32, 64], tiny=[4, 8, 16])
    size = sized(scale, 8, quick=2)
    name = _resnet_name(20, widths, scale == "tiny")
    return resnet_problem(name, widths, 3, 2, size, seed)


def resnet18_problem(seed: int, scale: str) -> Problem:
    """ResNet-18 (64-512 channels, 2 blocks per stage; tiny: 4-32), 2 batches of 4 (quick: 2 of
    1, tiny: 2 of 2, gpu: 2 of 128)."""
    widths = sized(scale, [64, 128, 256, 512], tiny=[4, 8, 16, 32])
    size = sized(scale, 4, quick=1, tiny=2, gpu=128)
    name = _resnet_name(18, widths, scale == "tiny")
    return resnet_problem(name, widths, 2, 2, size, seed)


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


GPT_SIZES = {  # the keyword arguments of GPT per model
    "gpt": {"vocab": 2048, "width": 256, "layers": 4, "heads": 4, "context": 64},
    "gpt30m": {"vocab": 8192, "width": 512, "layers": 8, "heads": 8, "context": 256},
    "gpt124m": {"vocab": 50257, "width": 768, "layers": 12, "heads": 12, "context": 512},
}
TINY_GPT = {"vocab": 128, "width": 32, "layers": 2, "heads": 2, "context": 16}
GPT_SEQUENCES = {"gpt": 2, "gpt30m": 8, "gpt124m": 4}  # per batch, at the full and gpu scales


def gpt_problem(key: str, seed: int, scale: str) -> Problem:
    """The GPT ``key`` of :data:`GPT_SIZES` (tiny: :data:`TINY_GPT`) on random token sequences
    of its full context (next-token targets), 2 batches of :data:`GPT_SEQUENCES` sequences
    (quick and tiny: 2 of 1)."""
    torch.manual_seed(seed)
    sizes = TINY_GPT if scale == "tiny" else GPT_SIZES[key]
    model = GPT(**sizes)
    batches, sequences = 2, sized(scale, GPT_SEQUENCES[key], quick=1)
    generator = torch.Generator().manual_seed(seed + 1)
    shape = (batches * sequences, sizes["context"] + 1)
    tokens = torch.randint(0, sizes["vocab"], shape, generator=generator)
    x, y = tokens[:, :-1], tokens[:, 1:]
    data = [
        (xb, yb.reshape(-1)) for xb, yb in zip(x.split(sequences), y.split(sequences), strict=True)
    ]
    name = "GPT {vocab}v d{width} {layers}L {heads}h ctx{context}".format(**sizes)
    name += f" (tiny {key})" * (scale == "tiny")
    return Problem(name, model, nn.CrossEntropyLoss(), data)


def _gpt(key: str) -> Callable[[int, str], Problem]:
    return lambda seed, scale: gpt_problem(key, seed, scale)


MODELS: dict[str, Callable[[int, str], Problem]] = {
    "mlp": mlp_problem,
    "cnn": cnn_problem,
    "convnet": convnet_problem,
    "resnet20": resnet20_problem,
    "gpt": _gpt("gpt"),
    "resnet18": resnet18_problem,
    "gpt30m": _gpt("gpt30m"),
    "gpt124m": _gpt("gpt124m"),
}
GPU_MODELS = ("resnet18", "gpt30m", "gpt124m")  # too large for the CPU runs' defaults


def moved(problem: Problem, device: str) -> Problem:
    """``problem`` on ``device`` (itself if that is the CPU, where problems are built)."""
    return problem if torch.device(device).type == "cpu" else problem.to(device=device)


def build(name: str, seed: int = 0, scale: str = "full", device: str = "cpu") -> Problem:
    """The problem ``name`` (a key of :data:`MODELS`) at ``scale`` on ``device``, the same
    bitwise in every process (built on the CPU, then moved)."""
    return moved(MODELS[name](seed, scale), device)
