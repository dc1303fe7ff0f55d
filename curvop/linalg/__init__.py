"""Algorithms on any SciPy ``LinearOperator``, written once against a torch block product.

- :func:`top_eigenvalues` — extreme eigenvalues by block Lanczos, robust on singular operators.
- :func:`solve_damped` — :math:`(A + \\lambda I)x = b` by conjugate gradients or MINRES.
- :func:`lanczos` — the Lanczos tridiagonal matrix, fully reorthogonalized.
- :func:`hutchinson_trace`, :func:`hutchpp_trace`, :func:`xtrace` — trace estimates.
- :func:`hutchinson_diagonal`, :func:`xdiag` — diagonal estimates.
- :func:`spectral_density` — SLQ or KPM spectral density.

Every algorithm sees its operator as a :class:`~curvop.BlockOperator` (a curvop operator, a sum or
scaling of them, or any other SciPy operator wrapped with a numpy round trip) within a memory
budget (:mod:`curvop.linalg.workspace`), and runs in torch on the operator's device.
"""

from .convergence import ConvergenceWarning
from .density import SpectralDensity, spectral_density
from .diagonal import hutchinson_diagonal, xdiag
from .eigen import top_eigenvalues
from .lanczos import lanczos
from .probes import draw_probes, make_generator
from .solve import SolveResult, solve_damped
from .trace import Estimate, hutchinson_trace, hutchpp_trace, xtrace

__all__ = [
    "ConvergenceWarning",
    "Estimate",
    "SolveResult",
    "SpectralDensity",
    "draw_probes",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "make_generator",
    "solve_damped",
    "spectral_density",
    "top_eigenvalues",
    "xdiag",
    "xtrace",
]
