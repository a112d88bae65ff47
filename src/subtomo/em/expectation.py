"""E-step: scoring as matrix products, posteriors, coarse-to-fine (dimension-agnostic).

For particles X (B, M) with CTF C (B, M), noise 1/sigma^2 w (M,), translations as phase
ramps phi_t (T, M) and references A_r (R, M) (already rotated and restricted to the
component set, see :mod:`subtomo.em.components`), the Gaussian log-likelihood up to a
per-particle constant is

    L(b, t, r) = Re sum_k conj(X_b phi_t) C_b w A_r  -  1/2 sum_k C_b^2 w |A_r|^2

The first (cross) term is one real GEMM of (B*T, 2M) [Re, Im stacked] by (2M, R); the
second (norm) term a real GEMM of (B, M) by (M, R). Per-particle reference sets (local
searches, fine pass) use batched matmuls instead. Everything is float32/complex64 on the
device of the inputs.

The driver :func:`expectation_batch` does RELION's adaptive oversampling: a coarse pass on
the components of the coarse size, the smallest set of coarse (translation, class,
rotation) points that holds ``fraction`` of the posterior mass (at most
``max_significant``), then a fine pass on their oversampled children at the current
size; the posterior over the fine points is normalised per particle and its largest
weights (``fraction`` of the mass, at most ``max_keep``) are returned for the M-step.
Only the :class:`Projector` callables are dimension-specific.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from subtomo.em.components import FourierComponents


class Projector(Protocol):
    """A reference that can be sampled at A^T k: 3D (:class:`subtomo.em.projector3d.Projector3D`) or 2D."""

    def project(self, rotations: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Rotations (..., d, d), k (M, d) -> (..., M) complex64."""
        ...


# ---------------------------------------------------------------- scoring kernels
def _stack_real(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z.real, z.imag], dim=-1)


def score_terms(x: torch.Tensor, ctf: torch.Tensor, inv_sigma2: torch.Tensor, phases: torch.Tensor,
                refs) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross and norm terms of the likelihood.

    Parameters
    ----------
    x : torch.Tensor
        (B, M) complex particle transforms.
    ctf : torch.Tensor
        (B, M) real CTFs.
    inv_sigma2 : torch.Tensor
        (M,) or (B, M) 1 / noise power.
    phases : torch.Tensor
        (T, M) or (B, T, M) translation phase ramps.
    refs : torch.Tensor or tuple
        (R, M) shared or (B, R, M) per-particle complex references, or the pair
        (stacked [Re, Im] (R, 2M), power (R, M)) from :func:`prepare_refs`.

    Returns
    -------
    cross, norm : torch.Tensor
        (B, T, R) Re sum conj(x phi) C A / sigma^2 and (B, R) sum C^2 |A|^2 / sigma^2.
    """
    b, m = x.shape
    cs = ctf * inv_sigma2  # (B, M)
    xs = x[:, None, :] * phases  # (B, T, M)
    t = xs.shape[1]
    y = torch.cat([xs.real * cs[:, None], xs.imag * cs[:, None]], dim=-1)  # (B, T, 2M)
    c2 = ctf * ctf * inv_sigma2  # (B, M)
    if isinstance(refs, tuple):
        ar, a2 = refs
        if a2 is None:
            a2 = stacked_power(ar)
    else:
        a2 = refs.real ** 2 + refs.imag ** 2
        ar = _stack_real(refs)  # (R, 2M) or (B, R, 2M)
    if ar.ndim == 2:
        cross = (y.reshape(b * t, 2 * m) @ ar.T).reshape(b, t, -1)
        norm = c2 @ a2.T
    else:
        cross = torch.bmm(y, ar.transpose(1, 2))
        norm = torch.bmm(c2[:, None, :], a2.transpose(1, 2))[:, 0]
    return cross, norm


def prepare_refs(refs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked [Re, Im] references and their power, computed once for repeated scoring.

    Parameters
    ----------
    refs : torch.Tensor
        (..., M) complex references.

    Returns
    -------
    stacked : torch.Tensor
        (..., 2M) float32.
    power : torch.Tensor
        (..., M) |A|^2.
    """
    return _stack_real(refs).contiguous(), (refs.real ** 2 + refs.imag ** 2).contiguous()


