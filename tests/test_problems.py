"""The built-in problem: deterministic, real or synthetic data, trainable, RNG-neutral."""

from __future__ import annotations

import sys

import pytest
import torch

from curvop.problems import VARIANTS, Problem, load_problem


def _state(problem: Problem) -> list[torch.Tensor]:
    tensors = [p.detach() for p in problem.model.parameters()]
    return tensors + [t for batch in problem.data for t in batch]


def _has_sklearn() -> bool:
    """Whether scikit-learn's digits can be loaded (any ImportError, as for the library: a
    broken installation falls back to synthetic data as a missing one does)."""
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


AUTO_SOURCE = "digits" if _has_sklearn() else "synthetic"  # what dataset="auto" loads here
needs_digits = pytest.mark.skipif(not _has_sklearn(), reason="the digits need scikit-learn")


@pytest.fixture
def no_sklearn(monkeypatch):
    """Make ``import sklearn.datasets`` fail, as without scikit-learn installed."""
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_seed_same_problem_bitwise(variant):
    first, second = load_problem(variant, seed=3), load_problem(variant, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(_state(first), _state(second), strict=True))
    other = load_problem(variant, seed=4, trained=False)
    assert not torch.equal(_state(first)[0], _state(other)[0])


def test_global_random_state_untouched():
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    load_problem("tiny", dataset="synthetic")
    load_problem("tiny", trained=False)
    assert torch.equal(torch.rand(5), expected)


@pytest.mark.parametrize("dataset", [pytest.param("digits", marks=needs_digits), "synthetic"])
def test_training_lowers_the_loss(dataset):
    untrained = load_problem("tiny", trained=False, dataset=dataset)
    trained = load_problem("tiny", dataset=dataset)
    assert untrained.loss() > 2.0  # about log(10) at initialization
    assert trained.loss() < 0.5 * untrained.loss()
    assert trained.trained and not untrained.trained


def test_default_shape_and_batches():
    problem = load_problem(trained=False)
    assert problem.name == AUTO_SOURCE
    assert problem.num_params == 64 * 32 + 32 + 32 * 10 + 10
    sizes = [len(targets) for _, targets in problem.data]
    assert sum(sizes) == problem.num_samples == 1797
    assert sizes[-1] < sizes[0]  # a short last batch
    assert problem.data[0][0].dtype == torch.float64
    assert "2,410 parameters" in problem.describe()


def test_tiny_is_small_enough_for_dense_ground_truth():
    problem = load_problem("tiny", dtype=torch.float32)
    assert problem.num_params <= 1000
    assert problem.name == f"{AUTO_SOURCE}-tiny"
    assert all(p.dtype == torch.float32 for p in problem.model.parameters())
    assert problem.data[-1][0].dtype == torch.float32


def test_synthetic_fallback_without_sklearn(no_sklearn):
    problem = load_problem("tiny")
    assert problem.name == "synthetic-tiny"
    explicit = load_problem("tiny", dataset="synthetic")
    assert all(torch.equal(a, b) for a, b in zip(_state(problem), _state(explicit), strict=True))


def test_digits_without_sklearn_says_what_to_install(no_sklearn):
    with pytest.raises(ImportError, match=r"curvop\[demo\]"):
        load_problem(dataset="digits")


@needs_digits
def test_synthetic_has_the_shape_of_digits():
    digits = load_problem(trained=False, dataset="digits")
    synthetic = load_problem(trained=False, dataset="synthetic")
    assert synthetic.num_params == digits.num_params
    assert [len(y) for _, y in synthetic.data] == [len(y) for _, y in digits.data]
    assert set(torch.cat([y for _, y in synthetic.data]).tolist()) == set(range(10))


@pytest.mark.parametrize(("argument", "value"), [("variant", "huge"), ("dataset", "mnist")])
def test_unknown_names_are_rejected(argument, value):
    with pytest.raises(ValueError, match=argument):
        load_problem(**{argument: value})


def test_loss_and_gradient_are_over_all_samples():
    problem = load_problem("tiny")
    inputs = torch.cat([x for x, _ in problem.data])
    targets = torch.cat([y for _, y in problem.data])
    loss = problem.loss_fn(problem.model(inputs), targets)
    expected = torch.autograd.grad(loss, list(problem.model.parameters()))
    torch.testing.assert_close(problem.gradient(), torch.cat([g.reshape(-1) for g in expected]))
    assert problem.loss() == pytest.approx(loss.item(), rel=1e-12)
    assert problem.gradient().shape == (problem.num_params,)


def test_repr_is_one_short_line():
    problem = load_problem("tiny", dataset="synthetic", trained=False)
    assert repr(problem) == (
        "<Problem synthetic-tiny: 610 parameters, 400 samples in 4 batches, untrained>"
    )
    assert len(repr(load_problem(dataset="synthetic"))) < 100
