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

from subtomo.ctf.model import ctf_from_defocus, electron_wavelength_A
from subtomo.errors import SubtomoError



def model_degrees(s_lo: float, s_hi: float, defocus_A: float, optics: Optics, max_bg: int = 4,
                  max_env: int = 2) -> tuple[int, int]:
    """Polynomial degrees of background and envelope for a band holding few or many rings.

    A polynomial of degree k can mimic about k/2 oscillations, so with only one or two CTF
    zeros in the band (large pixels) a flexible background would absorb the rings; the
    degrees grow with the number of zeros expected at ``defocus_A``.
    """
    lam = electron_wavelength_A(optics.voltage_kV)
    n_zeros = lam * defocus_A * (s_hi ** 2 - s_lo ** 2)
    half = int(round(n_zeros / 2))
    return int(min(max(half + 1, 2), max_bg)), int(min(max(half - 1, 0), max_env))


@dataclass(frozen=True)
class CtfSearchParams:
    """Search options, named and defaulted like CTFFIND's (lengths in Å)."""

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


@dataclass(frozen=True)
class Optics:
    voltage_kV: float
    cs_mm: float
    amplitude_contrast: float
    pixel_size_A: float


@dataclass(frozen=True)
class Band:
    """Box and fitting band actually used for an image size (after adapting to Nyquist)."""

    box_px: int
    res_min_A: float
    res_max_A: float
    notes: tuple[str, ...] = ()

    def radii_px(self, pixel_size_A: float) -> tuple[float, float]:
        return self.box_px * pixel_size_A / self.res_min_A, self.box_px * pixel_size_A / self.res_max_A


@dataclass
class CtfFit:
    """Per-image results of :func:`estimate_ctf` (numpy arrays of length N)."""

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
        return (self.defocus_u_A + self.defocus_v_A) / 2


def effective_band(shape_yx: tuple[int, int], pixel_size_A: float, params: CtfSearchParams) -> Band:
    """The tile box and resolution band for images of ``shape_yx``.

    The box shrinks for small images (at least 2 x 2 tiles); the high-resolution limit
    stays inside Nyquist (>= 2.2 pixels) and the low limit at least 2.5x coarser.
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

def _taper(box: int, device, dtype) -> torch.Tensor:
    """Flat window with raised-cosine edges (box/8 wide) against tile-edge streaks."""
    edge = max(2, box // 8)
    w = torch.ones(box, device=device, dtype=dtype)
    ramp = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(edge, device=device, dtype=dtype) + 0.5) / edge)
    w[:edge] = ramp
    w[-edge:] = ramp.flip(0)
    return w[:, None] * w[None, :]


def _tiling(n: int, box: int) -> tuple[int, int, int]:
    """(stride, count, offset) of 50 %-overlapping tiles centred in a length-n axis."""
    stride = box // 2
    count = max(1, (n - box) // stride + 1)
    offset = (n - box - (count - 1) * stride) // 2
    return stride, count, offset


def strip_log_spectra(images: torch.Tensor, box: int, pixel_size_A: float,
                      chunk: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Log power spectra per column strip.

    images: (N, ny, nx) real. Returns (log P of shape (N, S, box, box//2+1) in the rfft
    layout, strip centre x positions (S,) in Å from the image centre, + to the right).
    """
    n, ny, nx = images.shape
    sy, cy, oy = _tiling(ny, box)
    sx, cx, ox = _tiling(nx, box)
    win = _taper(box, images.device, torch.float32)
    coord = torch.arange(box, device=images.device, dtype=torch.float32) - (box - 1) / 2
    ramp_y, ramp_x = coord[:, None].expand(box, box), coord[None, :].expand(box, box)
    ramp_norm = (coord ** 2).sum() * box
    out = []
    for i in range(0, n, chunk):
        x = images[i:i + chunk, oy:oy + box + (cy - 1) * sy, ox:ox + box + (cx - 1) * sx].to(torch.float32)
        t = x.unfold(1, box, sy).unfold(2, box, sx)  # (n, cy, cx, box, box)
        # remove each tile's mean and linear ramp (ice/illumination gradients leak along the axes)
        t = t - t.mean(dim=(-2, -1), keepdim=True)
        t = t - (t * ramp_y).sum(dim=(-2, -1), keepdim=True) / ramp_norm * ramp_y
        t = t - (t * ramp_x).sum(dim=(-2, -1), keepdim=True) / ramp_norm * ramp_x
        t = t * win
        p = torch.fft.rfft2(t).abs().square().mean(dim=1)  # (n, cx, box, box//2+1)
        out.append(p)
    power = torch.cat(out)
    scale = power.mean(dim=(-3, -2, -1), keepdim=True).clamp(min=1e-30)
    logp = torch.log(power / scale + 1e-12)
    centres = ox + torch.arange(cx, device=images.device, dtype=torch.float32) * sx + box / 2 - nx // 2
    return logp, centres * pixel_size_A


