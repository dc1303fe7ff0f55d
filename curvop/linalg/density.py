r"""Spectral density estimates: stochastic Lanczos quadrature (SLQ) and the kernel polynomial method.

The spectral density of a symmetric :math:`A` with eigenvalues :math:`\lambda_1, \dots,
\lambda_n` is :math:`\phi(t) = \frac{1}{n}\sum_i \delta(t - \lambda_i)`; both methods estimate a
smoothed version of it from a few random probes.

- **SLQ** (Lin, Saad & Yang, 2016; Ghorbani, Krishnan & Xiao, 2019): ``m`` Lanczos steps from a
  unit probe :math:`q` give the Gauss quadrature :math:`q^\top f(A) q \approx \sum_j w_j
  f(\theta_j)` (Ritz values :math:`\theta_j`, squared first components :math:`w_j` of the
  eigenvectors of :math:`T_m`). Averaged over probes and with each node broadened into a
  Gaussian of width :math:`\sigma`, this is the density.
- **KPM** (Weisse, Wellein, Alvermann & Fehske, 2006): with :math:`A` mapped to
  :math:`\tilde A = (A - c)/h` inside :math:`[-1, 1]`, the Chebyshev moments
  :math:`\mu_k = \frac{1}{n} \operatorname{tr} T_k(\tilde A)` are estimated by Hutchinson and
  the density is :math:`\frac{1}{\pi\sqrt{1 - x^2}}\big(g_0\mu_0 + 2\sum_{k \ge 1} g_k \mu_k
  T_k(x)\big)` with Jackson damping :math:`g_k`, which suppresses Gibbs oscillations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.polynomial import chebyshev
from scipy.integrate import trapezoid
from scipy.linalg import eigh_tridiagonal

from ..validation import check_choice, check_positive_int, check_real
from .lanczos import WORKING_VECTORS, LanczosRun, lanczos_block
from .workspace import Workspace, open_workspace

__all__ = ["SpectralDensity", "spectral_density"]

METHODS = ("slq", "kpm")
SIGMA_FRACTION = 0.01  # default SLQ broadening: this fraction of the width of the spectrum
GRID_SIGMAS = 5.0  # the SLQ grid extends this many sigmas past the extreme nodes
BOUND_STEPS = 20  # Lanczos steps that find KPM's spectrum bounds
MARGIN = 0.05  # KPM: the grid extends the bounds by this fraction of their width each side,
# and the Chebyshev interval by twice as much (the grid then stays inside |x| <= 0.92)
KPM_VECTORS = 4  # n-vectors per probe in the Chebyshev recurrence (three terms and a product)
MOMENT_SLACK = 1e-3  # |mu_k| may exceed mu_0 by this (relative) before the bounds are blamed
LOG_FLOOR = 1e-8  # log plots show densities down to this fraction of the peak
LOG_HEADROOM = 3.0  # log plots end this factor above the peak (half a decade)


@dataclass(frozen=True, repr=False)
class SpectralDensity:
    """An estimated spectral density on a grid.

    Attributes
    ----------
    grid : numpy.ndarray
        ``(num_points,)`` increasing eigenvalue axis, covering the spectrum.
    density : numpy.ndarray
        ``(num_points,)`` non-negative values; the trapezoidal integral over ``grid`` is 1.
    method : str
        ``"slq"`` or ``"kpm"``.
    nodes, weights : numpy.ndarray or None
        SLQ only: ``(num_probes, num_steps)`` Gauss quadrature nodes (Ritz values) and weights per
        probe; each row of ``weights`` sums to 1. Where a probe's Lanczos run stopped early, the
        remaining weights are 0 and the nodes repeat its last one.
    sigma : float or None
        SLQ only: the Gaussian broadening used.
    """

    grid: np.ndarray
    density: np.ndarray
    method: str
    nodes: np.ndarray | None = None
    weights: np.ndarray | None = None
    sigma: float | None = None

    def __repr__(self) -> str:
        """One line: the method, the grid and its support, and for SLQ probes, steps and sigma."""
        grid = np.asarray(self.grid)
        parts = [f"method={self.method!r}", f"{grid.size} grid points"]
        if grid.size:
            parts[-1] += f" on [{float(grid[0]):.4g}, {float(grid[-1]):.4g}]"
        if self.nodes is not None:
            num_probes, num_steps = np.shape(self.nodes)
            parts.append(f"{num_probes} probes x {num_steps} steps")
        if self.sigma is not None:
            parts.append(f"sigma={self.sigma:.3g}")
        return f"<SpectralDensity {', '.join(parts)}>"

    def plot(self, ax: Any = None, *, log: bool = False, **kwargs: Any) -> Any:
        """Draw the density with matplotlib (imported here) and return the axes.

        Parameters
        ----------
        ax
            Matplotlib axes to draw on (default: a new figure).
        log
            Logarithmic density axis from ``1e-8`` of the peak to a factor 3 above it: shows the
            bulk next to the typical huge spike at zero. The peak is the highest of this density
            and of what ``ax`` already shows (other densities, a histogram), so overlays are not
            clipped.
        **kwargs
            Passed to ``ax.plot``.
        """
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots()
        shown = float(ax.dataLim.y1) if ax.has_data() else -math.inf  # before our curve
        shown = shown if math.isfinite(shown) else -math.inf
        ax.plot(self.grid, self.density, **kwargs)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        if log:
            peak = max(float(self.density.max()), shown)
            ax.set_yscale("log")
            ax.set_ylim(LOG_FLOOR * peak, LOG_HEADROOM * peak)
        return ax


def _normalized(grid: np.ndarray, density: np.ndarray) -> np.ndarray:
    density = np.clip(density, 0.0, None)
    return density / trapezoid(density, grid)


def _quadrature(run: LanczosRun, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss nodes and weights per Lanczos run, padded to ``num_steps`` columns."""
    nodes = np.zeros((len(run.lengths), num_steps))
    weights = np.zeros_like(nodes)
    for row, m in enumerate(run.lengths):
        theta, vectors = eigh_tridiagonal(run.alphas[row, :m], run.betas[row, : m - 1])
        nodes[row, :m], nodes[row, m:] = theta, theta[-1]
        weights[row, :m] = vectors[0] ** 2
    return nodes, weights


