"""Power spectra of tilt images for CTF estimation: tiles, column strips, the band's pixel grid.

Each image is cut into 50 %-overlapping tiles (``box`` pixels), each tile loses its mean
and linear ramp, is tapered and Fourier transformed; tiles in the same column (same
distance from the tilt axis, hence the same defocus on a flat specimen) are averaged into
one spectrum per strip, of which the log is used (:func:`strip_log_spectra`).
:class:`SpectrumGrid` lists the rfft pixels inside the fitting band with their frequency,
direction and radial bin. :func:`display_spectrum` makes the picture of one fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from subtomo.ctf.model import Optics, ctf_squared


@dataclass(frozen=True)
class Band:
    """Box and fitting band actually used for an image size (after adapting to Nyquist).

    Attributes
    ----------
    box_px : int
        Tile box [px].
    res_min_A, res_max_A : float
        Low and high resolution limits of the fit [Å].
    notes : tuple of str
        What was changed from the requested values, and why.
    """

    box_px: int
    res_min_A: float
    res_max_A: float
    notes: tuple[str, ...] = ()

    def radii_px(self, pixel_size_A: float) -> tuple[float, float]:
        """(low, high) band limits as radii in Fourier pixels of the tile box, at ``pixel_size_A`` [Å]."""
        return self.box_px * pixel_size_A / self.res_min_A, self.box_px * pixel_size_A / self.res_max_A


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

    Parameters
    ----------
    images : torch.Tensor
        (N, ny, nx) real images.
    box : int
        Tile box [px], even.
    pixel_size_A : float
        Pixel size [Å].
    chunk : int
        Images transformed at once (memory).

    Returns
    -------
    logp : torch.Tensor
        (N, S, box, box//2+1) log power in the rfft layout, S strips.
    centres_A : torch.Tensor
        (S,) strip centre x positions from the image centre [Å], + to the right.
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
class SpectrumGrid:
    """Geometry of the tile spectrum: the P band pixels, R radial bins and their frequencies.

    Attributes
    ----------
    box : int
        Tile box [px].
    s2, cos2, sin2 : torch.Tensor
        (P,) squared frequency [1/Å²] and cos/sin 2φ of each band pixel.
    flat_index : torch.Tensor
        (P,) index into the flattened (box, box//2+1) grid.
    bin_of_pixel : torch.Tensor
        (P,) radial bin 0..R-1 of each pixel.
    s_bin, t_bin, count_bin : torch.Tensor
        (R,) mean frequency [1/Å], frequency mapped to [-1, 1] over the band, pixel count.
    t_pixel : torch.Tensor
        (P,) frequency of each pixel mapped to [-1, 1].
    """

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


def make_grid(box: int, pixel_size_A: float, band: Band, device) -> SpectrumGrid:
    """The rfft pixels of a (box, box) tile inside the fitting band.

    Parameters
    ----------
    box : int
        Tile size [px].
    pixel_size_A : float
        Pixel size [Å].
    band : Band
        Resolution band.
    device : torch.device or str
        Where the tensors live.

    Returns
    -------
    SpectrumGrid
        P band pixels grouped into R radial bins of one Fourier pixel.
    """
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
    return SpectrumGrid(box, s ** 2, torch.cos(2 * phi), torch.sin(2 * phi), flat_index, bins, s_bin,
                 to_t(s_bin), to_t(s), count)


def legendre_basis(t: torch.Tensor, degree: int) -> torch.Tensor:
    """Legendre polynomials P_0..P_degree.

    Parameters
    ----------
    t : torch.Tensor
        (...) points in [-1, 1].
    degree : int
        Highest degree.

    Returns
    -------
    torch.Tensor
        (..., degree+1).
    """
    cols = [torch.ones_like(t), t]
    for k in range(1, degree):
        cols.append(((2 * k + 1) * t * cols[k] - k * cols[k - 1]) / (k + 1))
    return torch.stack(cols[: degree + 1], dim=-1)


def radial_profiles(values: torch.Tensor, grid: SpectrumGrid) -> torch.Tensor:
    """Mean of band pixels per radial bin.

    Parameters
    ----------
    values : torch.Tensor
        (..., P) values of the band pixels.
    grid : SpectrumGrid
        The band's grid.

    Returns
    -------
    torch.Tensor
        (..., R).
    """
    out = torch.zeros(*values.shape[:-1], len(grid.count_bin), device=values.device, dtype=values.dtype)
    out.index_add_(-1, grid.bin_of_pixel, values)
    return out / grid.count_bin


def _centred_full_spectra(logp: torch.Tensor) -> torch.Tensor:
    """(S, box, box//2+1) rfft-layout spectra -> (S, box, box) centred full spectra (Hermitian mates filled)."""
    S, box = logp.shape[0], logp.shape[-2]
    dev = logp.device
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
    return torch.stack(full)


def _stretched_average(full: torch.Tensor, D: torch.Tensor, delta: torch.Tensor, KX: torch.Tensor,
                       KY: torch.Tensor) -> torch.Tensor:
    """Mean of the strips' spectra (S, box, box), each stretched by sqrt(D / (D + delta)) onto defocus D."""
    box = full.shape[-1]
    scale = torch.sqrt(D / (D + delta).clamp(min=1.0))  # (S,)
    gx = (KX[None] * scale[:, None, None] + box // 2) / (box - 1) * 2 - 1
    gy = (KY[None] * scale[:, None, None] + box // 2) / (box - 1) * 2 - 1
    g = torch.stack([gx, gy], -1)
    samp = torch.nn.functional.grid_sample(full[:, None], g, mode="bilinear", align_corners=True, padding_mode="border")
    return samp[:, 0].mean(0)


def _background_image(r: torch.Tensor, r_bin: torch.Tensor, bg_bin: torch.Tensor) -> torch.Tensor:
    """Background per radial bin, linearly interpolated at each pixel's radius r (box, box) [px] (held beyond the band)."""
    dev = r.device
    pos = torch.from_numpy(np.interp(r.reshape(-1).cpu().numpy(), r_bin.cpu().numpy(),
                                     np.arange(len(r_bin), dtype=np.float64))).to(dev, torch.float32)
    lo_i = pos.floor().long().clamp(max=len(r_bin) - 2)
    fr = pos - lo_i
    return (bg_bin[lo_i] * (1 - fr) + bg_bin[lo_i + 1] * fr).reshape(r.shape)


def _unit_spread_per_ring(data: torch.Tensor, r: torch.Tensor, box: int) -> torch.Tensor:
    """``data`` (box, box) divided by its standard deviation on each ring of radius round(r) [px]."""
    dev = data.device
    ring = torch.round(r).long().clamp(max=box)
    cnt = torch.zeros(box + 1, device=dev).index_add_(0, ring.reshape(-1), torch.ones(box * box, device=dev))
    m1 = torch.zeros(box + 1, device=dev).index_add_(0, ring.reshape(-1), data.reshape(-1)) / cnt.clamp(min=1)
    m2 = torch.zeros(box + 1, device=dev).index_add_(0, ring.reshape(-1), data.reshape(-1) ** 2) / cnt.clamp(min=1)
    sd = (m2 - m1 ** 2).clamp(min=1e-12).sqrt()
    return data / sd[ring]


def display_spectrum(logp: torch.Tensor, delta: torch.Tensor, D: torch.Tensor, a1, a2, bg_bin: torch.Tensor,
                      env_bin: torch.Tensor, grid: SpectrumGrid, optics: Optics, band: Band) -> tuple[np.ndarray, np.ndarray]:
    """Picture of one fit: the spectrum and the fitted CTF², background-subtracted and scaled alike.

    The strips of the image are stretched onto the defocus at the image centre before they
    are averaged, so the rings of a tilted image line up.

    Parameters
    ----------
    logp : torch.Tensor
        (S, box, box//2+1) log power of the image's S strips.
    delta : torch.Tensor
        (S,) defocus offset of each strip [Å].
    D, a1, a2 : torch.Tensor
        Fitted mean defocus and astigmatism vector [Å] (scalars).
    bg_bin, env_bin : torch.Tensor
        (R,) background and envelope per radial bin of ``grid``.
    grid : SpectrumGrid
        The band's pixel grid.
    optics : Optics
        Microscope and pixel size.
    band : Band
        Fitting band.

    Returns
    -------
    data, model : numpy.ndarray
        (M, M) centred images, M a little more than the band's diameter in pixels.
    """
    box = logp.shape[-2]
    dev = logp.device
    p = optics.pixel_size_A
    c = torch.arange(box, device=dev, dtype=torch.float32) - box // 2
    KY, KX = torch.meshgrid(c, c, indexing="ij")
    avg = _stretched_average(_centred_full_spectra(logp), D, delta, KX, KY)
    r = torch.sqrt(KX ** 2 + KY ** 2)
    s = r / (box * p)
    s_lo, s_hi = 1.0 / band.res_min_A, 1.0 / band.res_max_A
    bg = _background_image(r, grid.s_bin * box * p, bg_bin)
    phi = torch.atan2(KY, KX)
    d = D + a1 * torch.cos(2 * phi) + a2 * torch.sin(2 * phi)
    # data: background removed, lightly smoothed, scaled to unit spread on every ring
    data = torch.nn.functional.avg_pool2d((avg - bg)[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    data = _unit_spread_per_ring(data, r, box)
    model = ctf_squared(s * s, d, optics)
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
