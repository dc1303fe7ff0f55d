"""curvop: curvature of PyTorch models as SciPy LinearOperators."""

from .counting import ProductCount, count_products
from .functional import approximate_hvp, exact_hvp, gauss_newton_product, hessian_trace, model_hvp
from .layout import ParamLayout
from .linalg import (
    ConvergenceWarning,
    Estimate,
    SolveResult,
    SpectralDensity,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    solve_damped,
    spectral_density,
    top_eigenvalues,
    xdiag,
    xtrace,
)
from .operators import (
    BlockOperator,
    CurvatureOperator,
    FiniteDifferenceHessianOperator,
    GaussNewtonOperator,
    HessianOperator,
    IdentityOperator,
    KinkError,
    LinearCombination,
    ProductCost,
)

__version__ = "0.2.0"

__all__ = [
    "BlockOperator",
    "ConvergenceWarning",
    "CurvatureOperator",
    "Estimate",
    "FiniteDifferenceHessianOperator",
    "GaussNewtonOperator",
    "HessianOperator",
    "IdentityOperator",
    "KinkError",
    "LinearCombination",
    "ParamLayout",
    "ProductCost",
    "ProductCount",
    "SolveResult",
    "SpectralDensity",
    "approximate_hvp",
    "count_products",
    "exact_hvp",
    "gauss_newton_product",
    "hessian_trace",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "model_hvp",
    "solve_damped",
    "spectral_density",
    "top_eigenvalues",
    "xdiag",
    "xtrace",
]
