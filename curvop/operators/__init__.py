"""Curvature operators: SciPy ``LinearOperator`` subclasses around one kernel each."""

from .base import CurvatureOperator
from .finite_difference import FiniteDifferenceHessianOperator, KinkError
from .gauss_newton import GaussNewtonOperator
from .hessian import HessianOperator
from .identity import IdentityOperator

__all__ = [
    "CurvatureOperator",
    "FiniteDifferenceHessianOperator",
    "GaussNewtonOperator",
    "HessianOperator",
    "IdentityOperator",
    "KinkError",
]
