"""Spectral densities (curvop.linalg.density): normalization, coverage, moments; SLQ
quadrature; memory budgets; on curvop operators; plotting (log limits from the peak); the
SpectralDensity's short repr; the arguments it checks."""

import subprocess
import sys

import numpy as np
import pytest
from linalg_cases import MAX_LENGTH, SMALL_OP, SPECTRA, N, dense_case, hutchinson_std
from scipy.integrate import trapezoid
from scipy.sparse.linalg import aslinearoperator

from curvop import SpectralDensity, spectral_density
from curvop.linalg.density import LOG_FLOOR, LOG_HEADROOM

NUM_PROBES = 10


def moment(result: SpectralDensity, power: int) -> float:
    return float(trapezoid(result.grid**power * result.density, result.grid))


# ----------------------------------------------------------------- dense matrices of known spectrum
@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("method", ["slq", "kpm"])
def test_density_is_normalized_covers_the_spectrum_and_has_the_right_moments(name, method):
    op, A, eigenvalues = dense_case(name)
    n = len(eigenvalues)
    result = spectral_density(op, method=method, num_probes=NUM_PROBES, num_points=2000, seed=0)
    assert result.method == method
    assert result.grid.shape == result.density.shape == (2000,)
    assert np.all(np.diff(result.grid) > 0) and np.all(result.density >= 0)
    assert trapezoid(result.density, result.grid) == pytest.approx(1.0, abs=1e-12)
    assert result.grid[0] <= eigenvalues[0] and result.grid[-1] >= eigenvalues[-1]
    # Hutchinson error of tr(A)/n and ||A||_F^2/n with these probes, plus the smoothing bias
    width = eigenvalues[-1] - eigenvalues[0]
    broadening = result.sigma**2 if method == "slq" else 0.0
    first_tolerance = 4 * hutchinson_std(A, NUM_PROBES) / n + 1e-4 * width
    second_tolerance = 4 * hutchinson_std(A @ A, NUM_PROBES) / n + 1e-3 * width**2
    assert moment(result, 1) == pytest.approx(eigenvalues.mean(), abs=first_tolerance)
    assert moment(result, 2) - broadening == pytest.approx(
        np.mean(eigenvalues**2), abs=second_tolerance
    )


def test_slq_quadrature_rows():
    op, _, eigenvalues = dense_case("indefinite")
    result = spectral_density(op, num_probes=4, num_steps=30, seed=1)
    assert result.nodes.shape == result.weights.shape == (4, 30)
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, rtol=1e-12)
    assert np.all(result.weights >= 0)
    assert result.nodes.min() >= eigenvalues[0] - 1e-12
    assert result.nodes.max() <= eigenvalues[-1] + 1e-12


def test_slq_pads_early_stopped_runs_with_zero_weights_and_finite_nodes():
    """The rank-8 matrix has a Krylov space of dimension 9: Lanczos stops long before 80 steps."""
    op, _, eigenvalues = dense_case("zero_cluster")
    result = spectral_density(op, num_probes=3, num_steps=80, seed=0)
    assert result.nodes.shape == (3, 80) and np.all(np.isfinite(result.nodes))
    np.testing.assert_array_equal(result.weights[:, 9:], 0.0)
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.sort(result.nodes[0, :9]), np.unique(eigenvalues), atol=1e-10)
    # the spike at zero holds (n - 8) / n of the mass, up to the probes' sampling error
    near_zero = np.abs(result.grid) < 5 * result.sigma
    mass = trapezoid(result.density[near_zero], result.grid[near_zero])
    assert mass == pytest.approx((len(eigenvalues) - 8) / len(eigenvalues), abs=0.05)


def test_slq_uses_the_given_sigma():
    op, _, _ = dense_case("indefinite")
    result = spectral_density(op, num_probes=2, num_steps=10, sigma=0.3, seed=0)
    assert result.sigma == 0.3
    assert result.grid[0] == pytest.approx(result.nodes.min() - 5 * 0.3)