def _slq(
    work: Workspace,
    generator: torch.Generator,
    num_probes: int,
    num_steps: int,
    num_points: int,
    sigma: float | None,
) -> SpectralDensity:
    """SLQ with as many probes side by side as their bases and products fit in the budget (the
    fastest such width by the operator's costs; at least one): each keeps its Lanczos basis in
    the operator's dtype, whose products carry no more precision, and a basis orthogonal to it
    gives Ritz values as accurate as a float64 one."""
    steps = min(num_steps, work.n)
    per_probe = (steps + WORKING_VECTORS) * work.vector_bytes()
    side_by_side = work.width(num_probes, per_probe)
    runs = [
        _quadrature(lanczos_block(work, probes, num_steps, work.dtype), num_steps)
        for probes in work.probe_chunks(generator, num_probes, side_by_side, "rademacher")
    ]
    nodes, weights = (np.concatenate(parts) for parts in zip(*runs, strict=True))
    low, high = float(nodes.min()), float(nodes.max())
    width = high - low or max(abs(low), abs(high), 1.0)
    sigma = SIGMA_FRACTION * width if sigma is None else sigma
    grid = np.linspace(low - GRID_SIGMAS * sigma, high + GRID_SIGMAS * sigma, num_points)
    gaussians = np.exp(-0.5 * ((grid[:, None] - nodes.ravel()) / sigma) ** 2)
    density = gaussians @ weights.ravel() / (len(nodes) * sigma * math.sqrt(2 * math.pi))
    return SpectralDensity(grid, _normalized(grid, density), "slq", nodes, weights, sigma)


def _spectrum_bounds(work: Workspace, generator: torch.Generator) -> tuple[float, float]:
    r"""Bounds of the spectrum: Ritz values :math:`\theta_j` of ``BOUND_STEPS`` Lanczos steps from a
    Gaussian start, widened by their residuals :math:`|\beta_m s_{mj}|`.

    A Gaussian start has a nonzero component along every eigenvector almost surely (a Rademacher
    one is orthogonal to :math:`(e_1 - e_2)/\sqrt{2}` half the time, and then misses an outlier
    there entirely).
    """
    start = work.probes(1, generator, "gaussian", torch.float64)
    run = lanczos_block(work, start, BOUND_STEPS)
    m = int(run.lengths[0])
    theta, vectors = eigh_tridiagonal(run.alphas[0, :m], run.betas[0, : m - 1])
    residuals = abs(run.betas[0, m - 1]) * np.abs(vectors[-1])
    return float((theta - residuals).min()), float((theta + residuals).max())


