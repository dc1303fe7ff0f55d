"""Random probe vectors for the randomized estimators, drawn from private generators."""

from __future__ import annotations

import torch

from ..validation import check_seed

__all__ = ["DISTRIBUTIONS", "draw_probes", "make_generator"]

DISTRIBUTIONS = ("rademacher", "gaussian", "sparse_rademacher")
SPARSE_DENSITY = 0.1


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A private generator: seeded when ``seed`` is given, else from fresh OS entropy.

    The global random state is never read or advanced. ``seed`` must be ``None`` or an int
    (``TypeError`` otherwise).
    """
    seed = check_seed(seed)
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def draw_probes(
    n: int,
    k: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    r"""``k`` independent probe vectors as an ``(n, k)`` tensor with :math:`E[zz^\top] = I`.

    ``"rademacher"``: entries :math:`\pm 1`. ``"gaussian"``: standard normal entries.
    ``"sparse_rademacher"``: :math:`\pm 1/\sqrt{p}` with probability :math:`p = 0.1`, else 0
    (rescaled so that the trace estimate stays unbiased).
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    # drawn one column after the other ((k, n), transposed), so that drawing k columns at once
    # or in chunks gives the same probes (on the CPU), whatever the memory a caller can afford
    if distribution == "gaussian":
        return torch.randn(k, n, generator=generator, dtype=dtype, device=device).T
    signs = torch.randint(0, 2, (k, n), generator=generator, device=device).to(dtype).T * 2 - 1
    if distribution == "rademacher":
        return signs
    mask = torch.rand(k, n, generator=generator, device=device).T < SPARSE_DENSITY
    return signs * mask.to(dtype) / SPARSE_DENSITY**0.5
