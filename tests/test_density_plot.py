"""SpectralDensity.plot(log=True): the y-axis ends just above the peak and keeps its floor."""

import numpy as np
import pytest
from linalg_cases import dense_case

from curvop import SpectralDensity, spectral_density
from curvop.linalg.density import LOG_FLOOR, LOG_HEADROOM

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture
def ax():
    figure, ax = plt.subplots()
    yield ax
    plt.close(figure)


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


def test_default_axes_too():
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