@dataclass
class _Grid:
    """Geometry of the tile spectrum: band pixels, radial bins and their frequencies."""

    box: int
    s2: torch.Tensor  # (P,) squared frequency (1/Å²) of band pixels
    cos2: torch.Tensor  # (P,) cos 2φ
    sin2: torch.Tensor  # (P,)
    flat_index: torch.Tensor  # (P,) index into the flattened rfft grid
    bin_of_pixel: torch.Tensor  # (P,) radial bin 0..R-1
    s_bin: torch.Tensor  # (R,) mean frequency (1/Å) of each bin
    t_bin: torch.Tensor  # (R,) frequency mapped to [-1, 1] over the band
    t_pixel: torch.Tensor  # (P,)
    count_bin: torch.Tensor  # (R,)


def _make_grid(box: int, pixel_size_A: float, band: Band, device) -> _Grid:
    ky = torch.fft.fftfreq(box, device=device)
    kx = torch.fft.rfftfreq(box, device=device)
    KY, KX = torch.meshgrid(ky, kx, indexing="ij")
    r = torch.sqrt(KX ** 2 + KY ** 2) * box
    r_lo, r_hi = band.radii_px(pixel_size_A)
    sel = ((r >= r_lo) & (r <= r_hi)).reshape(-1)
    flat_index = torch.nonzero(sel).squeeze(1)
    rr = r.reshape(-1)[flat_index]
    phi = torch.atan2(KY.reshape(-1)[flat_index], KX.reshape(-1)[flat_index])
    b0 = int(math.floor(r_lo))
    bins = (torch.round(rr) - b0).long()
    bins = bins - bins.min()
    n_bins = int(bins.max()) + 1
    count = torch.zeros(n_bins, device=device).index_add_(0, bins, torch.ones_like(rr))
    rsum = torch.zeros(n_bins, device=device).index_add_(0, bins, rr)
    keep = count > 0
    # drop empty bins (can only happen at the band edges)
    remap = torch.cumsum(keep.long(), 0) - 1
    bins = remap[bins]
    count = count[keep]
    s_bin = (rsum[keep] / count) / (box * pixel_size_A)
    s = rr / (box * pixel_size_A)
    s_lo, s_hi = 1.0 / band.res_min_A, 1.0 / band.res_max_A
    to_t = lambda v: 2 * (v - s_lo) / (s_hi - s_lo) - 1  # noqa: E731
    return _Grid(box, s ** 2, torch.cos(2 * phi), torch.sin(2 * phi), flat_index, bins, s_bin,
                 to_t(s_bin), to_t(s), count)


def _poly_basis(t: torch.Tensor, degree: int) -> torch.Tensor:
    """Legendre polynomials P_0..P_degree at t in [-1, 1]: (..., degree+1)."""
    cols = [torch.ones_like(t), t]
    for k in range(1, degree):
        cols.append(((2 * k + 1) * t * cols[k] - k * cols[k - 1]) / (k + 1))
    return torch.stack(cols[: degree + 1], dim=-1)