def project_stacked(projector: Projector, rotations: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """References as stacked [Re, Im], directly where the projector can (3D), else via complex.

    Parameters
    ----------
    projector : Projector
        One reference.
    rotations : torch.Tensor
        (..., d, d) rotation matrices.
    k : torch.Tensor
        (M, d) components in index units.

    Returns
    -------
    torch.Tensor
        (..., 2M) float32.
    """
    direct = getattr(projector, "project_stacked", None)
    return direct(rotations, k) if direct is not None else _stack_real(projector.project(rotations, k))


def stacked_power(stacked: torch.Tensor) -> torch.Tensor:
    """|A|^2 from stacked [Re, Im] references.

    Parameters
    ----------
    stacked : torch.Tensor
        (..., 2M) float32.

    Returns
    -------
    torch.Tensor
        (..., M).
    """
    m = stacked.shape[-1] // 2
    return stacked[..., :m] ** 2 + stacked[..., m:] ** 2


def log_likelihood(x, ctf, inv_sigma2, phases, refs) -> torch.Tensor:
    """Gaussian log-likelihood up to a per-particle constant: cross - norm / 2.

    Parameters
    ----------
    x, ctf, inv_sigma2, phases, refs
        As for :func:`score_terms`.

    Returns
    -------
    torch.Tensor
        (B, T, R).
    """
    cross, norm = score_terms(x, ctf, inv_sigma2, phases, refs)
    return cross - 0.5 * norm[:, None, :]


def normalised_cc(x, ctf, phases, refs) -> torch.Tensor:
    """Normalised cross-correlation Re sum conj(x phi) C A / (|x| |C A|) (RELION --firstiter_cc).

    Parameters
    ----------
    x, ctf, phases, refs
        As for :func:`score_terms`.

    Returns
    -------
    torch.Tensor
        (B, T, R) in -1..1.
    """
    ones = torch.ones(x.shape[-1], device=x.device, dtype=ctf.dtype)
    cross, norm = score_terms(x, ctf, ones, phases, refs)
    xn = (x.real ** 2 + x.imag ** 2).sum(-1).sqrt()  # (B,)
    return cross / (norm.clamp(min=1e-30).sqrt()[:, None, :] * xn[:, None, None].clamp(min=1e-30))


def constant_term(x: torch.Tensor, inv_sigma2: torch.Tensor) -> torch.Tensor:
    """-1/2 sum |x|^2 / sigma^2 per particle: completes :func:`log_likelihood` to the full log-likelihood.

    Parameters
    ----------
    x : torch.Tensor
        (B, M) complex particle transforms.
    inv_sigma2 : torch.Tensor
        (M,) 1 / noise power.

    Returns
    -------
    torch.Tensor
        (B,).
    """
    return -0.5 * ((x.real ** 2 + x.imag ** 2) * inv_sigma2).sum(-1)


def posterior(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise log-weights over all but the first dimension.

    Parameters
    ----------
    log_w : torch.Tensor
        (B, ...) log-weights (-inf allowed).

    Returns
    -------
    weights : torch.Tensor
        Same shape, summing to 1 per particle.
    log_sum : torch.Tensor
        (B,) log-sum-exp.
    """
    flat = log_w.reshape(log_w.shape[0], -1)
    lse = torch.logsumexp(flat, dim=1)
    return torch.exp(flat - lse[:, None]).reshape(log_w.shape), lse


def significant_count(weights: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest number of points per row holding ``fraction`` of the mass, and the sort order.

    Parameters
    ----------
    weights : torch.Tensor
        (B, P) normalised per row.
    fraction : float
        Mass to hold (0.999 in RELION).

    Returns
    -------
    counts : torch.Tensor
        (B,) int64.
    order : torch.Tensor
        (B, P) indices, weights descending.
    """
    w, order = torch.sort(weights, dim=1, descending=True)
    cum = torch.cumsum(w, dim=1)
    count = (cum < fraction).sum(1) + 1
    return count.clamp(max=weights.shape[1]), order


def offset_log_prior(offsets_px: torch.Tensor, centre_px: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Isotropic Gaussian log prior of absolute offsets about their prior centres.

    Parameters
    ----------
    offsets_px : torch.Tensor
        (..., d) offsets [px].
    centre_px : torch.Tensor
        Centres broadcastable to ``offsets_px`` [px].
    sigma_px : float
        Width of the prior [px].

    Returns
    -------
    torch.Tensor
        (...) log prior.
    """
    d2 = ((offsets_px - centre_px) ** 2).sum(-1)
    return -d2 / (2 * max(sigma_px, 1e-3) ** 2)


# ---------------------------------------------------------------- the driver
@dataclass
class EStepOptions:
    """Significance (fraction, max points), kept poses, offset prior width [px], CC mode and memory [bytes]."""

    fraction: float = 0.999  # adaptive_fraction
    max_significant: int = 48  # coarse points carried to the fine pass, per particle
    max_keep: int = 12  # fine poses kept per particle for the M-step
    sigma_offset_px: float = 3.0
    cc: bool = False  # normalised cross-correlation + best pose only (first iteration, relative grey-scale)
    # classification: the significant coarse points are chosen within each class (each class's posterior
    # over (T, R) normalised on its own), so every class reaches the fine pass and the class is decided
    # there, at the oversampled poses, not by which class had the luckiest coarse grid point
    significant_per_class: bool = False
    # at least this many coarse points (per class with significant_per_class) go to the fine pass: a
    # coarse grid that undersamples a sharp posterior ranks its points unreliably (the optimum's
    # parent is often the 2nd-4th best coarse point)
    min_significant: int = 1
    memory_bytes: int = 512 * 2 ** 20  # working-set bound for one chunk
    # bound on what a pass holds across batches: the coarse references of a global search when they fit
    # (:func:`coarse_refs_bytes`), else the coarse scores of a group of particles that share each
    # rotation chunk's projections (:func:`coarse_group_size`)
    pass_memory_bytes: int = 3 * 2 ** 30


@dataclass
class BatchData:
    """One batch of particles at the current size (components of ``comps``)."""

    x: torch.Tensor  # (B, M) complex, masked (E-step)
    ctf: torch.Tensor  # (B, M) real
    prev_offset_px: torch.Tensor  # (B, d) search centre
    prior_offset_px: torch.Tensor  # (B, d) centre of the offset prior
    prev_rot: torch.Tensor | None = None  # (B, d, d) for local searches


@dataclass
class Orientations:
    """Coarse rotations for the batch: shared (R, d, d) / children (R, C, d, d) or per particle (B, ...)."""

    coarse: torch.Tensor
    children: torch.Tensor
    log_prior: torch.Tensor  # (R,)
    child_log_prior: torch.Tensor  # (R, C)

    @property
    def shared(self) -> bool:
        """True when every particle of the batch has the same rotations."""
        return self.coarse.ndim == 3


@dataclass
class BatchPosterior:
    """Kept poses per particle (zero weight = padding) and per-particle summaries."""

    rot: torch.Tensor  # (B, P, d, d)
    offset_px: torch.Tensor  # (B, P, d) absolute offsets (rlnOrigin in px)
    cls: torch.Tensor  # (B, P) long
    weight: torch.Tensor  # (B, P), rows sum to 1
    max_prob: torch.Tensor  # (B,) rlnMaxValueProbDistribution
    log_lik: torch.Tensor  # (B,) rlnLogLikeliContribution (up to the Gaussian normalisation)
    n_significant: torch.Tensor  # (B,) rlnNrOfSignificantSamples (coarse points; at most max_significant)

    def best(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotation (B, d, d), offset (B, d), class (B,) of the largest weight."""
        j = self.weight.argmax(1)
        ar = torch.arange(len(j), device=j.device)
        return self.rot[ar, j], self.offset_px[ar, j], self.cls[ar, j]


def precompute_refs(projectors: Sequence[Projector], rotations: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Every class rotated once for a shared rotation set.

    Parameters
    ----------
    projectors : sequence of Projector
        The K references.
    rotations : torch.Tensor
        (R, d, d) rotation matrices.
    k : torch.Tensor
        (M, d) components in index units.

    Returns
    -------
    torch.Tensor
        (K, R, M) complex.
    """
    return torch.stack([p.project(rotations, k) for p in projectors])


def precompute_stacked_refs(projectors: Sequence[Projector], rotations: torch.Tensor, k: torch.Tensor,
                            chunk_bytes: int = 256 * 2 ** 20,
                            with_power: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every class rotated once, stored as stacked [Re, Im] float32 (and their power with ``with_power``).

    Filled chunk by chunk, so the peak is this array plus one chunk; without ``with_power``
    the power |A|^2 is recomputed per scoring chunk (:func:`stacked_power`; a fifth of the
    coarse time at box 64 with 16-particle batches, bench/bench_engine.py), with it the
    references take 1.5 times the memory. Pass as ``coarse_refs``.

    Parameters
    ----------
    projectors : sequence of Projector
        The K references.
    rotations : torch.Tensor
        (R, d, d) rotation matrices.
    k : torch.Tensor
        (M, d) components in index units.
    chunk_bytes : int
        Memory of one chunk [bytes].
    with_power : bool
        Also hold |A|^2 (K, R, M).

    Returns
    -------
    tuple
        ((K, R, 2M) float32, (K, R, M) float32 or None).
    """
    n_r, m = rotations.shape[0], k.shape[0]
    out = torch.empty(len(projectors), n_r, 2 * m, dtype=torch.float32, device=k.device)
    power = torch.empty(len(projectors), n_r, m, dtype=torch.float32, device=k.device) if with_power else None
    step = max(1, chunk_bytes // max(1, 8 * m))
    for kc, projector in enumerate(projectors):
        for s, e in _chunks(n_r, step):
            out[kc, s:e] = project_stacked(projector, rotations[s:e], k)
            if power is not None:
                power[kc, s:e] = stacked_power(out[kc, s:e])
    return out, power


def coarse_refs_bytes(n_classes: int, n_rot: int, mc: int) -> int:
    """Bytes of the stacked coarse references of a shared grid (:func:`precompute_stacked_refs`).

    Parameters
    ----------
    n_classes : int
        K references.
    n_rot : int
        R coarse rotations.
    mc : int
        Mc coarse components.

    Returns
    -------
    int
        4 K R 2Mc [bytes] (float32 [Re | Im]).
    """
    return 4 * n_classes * n_rot * 2 * mc


def coarse_group_bytes_per_particle(n_t: int, n_classes: int, n_rot: int, mc: int) -> int:
    """Bytes one particle adds to a coarse group: scores (T, K, R), translated particle (T, 2Mc), its data.

    Parameters
    ----------
    n_t : int
        T coarse translations.
    n_classes : int
        K references.
    n_rot : int
        R coarse rotations.
    mc : int
        Mc coarse components.

    Returns
    -------
    int
        4 T K R + 16 T Mc (translated particle and its complex temporary) + 24 Mc [bytes].
    """
    return 4 * n_t * n_classes * n_rot + 16 * n_t * mc + 24 * mc


def coarse_group_size(budget_bytes: int, batch_size: int, n_particles: int, n_t: int, n_classes: int,
                      n_rot: int, mc: int) -> int:
    """Particles whose coarse pass shares each rotation chunk's projections, within ``budget_bytes``.

    A multiple of ``batch_size`` (at least one batch, at most all particles): each projected
    rotation chunk is scored against the whole group, so the projection cost per particle
    falls as 1 / group size while the held scores grow with it.

    Parameters
    ----------
    budget_bytes : int
        Memory for the group [bytes].
    batch_size : int
        Particles per batch B.
    n_particles : int
        Particles of the pass.
    n_t, n_classes, n_rot, mc : int
        T, K, R, Mc as for :func:`coarse_group_bytes_per_particle`.

    Returns
    -------
    int
        Group size [particles].
    """
    per = coarse_group_bytes_per_particle(n_t, n_classes, n_rot, mc)
    g = max(1, budget_bytes // max(per, 1)) // max(batch_size, 1) * batch_size
    return int(min(max(g, batch_size), max(n_particles, 1)))


def _chunks(n: int, size: int):
    size = max(1, int(size))
    for s in range(0, n, size):
        yield s, min(n, s + size)


def _coarse_scores(batch: BatchData, comps: FourierComponents, coarse_mask: torch.Tensor, inv_sigma2: torch.Tensor,
                   projectors: Sequence[Projector], orient: Orientations, trans_points: torch.Tensor,
                   opts: EStepOptions, coarse_refs) -> torch.Tensor:
    """Coarse-pass scores (B, T, K, R): log-likelihood (or normalised CC) of every coarse pose."""
    x, ctf = batch.x, batch.ctf
    b = x.shape[0]
    kcls, n_t = len(projectors), trans_points.shape[0]
    k_c = comps.k[coarse_mask]
    mc = k_c.shape[0]
    xc, cc_, wc = x[:, coarse_mask], ctf[:, coarse_mask], inv_sigma2[coarse_mask]
    pre = comps.phase_ramps(batch.prev_offset_px)  # (B, M)
    xc_pre = xc * pre[:, coarse_mask]
    ph_c = comps.phase_ramps(trans_points)[:, coarse_mask]  # (T, Mc)
    n_r = orient.coarse.shape[-3]
    scores = torch.empty(b, n_t, kcls, n_r, device=x.device)
    # per rotation: its stacked reference and power (12 Mc), projection temporaries (about 32 Mc), per
    # particle when not shared; cross and its difference with the norm (8 B T)
    per_elem = 44 * mc * (b if not orient.shared else 1) + 8 * b * n_t
    r_chunk = max(1, opts.memory_bytes // max(per_elem, 1))
    if not opts.cc:
        # the translated, CTF- and noise-weighted particles once per batch: (B*T, 2Mc) for every chunk's GEMM
        cs = cc_ * wc
        xs = xc_pre[:, None, :] * ph_c  # (B, T, Mc)
        y = torch.empty(b, n_t, 2 * mc, device=x.device)  # filled in place: no third (B, T, 2Mc) copy
        torch.mul(xs.real, cs[:, None], out=y[..., :mc])
        torch.mul(xs.imag, cs[:, None], out=y[..., mc:])
        del xs
        c2 = cc_ * cc_ * wc
    for kc in range(kcls):
        for s, e in _chunks(n_r, r_chunk):
            refs = _coarse_refs(projectors[kc], orient, coarse_refs, kc, s, e, k_c)
            if opts.cc:
                scores[:, :, kc, s:e] = normalised_cc(xc_pre, cc_, ph_c, refs)
                continue
            ar, a2 = refs if isinstance(refs, tuple) else prepare_refs(refs)
            if a2 is None:
                a2 = stacked_power(ar)
            if ar.ndim == 2:
                cross = (y.reshape(b * n_t, 2 * mc) @ ar.T).reshape(b, n_t, -1)
                norm = c2 @ a2.T  # (B, r)
            else:
                cross = torch.bmm(y, ar.transpose(1, 2))
                norm = torch.bmm(c2[:, None, :], a2.transpose(1, 2))[:, 0]
            scores[:, :, kc, s:e] = cross - 0.5 * norm[:, None, :]
    return scores


def coarse_scores(batch: BatchData, comps: FourierComponents, inv_sigma2: torch.Tensor,
                  projectors: Sequence[Projector], orient: Orientations, trans_points: torch.Tensor,
                  opts: EStepOptions, coarse_refs=None) -> torch.Tensor:
    """Coarse-pass scores of every (translation, class, rotation) of a batch or a group of batches.

    Rotations are scored in chunks of ``opts.memory_bytes``; without ``coarse_refs`` each chunk
    is projected once for all B particles, so a larger B shares each projection more widely.

    Parameters
    ----------
    batch : BatchData
        B particles at the coarse components of ``comps`` (M = Mc).
    comps : FourierComponents
        The Mc coarse components.
    inv_sigma2 : torch.Tensor
        (Mc,) 1 / noise power.
    projectors : sequence of Projector
        The K references.
    orient : Orientations
        Shared (R, d, d) or per-particle (B, R, d, d) coarse rotations.
    trans_points : torch.Tensor
        (T, d) coarse translations [px] relative to ``batch.prev_offset_px``.
    opts : EStepOptions
        CC mode and chunk memory.
    coarse_refs : optional
        Precomputed references as for :func:`expectation_batch`.

    Returns
    -------
    torch.Tensor
        (B, T, K, R) log-likelihoods (or normalised CC with ``opts.cc``).
    """
    every = torch.ones(comps.m, dtype=torch.bool, device=comps.k.device)
    return _coarse_scores(batch, comps, every, inv_sigma2, projectors, orient, trans_points, opts, coarse_refs)


def _coarse_refs(projector: Projector, orient: Orientations, coarse_refs, kc: int, s: int, e: int, k_c: torch.Tensor):
    """Class ``kc`` at coarse rotations s:e: precomputed (shared grid) or projected now."""
    if not orient.shared:
        return (project_stacked(projector, orient.coarse[:, s:e], k_c), None)
    if isinstance(coarse_refs, tuple):
        power = coarse_refs[1][kc, s:e] if coarse_refs[1] is not None else None
        return (coarse_refs[0][kc, s:e], power)
    if coarse_refs is not None:
        return coarse_refs[kc, s:e]
    return (project_stacked(projector, orient.coarse[s:e], k_c), None)


@dataclass
class _Significant:
    """The significant coarse points of each particle: count (B,), and (B, P) translation/class/rotation indices."""

    count: torch.Tensor
    valid: torch.Tensor
    t_idx: torch.Tensor
    k_idx: torch.Tensor
    r_idx: torch.Tensor

    @property
    def p(self) -> int:
        return int(self.valid.shape[1])


def significant_coarse_points(log_w: torch.Tensor, fraction: float, max_significant: int, per_class: bool = False,
                              min_significant: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose the coarse points carried to the fine pass.

    Default: the smallest set of (t, k, r) holding ``fraction`` of each particle's posterior
    mass (at most ``max_significant``). ``per_class``: that selection within every class
    separately (posterior over (t, r) given k), so that no class is dropped on the coarse grid.
    When the posterior is sharp (Pmax ~ 1), one coarse grid step costs more log-likelihood than
    the difference between similar classes, and a joint selection lets the grid, not the data,
    pick the class: particles then drift to the blurrier reference (a class with few particles,
    more strongly regularised), which fits a misaligned particle better, and a spare class fills
    up (issue 22). At least ``min_significant`` points
    (per class with ``per_class``) are kept whatever their weight.

    Parameters
    ----------
    log_w : torch.Tensor
        (B, T, K, R) coarse log-weights (log-likelihood plus log-priors).
    fraction : float
        Posterior mass to keep (RELION's adaptive_fraction, 0.999).
    max_significant : int
        Most points per particle (per class with ``per_class``).
    per_class : bool
        Select within each class.
    min_significant : int
        Fewest points per particle (per class with ``per_class``).

    Returns
    -------
    top : torch.Tensor
        (B, P) int64 flat indices over (T, K, R).
    valid : torch.Tensor
        (B, P) bool, which of the P columns are selected for each particle.
    count : torch.Tensor
        (B,) number of selected points per particle.
    """
    b, n_t, kcls, n_r = log_w.shape
    dev = log_w.device
    rows = log_w.reshape(b, -1) if not per_class or kcls == 1 else log_w.permute(0, 2, 1, 3).reshape(b * kcls, n_t * n_r)
    w_rows, _ = posterior(rows)
    # the largest max_significant points suffice (a full sort of T*K*R points per particle is slow)
    n_top = int(min(max_significant, w_rows.shape[1]))
    w_top, order = torch.topk(w_rows, n_top, dim=1)
    count = ((torch.cumsum(w_top, dim=1) < fraction).sum(1) + 1).clamp(min=min(min_significant, n_top), max=n_top)
    p = int(count.max())
    if not per_class or kcls == 1:
        valid = torch.arange(p, device=dev)[None, :] < count[:, None]
        return order[:, :p], valid, count
    count = count.reshape(b, kcls)
    sel = order[:, :p].reshape(b, kcls, p)  # index over (T, R) within each class
    k = torch.arange(kcls, device=dev)[None, :, None]
    flat = (sel // n_r) * (kcls * n_r) + k * n_r + sel % n_r
    valid = torch.arange(p, device=dev)[None, None, :] < count[:, :, None]
    return flat.reshape(b, kcls * p), valid.reshape(b, kcls * p), count.sum(1)


def _significant_points(scores: torch.Tensor, batch: BatchData, trans_points: torch.Tensor, orient: Orientations,
                        log_class_prior: torch.Tensor, opts: EStepOptions) -> _Significant:
    """Coarse posteriors; the smallest set of points holding ``fraction`` of each particle's mass."""
    b, _, kcls, n_r = scores.shape
    abs_t = batch.prev_offset_px[:, None, :] + trans_points[None]  # (B, T, d)
    lp_t = offset_log_prior(abs_t, batch.prior_offset_px[:, None, :], opts.sigma_offset_px)  # (B, T)
    if opts.cc:
        log_w = scores * 1e4  # effectively the best pose only
    else:
        log_w = scores + lp_t[:, :, None, None] + log_class_prior[None, None, :, None] + orient.log_prior[None, None, None, :]
    top, valid, count = significant_coarse_points(log_w, opts.fraction, opts.max_significant,
                                                  opts.significant_per_class, opts.min_significant)
    return _Significant(count, valid, top // (kcls * n_r), (top // n_r) % kcls, top % n_r)


def _shared_child_refs(projectors: Sequence[Projector], orient: Orientations, sig: _Significant, pairs: torch.Tensor,
                       k_all: torch.Tensor, memory_bytes: int):
    """For a shared grid: the children of each distinct (class, coarse rotation) of the batch, projected once.

    Returns (prepared refs, pair -> row index) or None when they would not fit in memory: they are
    held as stacked [Re | Im] and power only (12 bytes per component and child), at most
    2 ``memory_bytes``, and projected in chunks of ``memory_bytes`` / 4 (the complex copy and
    the whole-set projection of earlier versions took 20 bytes and up to 6 ``memory_bytes``;
    a 10 GB peak at box 128, bench/bench_engine.py).
    """
    b, p = sig.valid.shape
    n_r, n_cr, m = orient.coarse.shape[-3], orient.children.shape[-3], k_all.shape[0]
    key = (sig.k_idx.reshape(-1) * n_r + sig.r_idx.reshape(-1))[pairs]
    ukey, inv = torch.unique(key, return_inverse=True)
    if len(ukey) * n_cr * m * 12 > 2 * memory_bytes:
        return None
    stacked = torch.empty(len(ukey), n_cr, 2 * m, dtype=torch.float32, device=k_all.device)
    uk, ur = ukey // n_r, ukey % n_r
    step = max(1, memory_bytes // (4 * n_cr * m * 40))  # 8 B output + about 32 B of projection temporaries
    for kc in range(len(projectors)):
        sel = torch.nonzero(uk == kc).squeeze(1)
        for s, e in _chunks(len(sel), step):
            stacked[sel[s:e]] = project_stacked(projectors[kc], orient.children[ur[sel[s:e]]], k_all)
    pair_ref = torch.full((b * p,), -1, dtype=torch.long, device=k_all.device)
    pair_ref[pairs] = inv
    return (stacked, stacked_power(stacked)), pair_ref


def _chunk_child_refs(projectors: Sequence[Projector], sig: _Significant, pr: torch.Tensor, rot_flat: torch.Tensor,
                      n_r: int, k_all: torch.Tensor) -> torch.Tensor:
    """Children of the pairs ``pr``: each distinct (particle, class, rotation) of the chunk projected once.

    Significant points of one particle that differ only in translation share their rotation children.
    """
    kcls, dev = len(projectors), k_all.device
    b, p = sig.valid.shape
    flat_b = torch.arange(b, device=dev)[:, None].expand(b, p).reshape(-1)
    flat_k = sig.k_idx.reshape(-1)
    pb = flat_b[pr]
    ck = (pb * kcls + flat_k[pr]) * n_r + sig.r_idx.reshape(-1)[pr]
    uk, inv = torch.unique(ck, return_inverse=True)
    first = torch.zeros(len(uk), dtype=torch.long, device=dev).scatter_(0, inv, torch.arange(len(pr), device=dev))
    urefs = torch.zeros(len(uk), rot_flat.shape[1], k_all.shape[0], dtype=torch.complex64, device=dev)
    for kc in range(kcls):
        sel = torch.nonzero(flat_k[pr[first]] == kc).squeeze(1)
        if len(sel):
            urefs[sel] = projectors[kc].project(rot_flat[pr[first[sel]]], k_all)
    return urefs[inv]


@dataclass
class _FineGrid:
    """Oversampled children of the significant points: rotations (B, P, Cr, d, d), offsets (B, P, Ct, d), priors."""

    rot: torch.Tensor
    offset: torch.Tensor
    lp_rot: torch.Tensor
    lp_t: torch.Tensor


def _fine_grid(batch: BatchData, orient: Orientations, sig: _Significant, trans_children: torch.Tensor,
               opts: EStepOptions) -> _FineGrid:
    b, p = sig.valid.shape
    bi = torch.arange(b, device=batch.x.device)[:, None].expand(b, p)
    child_rot = orient.children[sig.r_idx] if orient.shared else orient.children[bi, sig.r_idx]  # (B, P, C, d, d)
    child_lp_rot = orient.child_log_prior[sig.r_idx]  # (B, P, C)
    child_t = batch.prev_offset_px[:, None, None, :] + trans_children[sig.t_idx]  # (B, P, Ct, d)
    child_lp_t = offset_log_prior(child_t, batch.prior_offset_px[:, None, None, :], opts.sigma_offset_px)
    return _FineGrid(child_rot, child_t, child_lp_rot, child_lp_t)


def _fine_scores(batch: BatchData, comps: FourierComponents, inv_sigma2: torch.Tensor, projectors: Sequence[Projector],
                 orient: Orientations, sig: _Significant, grid: _FineGrid, n_t: int, trans_children: torch.Tensor,
                 opts: EStepOptions) -> torch.Tensor:
    """Fine-pass scores (B, P, Ct, Cr) of the children of the significant points (-inf where padded)."""
    x, ctf = batch.x, batch.ctf
    b, p = sig.valid.shape
    m, k_all, dev = comps.m, comps.k, x.device
    n_ct, n_cr, n_r = trans_children.shape[1], orient.children.shape[-3], orient.coarse.shape[-3]
    fine = torch.full((b, p, n_ct, n_cr), -math.inf, device=dev)
    pairs = torch.nonzero(sig.valid.reshape(-1)).squeeze(1)
    # per pair: ramps, shifted particle and its stacked CTF-weighted copy (32 B per translation and
    # component), children as complex, stacked and power with temporaries (28 B per child and component)
    per_pair = m * (32 * n_ct + 28 * n_cr)
    pair_chunk = max(1, opts.memory_bytes // max(per_pair, 1))
    flat_b = torch.arange(b, device=dev)[:, None].expand(b, p).reshape(-1)
    rot_flat = grid.rot.reshape(b * p, n_cr, *grid.rot.shape[-2:])
    t_flat = grid.offset.reshape(b * p, n_ct, -1)
    fine_flat = fine.view(b * p, n_ct, n_cr)
    # translation = previous offset + child offset: ramps factorise, so the children's ramps
    # are computed once per batch and the particles pre-shifted once
    ramps_c = None
    if n_t * n_ct * m * 8 <= opts.memory_bytes:
        ramps_c = comps.phase_ramps(trans_children)  # (T, Ct, M)
        x_pre = x * comps.phase_ramps(batch.prev_offset_px)
        t_pair = sig.t_idx.reshape(-1)
    shared = _shared_child_refs(projectors, orient, sig, pairs, k_all, opts.memory_bytes) if orient.shared else None
    for s, e in _chunks(len(pairs), pair_chunk):
        pr = pairs[s:e]
        pb = flat_b[pr]
        refs: tuple[torch.Tensor, torch.Tensor] | torch.Tensor
        if shared is not None:
            j = shared[1][pr]
            refs = (shared[0][0][j], shared[0][1][j])
        else:
            refs = _chunk_child_refs(projectors, sig, pr, rot_flat, n_r, k_all)
        if ramps_c is not None:
            xb, ph = x_pre[pb], ramps_c[t_pair[pr]]
        else:
            xb, ph = x[pb], comps.phase_ramps(t_flat[pr])  # (n, Ct, M)
        if opts.cc:
            fine_flat[pr] = normalised_cc(xb, ctf[pb], ph, refs) * 1e4
        else:
            fine_flat[pr] = log_likelihood(xb, ctf[pb], inv_sigma2, ph, refs)
    return fine


def _kept_poses(fine: torch.Tensor, sig: _Significant, grid: _FineGrid, log_class_prior: torch.Tensor,
                opts: EStepOptions) -> tuple[BatchPosterior, torch.Tensor]:
    """Fine posteriors; the poses holding ``fraction`` of the mass (at most ``max_keep``); and log-sum-exp (B,)."""
    b, p, n_ct, n_cr = fine.shape
    dev = fine.device
    if not opts.cc:
        fine = (fine + grid.lp_t[:, :, :, None] + grid.lp_rot[:, :, None, :]
                + log_class_prior[sig.k_idx][:, :, None, None])
    w_f, lse = posterior(fine)
    wf = w_f.reshape(b, -1)
    max_prob = wf.max(1).values
    keep_n, order_f = significant_count(wf, opts.fraction)
    q = int(min(int(keep_n.max()), opts.max_keep, wf.shape[1]))
    topf = order_f[:, :q]
    wk = torch.gather(wf, 1, topf)
    wk = torch.where(torch.arange(q, device=dev)[None, :] < keep_n[:, None], wk, torch.zeros_like(wk))
    wk = wk / wk.sum(1, keepdim=True).clamp(min=1e-30)
    pi = topf // (n_ct * n_cr)
    ti = (topf // n_cr) % n_ct
    ri = topf % n_cr
    bq = torch.arange(b, device=dev)[:, None].expand(b, q)
    post = BatchPosterior(grid.rot[bq, pi, ri], grid.offset[bq, pi, ti], sig.k_idx[bq, pi], wk, max_prob,
                          torch.zeros(b, device=dev), sig.count)
    return post, lse


def expectation_batch(batch: BatchData, comps: FourierComponents, coarse_mask: torch.Tensor,
                      inv_sigma2: torch.Tensor, projectors: Sequence[Projector], orient: Orientations,
                      trans_points: torch.Tensor, trans_children: torch.Tensor, log_class_prior: torch.Tensor,
                      opts: EStepOptions, coarse_refs=None, fine_mask: torch.Tensor | None = None,
                      coarse_scores: torch.Tensor | None = None) -> BatchPosterior:
    """Two-pass E-step of one batch; see the module docstring.

    Parameters
    ----------
    batch : BatchData
        B particles: masked transforms and CTFs (B, M) at the components of ``comps``, offsets (B, d) px.
    comps : FourierComponents
        The current-size components (M).
    coarse_mask : torch.Tensor
        (M,) bool, the components of the coarse pass.
    inv_sigma2 : torch.Tensor
        (M,) 1 / noise power.
    projectors : sequence of Projector
        The K references.
    orient : Orientations
        Coarse rotations (R, d, d) shared, or (B, R, d, d) per particle, their children and log priors.
    trans_points, trans_children : torch.Tensor
        (T, d) coarse and (T, Ct, d) oversampled translations [px] relative to ``batch.prev_offset_px``.
    log_class_prior : torch.Tensor
        (K,) log class priors.
    opts : EStepOptions
        Significance, limits, offset prior, cross-correlation mode, memory.
    coarse_refs : optional
        (K, R, Mc) complex from :func:`precompute_refs`, or that passed through
        :func:`prepare_refs`, for shared orientations (computed here when None).
    fine_mask : torch.Tensor, optional
        (M,) bool: the components scored in the fine pass (default all; components where
        every reference is zero add nothing).
    coarse_scores : torch.Tensor, optional
        (B, T, K, R) coarse-pass scores computed beforehand (:func:`coarse_scores`, e.g. for a
        group of particles sharing the projections); skips the coarse scoring here.

    Returns
    -------
    BatchPosterior
        Kept poses (B, P), weights, Pmax, log-likelihood contributions and significant counts.
    """
    kcls = len(projectors)
    if log_class_prior.numel() != kcls:  # would broadcast the scores to more classes than references
        raise ValueError(f"log_class_prior has {log_class_prior.numel()} classes for {kcls} references")
    scores = coarse_scores if coarse_scores is not None else _coarse_scores(
        batch, comps, coarse_mask, inv_sigma2, projectors, orient, trans_points, opts, coarse_refs)
    sig = _significant_points(scores, batch, trans_points, orient, log_class_prior, opts)
    x_all, inv_s2_all = batch.x, inv_sigma2
    fine_batch = batch
    if fine_mask is not None and not bool(fine_mask.all()):
        comps = comps.select(fine_mask)
        fine_batch = dataclasses.replace(batch, x=batch.x[:, fine_mask], ctf=batch.ctf[:, fine_mask])
        inv_sigma2 = inv_sigma2[fine_mask]
    grid = _fine_grid(batch, orient, sig, trans_children, opts)
    fine = _fine_scores(fine_batch, comps, inv_sigma2, projectors, orient, sig, grid, trans_points.shape[0],
                        trans_children, opts)
    post, lse = _kept_poses(fine, sig, grid, log_class_prior, opts)
    post.log_lik = lse + constant_term(x_all, inv_s2_all) if not opts.cc else lse * 0
    return post
