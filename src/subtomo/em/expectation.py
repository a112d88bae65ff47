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

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from subtomo.em.components import FourierComponents


class Projector(Protocol):
    """A reference that can be sampled at A^T k: 3D (:class:`subtomo.em.projector3d.Projector3D`) or 2D."""

    def project(self, rotations: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """rotations (..., d, d), k (M, d) -> (..., M) complex64."""
        ...


# ---------------------------------------------------------------- scoring kernels
def _stack_real(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z.real, z.imag], dim=-1)


def score_terms(x: torch.Tensor, ctf: torch.Tensor, inv_sigma2: torch.Tensor, phases: torch.Tensor,
                refs) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross and norm terms of the likelihood.

    x (B, M) complex, ctf (B, M) real, inv_sigma2 (M,) or (B, M), phases (T, M) or (B, T, M),
    refs (R, M) shared by all particles or (B, R, M) per particle (complex), or a pair
    (stacked [Re, Im] (R, 2M), power |A|^2 (R, M)) prepared once by :func:`prepare_refs`.
    Returns cross (B, T, R) = Re sum conj(x phi) C w A and norm (B, R) = sum C^2 w |A|^2.
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
    """(stacked [Re, Im] (..., 2M), power (..., M)) of complex references, for repeated scoring."""
    return _stack_real(refs).contiguous(), (refs.real ** 2 + refs.imag ** 2).contiguous()


