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

Everything about sub-sketches happens in the ``r``-dimensional coordinates of :math:`Q`: with
:math:`G = Q^\top Y` (so :math:`Y = QG`), the projector onto the range of the columns
:math:`Y_S` of a subset :math:`S` of probes is :math:`Q M_S Q^\top`, :math:`M_S` the orthogonal
projector onto :math:`\operatorname{range}(G_S)`. :meth:`ExchangeableSketch.leave_two_out` gives
the projectors of the sketch without one probe :math:`j` and, by the same rule as above, the
directions each further probe removes from it; no product with :math:`A` is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter import BlockOperator

__all__ = ["ExchangeableSketch", "exchangeable_sketch"]


def _removed_directions(sigma: torch.Tensor, V: torch.Tensor, tolerance: float) -> torch.Tensor:
    r"""The unit directions :math:`c_i` that leaving out each column removes from a span, or 0.

    Parameters
    ----------
    sigma
        ``(..., k)`` singular values, all positive.
    V
        ``(..., s, k)`` right singular vectors; columns of singular values that count as zero are
        zero (they span nothing).
    tolerance
        A row counts as a unit vector when its squared norm exceeds ``1 - tolerance``.

    Returns
    -------
    torch.Tensor
        ``(..., k, s)``; column :math:`i` is :math:`\Sigma^{-1} v_i / \|\Sigma^{-1} v_i\|` in the
        coordinates of the left singular vectors when :math:`\|v_i\| = 1`, else zero.
    """
    unique = (V**2).sum(-1) > 1 - tolerance  # leaving the column out shrinks the span
    directions = V.mT / sigma[..., :, None]
    norms = torch.linalg.vector_norm(directions, dim=-2, keepdim=True)
    return torch.where(unique[..., None, :], directions / norms, 0.0)


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
    coordinates : torch.Tensor
        :math:`G = Q^\top Y = \Sigma_r V_r^\top`, ``(r, s)``.
    removed : torch.Tensor
        ``(r, s)``; column :math:`c_i` is the unit direction (in :math:`Q`'s coordinates) that
        leaving out probe :math:`i` removes from the basis, or zero.
    cutoff : float
        Singular values at or below it count as zero.
    tolerance : float
        A row of :math:`V_r` counts as a unit vector within it.
    num_matvecs : int
        Products spent, :math:`s + r`.
    """

    probes: torch.Tensor
    images: torch.Tensor
    basis: torch.Tensor
    basis_images: torch.Tensor
    coordinates: torch.Tensor
    removed: torch.Tensor
    cutoff: float
    tolerance: float
    num_matvecs: int

    def leave_two_out(self, left_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The sketches without probe :math:`j`, for each :math:`j` in ``left_out``.

        Parameters
        ----------
        left_out
            ``(b,)`` probe indices :math:`j`.

        Returns
        -------
        projectors : torch.Tensor
            ``(b, r, r)``: :math:`M_{-j}`, the projector onto :math:`\operatorname{range}(G_{-j})`
            (:math:`G` without column :math:`j`) in :math:`Q`'s coordinates.
        removed : torch.Tensor
            ``(b, r, s)``: column :math:`i` is the unit direction :math:`u_{ij}` that leaving out
            probe :math:`i` too removes from it, or zero (always for :math:`i = j`), so that the
            projector onto :math:`\operatorname{range}(G_{-ij})` is :math:`M_{-j} - u_{ij}
            u_{ij}^\top`. Both follow from one SVD of :math:`G_{-j}` with the sketch's cutoff and
            tolerance, at :math:`O(r^2 s)` per :math:`j`.
        """
        num_probes = self.coordinates.shape[1]
        columns = torch.arange(num_probes, device=left_out.device) != left_out[:, None]
        U, sigma, Vh = torch.linalg.svd(
            self.coordinates * columns[:, None, :].to(self.coordinates.dtype), full_matrices=False
        )
        kept = sigma > self.cutoff
        U, V = U * kept[:, None, :], Vh.mT * kept[:, None, :]
        directions = _removed_directions(torch.where(kept, sigma, 1.0), V, self.tolerance)
        return U @ U.mT, U @ directions


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
    cutoff = 10 * num_probes * block.eps * float(sigma[0])
    rank = int((sigma > cutoff).sum())
    basis, sigma, Vh = U[:, :rank], sigma[:rank], Vh[:rank]
    tolerance = block.eps**0.5
    return ExchangeableSketch(
        probes,
        images,
        basis,
        block.matmat(basis),
        sigma[:, None] * Vh,
        _removed_directions(sigma, Vh.T, tolerance),
        cutoff,
        tolerance,
        num_probes + rank,
    )
