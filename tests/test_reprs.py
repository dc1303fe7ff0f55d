"""Short reprs: printing a SpectralDensity or a SolveResult shows facts, not arrays."""

import numpy as np
import pytest
import torch
from linalg_cases import N, dense_case

from curvop import SolveResult, SpectralDensity, solve_damped, spectral_density

MAX_LENGTH = 200  # one line in a terminal or a notebook


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


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_solve_result_repr(kind):
    op, _, _ = dense_case("decaying")
    rhs = np.ones(N) if kind == "numpy" else torch.ones(N, dtype=torch.float32)
    result = solve_damped(op, rhs, 0.1)
    text = repr(result)
    assert str(result) == text
    assert "\n" not in text and len(text) <= MAX_LENGTH
    assert f"converged={result.converged}" in text
    assert f"num_iterations={result.num_iterations}" in text
    assert f"residual_norm={result.residual_norm:.3g}" in text
    expected = "numpy.ndarray (40,) float64" if kind == "numpy" else "torch.Tensor (40,) float32"
    assert expected.replace("40", str(N)) in text


def test_solve_result_repr_of_a_huge_x_stays_short():
    result = SolveResult(np.zeros(10**6), False, 500, 3.25)
    assert repr(result) == (
        "SolveResult(x=<numpy.ndarray (1000000,) float64>, converged=False, "
        "num_iterations=500, residual_norm=3.25)"
    )


def test_solve_result_is_still_a_named_tuple():
    x, converged, iterations, residual = result = SolveResult(np.ones(3), True, 4, 1e-9)
    assert isinstance(result, tuple) and result._fields == (
        "x",
        "converged",
        "num_iterations",
        "residual_norm",
    )
    assert converged and iterations == 4 and residual == 1e-9 and x is result.x
    assert result._replace(num_iterations=5).num_iterations == 5
