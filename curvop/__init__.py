"""curvop: curvature of PyTorch models as SciPy LinearOperators."""

from .functional import approximate_hvp, exact_hvp, gauss_newton_product, hessian_trace, model_hvp
from .layout import ParamLayout
from .operators import (
    CurvatureOperator,
    FiniteDifferenceHessianOperator,
    GaussNewtonOperator,
    HessianOperator,
)

__version__ = "0.1.0"

__all__ = [
    "CurvatureOperator",
    "FiniteDifferenceHessianOperator",
    "GaussNewtonOperator",
    "HessianOperator",
    "ParamLayout",
    "approximate_hvp",
    "exact_hvp",
    "gauss_newton_product",
    "hessian_trace",
    "model_hvp",
]