def project_stacked(projector: Projector, rotations: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """References as stacked [Re, Im] (..., 2M), directly where the projector can (3D), else via complex."""
    direct = getattr(projector, "project_stacked", None)
    return direct(rotations, k) if direct is not None else _stack_real(projector.project(rotations, k))


def stacked_power(stacked: torch.Tensor) -> torch.Tensor:
    """|A|^2 (..., M) from stacked [Re, Im] references (..., 2M)."""
    m = stacked.shape[-1] // 2
    return stacked[..., :m] ** 2 + stacked[..., m:] ** 2


def log_likelihood(x, ctf, inv_sigma2, phases, refs) -> torch.Tensor:
    """L(b, t, r) = cross - norm/2 (B, T, R): the Gaussian log-likelihood up to a per-particle constant."""
    cross, norm = score_terms(x, ctf, inv_sigma2, phases, refs)
    return cross - 0.5 * norm[:, None, :]


def normalised_cc(x, ctf, phases, refs) -> torch.Tensor:
    """Normalised cross-correlation Re sum conj(x phi) C A / (|x| |C A|) (B, T, R) (RELION --firstiter_cc)."""
    ones = torch.ones(x.shape[-1], device=x.device, dtype=ctf.dtype)
    cross, norm = score_terms(x, ctf, ones, phases, refs)
    xn = (x.real ** 2 + x.imag ** 2).sum(-1).sqrt()  # (B,)
    return cross / (norm.clamp(min=1e-30).sqrt()[:, None, :] * xn[:, None, None].clamp(min=1e-30))


def constant_term(x: torch.Tensor, inv_sigma2: torch.Tensor) -> torch.Tensor:
    """-1/2 sum |x|^2 w per particle (B,): completes :func:`log_likelihood` to the full log-likelihood."""
    return -0.5 * ((x.real ** 2 + x.imag ** 2) * inv_sigma2).sum(-1)


def posterior(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise log-weights over all but the first dim: (weights summing to 1 per row, log-sum-exp (B,))."""
    flat = log_w.reshape(log_w.shape[0], -1)
    lse = torch.logsumexp(flat, dim=1)
    return torch.exp(flat - lse[:, None]).reshape(log_w.shape), lse


def significant_count(weights: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest number of points per row holding ``fraction`` of the mass; also the sort order.

    weights (B, P) normalised per row -> (counts (B,), order (B, P) descending).
    """
    w, order = torch.sort(weights, dim=1, descending=True)
    cum = torch.cumsum(w, dim=1)
    count = (cum < fraction).sum(1) + 1
    return count.clamp(max=weights.shape[1]), order


def offset_log_prior(offsets_px: torch.Tensor, centre_px: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Isotropic Gaussian log prior of absolute offsets (..., d) about centres broadcastable to them."""
    d2 = ((offsets_px - centre_px) ** 2).sum(-1)
    return -d2 / (2 * max(sigma_px, 1e-3) ** 2)


# ---------------------------------------------------------------- the driver
@dataclass
class EStepOptions:
    fraction: float = 0.999  # adaptive_fraction
    max_significant: int = 48  # coarse points carried to the fine pass, per particle
    max_keep: int = 12  # fine poses kept per particle for the M-step
    sigma_offset_px: float = 3.0
    cc: bool = False  # normalised cross-correlation + best pose only (first iteration, relative grey-scale)
    memory_bytes: int = 512 * 2 ** 20  # working-set bound for one chunk


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
    """Rotate every class once for a shared rotation set: (K, R, M) complex."""
    return torch.stack([p.project(rotations, k) for p in projectors])


def precompute_stacked_refs(projectors: Sequence[Projector], rotations: torch.Tensor, k: torch.Tensor,
                            chunk_bytes: int = 256 * 2 ** 20) -> tuple[torch.Tensor, None]:
    """Every class rotated once, stored only as stacked [Re, Im] (K, R, 2M) float32.

    Filled chunk by chunk, so the peak is this array plus one chunk (not the complex array,
    its stacked copy and the power together); the power |A|^2 is recomputed per scoring
    chunk (:func:`stacked_power`, cheap next to the GEMM). Pass as ``coarse_refs``.
    """
    n_r, m = rotations.shape[0], k.shape[0]
    out = torch.empty(len(projectors), n_r, 2 * m, dtype=torch.float32, device=k.device)
    step = max(1, chunk_bytes // max(1, 8 * m))
    for kc, projector in enumerate(projectors):
        for s, e in _chunks(n_r, step):
            out[kc, s:e] = project_stacked(projector, rotations[s:e], k)
    return out, None


def _chunks(n: int, size: int):
    size = max(1, int(size))
    for s in range(0, n, size):
        yield s, min(n, s + size)


def expectation_batch(batch: BatchData, comps: FourierComponents, coarse_mask: torch.Tensor,
                      inv_sigma2: torch.Tensor, projectors: Sequence[Projector], orient: Orientations,
                      trans_points: torch.Tensor, trans_children: torch.Tensor, log_class_prior: torch.Tensor,
                      opts: EStepOptions, coarse_refs=None, fine_mask: torch.Tensor | None = None) -> BatchPosterior:
    """Two-pass E-step of one batch; see the module docstring.

    comps: current-size components (M); coarse_mask (M,) bool selects the coarse-pass ones;
    inv_sigma2 (M,); trans_points (T, d), trans_children (T, Ct, d) px relative to
    ``batch.prev_offset_px``; log_class_prior (K,); coarse_refs (K, R, Mc) complex from
    :func:`precompute_refs`, or that passed through :func:`prepare_refs`, for shared
    orientations (computed here when None); fine_mask (M,) bool: the components scored in
    the fine pass (default all; components where every reference is zero add nothing).
    """
    x, ctf = batch.x, batch.ctf
    dev = x.device
    b, m = x.shape
    kcls = len(projectors)
    if log_class_prior.numel() != kcls:  # would broadcast the scores to more classes than references
        raise ValueError(f"log_class_prior has {log_class_prior.numel()} classes for {kcls} references")
    n_t = trans_points.shape[0]
    k_all = comps.k
    k_c = k_all[coarse_mask]
    mc = k_c.shape[0]
    xc, cc_, wc = x[:, coarse_mask], ctf[:, coarse_mask], inv_sigma2[coarse_mask]

    # ---- coarse pass
    pre = comps.phase_ramps(batch.prev_offset_px)  # (B, M)
    xc_pre = xc * pre[:, coarse_mask]
    ph_c = comps.phase_ramps(trans_points)[:, coarse_mask]  # (T, Mc)
    n_r = orient.coarse.shape[-3]
    scores = torch.empty(b, n_t, kcls, n_r, device=dev)
    per_elem = 4 * (2 * mc * max(n_t * (b if not orient.shared else 1), 1) + b * n_t) + 16 * mc
    r_chunk = max(1, opts.memory_bytes // max(per_elem, 1))
    if not opts.cc:
        # the translated, CTF- and noise-weighted particles once per batch: (B*T, 2Mc) for every chunk's GEMM
        cs = cc_ * wc
        xs = xc_pre[:, None, :] * ph_c  # (B, T, Mc)
        y = torch.cat([xs.real * cs[:, None], xs.imag * cs[:, None]], dim=-1)
        del xs
        c2 = cc_ * cc_ * wc
    for kc in range(kcls):
        for s, e in _chunks(n_r, r_chunk):
            if orient.shared:
                if isinstance(coarse_refs, tuple):
                    power = coarse_refs[1][kc, s:e] if coarse_refs[1] is not None else None
                    refs = (coarse_refs[0][kc, s:e], power)
                elif coarse_refs is not None:
                    refs = coarse_refs[kc, s:e]
                else:
                    refs = projectors[kc].project(orient.coarse[s:e], k_c)
            else:
                refs = (project_stacked(projectors[kc], orient.coarse[:, s:e], k_c), None)
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
    abs_t = batch.prev_offset_px[:, None, :] + trans_points[None]  # (B, T, d)
    lp_t = offset_log_prior(abs_t, batch.prior_offset_px[:, None, :], opts.sigma_offset_px)  # (B, T)
    if opts.cc:
        log_w = scores * 1e4  # effectively the best pose only
    else:
        log_w = scores + lp_t[:, :, None, None] + log_class_prior[None, None, :, None] + orient.log_prior[None, None, None, :]
    w_c, _ = posterior(log_w)
    w_flat = w_c.reshape(b, -1)
    # the largest max_significant points suffice (a full sort of T*K*R points per particle is slow)
    n_top = int(min(opts.max_significant, w_flat.shape[1]))
    w_top, order = torch.topk(w_flat, n_top, dim=1)
    count = ((torch.cumsum(w_top, dim=1) < opts.fraction).sum(1) + 1).clamp(max=n_top)
    p = int(count.max())
    top = order[:, :p]  # (B, P) flat index over (T, K, R)
    valid = torch.arange(p, device=dev)[None, :] < count[:, None]
    t_idx = top // (kcls * n_r)
    k_idx = (top // n_r) % kcls
    r_idx = top % n_r

    # ---- fine pass on the oversampled children of the significant coarse points
    x_all, inv_s2_all = x, inv_sigma2
    if fine_mask is not None and not bool(fine_mask.all()):
        comps = comps.select(fine_mask)
        x, ctf, inv_sigma2 = x[:, fine_mask], ctf[:, fine_mask], inv_sigma2[fine_mask]
        k_all = comps.k
        m = comps.m
    n_ct = trans_children.shape[1]
    n_cr = orient.children.shape[-3]
    bi = torch.arange(b, device=dev)[:, None].expand(b, p)
    if orient.shared:
        child_rot = orient.children[r_idx]  # (B, P, C, d, d)
    else:
        child_rot = orient.children[bi, r_idx]
    child_lp_rot = orient.child_log_prior[r_idx]  # (B, P, C)
    child_t = batch.prev_offset_px[:, None, None, :] + trans_children[t_idx]  # (B, P, Ct, d)
    child_lp_t = offset_log_prior(child_t, batch.prior_offset_px[:, None, None, :], opts.sigma_offset_px)
    fine = torch.full((b, p, n_ct, n_cr), -math.inf, device=dev)
    pairs = torch.nonzero(valid.reshape(-1)).squeeze(1)
    per_pair = 4 * (n_ct * 2 * m + 3 * n_cr * m + n_ct * m * 2)
    pair_chunk = max(1, opts.memory_bytes // max(per_pair, 1))
    flat_b = bi.reshape(-1)
    flat_k = k_idx.reshape(-1)
    rot_flat = child_rot.reshape(b * p, n_cr, *child_rot.shape[-2:])
    t_flat = child_t.reshape(b * p, n_ct, -1)
    fine_flat = fine.view(b * p, n_ct, n_cr)
    # translation = previous offset + child offset: ramps factorise, so the children's ramps
    # are computed once per batch and the particles pre-shifted once
    ramps_c = None
    if n_t * n_ct * m * 8 <= opts.memory_bytes:
        ramps_c = comps.phase_ramps(trans_children)  # (T, Ct, M)
        x_pre = x * comps.phase_ramps(batch.prev_offset_px)
        t_pair = t_idx.reshape(-1)
    uniq_refs = None
    if orient.shared:
        # the children of one coarse rotation are the same for every particle and translation:
        # project each distinct (class, rotation) of the batch once
        key = (flat_k * n_r + r_idx.reshape(-1))[pairs]
        ukey, inv = torch.unique(key, return_inverse=True)
        if len(ukey) * n_cr * m * 8 <= 4 * opts.memory_bytes:
            uniq_refs = torch.empty(len(ukey), n_cr, m, dtype=torch.complex64, device=dev)
            uk, ur = ukey // n_r, ukey % n_r
            for kc in range(kcls):
                sel = torch.nonzero(uk == kc).squeeze(1)
                if len(sel):
                    uniq_refs[sel] = projectors[kc].project(orient.children[ur[sel]], k_all)
            pair_ref = torch.full((b * p,), -1, dtype=torch.long, device=dev)
            pair_ref[pairs] = inv
            uniq_refs = prepare_refs(uniq_refs)
    for s, e in _chunks(len(pairs), pair_chunk):
        pr = pairs[s:e]
        pb = flat_b[pr]
        if uniq_refs is not None:
            j = pair_ref[pr]
            refs = (uniq_refs[0][j], uniq_refs[1][j])
        else:
            # significant points of one particle that differ only in translation share their
            # rotation children: project each distinct (particle, class, rotation) of the chunk once
            ck = (pb * kcls + flat_k[pr]) * n_r + r_idx.reshape(-1)[pr]
            uk, inv = torch.unique(ck, return_inverse=True)
            first = torch.zeros(len(uk), dtype=torch.long, device=dev).scatter_(
                0, inv, torch.arange(len(pr), device=dev))
            urefs = torch.zeros(len(uk), n_cr, m, dtype=torch.complex64, device=dev)
            for kc in range(kcls):
                sel = torch.nonzero(flat_k[pr[first]] == kc).squeeze(1)
                if len(sel):
                    urefs[sel] = projectors[kc].project(rot_flat[pr[first[sel]]], k_all)
            refs = urefs[inv]
        if ramps_c is not None:
            xb, ph = x_pre[pb], ramps_c[t_pair[pr]]
        else:
            xb, ph = x[pb], comps.phase_ramps(t_flat[pr])  # (n, Ct, M)
        if opts.cc:
            sc = normalised_cc(xb, ctf[pb], ph, refs) * 1e4
        else:
            sc = log_likelihood(xb, ctf[pb], inv_sigma2, ph, refs)
        fine_flat[pr] = sc
    if not opts.cc:
        fine = (fine + child_lp_t[:, :, :, None] + child_lp_rot[:, :, None, :]
                + log_class_prior[k_idx][:, :, None, None])
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
    rot_out = child_rot[bq, pi, ri]
    off_out = child_t[bq, pi, ti]
    cls_out = k_idx[bq, pi]
    log_lik = lse + constant_term(x_all, inv_s2_all) if not opts.cc else lse * 0
    return BatchPosterior(rot_out, off_out, cls_out, wk, max_prob, log_lik, count)