def _radial_profiles(values: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """Mean of band pixels per radial bin: (..., P) -> (..., R)."""
    out = torch.zeros(*values.shape[:-1], len(grid.count_bin), device=values.device, dtype=values.dtype)
    out.index_add_(-1, grid.bin_of_pixel, values)
    return out / grid.count_bin


# ----------------------------------------------------------------------------- 1D search

def _ctf2(s2: torch.Tensor, defocus_A: torch.Tensor, optics: Optics) -> torch.Tensor:
    """CTF² without envelope, identical to ``ctf_from_defocus(...)**2`` but cheaper (hot loop).

    With ``CTF = -(sqrt(1-Q²) sin χ - Q cos χ) = -sin(χ - α)``, ``α = atan2(Q, sqrt(1-Q²))``,
    ``CTF² = (1 - cos(2χ - 2α)) / 2``.
    """
    lam = electron_wavelength_A(optics.voltage_kV)
    q = optics.amplitude_contrast
    alpha = math.atan2(q, math.sqrt(max(0.0, 1 - q * q)))
    quartic = (math.pi * optics.cs_mm * 1e7 * lam ** 3) * s2 * s2 - 2 * alpha  # 2x the Cs term, minus 2α
    two_chi = (-2 * math.pi * lam) * s2 * defocus_A + quartic
    return 0.5 - 0.5 * torch.cos(two_chi)


def _phase_periods(s2: torch.Tensor, defocus_A: torch.Tensor, optics: Optics) -> torch.Tensor:
    """``u = -chi / pi``: CTF² = sin²(pi u + alpha) has period 1 in u (u grows with s)."""
    lam = electron_wavelength_A(optics.voltage_kV)
    return lam * defocus_A * s2 - (0.5 * optics.cs_mm * 1e7 * lam ** 3) * s2 * s2


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
    """
    lam = electron_wavelength_A(optics.voltage_kV)
    s_lo2, s_hi2 = (1.0 / band.res_min_A) ** 2, (1.0 / band.res_max_A) ** 2
    return min_periods / (lam * (s_hi2 - s_lo2))


def _search_1d(y1: torch.Tensor, delta: torch.Tensor, grid: _Grid, optics: Optics, params: CtfSearchParams,
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
        return _window_matrix(_phase_periods(s2, d_ref[:, None, None] + delta[:, :, None], optics))

    def scores_for(cand: torch.Tensor, W: torch.Tensor) -> torch.Tensor:  # cand (N, C)
        zn = _normalised_data(y1, W)[2][:, None]
        res = []
        for j in range(0, cand.shape[1], chunk):
            d = cand[:, j:j + chunk, None, None] + delta[:, None, :, None]  # (N, c, S, 1)
            res.append(_period_scores(zn, _ctf2(s2, d, optics), W, w))
        return torch.cat(res, 1)

    d_ref = torch.full((n,), math.sqrt(lo * hi), device=dev)
    best = None
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
    c = _ctf2(s2, D[:, None, None] + delta[:, :, None], optics)[:, None]
    mc = _apply(W, c)
    m = c - mc
    env = (_apply(W, z[:, None] * m) / _apply(W, m * m).clamp(min=1e-12)).clamp(min=0)
    return D, fs[idx, k], bg, env[:, 0], mc[:, 0]


# ----------------------------------------------------------------------------- 2D refine

def _refine_2d(z2: torch.Tensor, env: torch.Tensor, offset: torch.Tensor, delta: torch.Tensor, grid: _Grid,
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
    moves = torch.stack(moves)  # (M, 3)

    def cc_of(params_: torch.Tensor) -> torch.Tensor:  # (N, M, 3) -> (N, M)
        d = (params_[..., 0:1] + params_[..., 1:2] * grid.cos2 + params_[..., 2:3] * grid.sin2)  # (N, M, P)
        d = d[:, :, None, :] + delta[:, None, :, None]  # (N, M, S, P)
        m = (_ctf2(grid.s2, d, optics) - offset[:, None]) * env[:, None]
        count = m.shape[2] * m.shape[3]
        num = (m * zc[:, None]).sum(dim=(2, 3))  # zc has zero mean: no need to centre m
        var = m.square().sum(dim=(2, 3)) - m.sum(dim=(2, 3)).square() / count
        return num / (var.clamp(min=1e-12).sqrt() * znorm[:, None])

    cur = cc_of(x[:, None])[:, 0]
    for _ in range(max_iter):
        active = (step[:, :n_par] > min_step[:n_par]).any(1)
        if not bool(active.any()):
            break
        cand = x[:, None] + moves[None] * step[:, None]  # (N, M, 3)
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
    lam = electron_wavelength_A(optics.voltage_kV)
    a = 0.5 * math.pi * optics.cs_mm * 1e7 * lam ** 3
    nb = math.pi * lam * defocus_A  # -b
    disc = (nb * nb + 4 * a * chi).clamp(min=0)
    return (-2 * chi / (nb + torch.sqrt(disc))).clamp(min=0)


def _chi(s2: torch.Tensor, defocus_A: torch.Tensor, optics: Optics) -> torch.Tensor:
    lam = electron_wavelength_A(optics.voltage_kV)
    return -math.pi * lam * defocus_A * s2 + 0.5 * math.pi * optics.cs_mm * 1e7 * lam ** 3 * s2 * s2


def _fit_statistics(logp: torch.Tensor, delta: torch.Tensor, D: torch.Tensor, a1: torch.Tensor,
                    a2: torch.Tensor, optics: Optics, band: Band, params: CtfSearchParams,
                    want_diagnostics: bool):
    """Equiphase 1D average over the whole spectrum, windowed CC, fit resolution."""
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
    chi = _chi(s2, d_pix, optics)
    seq = _equiphase_frequency2(chi, D[:, None, None], optics).sqrt()  # (N, S, Q) 1/Å
    # bins of half a Fourier pixel along s
    ds = 0.5 / (box * p)
    n_bins = int(0.5 / p / ds) + 2
    b = torch.clamp((seq / ds).round().long(), max=n_bins - 1)
    flat_b = (b + torch.arange(n, device=dev)[:, None, None] * n_bins).reshape(-1)
    sums = torch.zeros(n * n_bins, device=dev).index_add_(0, flat_b, vals.reshape(-1)).reshape(n, n_bins)
    cnts = torch.zeros(n * n_bins, device=dev).index_add_(0, flat_b, torch.ones_like(flat_b, dtype=torch.float32)).reshape(n, n_bins)
    s_axis = torch.arange(n_bins, device=dev) * ds
    results = []
    s_lo_band = 1.0 / band.res_min_A
    for i in range(n):
        ok = (cnts[i] >= 4) & (s_axis >= s_lo_band * 0.999) & (s_axis <= 1.0 / (2 * p))
        s_i = s_axis[ok]
        y_i = sums[i][ok] / cnts[i][ok]
        ctf2_i = _ctf2(s_i ** 2, D[i], optics)
        chi_i = _chi(s_i ** 2, D[i], optics)
        # background and envelope over the whole range (higher order than in the band)
        t = 2 * (s_i - s_i[0]) / (s_i[-1] - s_i[0]).clamp(min=1e-12) - 1
        kb, ke = model_degrees(float(s_i[0]), float(s_i[-1]), float(D[i]), optics, 6, 4)
        Bb = _poly_basis(t, kb)
        Be = _poly_basis(t, ke)
        X = torch.cat([Bb, Be * ctf2_i[:, None]], 1)
        G = X.T @ X
        G = G + 1e-6 * G.diagonal().mean() * torch.eye(G.shape[0], device=dev)
        Ginv = torch.linalg.inv(G)
        beta = Ginv @ (X.T @ y_i)
        bg = Bb @ beta[: Bb.shape[1]]
        env = Be @ beta[Bb.shape[1]:]
        # t statistic of the mean envelope (CTF amplitude): ~N(0,1) without Thon rings
        dof = max(1, len(y_i) - X.shape[1])
        sigma2 = (y_i - X @ beta).square().sum() / dof
        w = torch.zeros(X.shape[1], device=dev)
        w[Bb.shape[1]:] = Be.mean(0)
        t_env = float((w @ beta) / torch.sqrt(sigma2 * (w @ Ginv @ w)).clamp(min=1e-12))
        resid = y_i - bg
        # windowed correlation: window = +-1 period of CTF² (|Δχ| <= π) around each bin
        W = ((chi_i[:, None] - chi_i[None, :]).abs() <= math.pi).float()  # (L, L)
        cnt = W.sum(1)
        mx = W @ resid / cnt
        my = W @ ctf2_i / cnt
        sxy = W @ (resid * ctf2_i) / cnt - mx * my
        sxx = (W @ resid.square() / cnt - mx * mx).clamp(min=1e-12)
        syy = (W @ ctf2_i.square() / cnt - my * my).clamp(min=1e-12)
        cc = sxy / torch.sqrt(sxx * syy)
        cc = torch.where(cnt >= 5, cc, torch.zeros_like(cc))
        # zeros of the CTF: phases zero_phase - kπ (k = 0, 1, ...) for underfocus
        zero_phase = math.atan2(optics.amplitude_contrast, math.sqrt(1 - optics.amplitude_contrast ** 2))
        order = torch.floor((zero_phase - chi_i) / math.pi)  # zeros passed at each s
        first = s_i[order >= 1]
        s1 = float(first[0]) if len(first) else float(s_i[-1])
        below = (cc < params.cc_threshold) & (s_i > s1)
        s_fail = float(s_i[below][0]) if bool(below.any()) else float(s_i[-1])
        fit_res = 1.0 / max(s_fail, 1e-6)
        zeros_fitted = int(order[s_i < s_fail].max()) if bool((s_i < s_fail).any()) else 0
        diag = None
        if want_diagnostics:
            diag = {"s_A": s_i.cpu().numpy(), "profile": resid.cpu().numpy(), "model": (env * ctf2_i).cpu().numpy(),
                    "cc": cc.cpu().numpy(), "first_zero_A": 1.0 / s1}
        results.append({"fit_res_A": fit_res, "first_zero_A": 1.0 / s1, "zeros_fitted": zeros_fitted,
                        "t_env": t_env, "diag": diag})
    return results


def _display_spectrum(logp: torch.Tensor, delta: torch.Tensor, D: torch.Tensor, a1, a2, bg_bin: torch.Tensor,
                      env_bin: torch.Tensor, grid: _Grid, optics: Optics, band: Band) -> tuple[np.ndarray, np.ndarray]:
    """Centred (box, box) spectrum of one image (strips stretched onto the central defocus)
    and the fitted model, both background-subtracted and scaled alike (for plots)."""
    box = logp.shape[-2]
    dev = logp.device
    p = optics.pixel_size_A
    S = logp.shape[0]
    full = []
    for j in range(S):
        h = logp[j]
        f = torch.empty(box, box, device=dev)
        f[:, : box // 2 + 1] = h
        # Hermitian mate: P(-ky, -kx) = P(ky, kx)
        idx_y = (-torch.arange(box, device=dev)) % box
        kxs = torch.arange(box // 2 + 1, box, device=dev)
        f[:, kxs] = h[idx_y][:, (box - kxs)]
        full.append(torch.fft.fftshift(f))
    full = torch.stack(full)  # (S, box, box) centred
    c = torch.arange(box, device=dev, dtype=torch.float32) - box // 2
    KY, KX = torch.meshgrid(c, c, indexing="ij")
    scale = torch.sqrt(D / (D + delta).clamp(min=1.0))  # (S,)
    gx = (KX[None] * scale[:, None, None] + box // 2) / (box - 1) * 2 - 1
    gy = (KY[None] * scale[:, None, None] + box // 2) / (box - 1) * 2 - 1
    g = torch.stack([gx, gy], -1)
    samp = torch.nn.functional.grid_sample(full[:, None], g, mode="bilinear", align_corners=True, padding_mode="border")
    avg = samp[:, 0].mean(0)
    r = torch.sqrt(KX ** 2 + KY ** 2)
    s = r / (box * p)
    s_lo, s_hi = 1.0 / band.res_min_A, 1.0 / band.res_max_A
    # background per radial bin, linearly interpolated at each pixel's radius (held beyond the band)
    r_bin = grid.s_bin * box * p
    pos = torch.from_numpy(np.interp(r.reshape(-1).cpu().numpy(), r_bin.cpu().numpy(),
                                     np.arange(len(r_bin), dtype=np.float64))).to(dev, torch.float32)
    lo_i = pos.floor().long().clamp(max=len(r_bin) - 2)
    fr = pos - lo_i
    bg = (bg_bin[lo_i] * (1 - fr) + bg_bin[lo_i + 1] * fr).reshape(box, box)
    phi = torch.atan2(KY, KX)
    d = D + a1 * torch.cos(2 * phi) + a2 * torch.sin(2 * phi)
    # data: background removed, lightly smoothed, scaled to unit spread on every ring
    data = torch.nn.functional.avg_pool2d((avg - bg)[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    ring = torch.round(r).long().clamp(max=box)
    cnt = torch.zeros(box + 1, device=dev).index_add_(0, ring.reshape(-1), torch.ones(box * box, device=dev))
    m1 = torch.zeros(box + 1, device=dev).index_add_(0, ring.reshape(-1), data.reshape(-1)) / cnt.clamp(min=1)
    m2 = torch.zeros(box + 1, device=dev).index_add_(0, ring.reshape(-1), data.reshape(-1) ** 2) / cnt.clamp(min=1)
    sd = (m2 - m1 ** 2).clamp(min=1e-12).sqrt()
    data = data / sd[ring]
    model = _ctf2(s * s, d, optics)
    inband = (s >= s_lo) & (s <= s_hi)
    if bool(inband.any()):
        lo, hi = torch.quantile(data[inband], 0.03), torch.quantile(data[inband], 0.97)
        data = (data - lo) / (hi - lo).clamp(min=1e-9)
    data = torch.where(s < s_lo, torch.full_like(data, 0.5), data)
    model = torch.where(s < s_lo, torch.full_like(model, 0.5), model)
    # show the spectrum out to a little beyond the fitting band
    half = min(box // 2, int(math.ceil(1.15 * box * p * s_hi)))
    sl = slice(box // 2 - half, box // 2 + half)
    data, model = data[sl, sl], model[sl, sl]
    return data.cpu().numpy(), model.cpu().numpy()


# ----------------------------------------------------------------------------- driver

def uv_angle(D: np.ndarray, a1: np.ndarray, a2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean defocus, a1, a2) -> (DefocusU >= DefocusV, angle of U in degrees, (-90, 90])."""
    amp = np.hypot(a1, a2)
    ang = 0.5 * np.degrees(np.arctan2(a2, a1))
    return D + amp, D - amp, ang


def astig_vector(u: np.ndarray, v: np.ndarray, angle_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`uv_angle`: (U, V, angle) -> (mean defocus, a1, a2)."""
    half = (np.asarray(u, float) - np.asarray(v, float)) / 2
    th = np.radians(2 * np.asarray(angle_deg, float))
    return (np.asarray(u, float) + np.asarray(v, float)) / 2, half * np.cos(th), half * np.sin(th)


def estimate_ctf(images: torch.Tensor, tilt_deg, optics: Optics, params: CtfSearchParams = CtfSearchParams(),
                 diagnostics: bool = False) -> CtfFit:
    """Estimate defocus, astigmatism and fit quality of a batch of same-size images.

    images: (N, ny, nx) tensor (any device; computation follows it). tilt_deg: N tilt
    angles (°) for the defocus-gradient model. Defoci are at the image centre.
    """
    if images.ndim == 2:
        images = images[None]
    n, ny, nx = images.shape
    dev = images.device
    band = effective_band((ny, nx), optics.pixel_size_A, params)
    if params.defocus_max_A <= params.defocus_min_A or params.defocus_step_A <= 0:
        raise SubtomoError(f"defocus search range {params.defocus_min_A:g}-{params.defocus_max_A:g} A, step "
                           f"{params.defocus_step_A:g} A: need min < max and step > 0.")
    tilt = torch.as_tensor(np.asarray(tilt_deg, dtype=np.float32).reshape(-1), device=dev)
    if len(tilt) != n:
        raise SubtomoError(f"{n} images but {len(tilt)} tilt angles given.")
    logp, strip_x = strip_log_spectra(images, band.box_px, optics.pixel_size_A)
    grid = _make_grid(band.box_px, optics.pixel_size_A, band, dev)
    S = logp.shape[1]
    y2 = logp.reshape(n, S, -1)[..., grid.flat_index]  # (N, S, P)
    y1 = _radial_profiles(y2, grid)  # (N, S, R)
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
    failed = np.zeros(n, dtype=bool)
    reasons = []
    for i in range(n):
        why = []
        if signif[i] < params.min_significance:
            why.append(f"Thon rings not significant (t = {signif[i]:.1f} < {params.min_significance:g})")
        if float(score1[i]) <= 0:
            why.append("the fitted Thon rings are out of phase with the data")
        failed[i] = bool(why)
        reasons.append("; ".join(why))
    diags = None
    if diagnostics:
        diags = []
        for i in range(n):
            data2d, model2d = _display_spectrum(logp[i], delta[i], D[i], a1[i], a2[i], bg1[i].mean(0),
                                                env1[i].mean(0), grid, optics, band)
            d = dict(stats[i]["diag"])
            d.update({"spectrum": data2d, "model2d": model2d, "band": band, "pixel_size_A": optics.pixel_size_A,
                      "fit_res_A": float(fit_res[i]), "significance": float(signif[i]),
                      "tilt_deg": float(tilt[i]), "strip_defocus_offsets_A": delta[i].cpu().numpy()})
            diags.append(d)
    return CtfFit(u, v, ang, cc.cpu().numpy().astype(np.float64), fit_res, failed, signif, reasons, diags)


def with_band_notes(params: CtfSearchParams, shape_yx, pixel_size_A) -> tuple[CtfSearchParams, list[str]]:
    """Params with box/resolution replaced by the effective ones, and the notes why."""
    band = effective_band(shape_yx, pixel_size_A, params)
    return replace(params, box_px=band.box_px, res_min_A=band.res_min_A, res_max_A=band.res_max_A), list(band.notes)


def synthetic_tilt_images(defocus_u_A, defocus_v_A, angle_deg, tilt_deg, optics: Optics, size: int = 512,
                          snr: float = 0.3, bfactor_A2: float = 150.0, seed: int = 0,
                          device=None) -> torch.Tensor:
    """Simulated tilt images with known CTF, for tests and benchmarks.

    A random-phase object (white noise with a mild low-pass), multiplied by the CTF with
    the tilted-plane defocus ``D + x tan θ`` across x (Å from the centre), an envelope
    exp(-B s²/4), scaled to variance ``snr`` (0: no signal), plus unit white noise and a
    slowly varying background.
    Returns (N, size, size) float32.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    du = np.atleast_1d(np.asarray(defocus_u_A, float))
    dv = np.atleast_1d(np.asarray(defocus_v_A, float))
    an = np.atleast_1d(np.asarray(angle_deg, float))
    tl = np.atleast_1d(np.asarray(tilt_deg, float))
    n = len(du)
    p = optics.pixel_size_A
    ky = torch.fft.fftfreq(size, d=p)
    kx = torch.fft.rfftfreq(size, d=p)
    KY, KX = torch.meshgrid(ky, kx, indexing="ij")
    s2 = KX ** 2 + KY ** 2
    phi = torch.atan2(KY, KX)
    x_A = (torch.arange(size, dtype=torch.float32) - size // 2) * p
    shape = 1.0 / (1.0 + s2 * 40.0 ** 2) ** 0.25  # mild fall-off of the object spectrum
    env = torch.exp(-bfactor_A2 * s2 / 4)
    out = torch.empty(n, size, size)
    for i in range(n):
        obj = torch.fft.rfft2(torch.randn(size, size, generator=gen)) * shape
        half = (du[i] - dv[i]) / 2
        ddef = half * torch.cos(2 * (phi - math.radians(an[i])))
        grad = math.tan(math.radians(tl[i]))
        span = float(x_A.abs().max()) * abs(grad)
        k = max(2, int(math.ceil(2 * span / 100.0)) + 1) if span > 0 else 1
        offsets = np.linspace(-span, span, k) if k > 1 else np.zeros(1)
        layers = []
        for off in offsets:
            d = (du[i] + dv[i]) / 2 + off + ddef
            c = ctf_from_defocus(s2, d, optics.voltage_kV, optics.cs_mm, optics.amplitude_contrast)
            layers.append(torch.fft.irfft2(obj * c * env, s=(size, size)))
        if k == 1:
            img = layers[0]
        else:
            pos = torch.from_numpy(np.interp((x_A * grad).numpy(), offsets, np.arange(k))).float()
            lo = pos.floor().long().clamp(max=k - 2)
            w = pos - lo
            stack = torch.stack(layers)  # (k, y, x)
            cols = torch.arange(size)
            img = stack[lo, :, cols].T * (1 - w) + stack[lo + 1, :, cols].T * w
        sig = img / img.std() * math.sqrt(max(snr, 0.0))
        noise = torch.randn(size, size, generator=gen)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
        background = 0.5 * torch.cos(2.0 * xx + 1.0) * torch.cos(1.5 * yy)
        out[i] = sig + noise + background + 10.0
    return out.to(device) if device is not None else out
