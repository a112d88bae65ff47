"""CTF estimation of tilt images (protocol Step 8), batched over images.

Method (a CTFFIND-like fit written for tilted, low-dose images):

1. **Tiled power spectra.** Each image is cut into overlapping tiles (``box`` pixels,
   50 % overlap), each tile is mean-subtracted, tapered at its edges and Fourier
   transformed (batched ``rfft2``). Tiles in the same *column* (same distance from the
   tilt axis, which is the image y axis) see the same defocus on a flat specimen, so
   their power is averaged into one spectrum per column strip. We work with the log of
   that power: at the low per-pixel SNR of tilt images, ``log P ≈ log N(s) + R(s) CTF²``,
   i.e. background plus an envelope times CTF², with smooth N and R.
2. **Tilted-plane model.** A strip whose centre lies ``x`` Å right of the tilt axis has
   defocus ``D + x tan θ`` (docs/conventions.md: at positive tilt the right side is more
   underfocused). Every model evaluation uses each strip's own defocus, so the reported
   defocus ``D`` is the one at the image centre (the tilt axis).
3. **1D exhaustive search** (CTFFIND-like pre-processing). Rotational averages of each
   strip (band ``res_min``..``res_max``; the default 30 Å keeps out the specimen's strong
   low-resolution spectrum, which biases the first ring) lose a smooth background, a
   running mean over one CTF period (a window of width 1 in ``u = -chi/pi``, so that it
   adapts to the local ring spacing), and are divided by their running RMS (local ring
   amplitude). Every candidate's CTF² gets the same filtering, and the score is the
   weighted correlation of the two. The window is the same for all candidates (first the
   period at the geometric mean of the range, then at the first pass's best defocus), so
   candidates are compared on identical data; defoci with fewer than 1.5 ring periods in
   the band are not searched (indistinguishable from a smooth background). The best grid
   point is refined on a finer grid.
4. **2D refinement** of mean defocus and astigmatism ``(D, a1, a2)`` with
   ``ΔD(φ) = a1 cos 2φ + a2 sin 2φ`` (so ``U, V = D ± |a|``, angle = ``atan2(a2, a1)/2``),
   by a batched coordinate pattern search maximising the correlation between the
   background-subtracted 2D strip spectra and ``e(s)·(CTF² - <CTF²>)`` (background, local
   envelope e and running mean <CTF²> from the 1D search).
5. **Fit statistics.** Figure of merit = that correlation. Fit resolution = the
   spacing up to which the windowed (two-period) correlation between the equiphase
   1D average and CTF² stays above ``cc_threshold`` (CTFFIND's "spacing up to which CTF
   rings were fit successfully"). Significance = t statistic of the fitted ring
   amplitude (the mean envelope in a least-squares fit of the equiphase average): about
   N(0, 1) when there are no Thon rings, since then in-phase and anti-phase models fit
   equally well. A fit is flagged as failed when it is below ``min_significance`` (or the
   fitted rings come out in anti-phase). The tilt-series consistency check (a defocus
   far from the trend of the neighbouring tilts) is in ``subtomo.ctf.series``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from subtomo.ctf.model import Optics, chi, ctf_squared, electron_wavelength_A, phase_coefficients, phase_periods
from subtomo.ctf.spectra import (
    Band,
    SpectrumGrid,
    display_spectrum,
    legendre_basis,
    make_grid,
    radial_profiles,
    strip_log_spectra,
)
from subtomo.errors import SubtomoError


def model_degrees(s_lo: float, s_hi: float, defocus_A: float, optics: Optics, max_bg: int = 4,
                  max_env: int = 2) -> tuple[int, int]:
    """Polynomial degrees of background and envelope for a band holding few or many rings.

    A polynomial of degree k can mimic about k/2 oscillations, so with only one or two CTF
    zeros in the band (large pixels) a flexible background would absorb the rings; the
    degrees grow with the number of zeros expected at ``defocus_A``.

    Parameters
    ----------
    s_lo, s_hi : float
        Band limits [1/Å].
    defocus_A : float
        Defocus [Å].
    optics : Optics
        Microscope.
    max_bg, max_env : int
        Largest degrees allowed.

    Returns
    -------
    tuple of int
        (background degree, envelope degree).
    """
    lam = electron_wavelength_A(optics.voltage_kV)
    n_zeros = lam * defocus_A * (s_hi ** 2 - s_lo ** 2)
    half = int(round(n_zeros / 2))
    return int(min(max(half + 1, 2), max_bg)), int(min(max(half - 1, 0), max_env))


@dataclass(frozen=True)
class CtfSearchParams:
    """Search options, named and defaulted like CTFFIND's.

    Attributes
    ----------
    box_px : int
        Tile box of the power spectra [px] (reduced for small images).
    res_min_A, res_max_A : float
        Resolution band of the fit [Å] (low, high).
    defocus_min_A, defocus_max_A, defocus_step_A : float
        Exhaustive search range and step [Å].
    astigmatism_A : float
        Expected |U - V| [Å]; 0 fits no astigmatism.
    tilt_gradient : bool
        Model the defocus gradient across tilted images.
    cc_threshold : float
        Windowed correlation that defines the fit resolution.
    min_significance : float
        Fits whose Thon-ring t statistic is below this are flagged as failed.
    """

    box_px: int = 256
    res_min_A: float = 30.0
    res_max_A: float = 8.0
    defocus_min_A: float = 5000.0
    defocus_max_A: float = 50000.0
    defocus_step_A: float = 500.0
    astigmatism_A: float = 1000.0  # expected |U - V|; 0: fit no astigmatism
    tilt_gradient: bool = True  # model the defocus gradient across tilted images
    cc_threshold: float = 0.5  # windowed correlation limit for the fit resolution
    min_significance: float = 6.0  # t statistic of the fitted Thon-ring amplitude; below: failed


@dataclass
class CtfFit:
    """Per-image results of :func:`estimate_ctf`.

    Attributes
    ----------
    defocus_u_A, defocus_v_A : numpy.ndarray
        (N,) float64 defocus U >= V at the image centre [Å].
    defocus_angle_deg : numpy.ndarray
        (N,) angle of U from x towards y [deg], (-90, 90].
    figure_of_merit : numpy.ndarray
        (N,) 2D correlation of data and model.
    max_resolution_A : numpy.ndarray
        (N,) resolution up to which the rings were fit [Å].
    failed : numpy.ndarray
        (N,) bool, the fit is not trustworthy.
    significance : numpy.ndarray
        (N,) t statistic of the Thon-ring amplitude (about N(0, 1) without rings).
    reasons : list of str
        Why each fit failed ("" when fine).
    diagnostics : list of dict or None
        Per-image spectra and profiles for the plots.
    """

    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    defocus_angle_deg: np.ndarray
    figure_of_merit: np.ndarray
    max_resolution_A: np.ndarray
    failed: np.ndarray  # bool
    significance: np.ndarray  # t statistic of the Thon-ring amplitude (~N(0,1) for no rings)
    reasons: list[str] = field(default_factory=list)  # why a fit failed ("" when fine)
    diagnostics: list[dict] | None = None

    @property
    def defocus_mean_A(self) -> np.ndarray:
        """Mean of DefocusU and DefocusV [Å], (N,)."""
        return (self.defocus_u_A + self.defocus_v_A) / 2


def effective_band(shape_yx: tuple[int, int], pixel_size_A: float, params: CtfSearchParams) -> Band:
    """The tile box and resolution band for images of ``shape_yx``.

    The box shrinks for small images (at least 2 x 2 tiles); the high-resolution limit
    stays inside Nyquist (>= 2.2 pixels) and the low limit at least 2.5x coarser.

    Parameters
    ----------
    shape_yx : tuple of int
        Image size (ny, nx) [px].
    pixel_size_A : float
        Pixel size [Å].
    params : CtfSearchParams
        The requested box and band.

    Returns
    -------
    Band
        The box [px] and band [Å] used, with notes on what was changed and why.
    """
    ny, nx = shape_yx
    notes = []
    box = int(params.box_px)
    box -= box % 2
    limit = (min(ny, nx) // 2) // 2 * 2
    if limit < 32:
        raise SubtomoError(f"tilt images of {nx}x{ny} pixels are too small for CTF estimation (need at least 64x64).")
    if box > limit:
        notes.append(f"tile box reduced from {box} to {limit} px for {nx}x{ny} images")
        box = limit
    if box < 32:
        raise SubtomoError(f"--box {params.box_px}: too small; use at least 64 px tiles.")
    res_max = float(params.res_max_A)
    nyq_limit = 2.2 * pixel_size_A
    if res_max < nyq_limit:
        notes.append(f"max. resolution {res_max:.2f} A is beyond Nyquist ({2 * pixel_size_A:.2f} A); using {nyq_limit:.2f} A")
        res_max = nyq_limit
    res_min = float(params.res_min_A)
    if res_min < 2.5 * res_max:
        notes.append(f"min. resolution {res_min:.1f} A too close to the max. resolution; using {2.5 * res_max:.1f} A")
        res_min = 2.5 * res_max
    r_lo = box * pixel_size_A / res_min
    if r_lo < 2.0:
        res_min = box * pixel_size_A / 2.0
        notes.append(f"min. resolution limited to {res_min:.1f} A by the {box} px tile")
    return Band(box, res_min, res_max, tuple(notes))


# ----------------------------------------------------------------------------- spectra


# ----------------------------------------------------------------------------- 1D search


def _window_matrix(u: torch.Tensor, width: float = 1.0) -> torch.Tensor:
    """Running-mean operator (..., R, R) over the window ``[u - width/2, u + width/2]``.

    Each bin covers the u-interval between the midpoints to its neighbours and enters a
    window with its overlap, so the mean is an integral over u: one full period of CTF²
    averages to exactly 1/2 whatever the bin spacing. Windows are clipped at the band edges.
    """
    mid = 0.5 * (u[..., 1:] + u[..., :-1])
    edges = torch.cat([2 * u[..., :1] - mid[..., :1], mid, 2 * u[..., -1:] - mid[..., -1:]], -1)  # (..., R+1)
    lo = (u - width / 2)[..., :, None]
    hi = (u + width / 2)[..., :, None]
    ov = (torch.minimum(edges[..., None, 1:], hi) - torch.maximum(edges[..., None, :-1], lo)).clamp(min=0)
    return ov / ov.sum(-1, keepdim=True).clamp(min=1e-12)


def _apply(W: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Running mean: W (N, S, R, R), v (N, C, S, R) -> (N, C, S, R)."""
    return torch.einsum("nsrk,ncsk->ncsr", W, v)