def test_kpm_has_no_quadrature():
    op, _, _ = dense_case("indefinite")
    result = spectral_density(op, method="kpm", num_probes=2, num_steps=20, seed=0)
    assert result.nodes is None and result.weights is None and result.sigma is None


def test_identity_gives_a_single_peak():
    result = spectral_density(aslinearoperator(np.eye(30)), num_probes=2, num_steps=5, seed=0)
    assert result.grid[np.argmax(result.density)] == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("method", ["slq", "kpm"])
def test_a_small_memory_budget_runs_the_probes_in_chunks_with_the_same_result(method):
    """memory_gb holds 3 probes' vectors (SLQ: 20 steps each): 10 probes run as 3 + 3 + 3 + 1,
    with the same probes and the same density as all at once."""
    op, _, _ = dense_case("indefinite")
    vectors = 20 if method == "slq" else 4  # per probe
    three = 3 * vectors * N * 8 / 2**30
    chunked = spectral_density(op, method=method, num_steps=20, seed=0, memory_gb=three)
    whole = spectral_density(op, method=method, num_steps=20, seed=0)
    np.testing.assert_allclose(chunked.density, whole.density, rtol=1e-8, atol=1e-12)
    if method == "slq":
        np.testing.assert_allclose(chunked.nodes, whole.nodes, rtol=1e-10, atol=1e-12)


