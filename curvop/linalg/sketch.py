r"""The exchangeable sketch shared by XTrace and XDiag (Epperly, Tropp & Webber, 2024).

With ``s`` probes :math:`\Omega = [\omega_1, \dots, \omega_s]` and :math:`Y = A\Omega`, each
probe :math:`\omega_i` is paired with the projector :math:`P_{-i}` onto the range of :math:`Y`
without column :math:`i`: it does not depend on :math:`\omega_i`, so :math:`\omega_i` gives an
unbiased Monte-Carlo correction to the low-rank part :math:`P_{-i} A`. Averaging over :math:`i`
uses every product twice.

The textbook formula for :math:`P_{-i}` inverts the triangular factor of :math:`Y`, which breaks
down when :math:`Y` is rank-deficient (a low-rank curvature matrix). Here, with the SVD
:math:`Y = U \Sigma V^\top` (from a QR factorization of the tall :math:`Y = Q_Y R` and the SVD of
the small :math:`R`: no factorization but QR ever sees a matrix of ``n`` rows), singular values at or below a cutoff :math:`\epsilon` count as zero:
:math:`r` are kept, :math:`Q = U_r`, :math:`v_i` is the ``i``-th row of :math:`V_r` and
:math:`\eta_i` the norm of the ``i``-th row of the other right singular vectors (the numerical
null space of :math:`Y`). Without column :math:`i` the singular values are at least
:math:`\eta_i \sigma_r`, so:

- if :math:`\eta_i \sigma_r > \epsilon`, the other columns still span
  :math:`\operatorname{range}(Y)` and :math:`P_{-i} = QQ^\top`;
- otherwise (always when :math:`Y` has full column rank: :math:`\eta_i = 0`), removing column
  :math:`i` removes the direction :math:`u_i = Q c_i` with :math:`c_i = \Sigma_r^{-1} v_i /
  \|\Sigma_r^{-1} v_i\|`, orthogonal to every other column, and :math:`P_{-i} = QQ^\top - u_i
  u_i^\top`.

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

from .workspace import Workspace, raise_not_symmetric

__all__ = ["SKETCH_VECTORS", "ExchangeableSketch", "exchangeable_sketch", "tall_svd"]

SKETCH_VECTORS = 4  # (n, s) arrays a sketch holds: probes, images, basis, basis images


def tall_svd(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The thin SVD :math:`Y = U \Sigma V^\top` of a tall ``(n, s)`` matrix through its QR
    factorization :math:`Y = QR` and the SVD of the ``s x s`` factor :math:`R = U_R \Sigma
    V^\top`, :math:`U = Q U_R`: cuSOLVER's SVD of a tall matrix fails from about 11M rows,
    while Householder QR scales. Singular values come back in float64."""
    Q, R = torch.linalg.qr(Y)
    U_R, sigma, Vh = torch.linalg.svd(R.double())
    return Q @ U_R.to(Q.dtype), sigma, Vh


