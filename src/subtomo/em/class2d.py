"""Reference-free 2D classification (protocol Step 15) on the shared likelihood engine.

RELION's 2D classification (relion-internals §3.1, §3.3, §3.8, §3.9): K class averages
start as averages of random subsets in random in-plane orientations; each iteration runs
the engine's two-pass E-step (:func:`subtomo.em.expectation.expectation_batch`: coarse psi
step 2x the fine one and coarse offsets 2x the fine step, adaptive oversampling 1, 99.9 %
significance) on zero-masked images, accumulates the additive sufficient statistics
(:func:`subtomo.em.maximisation.accumulate`, unmasked data splatted by :func:`insert2d`
into a ``pad``-times oversampled 2D grid), then updates sigma^2, tau^2 (power of the
previous averages), class priors and the offset prior, reconstructs the regularised
averages ``V = data / (weight + 1/(p^2 T tau^2))`` with gridding correction, flattens the
solvent with the particle mask and sets the next resolution from data_vs_prior.

The random numbers of iteration ``it`` come from ``(seed, it)`` only, so an interrupted
run continued from its saved state gives the same result as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np
import torch

from subtomo.em.components import FourierComponents, fourier_components
from subtomo.em.expectation import BatchData, BatchPosterior, EStepOptions, Orientations, expectation_batch, precompute_refs
from subtomo.em.model import EMModel
from subtomo.em.reconstruct import resolution_shell
from subtomo.em.rotations2d import (
    apply_plan,
    back_rotate2d,
    bilinear_plan,
    components_to_rfft_grid,
    oversampled_psi_deg,
    padded_rfft2d,
    psi_grid_deg,
    psi_step_adjusted,
    rotation_matrices_2d,
    sample_rfft2d,
)
from subtomo.em.sampling import TranslationSet, translation_grid
from subtomo.fourier import fft_centered, ifft_centered, pad_rfft, soft_sphere_mask

# ----------------------------------------------------------------------------- 2D projector and sums


class Projector2D:
    """Samples REF(A^T k) of one 2D reference (N, N) on a ``pad``-times oversampled rfft (bilinear).

    :meth:`cache` pre-computes the rotated reference for every angle of a fixed grid at a
    fixed component set; later :meth:`project` calls with rotations of that grid and that
    component set are table look-ups (the engine's fine pass and the noise sums ask for the
    same few thousand rotated references many times per iteration).
    """

    def __init__(self, image: torch.Tensor, pad: int = 2) -> None:
        self.pad = pad
        self.ft = padded_rfft2d(image[None].float(), pad, gridding=True)[0]
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor, float, float]] = {}

    def _sample(self, rotations: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q = torch.matmul(k.to(rotations.dtype), rotations)  # (..., M, 2) = (A^T k)^T
        return sample_rfft2d(self.ft, q * self.pad)

    def cache(self, psi0_deg: float, step_deg: float, n_angles: int, k: torch.Tensor,
              table: torch.Tensor | None = None) -> None:
        """Tabulate the rotated reference at psi0 + j step (j < n_angles) for components ``k``.

        With ``table`` (n_angles, M), store that (computed by :func:`cache_projectors`) instead.
        """
        if table is None:
            psi = psi0_deg + step_deg * torch.arange(n_angles, dtype=torch.float64)
            table = self._sample(rotation_matrices_2d(psi).float().to(k.device), k)
        self._tables[id(k)] = (k, table, psi0_deg, step_deg)

    def project(self, rotations: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Rotations (..., 2, 2), k (M, 2) index units of the N box -> (..., M) complex64."""
        entry = self._tables.get(id(k))
        if entry is not None and entry[0] is k:
            _, table, psi0, step = entry
            pos = torch.remainder(psi_from_matrix(rotations.double()) - psi0, 360.0) / step
            j = torch.round(pos)
            if float((pos - j).abs().max()) < 1e-3 if pos.numel() else True:
                return table[torch.remainder(j.long(), table.shape[0])]
        return self._sample(rotations, k)


def cache_projectors(projectors: list[Projector2D], psi0_deg: float, step_deg: float, n_angles: int,
                     k: torch.Tensor) -> None:
    """Tabulate all classes at once on an angle grid (the interpolation plan is shared by the classes).

    Parameters
    ----------
    projectors : list of Projector2D
        The K references.
    psi0_deg, step_deg : float
        First angle and step of the grid [deg].
    n_angles : int
        Number of angles J.
    k : torch.Tensor
        (M, 2) components in index units (the table is keyed by this tensor).
    """
    psi = psi0_deg + step_deg * torch.arange(n_angles, dtype=torch.float64)
    rot = rotation_matrices_2d(psi).float().to(k.device)
    pad = projectors[0].pad
    p, h = projectors[0].ft.shape
    plan = bilinear_plan(torch.matmul(k.to(rot.dtype), rot) * pad, p, h)
    flat = torch.stack([pr.ft.reshape(-1) for pr in projectors])
    tables = apply_plan(flat, plan)  # (K, J, M)
    for pr, tab in zip(projectors, tables):
        pr.cache(psi0_deg, step_deg, n_angles, k, tab)