def _jackson_damping(num_moments: int) -> np.ndarray:
    r"""Jackson kernel coefficients :math:`g_k`, :math:`k = 0, \dots, N - 1`, for :math:`N` moments.

    .. math::
        g_k = \frac{(N - k + 1)\cos\frac{\pi k}{N + 1}
        + \sin\frac{\pi k}{N + 1}\cot\frac{\pi}{N + 1}}{N + 1}.
    """
    k, angle = np.arange(num_moments), math.pi / (num_moments + 1)
    numerator = (num_moments - k + 1) * np.cos(angle * k) + np.sin(angle * k) / math.tan(angle)
    return numerator / (num_moments + 1)


def _chebyshev_moments(
    work: Workspace, probes: torch.Tensor, center: float, half_width: float, num_moments: int
) -> np.ndarray:
    r"""Hutchinson estimates of :math:`\mu_k = \frac{1}{n}\operatorname{tr} T_k(\tilde A)`.

    Runs the recurrence :math:`T_{k+1} = 2\tilde A T_k - T_{k-1}` on the whole ``(n, p)`` block of
    probes and doubles it up, :math:`\mu_{2k} = 2\langle T_k, T_k\rangle - \mu_0` and
    :math:`\mu_{2k+1} = 2\langle T_{k+1}, T_k\rangle - \mu_1`, so ``N`` moments cost about
    ``N / 2`` block products.
    """

    kept = KPM_VECTORS * probes.numel() * 8

    def scaled(V: torch.Tensor) -> torch.Tensor:
        return (work.multiply(V, kept, torch.float64) - center * V) / half_width

    def mean_inner(X: torch.Tensor, Y: torch.Tensor) -> float:
        return float((X * Y).sum()) / probes.numel()

    moments = np.zeros(num_moments)
    previous = probes
    moments[0] = mean_inner(probes, probes)
    if num_moments > 1:
        current = scaled(probes)
        moments[1] = mean_inner(probes, current)
    for k in range(1, (num_moments + 1) // 2):  # current is T_k
        moments[2 * k] = 2 * mean_inner(current, current) - moments[0]
        if 2 * k + 1 < num_moments:
            following = 2 * scaled(current) - previous
            moments[2 * k + 1] = 2 * mean_inner(following, current) - moments[1]
            previous, current = current, following
    return moments


def _check_moments(moments: np.ndarray, low: float, high: float) -> None:
    r"""Raise unless :math:`|\mu_k| \le \mu_0`, as holds for every spectrum inside the bounds
    (:math:`|T_k| \le 1` on :math:`[-1, 1]`, for each probe alike); outside them :math:`T_k` grows
    exponentially in :math:`k`, and the density would be garbage."""
    worst = int(np.argmax(np.abs(moments)))
    if abs(moments[worst]) > (1 + MOMENT_SLACK) * moments[0]:
        raise RuntimeError(
            f"KPM: the spectrum reaches beyond the bounds [{low:.4g}, {high:.4g}] that Lanczos "
            f"found (Chebyshev moment {worst} is {moments[worst]:.3g}, more than mu_0 = "
            f"{moments[0]:.3g}), so the density would be wrong; use method='slq', or another seed"
        )


def _kpm(
    work: Workspace,
    generator: torch.Generator,
    num_probes: int,
    num_moments: int,
    num_points: int,
) -> SpectralDensity:
    low, high = _spectrum_bounds(work, generator)
    margin = MARGIN * ((high - low) or max(abs(low), abs(high), 1.0))
    center, half_width = (low + high) / 2, (high - low) / 2 + 2 * margin
    width = work.width(num_probes, KPM_VECTORS * work.n * 8)
    moments = (
        sum(  # the mean over all probes, from the means over each chunk
            _chebyshev_moments(work, probes.double(), center, half_width, num_moments)
            * probes.shape[1]
            for probes in work.probe_chunks(generator, num_probes, width, "rademacher")
        )
        / num_probes
    )
    _check_moments(moments, low, high)
    coefficients = _jackson_damping(num_moments) * moments
    coefficients[1:] *= 2
    grid = np.linspace(low - margin, high + margin, num_points)
    x = (grid - center) / half_width
    density = chebyshev.chebval(x, coefficients) / (math.pi * np.sqrt(1 - x**2) * half_width)
    return SpectralDensity(grid, _normalized(grid, density), "kpm")


def spectral_density(
    op: Any,
    *,
    method: str = "slq",
    num_probes: int = 10,
    num_steps: int = 80,
    num_points: int = 1000,
    sigma: float | None = None,
    seed: int | None = None,
    memory_gb: float | None = None,
    progress: bool = False,
) -> SpectralDensity:
    r"""Estimate the spectral density of a symmetric operator.

    Parameters
    ----------
    op
        A symmetric SciPy ``LinearOperator`` (a curvop operator runs in torch on its device).
    method
        ``"slq"`` (stochastic Lanczos quadrature) or ``"kpm"`` (kernel polynomial method).
    num_probes
        Number of Rademacher probes; those that run side by side share one block product per
        step: as many as make the call fastest by the operator's measured costs within
        ``memory_gb``.
    num_steps
        SLQ: Lanczos steps per probe (at most ``n`` are taken). KPM: number of Chebyshev moments
        (about ``num_steps / 2`` block products, plus 20 single products for the bounds).
    num_points
        Size of the grid, ``>= 2``.
    sigma
        SLQ only: width of the Gaussian placed on each node; default 1% of the spread of the
        nodes. (KPM's resolution is set by its Jackson kernel, about
        :math:`\pi (b - a) / (2 N)` on an interval :math:`[a, b]` with :math:`N` moments.)
    seed
        Seed of the private generator. The probes are the same whatever ``memory_gb``.
    memory_gb
        Budget in GiB for what the call holds at once: SLQ keeps ``num_steps`` vectors per probe
        (full reorthogonalization) in the operator's dtype, KPM four in float64, and the block
        products their autograd graphs. Default (``None``): a quarter of the device's free memory,
        of which a product takes at most four single products' worth. Probes beyond what fits
        run in later chunks (more passes over the data, the same result); one probe always
        runs, even when its vectors alone exceed the budget.
    progress
        Show a progress bar of the column products (tqdm; see :mod:`curvop.progress`).

    Returns
    -------
    SpectralDensity
        ``grid`` and ``density`` (non-negative, integrating to 1), plus the SLQ ``nodes`` and
        ``weights``; ``.plot()`` draws it.

    Notes
    -----
    The moments of an SLQ density are those of the quadrature plus the broadening:
    :math:`\int t\,\phi = \frac{1}{p}\sum w\theta \approx \operatorname{tr}(A)/n` and
    :math:`\int t^2\phi \approx \|A\|_F^2/n + \sigma^2`.

    Examples
    --------
    >>> from scipy.sparse.linalg import aslinearoperator
    >>> result = spectral_density(aslinearoperator(np.diag(np.linspace(0, 1, 50))), seed=0)
    >>> bool(np.isclose(trapezoid(result.density, result.grid), 1.0))
    True
    """
    work = open_workspace(op, memory_gb)
    method = check_choice(method, "method", METHODS)
    num_probes = check_positive_int(num_probes, "num_probes")
    num_steps = check_positive_int(num_steps, "num_steps")
    num_points = check_positive_int(num_points, "num_points")
    if num_points < 2:
        raise ValueError(f"num_points must be at least 2, got {num_points}")
    if sigma is not None:
        if method != "slq":
            raise ValueError("sigma applies to method='slq' only (KPM uses a Jackson kernel)")
        sigma = check_real(sigma, "sigma", positive=True)
    generator = work.generator(seed)
    if method == "slq":
        total = num_probes * min(num_steps, work.n)
        with work.counting(progress, total, "spectral density (SLQ)"):
            return _slq(work, generator, num_probes, num_steps, num_points, sigma)
    total = BOUND_STEPS + num_probes * (num_steps // 2)
    with work.counting(progress, total, "spectral density (KPM)"):
        return _kpm(work, generator, num_probes, num_steps, num_points)