def _removed_directions(sigma: torch.Tensor, V: torch.Tensor, cutoff: float) -> torch.Tensor:
    r"""The unit directions :math:`c_i` that leaving out each column removes from a span, or 0.

    Parameters
    ----------
    sigma
        ``(..., k)`` singular values in descending order, ``k <= s``.
    V
        ``(..., s, s)`` all right singular vectors: the first ``k`` columns go with ``sigma``,
        the others span the null space.
    cutoff
        Singular values at or below it count as zero.

    Returns
    -------
    torch.Tensor
        ``(..., k, s)``; column :math:`i` is :math:`\Sigma_r^{-1} v_i / \|\Sigma_r^{-1} v_i\|`
        (zero in the rows of the dropped singular values) when :math:`\eta_i \sigma_r \le
        \epsilon` (see the module docstring), else zero.
    """
    num_values = sigma.shape[-1]
    kept = sigma > cutoff
    outside = torch.cat([V[..., :num_values] * ~kept[..., None, :], V[..., num_values:]], -1)
    eta = torch.linalg.vector_norm(outside, dim=-1)
    # sigma_r, the smallest kept singular value; inf when none is kept (then every eta is 1)
    padded = torch.nn.functional.pad(torch.where(kept, sigma, torch.inf), (0, 1), value=torch.inf)
    unique = eta * padded.amin(-1, keepdim=True) <= cutoff
    directions = V[..., :num_values].mT * kept[..., None] / torch.where(kept, sigma, 1.0)[..., None]
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
    projection : torch.Tensor
        :math:`H = Q^\top Z`, ``(r, r)`` float64, symmetric.
    coordinates : torch.Tensor
        :math:`G = Q^\top Y = \Sigma_r V_r^\top`, ``(r, s)``.
    removed : torch.Tensor
        ``(r, s)``; column :math:`c_i` is the unit direction (in :math:`Q`'s coordinates) that
        leaving out probe :math:`i` removes from the basis, or zero.
    cutoff : float
        Singular values at or below it count as zero.
    num_matvecs : int
        Products spent, :math:`s + r`.
    """

    probes: torch.Tensor
    images: torch.Tensor
    basis: torch.Tensor
    basis_images: torch.Tensor
    projection: torch.Tensor
    coordinates: torch.Tensor
    removed: torch.Tensor
    cutoff: float
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
            u_{ij}^\top`. Both follow from one SVD of :math:`G_{-j}` with the sketch's cutoff, at
            :math:`O(s^3)` per :math:`j`.
        """
        num_probes = self.coordinates.shape[1]
        columns = torch.arange(num_probes, device=left_out.device) != left_out[:, None]
        U, sigma, Vh = torch.linalg.svd(self.coordinates * columns[:, None, :].to(self.coordinates))
        U = U * (sigma > self.cutoff)[:, None, :]
        return U @ U.mT, U @ _removed_directions(sigma, Vh.mT, self.cutoff)


def exchangeable_sketch(
    work: Workspace,
    num_probes: int,
    generator: torch.Generator,
    distribution: str,
) -> ExchangeableSketch:
    """Sketch the operator with ``num_probes < n`` probes: two block products.

    The ``(n, s)`` arrays (probes, images, basis and its images) are kept in the operator's
    dtype; the small ``s x s`` ones are float64. The probes follow ``distribution`` (see
    ``draw_probes``). Singular values at or below ``10 * num_probes * eps`` (of the operator's
    dtype) times the largest count as zero. Raises ``ValueError`` when :math:`Q^\top A Q` shows
    that the operator is not symmetric (both estimators assume it).
    """
    vectors = work.vector_bytes() * num_probes
    probes = work.probes(num_probes, generator, distribution)
    images = work.multiply(probes, kept=2 * vectors)  # probes and images
    U, sigma, Vh = tall_svd(images)
    cutoff = 10 * num_probes * work.eps * float(sigma[0])
    rank = int((sigma > cutoff).sum())
    basis = U[:, :rank].contiguous()
    del U
    basis_images = work.multiply(basis, kept=SKETCH_VECTORS * vectors)
    projection = _symmetric_projection(work, basis, basis_images)
    return ExchangeableSketch(
        probes,
        images,
        basis,
        basis_images,
        projection,
        sigma[:rank, None] * Vh[:rank],
        _removed_directions(sigma, Vh.mT, cutoff)[:rank],
        cutoff,
        num_probes + rank,
    )


def _symmetric_projection(
    work: Workspace, basis: torch.Tensor, images: torch.Tensor
) -> torch.Tensor:
    r""":math:`H = Q^\top A Q` (float64, symmetrized); ``ValueError`` unless it is symmetric up to
    the operator's tolerance relative to the largest product column (a lower bound of
    :math:`\|A\|`): a non-symmetric operator would give a wrong estimate silently."""
    projected = (basis.T @ images).double()
    scale = float(torch.linalg.vector_norm(images, dim=0).max()) if images.numel() else 0.0
    gap = float((projected - projected.T).abs().max()) / scale if scale > 0 else 0.0
    # (an empty sketch of the zero operator has scale 0: nothing to check)
    if gap > work.symmetry_tolerance:
        raise_not_symmetric(gap, work.symmetry_tolerance)
    return (projected + projected.T) / 2