def test_slq_runs_one_probe_at_a_time_when_the_budget_holds_one_or_less():
    op, _, eigenvalues = dense_case("indefinite", dtype=np.float32)
    one_probe_float32 = 20 * N * 4 / 2**30  # half of what float64 needs
    density = spectral_density(op, num_steps=20, num_probes=4, seed=0, memory_gb=one_probe_float32)
    mean = trapezoid(density.grid * density.density, density.grid)
    assert mean == pytest.approx(eigenvalues.mean(), abs=0.2)  # the trace / n, from 4 probes
    # a budget below one probe's basis runs one probe at a time: the same probes, the same nodes
    tight = spectral_density(
        op, num_steps=20, num_probes=4, seed=0, memory_gb=one_probe_float32 / 2
    )
    np.testing.assert_allclose(tight.nodes, density.nodes, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_float32_rounding_is_not_taken_for_asymmetry_when_a_probe_starts_with_a_tiny_alpha(seed):
    """A start whose Rayleigh quotient is rounding-sized against the product's norm (the even mix
    of eigenvectors of +100 and -100; on ResNet-20, probes in the bulk near zero had alpha 1e-4
    against a norm of 0.24 and stopped SLQ with "op must be symmetric"): the symmetry check
    measures rounding against the products' norm, not the first alpha."""
    import torch

    from curvop.linalg.lanczos import lanczos_block
    from curvop.linalg.workspace import open_workspace

    n = 500
    rng = np.random.default_rng(seed)
    eigenvalues = np.concatenate([[100.0, -100.0], rng.uniform(-1, 1, n - 2)])
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    matrix = ((basis * eigenvalues) @ basis.T).astype(np.float32)
    mix = (basis[:, 0] + basis[:, 1]) / np.sqrt(2) + 1e-3 * rng.standard_normal(n) / np.sqrt(n)
    start = torch.from_numpy(mix)
    run = lanczos_block(
        open_workspace(aslinearoperator(matrix), None), start[:, None], 20, torch.float32
    )
    assert abs(run.alphas[0, 0]) < 1e-3 * np.linalg.norm(matrix @ start.numpy().astype(np.float32))
    assert run.lengths[0] == 20


def outlier_off_the_axes(n: int = 200) -> np.ndarray:
    """Eigenvalue 10 along (e1 - e2) / sqrt(2), a bulk in [0, 1] elsewhere: a Rademacher start
    has no component along the outlier half the time (z1 = z2)."""
    rng = np.random.default_rng(0)
    direction = np.zeros(n)
    direction[:2] = [1 / np.sqrt(2), -1 / np.sqrt(2)]
    others, _ = np.linalg.qr(np.column_stack([direction, rng.standard_normal((n, n - 1))]))
    eigenvalues = np.concatenate([[10.0], rng.uniform(0.0, 1.0, n - 1)])
    return (others * eigenvalues) @ others.T


@pytest.mark.parametrize("seed", range(1, 7))
def test_kpm_bounds_hold_an_outlier_a_rademacher_start_misses(seed):
    A = outlier_off_the_axes()
    result = spectral_density(
        aslinearoperator(A), method="kpm", num_probes=10, num_steps=60, seed=seed
    )
    assert result.grid[-1] >= 10.0  # the outlier is inside the grid
    bulk = (result.grid > 0.2) & (result.grid < 0.8)
    # the bulk holds 199/200 of the mass spread over [0, 1]: a density near 1, not 0 to 3.1
    assert np.all((result.density[bulk] > 0.5) & (result.density[bulk] < 1.6))


def test_kpm_raises_when_the_spectrum_leaves_its_bounds(monkeypatch):
    """A bound that misses part of the spectrum makes Chebyshev moments grow past mu_0: an error,
    not a wrong density."""
    from curvop.linalg import density as density_module

    monkeypatch.setattr(density_module, "_spectrum_bounds", lambda work, generator: (0.0, 1.0))
    with pytest.raises(RuntimeError, match=r"KPM: the spectrum reaches beyond the bounds"):
        spectral_density(aslinearoperator(outlier_off_the_axes()), method="kpm", seed=0)


# --------------------------------------------------------------------- on curvop operators
@pytest.mark.parametrize("method", ["slq", "kpm"])
@pytest.mark.parametrize("name", ["H", "G"])
def test_density_moments_match_the_dense_matrix(H, G, dense, name, method):
    A, op = dense[name], {"H": H, "G": G}[name]
    n = A.shape[0]
    result = spectral_density(op, method=method, num_probes=10, num_steps=40, seed=0)
    eigenvalues = np.linalg.eigvalsh(A)
    width = eigenvalues[-1] - eigenvalues[0]
    first = trapezoid(result.grid * result.density, result.grid)
    second = trapezoid(result.grid**2 * result.density, result.grid)
    second -= result.sigma**2 if method == "slq" else 0.0
    assert first == pytest.approx(np.trace(A) / n, abs=4 * hutchinson_std(A, 10) / n + 1e-4 * width)
    assert second == pytest.approx(
        np.sum(A**2) / n, abs=4 * hutchinson_std(A @ A, 10) / n + 1e-3 * width**2
    )


# ------------------ plotting; with log=True the y-axis ends just above the peak and keeps its floor
@pytest.fixture
def plt():
    """matplotlib.pyplot on the Agg backend; the test is skipped without matplotlib."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@pytest.fixture
def ax(plt):
    figure, ax = plt.subplots()
    yield ax
    plt.close(figure)


def test_plot_draws_on_given_axes_with_a_log_option():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    op, _, _ = dense_case("zero_cluster")
    result = spectral_density(op, num_probes=2, num_steps=20, seed=0)
    figure, ax = plt.subplots()
    assert result.plot(ax, log=True, color="red") is ax
    assert ax.get_yscale() == "log" and len(ax.lines) == 1
    assert result.plot().get_yscale() == "linear"
    plt.close("all")
    del figure


def test_importing_curvop_does_not_import_matplotlib():
    code = "import sys, curvop; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("method", ["slq", "kpm"])
def test_log_limits_come_from_the_peak(ax, method):
    op, _, _ = dense_case("zero_cluster")  # a spike at zero: the case the log scale is for
    density = spectral_density(op, method=method, num_probes=4, num_steps=40, seed=0)
    peak = float(density.density.max())
    density.plot(ax, log=True)
    ax.figure.canvas.draw()  # limits as drawn, after any pending autoscaling
    bottom, top = ax.get_ylim()
    assert bottom == pytest.approx(LOG_FLOOR * peak)
    assert top == pytest.approx(LOG_HEADROOM * peak)
    assert peak < top <= 10 * peak  # under a decade of empty space above the curve


def test_default_axes_too(plt):
    density = SpectralDensity(np.linspace(-1, 1, 5), np.array([1e-12, 0.1, 2.0, 0.1, 1e-12]), "kpm")
    ax = density.plot(log=True)
    try:
        assert ax.get_ylim() == pytest.approx((LOG_FLOOR * 2.0, LOG_HEADROOM * 2.0))
    finally:
        plt.close(ax.figure)


def test_overlays_are_not_clipped(ax):
    """Several densities (or a histogram) on one axes: the limits cover the highest of them."""
    grid = np.linspace(-1, 1, 101)
    tall = SpectralDensity(grid, np.exp(-(grid**2) / 0.001), "kpm")
    flat = SpectralDensity(grid, np.exp(-(grid**2) / 0.5), "kpm")
    ax.hist([0.0] * 90 + [0.5] * 10, bins=50, density=True)
    histogram_top = ax.dataLim.y1
    tall.plot(ax, log=True)
    flat.plot(ax, log=True)  # drawn last, with the lowest peak
    peak = max(histogram_top, tall.density.max())
    assert ax.get_ylim() == pytest.approx((LOG_FLOOR * peak, LOG_HEADROOM * peak))


def test_linear_scale_is_left_to_matplotlib(ax):
    density = SpectralDensity(np.linspace(0, 1, 3), np.array([0.5, 1.5, 0.5]), "kpm")
    density.plot(ax)
    assert ax.get_yscale() == "linear"
    assert ax.get_autoscaley_on()


# --------------------------------------------------------------------- SpectralDensity
def test_slq_density_repr():
    op, _, _ = dense_case("decaying")
    density = spectral_density(op, num_probes=3, num_steps=12, num_points=4000, seed=0)
    text = repr(density)
    assert str(density) == text
    assert "\n" not in text and len(text) <= MAX_LENGTH
    assert text.startswith("<SpectralDensity") and "'slq'" in text
    assert "4000 grid points" in text
    assert f"[{density.grid[0]:.4g}, {density.grid[-1]:.4g}]" in text
    assert "3 probes x 12 steps" in text
    assert f"sigma={density.sigma:.3g}" in text


def test_kpm_density_repr():
    op, _, _ = dense_case("decaying")
    density = spectral_density(op, method="kpm", num_points=5000, seed=0)
    text = repr(density)
    assert "\n" not in text and len(text) <= MAX_LENGTH
    assert "'kpm'" in text and "5000 grid points" in text
    assert f"[{density.grid[0]:.4g}, {density.grid[-1]:.4g}]" in text
    assert "probes" not in text and "sigma" not in text


def test_density_is_still_a_frozen_dataclass_with_its_fields():
    import dataclasses

    fields = [field.name for field in dataclasses.fields(SpectralDensity)]
    assert fields == ["grid", "density", "method", "nodes", "weights", "sigma"]
    density = SpectralDensity(np.linspace(0, 1, 3), np.ones(3), "kpm")
    with pytest.raises(dataclasses.FrozenInstanceError):
        density.method = "slq"


# --------------------------------------------------------------------- argument checks
BAD_ARGUMENTS = [
    (lambda: spectral_density(SMALL_OP, method="exact"), ValueError, "method must be one of"),
    (lambda: spectral_density(SMALL_OP, num_probes=0), ValueError, "num_probes must be a positive"),
    (lambda: spectral_density(SMALL_OP, num_steps=1.5), ValueError, "num_steps must be a positive"),
    (lambda: spectral_density(SMALL_OP, num_points=1), ValueError, "num_points must be at least 2"),
    (lambda: spectral_density(SMALL_OP, sigma=0.0), ValueError, "sigma must be a positive"),
    (lambda: spectral_density(SMALL_OP, method="kpm", sigma=0.1), ValueError, "sigma applies to"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_ARGUMENTS)
def test_bad_argument_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()
