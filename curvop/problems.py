"""Built-in problems: a small MLP on handwritten digits, trained in a fraction of a second.

The notebooks, the ``curvop`` command and the benchmarks all start from :func:`load_problem`.
The data are scikit-learn's bundled ``load_digits`` (1797 images of 8x8 pixels, 10 classes; no
download) when scikit-learn is installed (``pip install curvop[demo]``), otherwise a synthetic
data set of the same shape drawn from a seeded generator, so that the problem, and every number
computed from it, is reproducible either way.

Everything is deterministic for a given ``seed`` and the global random state is never consumed:
initialization runs under a saved and restored generator, synthetic data come from a private one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DATASETS", "VARIANTS", "Problem", "load_problem"]

DATASETS = ("auto", "digits", "synthetic")

NUM_FEATURES, NUM_CLASSES, NUM_SAMPLES = 64, 10, 1797


@dataclass(frozen=True)
class _Variant:
    hidden: int
    num_samples: int
    batch_size: int
    train_steps: int


VARIANTS = {
    # 64-32-10: 2410 parameters, all 1797 samples in batches of 512, 512, 512, 261.
    "default": _Variant(hidden=32, num_samples=NUM_SAMPLES, batch_size=512, train_steps=100),
    # 64-8-10: 610 parameters, 400 samples in batches of 128, 128, 128, 16: dense in a second.
    "tiny": _Variant(hidden=8, num_samples=400, batch_size=128, train_steps=100),
}


@dataclass(frozen=True, repr=False)
class Problem:
    """A model, its loss and its data: the three arguments of every curvature operator.

    Attributes
    ----------
    model
        A ``Linear-Tanh-Linear`` classifier (in ``eval`` mode; it has no dropout or batch norm).
    loss_fn
        ``nn.CrossEntropyLoss()`` (mean reduction).
    data
        A list of ``(inputs, targets)`` batches; the last one is shorter, so operators must weight
        batches by their sample counts.
    name
        The data set, ``"digits"`` or ``"synthetic"``, with ``"-tiny"`` for the tiny variant.
    trained
        Whether the model was trained (full-batch Adam); otherwise it is at its initialization.
    """

    model: nn.Module
    loss_fn: nn.Module
    data: list[tuple[torch.Tensor, torch.Tensor]]
    name: str
    trained: bool

    @property
    def num_params(self) -> int:
        """The number of parameters ``n``: operators on this problem are ``n x n``."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def num_samples(self) -> int:
        return sum(len(targets) for _, targets in self.data)

    def loss(self) -> float:
        """The mean loss over all samples (batches weighted by their sizes)."""
        with torch.no_grad():
            return float(self._mean_loss())

    def gradient(self) -> torch.Tensor:
        """The gradient of the mean loss as a flat ``(n,)`` tensor, in the operators' order."""
        gradients = torch.autograd.grad(self._mean_loss(), list(self.model.parameters()))
        return torch.cat([g.reshape(-1) for g in gradients])

    def _mean_loss(self) -> torch.Tensor:
        total = sum(self.loss_fn(self.model(x), y) * len(y) for x, y in self.data)
        return total / self.num_samples

    def __repr__(self) -> str:
        """One line, without the data's tensors (and without running the model: no loss)."""
        return f"<Problem {self.name}: {self._sizes()}>"

    def describe(self) -> str:
        """One line: data, architecture, size and training state."""
        sizes = [layer.in_features for layer in self.model if isinstance(layer, nn.Linear)]
        architecture = "-".join(map(str, [*sizes, NUM_CLASSES]))
        return f"{self.name}: {architecture} tanh MLP, {self._sizes()} (loss {self.loss():.4f})"

    def _sizes(self) -> str:
        state = "trained" if self.trained else "untrained"
        return (
            f"{self.num_params:,} parameters, {self.num_samples:,} samples in {len(self.data)} "
            f"batches, {state}"
        )


def load_problem(
    variant: str = "default",
    *,
    trained: bool = True,
    dataset: str = "auto",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Problem:
    """Build the built-in classification problem, deterministically.

    Parameters
    ----------
    variant
        ``"default"``: a 64-32-10 MLP on all samples (2410 parameters). ``"tiny"``: a 64-8-10 MLP
        on 400 samples (610 parameters), small enough for dense ground truth (``op.to_dense()``).
    trained
        Train with full-batch Adam (100 steps, well under a second) or keep the initialization.
    dataset
        ``"digits"`` (scikit-learn's bundled digits; raises ``ImportError`` without scikit-learn),
        ``"synthetic"`` (Gaussian clusters of the same shape), or ``"auto"``: digits when
        scikit-learn is installed, else synthetic.
    seed
        Seeds initialization, synthetic data and the choice of samples of the tiny variant.
    dtype
        The dtype of the parameters and inputs (float64 by default, for clean comparisons with
        dense matrices; float32 works as well).

    Returns
    -------
    Problem
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    spec = VARIANTS[variant]
    generator = torch.Generator().manual_seed(seed)
    features, labels, source = _load_data(dataset, generator)
    chosen = torch.randperm(NUM_SAMPLES, generator=generator)[: spec.num_samples].sort().values
    inputs, targets = features[chosen].to(dtype), labels[chosen]
    data = list(zip(inputs.split(spec.batch_size), targets.split(spec.batch_size), strict=True))
    model = _make_model(spec.hidden, seed, dtype)
    loss_fn = nn.CrossEntropyLoss()
    if trained:
        _train(model, loss_fn, inputs, targets, spec.train_steps)
    name = source if variant == "default" else f"{source}-{variant}"
    return Problem(model=model, loss_fn=loss_fn, data=data, name=name, trained=trained)


def _load_data(dataset: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Features of order one as float64 ``(1797, 64)``, labels ``(1797,)``, and the source."""
    if dataset != "synthetic":
        digits = _load_digits()
        if digits is not None:
            return (*digits, "digits")
        if dataset == "digits":
            raise ImportError(
                "dataset='digits' needs scikit-learn: pip install 'curvop[demo]', or pass "
                "dataset='synthetic' (or 'auto' to fall back automatically)"
            )
    return (*_synthetic_data(generator), "synthetic")


def _load_digits() -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    images, labels = load_digits(return_X_y=True)
    return torch.as_tensor(images / 16.0, dtype=torch.float64), torch.as_tensor(labels)


def _synthetic_data(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten overlapping Gaussian clusters around centers in the unit cube, shaped like the digits."""
    centers = torch.rand(NUM_CLASSES, NUM_FEATURES, generator=generator, dtype=torch.float64)
    labels = torch.arange(NUM_SAMPLES) % NUM_CLASSES
    noise = torch.randn(NUM_SAMPLES, NUM_FEATURES, generator=generator, dtype=torch.float64)
    return centers[labels] + 0.8 * noise, labels


def _make_model(hidden: int, seed: int, dtype: torch.dtype) -> nn.Sequential:
    """PyTorch's default initialization under ``seed``, leaving the global random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(NUM_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, NUM_CLASSES)
        )
    return model.to(dtype).eval()


def _train(
    model: nn.Module, loss_fn: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: int
) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(inputs), targets).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
