"""M-step sufficient statistics: additive partial sums (dimension-agnostic container).

For each kept pose (class k, rotation A, offset t, weight w) of a particle X with CTF C
and noise 1/sigma^2 = w_s, RELION accumulates (relion-internals §2.5)

    data_k(A^T k)   += w C X_t(k) w_s        weight_k(A^T k) += w C^2 w_s

where X_t is the *unmasked* particle translated by t; the noise and class statistics
come from the masked particle used in the E-step. Everything here is a sum, so a batch,
a process or a cluster worker returns a :class:`SufficientStats` and they are added with
``+``. The insertion itself is dimension-specific and passed in (``insert3d`` for 3D).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Sequence

import torch

from subtomo.em.components import FourierComponents
from subtomo.em.expectation import BatchPosterior, Projector

InsertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class SufficientStats:
    """Partial sums of one or more particles. Grids are full, centred, unpadded (K, N^d)."""

    data: torch.Tensor  # (K, *grid) complex64: sum w C X / sigma^2
    weight: torch.Tensor  # (K, *grid) float32: sum w C^2 / sigma^2
    sigma2_num: torch.Tensor  # (n_shells,) float64: sum w |X - C A|^2 per shell
    sigma2_den: torch.Tensor  # (n_shells,) float64: number of (CTF != 0) components per shell
    class_weight: torch.Tensor  # (K,) float64: sum of posterior weight per class
    offset2: torch.Tensor  # () float64: sum w |t - prior|^2
    offset_w: torch.Tensor  # () float64: sum w
    log_lik: torch.Tensor  # () float64
    n_particles: torch.Tensor  # () float64

    @staticmethod
    def zeros(n_classes: int, box: int, ndim: int, device=None) -> "SufficientStats":
        """Empty sums for K classes on N^ndim grids."""
        grid = (n_classes,) + (box,) * ndim
        n_shells = box // 2 + 1
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return SufficientStats(torch.zeros(grid, dtype=torch.complex64, device=device),
                               torch.zeros(grid, dtype=torch.float32, device=device),
                               z(n_shells), z(n_shells), z(n_classes), z(()), z(()), z(()), z(()))

    def __add__(self, other: "SufficientStats") -> "SufficientStats":
        return SufficientStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def to(self, device) -> "SufficientStats":
        """The sums on ``device``."""
        return SufficientStats(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def state(self) -> dict:
        """Plain contents on cpu (for ``torch.save`` or sending to another process)."""
        return {f.name: getattr(self, f.name).cpu() for f in fields(self)}

    @staticmethod
    def from_state(state: dict, device=None) -> "SufficientStats":
        """Inverse of :meth:`state`."""
        return SufficientStats(**{k: v.to(device) for k, v in state.items()})

    def select_classes(self, classes: Sequence[int]) -> "SufficientStats":
        """The sums of the given classes only (in that order)."""
        idx = torch.as_tensor(list(classes), device=self.data.device)
        return replace(self, data=self.data[idx], weight=self.weight[idx], class_weight=self.class_weight[idx])


def accumulate(stats: SufficientStats, post: BatchPosterior, x_unmasked: torch.Tensor, x_masked: torch.Tensor,
               ctf: torch.Tensor, inv_sigma2: torch.Tensor, comps: FourierComponents,
               projectors: Sequence[Projector], insert: InsertFn, prior_offset_px: torch.Tensor,
               noise_stats: bool = True, memory_bytes: int = 512 * 2 ** 20) -> None:
    """Add one batch's weighted sums into ``stats`` (in place).

    The kept poses are inserted in chunks whose temporaries (about 160 bytes per pose and
    component: values, weights, ramps, the insertion's coordinates and corner weights, the
    noise residuals) stay within ``memory_bytes``; the sums do not depend on the chunking
    (up to float rounding).

    Parameters
    ----------
    stats : SufficientStats
        The sums (K classes, full centred N^d grids).
    post : BatchPosterior
        Kept poses (B, P) of the batch and their weights.
    x_unmasked, x_masked, ctf : torch.Tensor
        (B, M) complex particle transforms and their CTF at the components of ``comps``.
    inv_sigma2 : torch.Tensor
        (M,) 1 / noise power.
    comps : FourierComponents
        The M components (index units k (M, d)).
    projectors : sequence of Projector
        The K references (for the noise sums).
    insert : callable
        insert(data_k, weight_k, rotations (n, d, d), k (M, d), values (n, M), weights (n, M)).
    prior_offset_px : torch.Tensor
        (B, d) centres of the offset prior [px].
    noise_stats : bool
        Also add the noise (sigma^2) sums.
    memory_bytes : int
        Bound on the temporaries of one chunk of poses [bytes].
    """
    b, p = post.weight.shape
    live = torch.nonzero(post.weight.reshape(-1) > 0).squeeze(1)
    step = max(1, memory_bytes // max(160 * comps.m, 1))
    for s in range(0, len(live), step):
        _accumulate_poses(stats, post, live[s:s + step], x_unmasked, x_masked, ctf, inv_sigma2, comps, projectors,
                          insert, prior_offset_px, noise_stats)
    if noise_stats:
        nonzero = (ctf.abs() > 1e-4).double().sum(0)  # (M,) particles with data at each component
        stats.sigma2_den.index_add_(0, comps.shell.clamp(max=stats.sigma2_num.shape[0] - 1), nonzero)
    stats.log_lik += post.log_lik.sum().double()
    stats.n_particles += float(b)


def _accumulate_poses(stats: SufficientStats, post: BatchPosterior, live: torch.Tensor, x_unmasked: torch.Tensor,
                      x_masked: torch.Tensor, ctf: torch.Tensor, inv_sigma2: torch.Tensor, comps: FourierComponents,
                      projectors: Sequence[Projector], insert: InsertFn, prior_offset_px: torch.Tensor,
                      noise_stats: bool) -> None:
    """The sums of the kept poses ``live`` (flat indices over (B, P)) added into ``stats``."""
    b, p = post.weight.shape
    bi = live // p
    w = post.weight.reshape(-1)[live].float()
    rot = post.rot.reshape(b * p, *post.rot.shape[-2:])[live]
    off = post.offset_px.reshape(b * p, -1)[live]
    cls = post.cls.reshape(-1)[live]
    ph = comps.phase_ramps(off)  # (n, M)
    c = ctf[bi]
    vals = (w[:, None] * c * inv_sigma2)[:, :] * x_unmasked[bi] * ph
    wts = w[:, None] * c * c * inv_sigma2
    shell = comps.shell.clamp(max=stats.sigma2_num.shape[0] - 1)
    for kc in range(stats.data.shape[0]):
        sel = torch.nonzero(cls == kc).squeeze(1)
        if len(sel) == 0:
            continue
        insert(stats.data[kc], stats.weight[kc], rot[sel], comps.k, vals[sel], wts[sel])
        stats.class_weight[kc] += w[sel].sum().double()
        if noise_stats:
            a = projectors[kc].project(rot[sel], comps.k)
            res = x_masked[bi[sel]] * ph[sel] - c[sel] * a
            r2 = (res.real ** 2 + res.imag ** 2) * w[sel, None]
            r2 = r2 * (c[sel].abs() > 1e-4)  # only components with data (sigma2_den counts the same set)
            stats.sigma2_num.index_add_(0, shell, r2.sum(0).double())
    d = off - prior_offset_px[bi]
    stats.offset2 += (w * (d ** 2).sum(-1)).sum().double()
    stats.offset_w += w.sum().double()


def sigma2_from_stats(stats: SufficientStats, previous: torch.Tensor, max_shell: int) -> torch.Tensor:
    """New noise power: sigma^2(r) = sum w |X - CA|^2 / (2 count) for shells 1..max_shell-1.

    Parameters
    ----------
    stats : SufficientStats
        The summed statistics of an iteration.
    previous : torch.Tensor
        (N//2 + 1,) the previous noise power; kept outside the updated shells.
    max_shell : int
        First shell not updated [Fourier px].

    Returns
    -------
    torch.Tensor
        (N//2 + 1,) float32.
    """
    new = previous.clone().double()
    ok = stats.sigma2_den > 0
    ok[max_shell:] = False
    ok[0] = False
    new[ok] = stats.sigma2_num[ok] / (2 * stats.sigma2_den[ok])
    return new.to(previous.dtype)


def sigma_offset_from_stats(stats: SufficientStats, ndim: int, previous: float) -> float:
    """RELION's offset prior width: sigma_offset^2 = sum w |t|^2 / (ndim sum w).

    Parameters
    ----------
    stats : SufficientStats
        The summed statistics of an iteration.
    ndim : int
        2 or 3.
    previous : float
        The previous width [px], kept when no weight was summed.

    Returns
    -------
    float
        Width [px].
    """
    if float(stats.offset_w) <= 0:
        return previous
    return float((stats.offset2 / (ndim * stats.offset_w)).sqrt())
