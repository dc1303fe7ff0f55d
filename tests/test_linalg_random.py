"""Every randomized function checks its seed, is reproducible per seed and leaves the global RNGs
alone.

Cross-cutting: one promise of all the randomized calls (their private generators,
curvop.linalg.probes), checked on each of them in one place.
"""

import numpy as np
import pytest
import torch
from linalg_cases import SMALL_OP, dense_case, hessian

from curvop import (
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    spectral_density,
    top_eigenvalues,
    xdiag,
    xtrace,
)

# --------------------------------------------------------------------- the seed is checked
SEEDED = {
    "top_eigenvalues": lambda seed: top_eigenvalues(SMALL_OP, seed=seed),
    "lanczos": lambda seed: lanczos(SMALL_OP, 3, seed=seed),
    "hutchinson_trace": lambda seed: hutchinson_trace(SMALL_OP, 4, seed=seed),
    "hutchpp_trace": lambda seed: hutchpp_trace(SMALL_OP, 4, seed=seed),
    "xtrace": lambda seed: xtrace(SMALL_OP, 4, seed=seed),
    "hutchinson_diagonal": lambda seed: hutchinson_diagonal(SMALL_OP, 4, seed=seed),
    "xdiag": lambda seed: xdiag(SMALL_OP, 4, seed=seed),
    "spectral_density": lambda seed: spectral_density(SMALL_OP, seed=seed),
}


@pytest.mark.parametrize("name", list(SEEDED))
@pytest.mark.parametrize("seed", ["1", 1.5, True])
def test_every_randomized_function_checks_the_seed(name, seed):
    with pytest.raises(TypeError, match="seed must be None or an int"):
        SEEDED[name](seed)


# ----------------------------------------- reproducible per seed, the global random state untouched
RUNS = {
    "top_eigenvalues": lambda op, seed: top_eigenvalues(op, 2, which="SA", seed=seed),
    "lanczos": lambda op, seed: np.concatenate(lanczos(op, 8, seed=seed)),
    "hutchinson_trace": lambda op, seed: hutchinson_trace(op, 6, seed=seed).value,
    "hutchpp_trace": lambda op, seed: hutchpp_trace(op, 6, seed=seed).value,
    "xtrace": lambda op, seed: xtrace(op, 6, seed=seed).value,
    "hutchinson_diagonal": lambda op, seed: hutchinson_diagonal(op, 6, seed=seed),
    "xdiag": lambda op, seed: xdiag(op, 6, seed=seed),
    "slq": lambda op, seed: spectral_density(op, num_probes=3, num_steps=8, seed=seed).density,
    "kpm": lambda op, seed: (
        spectral_density(op, method="kpm", num_probes=3, num_steps=8, seed=seed).density
    ),
}


@pytest.fixture(scope="module", params=["dense", "curvop"])
def op(request):
    return dense_case("indefinite")[0] if request.param == "dense" else hessian()


@pytest.mark.parametrize("name", list(RUNS))
def test_same_seed_same_result_other_seed_other_result(op, name):
    run = RUNS[name]
    np.testing.assert_array_equal(run(op, 3), run(op, 3))
    if name != "top_eigenvalues":  # eigenvalues do not depend on the start
        assert not np.array_equal(run(op, 3), run(op, 4))


@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("seed", [0, None])
def test_global_random_state_is_untouched(op, name, seed):
    numpy_state, torch_state = np.random.get_state(), torch.get_rng_state()  # noqa: NPY002
    RUNS[name](op, seed)
    after = np.random.get_state()  # noqa: NPY002
    assert all(np.array_equal(a, b) for a, b in zip(numpy_state, after, strict=True))
    assert torch.equal(torch_state, torch.get_rng_state())