@dataclass
class Stats2D:
    """Additive sufficient statistics of one iteration of 2D classification.

    ``data`` (K, J, M): sum of w X_t over the poses of class k at fine in-plane angle j, in
    the image frame at the current-size components (X_t: the unmasked particle translated
    by its offset); ``dc`` (K, J): the same for the zero frequency; ``wsum`` (K, J): the
    posterior mass. They are rotated into the reference frame once per iteration
    (:func:`subtomo.em.rotations2d.back_rotate2d`). Noise, offset and likelihood sums as in
    :class:`subtomo.em.maximisation.SufficientStats`. ``a + b`` adds two partial sums.
    """

    data: torch.Tensor
    dc: torch.Tensor
    wsum: torch.Tensor
    sigma2_num: torch.Tensor  # (n_shells,) sum w |X_masked,t - A|^2
    sigma2_den: torch.Tensor  # (n_shells,) components x particles
    offset2: torch.Tensor  # () sum w |t|^2 (prior centre 0)
    offset_w: torch.Tensor
    log_lik: torch.Tensor
    n_particles: torch.Tensor

    @staticmethod
    def zeros(n_classes: int, n_angles: int, m: int, box: int, device=None) -> "Stats2D":
        """Empty sums for K classes, J angles, M components and an N box."""
        z = lambda *sh: torch.zeros(*sh, dtype=torch.float64, device=device)  # noqa: E731
        return Stats2D(torch.zeros(n_classes, n_angles, m, dtype=torch.complex64, device=device),
                       torch.zeros(n_classes, n_angles, dtype=torch.complex128, device=device),
                       z(n_classes, n_angles), z(box // 2 + 1), z(box // 2 + 1), z(()), z(()), z(()), z(()))

    def __add__(self, other: "Stats2D") -> "Stats2D":
        return Stats2D(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def class_weight(self) -> torch.Tensor:
        """(K,) posterior mass of each class."""
        return self.wsum.sum(1)


def angle_indices(rot: torch.Tensor, psi0_deg: float, step_deg: float, n_angles: int) -> torch.Tensor:
    """Index j on the grid psi0 + j * step of the in-plane angle of each matrix.

    Parameters
    ----------
    rot : torch.Tensor
        (..., 2, 2) in-plane rotations.
    psi0_deg, step_deg : float
        First angle and step of the grid [deg].
    n_angles : int
        Number of angles J (indices wrap around).

    Returns
    -------
    torch.Tensor
        (...) int64 in 0..J-1.
    """
    psi = psi_from_matrix(rot.double())
    return torch.remainder(torch.round(torch.remainder(psi - psi0_deg, 360.0) / step_deg).long(), n_angles)


def accumulate2d(stats: Stats2D, post: BatchPosterior, angle_index: torch.Tensor, x_unmasked: torch.Tensor,
                 x_masked: torch.Tensor, dc: torch.Tensor, comps: FourierComponents,
                 projectors: list | None = None) -> None:
    """Add one batch's weighted sums into ``stats`` (in place).

    Each kept pose adds w X_t (the unmasked particle translated by its offset, a phase ramp) to
    the row (class, fine angle) of ``stats.data``, w times the zero frequency to ``stats.dc`` and
    w to ``stats.wsum``; also the offset and log-likelihood sums. With ``projectors`` the noise
    sums (masked particle minus rotated reference) are added too.

    Parameters
    ----------
    stats : Stats2D
        Sums of K classes, J fine angles and M components, updated in place.
    post : BatchPosterior
        Kept poses (B, P) from the engine's E-step: ``rot`` (B, P, 2, 2), ``offset_px`` (B, P, 2)
        (x, y) [px] (rlnOrigin), ``cls`` (B, P), ``weight`` (B, P) (zero = padding).
    angle_index : torch.Tensor
        (B, P) int64 index of each pose's angle on the fine psi grid of ``stats`` (:func:`angle_indices`).
    x_unmasked : torch.Tensor
        (B, M) complex64 components (``comps``) of the unmasked particles' :func:`subtomo.fourier.fft_centered`
        transforms (grey values).
    x_masked : torch.Tensor
        (B, M) complex64 components of the masked particles (used for the noise sums only).
    dc : torch.Tensor
        (B,) complex zero frequency of the unmasked particles (the sum of their pixel values).
    comps : FourierComponents
        The M components (2D, index units of the N box).
    projectors : list of Projector2D, optional
        The K references; given, sigma^2 numerator and denominator sums per shell are added.

    Returns
    -------
    None
    """
    b, p = post.weight.shape
    k_cls, n_ang = stats.wsum.shape
    live = torch.nonzero(post.weight.reshape(-1) > 0).squeeze(1)
    bi = live // p
    w = post.weight.reshape(-1)[live].float()
    off = post.offset_px.reshape(b * p, -1)[live].float()
    cls = post.cls.reshape(-1)[live]
    row = cls * n_ang + angle_index.reshape(-1)[live]
    ph = comps.phase_ramps(off)
    stats.data.view(k_cls * n_ang, -1).index_add_(0, row, (w[:, None] * x_unmasked[bi] * ph).to(torch.complex64))
    stats.dc.view(-1).index_add_(0, row, w.double() * dc[bi].to(torch.complex128))
    stats.wsum.view(-1).index_add_(0, row, w.double())
    if projectors is not None:
        _add_noise_sums(stats, projectors, post.rot.reshape(b * p, 2, 2)[live], cls, w, x_masked[bi] * ph, comps, b)
    stats.offset2 += (w * (off ** 2).sum(-1)).sum().double()
    stats.offset_w += w.sum().double()
    stats.log_lik += post.log_lik.sum().double()
    stats.n_particles += float(b)


def _add_noise_sums(stats: Stats2D, projectors: list, rot: torch.Tensor, cls: torch.Tensor, w: torch.Tensor,
                    x_shifted: torch.Tensor, comps: FourierComponents, n_particles: int) -> None:
    """Add w |X_t - A_j V_k|^2 per shell (sigma^2 numerator) and the particle count (denominator) to ``stats``."""
    shell = comps.shell.clamp(max=stats.sigma2_num.shape[0] - 1)
    for kc in range(len(projectors)):
        sel = torch.nonzero(cls == kc).squeeze(1)
        if len(sel) == 0:
            continue
        res = x_shifted[sel] - projectors[kc].project(rot[sel], comps.k)
        r2 = (res.real ** 2 + res.imag ** 2) * w[sel, None]
        stats.sigma2_num.index_add_(0, shell, r2.sum(0).double())
    stats.sigma2_den.index_add_(0, shell, torch.full((comps.m,), float(n_particles), dtype=torch.float64,
                                                     device=shell.device))


def reconstruct2d(stats: Stats2D, psi_deg: torch.Tensor, comps: FourierComponents, sigma2: torch.Tensor,
                  tau2: torch.Tensor | None = None, tau2_fudge: float = 1.0, pad: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Class averages and data_vs_prior from one iteration's sums.

    The per-angle sums are rotated into the reference frame (padded, gridding-corrected
    interpolation); without a CTF the weight is radial, W_k / sigma^2(r), so the MAP average is
    V = sum / (W_k + sigma^2(r) / (T tau^2_k(r))) (RELION's reconstruct, §3.1) and
    data_vs_prior(r) = W_k T tau^2_k(r) / sigma^2(r) (§3.4). Without ``tau2``: the plain
    average. Zero beyond the current size; the mean (zero frequency) is the plain average.

    Parameters
    ----------
    stats : Stats2D
        One iteration's sums of K classes, J angles, M components (:func:`accumulate2d`).
    psi_deg : torch.Tensor
        (J,) the fine in-plane angles of ``stats`` [deg].
    comps : FourierComponents
        The M components of the sums (N box, current size s).
    sigma2 : torch.Tensor
        (N//2+1,) noise power per shell sigma^2(r) (of the fft_centered transforms, grey values squared).
    tau2 : torch.Tensor, optional
        (K, N//2+1) signal power per class and shell tau^2_k(r); None: plain average.
    tau2_fudge : float
        RELION's regularisation parameter T.
    pad : int
        Padding factor of the interpolation (:func:`subtomo.em.rotations2d.back_rotate2d`).

    Returns
    -------
    maps : torch.Tensor
        (K, N, N) float32 class averages, centre at N//2.
    data_vs_prior : torch.Tensor
        (K, N//2+1) float64 per shell; zero at shells >= s/2, all zero without ``tau2``.
    """
    box = comps.box
    n_sh = box // 2 + 1
    k_cls = stats.data.shape[0]
    dev = stats.data.device
    summed = back_rotate2d(stats.data, psi_deg, comps.idx, comps.k, comps.size, pad, True,
                           dc=stats.dc.to(torch.complex64)).to(torch.complex128)
    wk = stats.class_weight.to(dev)
    shell = comps.shell.clamp(max=n_sh - 1)
    s2 = sigma2.to(dev).double()
    if tau2 is None:
        v = summed / wk.clamp(min=1e-30)[:, None]
        dvp = torch.zeros(k_cls, n_sh, dtype=torch.float64, device=dev)
    else:
        t2 = tau2.to(dev).double()
        den = wk[:, None] + s2[shell][None] / (tau2_fudge * t2[:, shell].clamp(min=1e-300))
        v = torch.where(t2[:, shell] > 0, summed / den, torch.zeros_like(summed))
        dvp = wk[:, None] * tau2_fudge * t2 / s2.clamp(min=1e-300)[None]
        dvp[:, comps.size // 2:] = 0
    grid = components_to_rfft_grid(v.to(torch.complex64), comps.idx, comps.k, comps.size,
                                   (stats.dc.sum(1) / wk.clamp(min=1e-30)).to(torch.complex64))
    full = pad_rfft(grid, box, 2)
    return ifft_centered(full, (box, box)).float(), dvp


def tau2_from_power2d(maps: torch.Tensor) -> torch.Tensor:
    """Classification prior of 2D references: per-shell mean |V|^2 / 2.

    Parameters
    ----------
    maps : torch.Tensor
        (K, N, N) references.

    Returns
    -------
    torch.Tensor
        (K, N//2 + 1) float64.
    """
    n = maps.shape[-1]
    comps = fourier_components(n, n, 2, device=maps.device)
    f = comps.extract(fft_centered(maps, 2))
    p = (f.abs() ** 2).double() / 2
    out = torch.zeros(maps.shape[0], n // 2 + 1, dtype=torch.float64, device=maps.device)
    out.index_add_(1, comps.shell, p)
    cnt = torch.bincount(comps.shell, minlength=n // 2 + 1).double()
    return out / cnt.clamp(min=1)


# ----------------------------------------------------------------------------- settings and state


@dataclass
class Class2DSettings:
    """Settings of a 2D classification (RELION's names; pixel size and diameter Å, angles deg, offsets px)."""

    n_classes: int
    pixel_size_A: float
    particle_diameter_A: float
    tau2_fudge: float = 2.0
    psi_step_deg: float = 6.0  # fine (oversampled) step; the coarse pass uses twice this
    offset_range_px: float = 5.0
    offset_step_px: float = 1.0  # fine step; the coarse pass uses twice this
    highres_limit_A: float | None = 15.0  # E-step resolution limit
    initial_sigma_offset_px: float = 3.0
    fraction: float = 0.999
    max_significant: int = 48
    max_keep: int = 12
    incr_size: int = 10
    pad: int = 2
    mask_edge_px: float = 5.0
    batch_size: int = 256
    seed: int = 0


@dataclass
class Poses2D:
    """Per-particle state (numpy): class (0-based), psi (deg), origin (px, x y), E-step summaries."""

    cls: np.ndarray
    psi_deg: np.ndarray
    origin_px: np.ndarray
    max_prob: np.ndarray
    log_lik: np.ndarray
    n_sig: np.ndarray

    @staticmethod
    def new(n: int, origin_px: np.ndarray | None = None) -> "Poses2D":
        """Poses of ``n`` particles at class 0, psi 0 and the given (n, 2) origins [px] (default 0)."""
        o = np.zeros((n, 2)) if origin_px is None else np.asarray(origin_px, float).copy()
        return Poses2D(np.zeros(n, np.int64), np.zeros(n), o, np.zeros(n), np.zeros(n), np.zeros(n, np.int64))

    def state(self) -> dict:
        """Plain copies of the arrays (for ``torch.save``)."""
        return {k: getattr(self, k).copy() for k in ("cls", "psi_deg", "origin_px", "max_prob", "log_lik", "n_sig")}

    @staticmethod
    def from_state(s: dict) -> "Poses2D":
        """Inverse of :meth:`state`."""
        return Poses2D(**{k: np.asarray(v).copy() for k, v in s.items()})


@dataclass
class IterationInfo:
    """Summary of one 2D iteration: time s, resolution Å, size px, class/psi (deg)/offset (px) changes, Pmax."""

    iteration: int
    seconds: float
    resolution_A: float
    current_size: int
    class_change: float
    psi_change_deg: float
    offset_change_px: float
    average_pmax: float
    mean_significant: float
    class_resolution_A: list[float] = field(default_factory=list)


def particle_mask(box: int, settings: Class2DSettings, device=None) -> torch.Tensor:
    """The 2D mask of the images: a soft circle of the particle diameter, zero outside.

    Parameters
    ----------
    box : int
        Image size N [px].
    settings : Class2DSettings
        Particle diameter [Å], pixel size [Å] and the edge width [px].
    device : torch.device or str, optional
        Where the mask lives.

    Returns
    -------
    torch.Tensor
        (N, N) float32 in 0..1.
    """
    radius = settings.particle_diameter_A / (2 * settings.pixel_size_A)
    return soft_sphere_mask((box, box), radius, settings.mask_edge_px, device)


def psi_from_matrix(a: torch.Tensor) -> torch.Tensor:
    """In-plane angle of A = [[c, s], [-s, c]].

    Parameters
    ----------
    a : torch.Tensor
        (..., 2, 2) rotations.

    Returns
    -------
    torch.Tensor
        (...) psi [deg] in [0, 360).
    """
    return torch.remainder(torch.rad2deg(torch.atan2(a[..., 0, 1], a[..., 0, 0])), 360.0)


def _comps_for(box: int, shell_limit: int, device) -> FourierComponents:
    size = min(box, 2 * int(shell_limit))
    size -= size % 2
    return fourier_components(box, max(size, 4), 2, device=device)


def initial_sigma2(images: torch.Tensor, mask: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """RELION's start: sigma^2(r) = 1/2 (mean |X|^2 - |mean X|^2) of the masked images.

    Parameters
    ----------
    images : torch.Tensor
        (n, N, N) particle images.
    mask : torch.Tensor
        (N, N) soft mask.
    batch : int
        Images per batch.

    Returns
    -------
    torch.Tensor
        (N//2 + 1,) float64.
    """
    n = images.shape[-1]
    comps = fourier_components(n, n, 2, device=images.device)
    s1 = torch.zeros(comps.m, dtype=torch.complex128, device=images.device)
    s2 = torch.zeros(comps.m, dtype=torch.float64, device=images.device)
    for s in range(0, images.shape[0], batch):
        x = comps.extract(fft_centered(images[s:s + batch].float() * mask, 2))
        s1 += x.to(torch.complex128).sum(0)
        s2 += (x.abs() ** 2).double().sum(0)
    m = images.shape[0]
    var = (s2 / m - (s1 / m).abs() ** 2).clamp(min=0) / 2
    out = torch.zeros(n // 2 + 1, dtype=torch.float64, device=images.device).index_add_(0, comps.shell, var)
    cnt = torch.bincount(comps.shell, minlength=n // 2 + 1).double()
    res = out / cnt.clamp(min=1)
    res[0] = res[1]
    pos = res[res > 0]
    return torch.where(res > 0, res, pos.min() if len(pos) else torch.ones_like(res))


# ----------------------------------------------------------------------------- iterations


def fine_angles(settings: "Class2DSettings", rng: np.random.Generator | None, device=None
                ) -> tuple[Orientations, torch.Tensor, float]:
    """Coarse psi grid (step 2x ``psi_step_deg``, randomly perturbed) with its children.

    Parameters
    ----------
    settings : Class2DSettings
        The psi step [deg].
    rng : numpy.random.Generator or None
        Source of the perturbation (none without it).
    device : torch.device or str, optional
        Where the matrices live.

    Returns
    -------
    orientations : Orientations
        The engine's coarse rotations (R, 2, 2) and children (R, 2, 2, 2).
    psi_deg : torch.Tensor
        (J,) fine angles in grid order (child i of coarse c at index 2c + i) [deg].
    step_deg : float
        The fine step [deg].
    """
    step_c = psi_step_adjusted(2 * settings.psi_step_deg)
    perturb = float(rng.uniform(-0.5, 0.5)) if rng is not None else 0.0
    psi_c = psi_grid_deg(step_c, perturb=perturb)
    psi_f = oversampled_psi_deg(psi_c, step_c)  # (J, 2)
    coarse = rotation_matrices_2d(psi_c).float().to(device)
    children = rotation_matrices_2d(psi_f).float().to(device)
    orient = Orientations(coarse, children, torch.zeros(len(psi_c), device=device),
                          torch.zeros(children.shape[:2], device=device))
    return orient, psi_f.reshape(-1).to(device), step_c / 2


def _delta_posterior(rot: torch.Tensor, origin: torch.Tensor, cls: torch.Tensor) -> BatchPosterior:
    b = rot.shape[0]
    dev = origin.device
    return BatchPosterior(rot.float()[:, None], origin.float()[:, None], cls.long()[:, None], torch.ones(b, 1, device=dev),
                          torch.ones(b, device=dev), torch.zeros(b, device=dev), torch.ones(b, dtype=torch.long, device=dev))


def stats_for_poses(images: torch.Tensor, cls: np.ndarray, angle_index: np.ndarray, origin_px: np.ndarray,
                    psi_deg: torch.Tensor, n_classes: int, comps: FourierComponents, batch: int = 256) -> Stats2D:
    """Sums with a delta posterior at each particle's pose (class, angle psi_deg[angle_index], origin).

    Parameters
    ----------
    images : torch.Tensor
        (n, N, N) particle images.
    cls, angle_index : numpy.ndarray
        (n,) class (0-based) and fine-angle index of each particle.
    origin_px : numpy.ndarray
        (n, 2) origins [px].
    psi_deg : torch.Tensor
        (J,) fine angles [deg].
    n_classes : int
        Number of classes K.
    comps : FourierComponents
        The components of the sums.
    batch : int
        Images per batch.

    Returns
    -------
    Stats2D
    """
    dev = images.device
    stats = Stats2D.zeros(n_classes, len(psi_deg), comps.m, comps.box, device=dev)
    rot_all = rotation_matrices_2d(psi_deg.double())
    for s in range(0, images.shape[0], batch):
        sl = slice(s, s + batch)
        img = images[sl].float()
        x = comps.extract(fft_centered(img, 2))
        j = torch.as_tensor(angle_index[sl], device=dev).long()
        post = _delta_posterior(rot_all[j], torch.as_tensor(origin_px[sl], device=dev),
                                torch.as_tensor(cls[sl], device=dev))
        accumulate2d(stats, post, j[:, None], x, x, img.sum((-2, -1)).to(torch.complex64), comps)
    return stats


def initialise(images: torch.Tensor, settings: "Class2DSettings", origin_px: np.ndarray | None = None) -> tuple[EMModel, Poses2D]:
    """Iteration 0 of 2D classification: sigma^2 from the data; references = averages of random subsets at random psi.

    Parameters
    ----------
    images : torch.Tensor
        (n, N, N) float32 particle images (their device is used).
    settings : Class2DSettings
        Number of classes, pixel size [Å], diameter [Å], sampling, seed.
    origin_px : numpy.ndarray, optional
        (n, 2) input origins (x, y) [px]; default zeros.

    Returns
    -------
    model : EMModel
        K averages (K, N, N), noise and prior spectra (N//2 + 1 shells), equal class priors.
    poses : Poses2D
        Unassigned classes (-1), the random psi [deg] and the origins.
    """
    dev = images.device
    n_img, n = images.shape[0], images.shape[-1]
    k = settings.n_classes
    rng = np.random.default_rng([settings.seed, 0])
    mask = particle_mask(n, settings, dev)
    sigma2 = initial_sigma2(images, mask)
    poses = Poses2D.new(n_img, origin_px)
    cls = rng.permutation(np.arange(n_img) % k).astype(np.int64)  # balanced random subsets
    _, psi_f, _ = fine_angles(settings, None, dev)
    j = rng.integers(0, len(psi_f), n_img)
    comps = fourier_components(n, n, 2, device=dev)
    stats = stats_for_poses(images, cls, j, poses.origin_px, psi_f, k, comps)
    maps, _ = reconstruct2d(stats, psi_f, comps, sigma2, None, pad=settings.pad)
    maps = maps * mask
    tau2 = tau2_from_power2d(maps)
    dvp = stats.class_weight[:, None] * settings.tau2_fudge * tau2 / sigma2[None]
    r = max(resolution_shell(dvp[c]) for c in range(k))
    model = EMModel(maps=maps.float(), sigma2=sigma2.float(), tau2=tau2.float(), data_vs_prior=dvp.float(),
                    fsc=torch.zeros(k, n // 2 + 1), class_priors=torch.full((k,), 1.0 / k, dtype=torch.float64),
                    pixel_size_A=settings.pixel_size_A, tau2_fudge=settings.tau2_fudge,
                    sigma_offset_px=settings.initial_sigma_offset_px, current_shell=int(r), current_size=n, ndim=2)
    poses.cls[:] = -1  # no assignment yet
    poses.psi_deg = psi_f[torch.as_tensor(j)].cpu().double().numpy()
    return model, poses


def iterate(images: torch.Tensor, model: EMModel, poses: Poses2D, settings: Class2DSettings, iteration: int,
            progress: Callable | None = None) -> tuple[EMModel, Poses2D, IterationInfo]:
    """One E/M iteration of 2D classification.

    Parameters
    ----------
    images : torch.Tensor
        (n, N, N) float32 particle images.
    model : EMModel
        The model after the previous iteration.
    poses : Poses2D
        The poses after the previous iteration (not modified).
    settings : Class2DSettings
        The run's settings.
    iteration : int
        Iteration number (with the seed it sets the random perturbation).
    progress : callable, optional
        Wraps the list of batch starts (a progress bar).

    Returns
    -------
    model : EMModel
        New averages, spectra, class priors and current resolution.
    poses : Poses2D
        New classes, psi [deg], origins [px] and E-step summaries.
    info : IterationInfo
        Time, resolution [Å] and the changes of this iteration.
    """
    t0 = time.time()
    n_img, n = images.shape[0], images.shape[-1]
    plan = _plan_iteration(n, model, settings, iteration, images.device)
    stats = Stats2D.zeros(model.n_classes, plan.n_angles, plan.comps.m, n, device=images.device)
    new = Poses2D.from_state(poses.state())
    starts = list(range(0, n_img, settings.batch_size))
    for s in (progress(starts) if progress else starts):
        _batch2d(images, slice(s, min(n_img, s + settings.batch_size)), poses, new, stats, plan)
    return finish_iteration(stats, model, poses, new, plan, settings, iteration, t0)


def finish_iteration(stats: "Stats2D", model: EMModel, poses: Poses2D, new: Poses2D, plan: "_Plan2D",
                     settings: Class2DSettings, iteration: int, t0: float) -> tuple[EMModel, Poses2D, IterationInfo]:
    """The M-step after an E-step (in one process or on a cluster) and the iteration's summary.

    Parameters
    ----------
    stats : Stats2D
        The E-step sums of all images.
    model : EMModel
        The model of the previous iteration.
    poses, new : Poses2D
        The poses before and after the E-step.
    plan : _Plan2D
        The iteration's grids and components.
    settings : Class2DSettings
        The run's settings.
    iteration : int
        Iteration number.
    t0 : float
        When the iteration started [s, time.time()].

    Returns
    -------
    tuple
        (new model, ``new``, IterationInfo).
    """
    n_img, n = len(new.cls), plan.mask.shape[-1]
    model, class_shell = maximise(stats, model, plan.psi_deg, plan.comps, settings)
    model.extra = {"average_pmax": float(new.max_prob.mean()), "n_particles": n_img}
    info = _summary(iteration, time.time() - t0, n * settings.pixel_size_A, int(plan.comps.size), model.current_shell,
                    class_shell, poses, new)
    return model, new, info


@dataclass
class _Plan2D:
    """What every batch of an iteration shares: components (current size, E-step subset, coarse), grids, references."""

    mask: torch.Tensor
    comps: FourierComponents
    comps_e: FourierComponents
    keep_e: torch.Tensor
    coarse_mask: torch.Tensor
    projectors: list[Projector2D]
    orient: Orientations
    psi_deg: torch.Tensor
    step_deg: float
    trans: TranslationSet
    coarse_refs: torch.Tensor
    inv_s2_e: torch.Tensor
    log_cls: torch.Tensor
    opts: EStepOptions

    @property
    def n_angles(self) -> int:
        return len(self.psi_deg)

    @property
    def psi0(self) -> float:
        return float(self.psi_deg[0])


def _iteration_components(n: int, model: EMModel, settings: Class2DSettings,
                          dev) -> tuple[FourierComponents, FourierComponents, torch.Tensor, torch.Tensor]:
    """Current size from the resolution (+ incr_size shells), E-step limit, coarse size (§3.3, §3.5)."""
    px = settings.pixel_size_A
    r_img = min(n // 2, model.current_shell + settings.incr_size)
    comps = _comps_for(n, r_img, dev)
    size = comps.size
    r_e = size / 2 if not settings.highres_limit_A else min(size / 2, n * px / settings.highres_limit_A + 1)
    comps_e, keep_e = comps.subset(r_e)
    coarse_res = (2 * settings.psi_step_deg / 360.0) * math.pi * settings.particle_diameter_A / 1.5
    coarse_mask = comps_e.shell < max(3.0, math.ceil(n * px / max(coarse_res, 1e-6)))
    return comps, comps_e, keep_e, coarse_mask


def _plan_iteration(n: int, model: EMModel, settings: Class2DSettings, iteration: int, dev) -> _Plan2D:
    rng = np.random.default_rng([settings.seed, iteration])
    mask = particle_mask(n, settings, dev)
    comps, comps_e, keep_e, coarse_mask = _iteration_components(n, model, settings, dev)
    projectors = [Projector2D(model.maps[c].to(dev), settings.pad) for c in range(model.n_classes)]
    orient, psi_f, step_f = fine_angles(settings, rng, dev)
    n_ang = len(psi_f)
    psi0 = float(psi_f[0])
    cache_projectors(projectors, psi0, step_f, n_ang, comps_e.k)
    cache_projectors(projectors, psi0, step_f, n_ang, comps.k)
    k_coarse = comps_e.k[coarse_mask]
    cache_projectors(projectors, psi0 + step_f / 2, 2 * step_f, n_ang // 2, k_coarse)  # the coarse angles
    trans = translation_grid(settings.offset_range_px, 2 * settings.offset_step_px, ndim=2, device=dev)
    coarse_refs = precompute_refs(projectors, orient.coarse, k_coarse)
    sigma2 = model.sigma2.to(dev).float().clamp(min=1e-30)
    inv_s2_e = (1.0 / sigma2[comps.shell])[keep_e]
    log_cls = torch.log(model.class_priors.to(dev).float().clamp(min=1e-30))
    opts = EStepOptions(fraction=settings.fraction, max_significant=settings.max_significant, max_keep=settings.max_keep,
                        sigma_offset_px=model.sigma_offset_px)
    return _Plan2D(mask, comps, comps_e, keep_e, coarse_mask, projectors, orient, psi_f, step_f, trans, coarse_refs,
                   inv_s2_e, log_cls, opts)


def _batch2d(images: torch.Tensor, sl: slice, poses: Poses2D, new: Poses2D, stats: Stats2D, plan: _Plan2D) -> None:
    """E-step of the images ``sl``: sums added to ``stats``, best poses stored in ``new``."""
    dev = images.device
    img = images[sl].float()
    b = img.shape[0]
    comps, keep_e = plan.comps, plan.keep_e
    xu = comps.extract(fft_centered(img, 2))
    xm = comps.extract(fft_centered(img * plan.mask, 2))
    prev = torch.as_tensor(poses.origin_px[sl], dtype=torch.float32, device=dev)
    batch = BatchData(xm[:, keep_e], torch.ones(b, int(keep_e.sum()), device=dev), prev, torch.zeros(b, 2, device=dev))
    post = expectation_batch(batch, plan.comps_e, plan.coarse_mask, plan.inv_s2_e, plan.projectors, plan.orient,
                             plan.trans.points, plan.trans.children, plan.log_cls, plan.opts, coarse_refs=plan.coarse_refs)
    j = angle_indices(post.rot, plan.psi0, plan.step_deg, plan.n_angles)
    accumulate2d(stats, post, j, xu, xm, img.sum((-2, -1)).to(torch.complex64), comps, plan.projectors)
    _store_best(new, sl, post)


def _store_best(poses: Poses2D, sl: slice, post: BatchPosterior) -> None:
    """The best pose and the E-step summaries of a batch of particles (in place)."""
    br, bo, bc = post.best()
    poses.psi_deg[sl] = psi_from_matrix(br.double()).cpu().numpy()
    poses.origin_px[sl] = bo.double().cpu().numpy()
    poses.cls[sl] = bc.cpu().numpy()
    poses.max_prob[sl] = post.max_prob.double().cpu().numpy()
    poses.log_lik[sl] = post.log_lik.double().cpu().numpy()
    poses.n_sig[sl] = post.n_significant.cpu().numpy()


def _summary(iteration: int, seconds: float, box_A: float, size: int, current: int, class_shell: list[int],
             old: Poses2D, new: Poses2D) -> IterationInfo:
    """Resolution and the changes of classes, angles and offsets from ``old`` to ``new``."""
    was = old.cls >= 0
    dpsi = np.abs((new.psi_deg - old.psi_deg + 180.0) % 360.0 - 180.0)
    return IterationInfo(
        iteration=iteration, seconds=seconds, resolution_A=box_A / max(current, 1), current_size=size,
        class_change=float(np.mean(new.cls[was] != old.cls[was])) if was.any() else 1.0,
        psi_change_deg=float(dpsi.mean()),
        offset_change_px=float(np.sqrt(np.mean(np.sum((new.origin_px - old.origin_px) ** 2, 1)))),
        average_pmax=float(new.max_prob.mean()), mean_significant=float(new.n_sig.mean()),
        class_resolution_A=[box_A / r if r > 0 else 999.0 for r in class_shell])


def maximise(stats: Stats2D, model: EMModel, psi_deg: torch.Tensor, comps: FourierComponents,
             settings: Class2DSettings) -> tuple[EMModel, list[int]]:
    """M-step of 2D classification from the summed statistics.

    Parameters
    ----------
    stats : Stats2D
        The iteration's sums (K classes, J fine angles).
    model : EMModel
        The previous model (its averages give tau^2, its sigma^2 the regularisation).
    psi_deg : torch.Tensor
        (J,) fine in-plane angles of ``stats`` [deg].
    comps : FourierComponents
        The current-size components of ``stats``.
    settings : Class2DSettings
        T, pixel size, diameter, padding.

    Returns
    -------
    model : EMModel
        sigma^2, averages (solvent-flattened), class priors, offset prior [px], resolution.
    class_shell : list of int
        Resolution shell of each class [Fourier px] (0 for empty classes).
    """
    dev = stats.data.device
    n = comps.box
    k = model.n_classes
    n_sh = n // 2 + 1
    sig_new = model.sigma2.clone().double().to(dev)
    num, den = stats.sigma2_num, stats.sigma2_den
    ok = den > 0
    ok[0] = False
    sig_new[ok] = num[ok] / (2 * den[ok])
    tau2_old = tau2_from_power2d(model.maps.to(dev))
    maps, dvp = reconstruct2d(stats, psi_deg, comps, model.sigma2, tau2_old, settings.tau2_fudge, settings.pad)
    maps = maps * particle_mask(n, settings, dev)
    n_part = max(float(stats.n_particles), 1.0)
    class_w = stats.class_weight / n_part
    class_shell = [resolution_shell(dvp[c]) if class_w[c] > 0 else 0 for c in range(k)]
    sigma_off = math.sqrt(float(stats.offset2) / (2 * float(stats.offset_w))) if float(stats.offset_w) > 0 else model.sigma_offset_px
    new = EMModel(maps=maps.float(), sigma2=sig_new.float(), tau2=tau2_old.float(), data_vs_prior=dvp.float(),
                  fsc=torch.zeros(k, n_sh), class_priors=class_w.double(), pixel_size_A=settings.pixel_size_A,
                  tau2_fudge=settings.tau2_fudge, sigma_offset_px=max(sigma_off, 0.5), current_shell=int(max(class_shell)),
                  current_size=int(comps.size), ndim=2, log_lik=float(stats.log_lik))
    return new, class_shell