def _period_scores(zn: torch.Tensor, c: torch.Tensor, W: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted correlation of normalised data with each candidate's normalised CTF².

    zn: (N, 1, S, R) data after background removal and local amplitude normalisation (with
    the running mean W); c: (N, C, S, R) CTF² of the candidates, filtered the same way, so
    that data and model are compared after identical processing. Returns (N, C).
    """
    m = c - _apply(W, c)
    mn = m / _apply(W, m * m).clamp(min=1e-12).sqrt()
    num = (w * zn * mn).sum(dim=(-2, -1))
    den = torch.sqrt((w * zn * zn).sum(dim=(-2, -1)) * (w * mn * mn).sum(dim=(-2, -1))).clamp(min=1e-12)
    return num / den


def _normalised_data(y: torch.Tensor, W: torch.Tensor):
    """(background (N,S,R), z (N,S,R), z / local RMS) of the profiles y with running mean W."""
    bg = torch.einsum("nsrk,nsk->nsr", W, y)
    z = y - bg
    rms = torch.einsum("nsrk,nsk->nsr", W, z * z).clamp(min=1e-12).sqrt()
    return bg, z, z / rms


def _strip_offsets(strip_x_A: torch.Tensor, tilt_deg: torch.Tensor, use: bool) -> torch.Tensor:
    """Defocus offset of each strip (N, S): x tan θ (0 without the tilt model)."""
    if not use:
        return torch.zeros(len(tilt_deg), len(strip_x_A), device=strip_x_A.device)
    return strip_x_A[None, :] * torch.tan(torch.deg2rad(tilt_deg))[:, None]


def min_identifiable_defocus_A(band: Band, optics: Optics, min_periods: float = 1.5) -> float:
    """Smallest defocus whose CTF² completes ``min_periods`` periods inside the fitting band.

    With fewer periods Thon rings cannot be told apart from a smooth background (any
    running-mean background of one period then absorbs them), so such candidates are not
    searched.

    Parameters
    ----------
    band : Band
        Fitting band.
    optics : Optics
        Microscope.
    min_periods : float
        Periods of CTF² required.

    Returns
    -------
    float
        Defocus [Å].
    """
    lam = electron_wavelength_A(optics.voltage_kV)
    s_lo2, s_hi2 = (1.0 / band.res_min_A) ** 2, (1.0 / band.res_max_A) ** 2
    return min_periods / (lam * (s_hi2 - s_lo2))


def _search_1d(y1: torch.Tensor, delta: torch.Tensor, grid: SpectrumGrid, optics: Optics, params: CtfSearchParams,
               d_min_A: float, chunk: int = 64):
    """Exhaustive then fine 1D defocus search on the strip profiles y1 (N, S, R).

    The background is a running mean over one CTF period (CTFFIND-like), the same for all
    candidates so that they are compared on identical data: a first pass uses the period
    at the geometric mean of the search range, a second the period at the first pass's
    best defocus. Returns (D (N,), score (N,), background (N, S, R), envelope (N, S, R),
    running mean of CTF² (N, S, R)), the last three for the best defocus.
    """
    dev = y1.device
    n = y1.shape[0]
    idx = torch.arange(n, device=dev)
    lo = max(params.defocus_min_A, d_min_A)
    hi = max(params.defocus_max_A, lo + params.defocus_step_A)
    cands = torch.arange(lo, hi + 0.5 * params.defocus_step_A, params.defocus_step_A, device=dev, dtype=torch.float32)
    s2 = grid.s_bin ** 2
    w = grid.count_bin.sqrt()

    def window(d_ref: torch.Tensor) -> torch.Tensor:  # d_ref (N,) -> W (N, S, R, R)
        return _window_matrix(phase_periods(s2, d_ref[:, None, None] + delta[:, :, None], optics))

    def scores_for(cand: torch.Tensor, W: torch.Tensor) -> torch.Tensor:  # cand (N, C)
        zn = _normalised_data(y1, W)[2][:, None]
        res = []
        for j in range(0, cand.shape[1], chunk):
            d = cand[:, j:j + chunk, None, None] + delta[:, None, :, None]  # (N, c, S, 1)
            res.append(_period_scores(zn, ctf_squared(s2, d, optics), W, w))
        return torch.cat(res, 1)

    d_ref = torch.full((n,), math.sqrt(lo * hi), device=dev)
    best = cands[:1].expand(n)
    for _ in range(2):
        W = window(d_ref)
        coarse = scores_for(cands[None].expand(n, -1), W)
        best = cands[coarse.argmax(1)]
        d_ref = best
    # fine search: +-1 coarse step around the best grid point, window at the best point
    offs = torch.linspace(-1, 1, 41, device=dev) * params.defocus_step_A
    fine = (best[:, None] + offs[None]).clamp(min=1.0)
    fs = scores_for(fine, W)
    k = fs.argmax(1)
    D = fine[idx, k]
    W = window(D)
    bg, z, _ = _normalised_data(y1, W)
    c = ctf_squared(s2, D[:, None, None] + delta[:, :, None], optics)[:, None]
    mc = _apply(W, c)
    m = c - mc
    env = (_apply(W, z[:, None] * m) / _apply(W, m * m).clamp(min=1e-12)).clamp(min=0)
    return D, fs[idx, k], bg, env[:, 0], mc[:, 0]


# ----------------------------------------------------------------------------- 2D refine

def _refine_2d(z2: torch.Tensor, env: torch.Tensor, offset: torch.Tensor, delta: torch.Tensor, grid: SpectrumGrid,
               optics: Optics, D0: torch.Tensor, params: CtfSearchParams, max_iter: int = 60):
    """Pattern search on (D, a1, a2) maximising the 2D correlation.

    z2: (N, S, P) background-subtracted log power; env, offset: (N, S, P) local ring
    amplitude and running mean of CTF² (the model is ``env (CTF² - offset)``).
    Returns (D, a1, a2, cc) each (N,).
    """
    n = z2.shape[0]
    dev = z2.device
    zc = z2 - z2.mean(dim=(1, 2), keepdim=True)
    znorm = zc.square().sum(dim=(1, 2)).sqrt().clamp(min=1e-12)
    fit_astig = params.astigmatism_A > 0
    a_max = params.astigmatism_A  # bound on |a| = (U - V)/2, i.e. U - V <= 2x the expected astigmatism
    x = torch.stack([D0, torch.zeros_like(D0), torch.zeros_like(D0)], 1)  # (N, 3)
    step = torch.tensor([params.defocus_step_A / 4, params.astigmatism_A / 2 if fit_astig else 0.0, 0.0],
                        device=dev).repeat(n, 1)
    step[:, 2] = step[:, 1]
    min_step = torch.tensor([5.0, 5.0, 5.0], device=dev)
    n_par = 3 if fit_astig else 1
    moves = []
    for p in range(n_par):
        for sgn in (1.0, -1.0):
            m = torch.zeros(3, device=dev)
            m[p] = sgn
            moves.append(m)
    move_steps = torch.stack(moves)  # (M, 3)

    def cc_of(params_: torch.Tensor) -> torch.Tensor:  # (N, M, 3) -> (N, M)
        d = (params_[..., 0:1] + params_[..., 1:2] * grid.cos2 + params_[..., 2:3] * grid.sin2)  # (N, M, P)
        d = d[:, :, None, :] + delta[:, None, :, None]  # (N, M, S, P)
        m = (ctf_squared(grid.s2, d, optics) - offset[:, None]) * env[:, None]
        count = m.shape[2] * m.shape[3]
        num = (m * zc[:, None]).sum(dim=(2, 3))  # zc has zero mean: no need to centre m
        var = m.square().sum(dim=(2, 3)) - m.sum(dim=(2, 3)).square() / count
        return num / (var.clamp(min=1e-12).sqrt() * znorm[:, None])

    cur = cc_of(x[:, None])[:, 0]
    for _ in range(max_iter):
        active = (step[:, :n_par] > min_step[:n_par]).any(1)
        if not bool(active.any()):
            break
        cand = x[:, None] + move_steps[None] * step[:, None]  # (N, M, 3)
        if fit_astig:
            amp = cand[..., 1:].norm(dim=-1, keepdim=True)
            cand[..., 1:] = cand[..., 1:] * torch.clamp(a_max / amp.clamp(min=1e-9), max=1.0)
        cand[..., 0] = cand[..., 0].clamp(min=1.0)
        cc = cc_of(cand)
        k = cc.argmax(1)
        idx = torch.arange(n, device=dev)
        improved = (cc[idx, k] > cur + 1e-7) & active
        x = torch.where(improved[:, None], cand[idx, k], x)
        cur = torch.where(improved, cc[idx, k], cur)
        step = torch.where((~improved & active)[:, None], step * 0.5, step)
    return x[:, 0], x[:, 1], x[:, 2], cur


# ----------------------------------------------------------------------------- statistics

def _equiphase_frequency2(chi: torch.Tensor, defocus_A: torch.Tensor, optics: Optics) -> torch.Tensor:
    """s² at which a CTF of ``defocus_A`` (no astigmatism) has phase ``chi``."""
    k_defocus, a = phase_coefficients(optics.voltage_kV, optics.cs_mm)
    nb = -k_defocus * defocus_A  # -b
    disc = (nb * nb + 4 * a * chi).clamp(min=0)
    return (-2 * chi / (nb + torch.sqrt(disc))).clamp(min=0)


def _equiphase_average(logp: torch.Tensor, delta: torch.Tensor, D: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor,
                       optics: Optics) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Average of the whole spectrum along lines of equal CTF phase, per image.

    Every pixel of every strip goes to the frequency where an unastigmatic CTF at the
    image's mean defocus has the same phase (bins of half a Fourier pixel). Returns
    (sums (N, B), counts (N, B), bin frequencies (B,) [1/Å]).
    """
    n, S, box, nh = logp.shape
    dev = logp.device
    p = optics.pixel_size_A
    ky = torch.fft.fftfreq(box, device=dev)
    kx = torch.fft.rfftfreq(box, device=dev)
    KY, KX = torch.meshgrid(ky, kx, indexing="ij")
    r = torch.sqrt(KX ** 2 + KY ** 2).reshape(-1)
    sel = (r * box >= 1.5) & (r <= 0.5)
    s2 = (r[sel] / p) ** 2
    phi = torch.atan2(KY.reshape(-1)[sel], KX.reshape(-1)[sel])
    c2, s2phi = torch.cos(2 * phi), torch.sin(2 * phi)
    vals = logp.reshape(n, S, -1)[..., sel]  # (N, S, Q)
    d_pix = D[:, None] + a1[:, None] * c2 + a2[:, None] * s2phi  # (N, Q)
    d_pix = d_pix[:, None, :] + delta[:, :, None]  # (N, S, Q)
    phase = chi(s2, d_pix, optics.voltage_kV, optics.cs_mm)
    seq = _equiphase_frequency2(phase, D[:, None, None], optics).sqrt()  # (N, S, Q) 1/Å
    # bins of half a Fourier pixel along s
    ds = 0.5 / (box * p)
    n_bins = int(0.5 / p / ds) + 2
    b = torch.clamp((seq / ds).round().long(), max=n_bins - 1)
    flat_b = (b + torch.arange(n, device=dev)[:, None, None] * n_bins).reshape(-1)
    sums = torch.zeros(n * n_bins, device=dev).index_add_(0, flat_b, vals.reshape(-1)).reshape(n, n_bins)
    cnts = torch.zeros(n * n_bins, device=dev).index_add_(0, flat_b, torch.ones_like(flat_b, dtype=torch.float32)).reshape(n, n_bins)
    return sums, cnts, torch.arange(n_bins, device=dev) * ds


def _ring_amplitude_fit(s_i: torch.Tensor, y_i: torch.Tensor, ctf2_i: torch.Tensor, defocus_A: float,
                        optics: Optics) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Background + envelope x CTF² least squares on an equiphase profile.

    Returns (background (L,), envelope (L,), t statistic of the mean envelope: ~N(0, 1)
    without Thon rings).
    """
    dev = s_i.device
    # background and envelope over the whole range (higher order than in the band)
    t = 2 * (s_i - s_i[0]) / (s_i[-1] - s_i[0]).clamp(min=1e-12) - 1
    kb, ke = model_degrees(float(s_i[0]), float(s_i[-1]), defocus_A, optics, 6, 4)
    Bb = legendre_basis(t, kb)
    Be = legendre_basis(t, ke)
    X = torch.cat([Bb, Be * ctf2_i[:, None]], 1)
    G = X.T @ X
    G = G + 1e-6 * G.diagonal().mean() * torch.eye(G.shape[0], device=dev)
    Ginv = torch.linalg.inv(G)
    beta = Ginv @ (X.T @ y_i)
    bg = Bb @ beta[: Bb.shape[1]]
    env = Be @ beta[Bb.shape[1]:]
    dof = max(1, len(y_i) - X.shape[1])
    sigma2 = (y_i - X @ beta).square().sum() / dof
    w = torch.zeros(X.shape[1], device=dev)
    w[Bb.shape[1]:] = Be.mean(0)
    t_env = float((w @ beta) / torch.sqrt(sigma2 * (w @ Ginv @ w)).clamp(min=1e-12))
    return bg, env, t_env


def _windowed_cc(resid: torch.Tensor, ctf2_i: torch.Tensor, chi_i: torch.Tensor) -> torch.Tensor:
    """Correlation of data and CTF² in a window of +-1 period of CTF² (|Δχ| <= π) around each bin."""
    W = ((chi_i[:, None] - chi_i[None, :]).abs() <= math.pi).float()  # (L, L)
    cnt = W.sum(1)
    mx = W @ resid / cnt
    my = W @ ctf2_i / cnt
    sxy = W @ (resid * ctf2_i) / cnt - mx * my
    sxx = (W @ resid.square() / cnt - mx * mx).clamp(min=1e-12)
    syy = (W @ ctf2_i.square() / cnt - my * my).clamp(min=1e-12)
    cc = sxy / torch.sqrt(sxx * syy)
    return torch.where(cnt >= 5, cc, torch.zeros_like(cc))


def _profile_statistics(s_i: torch.Tensor, y_i: torch.Tensor, defocus_A: torch.Tensor, optics: Optics,
                        params: CtfSearchParams, want_diagnostics: bool) -> dict:
    """Fit resolution, first zero, zeros fitted, ring significance (and diagnostics) of one profile."""
    ctf2_i = ctf_squared(s_i ** 2, defocus_A, optics)
    chi_i = chi(s_i ** 2, defocus_A, optics.voltage_kV, optics.cs_mm)
    bg, env, t_env = _ring_amplitude_fit(s_i, y_i, ctf2_i, float(defocus_A), optics)
    resid = y_i - bg
    cc = _windowed_cc(resid, ctf2_i, chi_i)
    # zeros of the CTF: phases zero_phase - kπ (k = 0, 1, ...) for underfocus
    zero_phase = math.atan2(optics.amplitude_contrast, math.sqrt(1 - optics.amplitude_contrast ** 2))
    order = torch.floor((zero_phase - chi_i) / math.pi)  # zeros passed at each s
    first = s_i[order >= 1]
    s1 = float(first[0]) if len(first) else float(s_i[-1])
    below = (cc < params.cc_threshold) & (s_i > s1)
    s_fail = float(s_i[below][0]) if bool(below.any()) else float(s_i[-1])
    zeros_fitted = int(order[s_i < s_fail].max()) if bool((s_i < s_fail).any()) else 0
    diag = None
    if want_diagnostics:
        diag = {"s_A": s_i.cpu().numpy(), "profile": resid.cpu().numpy(), "model": (env * ctf2_i).cpu().numpy(),
                "cc": cc.cpu().numpy(), "first_zero_A": 1.0 / s1}
    return {"fit_res_A": 1.0 / max(s_fail, 1e-6), "first_zero_A": 1.0 / s1, "zeros_fitted": zeros_fitted,
            "t_env": t_env, "diag": diag}


def _fit_statistics(logp: torch.Tensor, delta: torch.Tensor, D: torch.Tensor, a1: torch.Tensor,
                    a2: torch.Tensor, optics: Optics, band: Band, params: CtfSearchParams,
                    want_diagnostics: bool) -> list[dict]:
    """Equiphase 1D average over the whole spectrum, windowed CC, fit resolution (one dict per image)."""
    sums, cnts, s_axis = _equiphase_average(logp, delta, D, a1, a2, optics)
    p = optics.pixel_size_A
    s_lo_band = 1.0 / band.res_min_A
    results = []
    for i in range(logp.shape[0]):
        ok = (cnts[i] >= 4) & (s_axis >= s_lo_band * 0.999) & (s_axis <= 1.0 / (2 * p))
        results.append(_profile_statistics(s_axis[ok], sums[i][ok] / cnts[i][ok], D[i], optics, params, want_diagnostics))
    return results


# ----------------------------------------------------------------------------- driver

def uv_angle(D: np.ndarray, a1: np.ndarray, a2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean defocus, astigmatism vector) -> (DefocusU >= DefocusV, angle of U).

    Parameters
    ----------
    D, a1, a2 : numpy.ndarray
        (N,) mean defocus and astigmatism vector ``ΔD(φ) = a1 cos 2φ + a2 sin 2φ`` [Å].

    Returns
    -------
    tuple of numpy.ndarray
        (U [Å], V [Å], angle of U [deg] in (-90, 90]), each (N,).
    """
    amp = np.hypot(a1, a2)
    ang = 0.5 * np.degrees(np.arctan2(a2, a1))
    return D + amp, D - amp, ang


def astig_vector(u: np.ndarray, v: np.ndarray, angle_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`uv_angle`: (U, V, angle) -> (mean defocus, a1, a2).

    Parameters
    ----------
    u, v : numpy.ndarray
        (N,) defocus U and V [Å].
    angle_deg : numpy.ndarray
        (N,) angle of U [deg].

    Returns
    -------
    tuple of numpy.ndarray
        (mean defocus, a1, a2) [Å], each (N,); averaging these averages CTFs correctly.
    """
    half = (np.asarray(u, float) - np.asarray(v, float)) / 2
    th = np.radians(2 * np.asarray(angle_deg, float))
    return (np.asarray(u, float) + np.asarray(v, float)) / 2, half * np.cos(th), half * np.sin(th)


def _checked_tilts(tilt_deg, n: int, params: CtfSearchParams, device) -> torch.Tensor:
    """The (n,) tilt angles [deg] as a float32 tensor, after checking them and the search range."""
    if params.defocus_max_A <= params.defocus_min_A or params.defocus_step_A <= 0:
        raise SubtomoError(f"defocus search range {params.defocus_min_A:g}-{params.defocus_max_A:g} A, step "
                           f"{params.defocus_step_A:g} A: need min < max and step > 0.")
    tilt = torch.as_tensor(np.asarray(tilt_deg, dtype=np.float32).reshape(-1), device=device)
    if len(tilt) != n:
        raise SubtomoError(f"{n} images but {len(tilt)} tilt angles given.")
    return tilt


def _failure_reasons(significance: np.ndarray, score_1d: torch.Tensor, params: CtfSearchParams) -> list[str]:
    """Why each fit failed ("" when it did not): rings not significant, or in anti-phase."""
    reasons = []
    for t, score in zip(significance, score_1d.tolist()):
        why = []
        if t < params.min_significance:
            why.append(f"Thon rings not significant (t = {t:.1f} < {params.min_significance:g})")
        if float(score) <= 0:
            why.append("the fitted Thon rings are out of phase with the data")
        reasons.append("; ".join(why))
    return reasons


def estimate_ctf(images: torch.Tensor, tilt_deg, optics: Optics, params: CtfSearchParams = CtfSearchParams(),
                 diagnostics: bool = False) -> CtfFit:
    """Estimate defocus, astigmatism and fit quality of a batch of same-size images.

    Parameters
    ----------
    images : torch.Tensor
        (N, ny, nx) or (ny, nx) tilt images (any device; the computation follows it).
    tilt_deg : array_like
        (N,) tilt angles [deg] for the defocus-gradient model.
    optics : Optics
        Microscope and pixel size [Å].
    params : CtfSearchParams
        Search options.
    diagnostics : bool
        Also return the spectra and profiles for the diagnostic plots.

    Returns
    -------
    CtfFit
        N fits; defoci are at the image centre (the tilt axis).
    """
    images = images[None] if images.ndim == 2 else images
    n, ny, nx = images.shape
    dev = images.device
    band = effective_band((ny, nx), optics.pixel_size_A, params)
    tilt = _checked_tilts(tilt_deg, n, params, dev)
    logp, strip_x = strip_log_spectra(images, band.box_px, optics.pixel_size_A)
    grid = make_grid(band.box_px, optics.pixel_size_A, band, dev)
    S = logp.shape[1]
    y2 = logp.reshape(n, S, -1)[..., grid.flat_index]  # (N, S, P)
    y1 = radial_profiles(y2, grid)  # (N, S, R)
    delta = _strip_offsets(strip_x, tilt, params.tilt_gradient)
    d_min = min_identifiable_defocus_A(band, optics)
    D1, score1, bg1, env1, mc1 = _search_1d(y1, delta, grid, optics, params, d_min)
    pix = grid.bin_of_pixel
    z2 = y2 - bg1[..., pix]
    # the 2D refinement needs the ring shapes, not every pixel: at most ~6000 band pixels per strip
    stride = max(1, int(math.ceil(z2.shape[-1] / 6000)))
    sub = replace(grid, s2=grid.s2[::stride], cos2=grid.cos2[::stride], sin2=grid.sin2[::stride])
    ps = pix[::stride]
    D, a1, a2, cc = _refine_2d(z2[..., ::stride], env1[..., ps], mc1[..., ps], delta, sub, optics, D1, params)
    stats = _fit_statistics(logp, delta, D, a1, a2, optics, band, params, diagnostics)
    Dn, a1n, a2n = (t.detach().cpu().numpy().astype(np.float64) for t in (D, a1, a2))
    u, v, ang = uv_angle(Dn, a1n, a2n)
    signif = np.array([st["t_env"] for st in stats], dtype=np.float64)
    fit_res = np.array([st["fit_res_A"] for st in stats])
    reasons = _failure_reasons(signif, score1, params)
    failed = np.array([bool(r) for r in reasons], dtype=bool)
    diags = None
    if diagnostics:
        diags = []
        for i in range(n):
            data2d, model2d = display_spectrum(logp[i], delta[i], D[i], a1[i], a2[i], bg1[i].mean(0),
                                               env1[i].mean(0), grid, optics, band)
            diags.append({**stats[i]["diag"], "spectrum": data2d, "model2d": model2d, "band": band,
                          "pixel_size_A": optics.pixel_size_A, "fit_res_A": float(fit_res[i]),
                          "significance": float(signif[i]), "tilt_deg": float(tilt[i]),
                          "strip_defocus_offsets_A": delta[i].cpu().numpy()})
    return CtfFit(u, v, ang, cc.cpu().numpy().astype(np.float64), fit_res, failed, signif, reasons, diags)


def with_band_notes(params: CtfSearchParams, shape_yx, pixel_size_A) -> tuple[CtfSearchParams, list[str]]:
    """Params with box and band replaced by the effective ones (:func:`effective_band`).

    Parameters
    ----------
    params : CtfSearchParams
        Requested options.
    shape_yx : tuple of int
        Image size (ny, nx) [px].
    pixel_size_A : float
        Pixel size [Å].

    Returns
    -------
    tuple
        (new params, notes on what changed).
    """
    band = effective_band(shape_yx, pixel_size_A, params)
    return replace(params, box_px=band.box_px, res_min_A=band.res_min_A, res_max_A=band.res_max_A), list(band.notes)


