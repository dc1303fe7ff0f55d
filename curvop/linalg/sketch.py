r"""The exchangeable sketch shared by XTrace and XDiag (Epperly, Tropp & Webber, 2024).

With ``s`` probes :math:`\Omega = [\omega_1, \dots, \omega_s]` and :math:`Y = A\Omega`, each
probe :math:`\omega_i` is paired with the projector :math:`P_{-i}` onto the range of :math:`Y`
without column :math:`i`: it does not depend on :math:`\omega_i`, so :math:`\omega_i` gives an
unbiased Monte-Carlo correction to the low-rank part :math:`P_{-i} A`. Averaging over :math:`i`
uses every product twice.

The textbook formula for :math:`P_{-i}` inverts the triangular factor of :math:`Y`, which breaks
down when :math:`Y` is rank-deficient (a low-rank curvature matrix). Here, with the thin SVD
:math:`Y = U \Sigma V^\top` truncated to its numerical rank :math:`r`, :math:`Q = U_r` and
:math:`v_i` the ``i``-th row of :math:`V_r`:

- if :math:`\|v_i\| < 1`, the other columns still span :math:`\operatorname{range}(Y)` and
  :math:`P_{-i} = QQ^\top`;
- if :math:`\|v_i\| = 1` (always when :math:`Y` has full column rank), removing column :math:`i`
  removes the direction :math:`u_i = Q c_i` with :math:`c_i = \Sigma_r^{-1} v_i / \|\Sigma_r^{-1}
  v_i\|`, orthogonal to every other column, and :math:`P_{-i} = QQ^\top - u_i u_i^\top`.

Below, :math:`c_i = 0` encodes the first case, so both read :math:`P_{-i} = Q(I - c_i c_i^\top)
Q^\top`. When every ``s - 1`` of the products span :math:`\operatorname{range}(A)`, every
:math:`c_i = 0`, :math:`QQ^\top A = A` and the estimates are exact. For Gaussian probes that
holds almost surely once :math:`s` exceeds the rank of :math:`A`; Rademacher probes can fall
short when the range of :math:`A` is aligned with the coordinate axes (repeated sign patterns).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter import BlockOperator

__all__ = ["ExchangeableSketch", "exchangeable_sketch"]


@dataclass(frozen=True)
class ExchangeableSketch:
    r"""Probes, their products, an orthonormal basis of the products and the basis' products.

    Attributes
    ----------
    probes : torch.Tensor
        :math:`\Omega`, ``(n, s)``.
    images : torch.Tensor
        :math:`Y = A\Omega`, ``(n, s)``.
    basis : torch.Tensor
        :math:`Q`, ``(n, r)`` orthonormal, :math:`r` the numerical rank of :math:`Y`.
    basis_images : torch.Tensor
        :math:`Z = AQ`, ``(n, r)``.
    removed : torch.Tensor
        ``(r, s)``; column :math:`c_i` is the unit direction (in :math:`Q`'s coordinates) that
        leaving out probe :math:`i` removes from the basis, or zero.
    num_matvecs : int
        Products spent, :math:`s + r`.
    """

    probes: torch.Tensor
    images: torch.Tensor
    basis: torch.Tensor
    basis_images: torch.Tensor
    removed: torch.Tensor
    num_matvecs: int


def exchangeable_sketch(
    block: BlockOperator, num_probes: int, generator: torch.Generator, distribution: str
) -> ExchangeableSketch:
    """Sketch ``block`` with ``num_probes`` probes: two block products, float64 throughout.

    The probes follow ``distribution`` (see ``draw_probes``). Singular values below
    ``10 * num_probes * eps`` (of the operator's dtype) times the largest count as zero; a row of
    :math:`V_r` counts as a unit vector within ``sqrt(eps)``.
    """
    probes = block.probes(num_probes, generator, distribution)
    images = block.matmat(probes)
    U, sigma, Vh = torch.linalg.svd(images, full_matrices=False)
    rank = int((sigma > 10 * num_probes * block.eps * sigma[0]).sum())
    basis, V = U[:, :rank], Vh[:rank].T
    unique = (V**2).sum(1) > 1 - block.eps**0.5  # leaving the probe out shrinks the span
    directions = V.T / sigma[:rank, None]
    removed = torch.where(unique, directions / torch.linalg.vector_norm(directions, dim=0), 0.0)
    return ExchangeableSketch(
        probes, images, basis, block.matmat(basis), removed, num_probes + rank
    )
