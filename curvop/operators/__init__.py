"""Curvature operators: SciPy ``LinearOperator`` subclasses with a torch block product."""

from .base import CurvatureOperator
from .block import BlockOperator, LinearCombination, ProductCost
from .finite_difference import FiniteDifferenceHessianOperator, KinkError
from .gauss_newton import GaussNewtonOperator
from .hessian import HessianOperator
from .identity import IdentityOperator

__all__ = [
    "BlockOperator",
    "CurvatureOperator",
    "FiniteDifferenceHessianOperator",
    "GaussNewtonOperator",
    "HessianOperator",
    "IdentityOperator",
    "KinkError",
    "LinearCombination",
    "ProductCost",
]
