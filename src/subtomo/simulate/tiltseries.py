"""Image formation of a tilt series (weak-phase approximation, tilt axis = y).

Each object (particle, gold bead, junk blob) is projected through the Fourier slice
theorem: its map's 3D transform (zero-padded 2x) is sampled on the tilt's central plane
rotated by the object's pose, then multiplied by

* the CTF of the object's own defocus ``D_θ − h`` (h = height along the beam, conventions),
  with the tilt's astigmatism,
* the radiation-damage attenuation exp(−N / 2N_e(s)) with Grant & Grigorieff's (2015)
  critical exposure N_e(s) = 0.245 s^−1.665 + 2.81 e/Å² at the image's mean accumulated dose,
* the detector MTF (optional) and an image B-factor (drift, vibration),
* a sub-pixel phase shift; then pasted at its image position.

The contrast is −2 σ_e × (filtered projected potential), σ_e the interaction constant,
so protein is dark in underfocus (as in real micrographs). Ice adds (a) a random 3D
low-resolution density in the slab, projected consistently across tilts, and (b) the
broad-band projected-potential fluctuations of amorphous water, variance ∝ path length
t / cos θ, both CTF-filtered with the defocus gradient across the tilted image. Electrons
lost to inelastic scattering (energy filter, mean free path λ_in) reduce the counts at
high tilt; shot noise is Poisson at the per-tilt dose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from subtomo.ctf.model import Optics, ctf_2d, ctf_of_phase, electron_wavelength_A, phase_coefficients
from subtomo.errors import SubtomoError
from subtomo.fourier import fft_centered, ifft_centered, phase_shift, rfft_frequencies
from subtomo.geometry.tilt import project_to_tilt

WATER_MOLECULES_PER_A3 = 0.0307  # vitreous ice, 0.92 g/cm³
WATER_POTENTIAL_INTEGRAL_V_A3 = 47.878 * (0.0974 + 0.2921 + 0.6910 + 0.6990 + 0.2039
                                          + 2 * (0.0349 + 0.1201 + 0.1970 + 0.0573 + 0.1195))  # O + 2 H
MIN_RELATIVE_INTENSITY = 0.02  # weak-phase contrast is clipped here (gold beads)


def interaction_constant(voltage_kV: float) -> float:
    """σ_e in rad / (V·Å): phase shift per unit projected potential (relativistic)."""
    lam = electron_wavelength_A(voltage_kV)
    e0 = 510.99895  # rest energy, keV
    return 2 * math.pi / (lam * voltage_kV * 1e3) * (e0 + voltage_kV) / (2 * e0 + voltage_kV)


def critical_exposure(s_A: torch.Tensor) -> torch.Tensor:
    """Grant & Grigorieff (2015) critical exposure (e/Å²) at spatial frequency s (1/Å), 300 kV."""
    return 0.245 * s_A.clamp(min=1e-4) ** -1.665 + 2.81


def tilt_scheme(tilt_min_deg: float, tilt_max_deg: float, step_deg: float, scheme: str,
                group: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Tilt angles in stack order (ascending) and each image's acquisition index (0 = first).

    ``dose-symmetric`` (Hagen et al. 2017): start at the tilt nearest 0, then alternate
    groups of ``group`` tilts on each side. ``bidirectional``: from the tilt nearest 0 up to
    the maximum, then from the first negative step down to the minimum.
    """
    n = int(math.floor((tilt_max_deg - tilt_min_deg) / step_deg + 1e-6)) + 1
    if n < 2:
        raise SubtomoError(f"tilt range {tilt_min_deg}..{tilt_max_deg} with step {step_deg}: fewer than 2 tilts.")
    tilts = tilt_min_deg + step_deg * np.arange(n)
    start = int(np.argmin(np.abs(tilts)))
    up = list(range(start + 1, n))
    down = list(range(start - 1, -1, -1))
    order = [start]
    if scheme == "dose-symmetric":
        while up or down:
            for side in (up, down):
                order.extend(side[:group])
                del side[:group]
    elif scheme == "bidirectional":
        order += up + down
    else:
        raise SubtomoError(f"--tilt-scheme {scheme!r}: use dose-symmetric or bidirectional.")
    acq = np.empty(n, dtype=np.int64)
    acq[np.asarray(order)] = np.arange(n)
    return tilts, acq


@dataclass
class TiltGeometry:
    """One tilt series' acquisition (arrays in stack order)."""

    tilts_deg: np.ndarray  # the refined tilts written to .tlt
    true_tilts_deg: np.ndarray  # what the specimen really saw (residual misalignment)
    shifts_px: np.ndarray  # (T, 2) residual image shifts x, y (content moves by +shift)
    acquisition: np.ndarray  # acquisition index
    pre_dose: np.ndarray  # accumulated dose before the image, e/Å²
    dose_per_tilt: float
    defocus_A: np.ndarray  # mean defocus at the tomogram centre (positive underfocus)
    astigmatism_A: np.ndarray  # defocus U - V
    astigmatism_angle_deg: np.ndarray
    image_shape: tuple[int, int]  # (ny, nx)
    pixel_size_A: float
    defocus_hand: int = -1  # defocus = D_θ + hand·h (−1: D_θ − h, docs/conventions.md; +1: data of the other hand)

    @property
    def defocus_u(self) -> np.ndarray:
        return self.defocus_A + self.astigmatism_A / 2

    @property
    def defocus_v(self) -> np.ndarray:
        return self.defocus_A - self.astigmatism_A / 2


@dataclass(frozen=True)
class Detector:
    """What the image goes through after the CTF: the detector MTF and an image B-factor.

    The microscope itself is :class:`subtomo.ctf.model.Optics`.
    """

    image_bfactor_A2: float = 0.0  # drift, vibration
    mtf: tuple[np.ndarray, np.ndarray] | None = None  # (cycles per detector pixel, value)
    detector_pixel_A: float = 1.0


def mean_exposure(geom: TiltGeometry) -> np.ndarray:
    """Mean accumulated dose during each image (e/Å²): the pre-exposure plus half the image's own dose."""
    return geom.pre_dose + geom.dose_per_tilt / 2


def image_filters(freq_A: torch.Tensor, dose_e_A2: np.ndarray, detector: Detector) -> torch.Tensor:
    """Object-independent amplitude filters (T, *grid) at each dose: radiation damage × MTF × B envelope."""
    s = freq_A.norm(dim=-1)
    dose = torch.as_tensor(np.asarray(dose_e_A2, dtype=np.float64), dtype=s.dtype, device=s.device)
    filt = torch.exp(-dose.reshape(-1, *([1] * s.ndim)) / (2 * critical_exposure(s)))
    filt = filt * torch.exp(-detector.image_bfactor_A2 * s ** 2 / 4)
    if detector.mtf is not None:
        fx, fv = detector.mtf
        sd = (s * detector.detector_pixel_A).cpu().numpy()
        filt = filt * torch.as_tensor(np.interp(sd, fx, fv), dtype=s.dtype, device=s.device)
    return filt


class FourierSliceProjector:
    """Projections of a map at arbitrary poses and tilts by central slices of its padded 3D FT."""

    def __init__(self, volume: torch.Tensor, patch: int) -> None:
        n = volume.shape[-1]
        self.box, self.patch, self.np = n, patch, 2 * n
        padded = F.pad(volume.float(), [n // 2] * 6)
        ft = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(padded)))
        self.grid = torch.stack([ft.real, ft.imag])[None].contiguous()  # (1, 2, D, H, W)
        k = rfft_frequencies((patch, patch), device=volume.device)  # cycles/px, (x, y)
        self.k2d = k
        self.inside = (k.norm(dim=-1) <= 0.5)

    def project(self, rot: torch.Tensor, tilt_rad: torch.Tensor) -> torch.Tensor:
        """FTs (B, patch, patch//2+1) of the projections of the map rotated by ``rot`` (B,3,3) at tilts (B,).

        Values are sums over voxels (multiply by the pixel size for V·Å); the phase origin
        is the patch centre (``subtomo.fourier`` layout).
        """
        kx, ky = self.k2d[..., 0] * self.np, self.k2d[..., 1] * self.np  # padded-grid index units
        c, s = torch.cos(tilt_rad)[:, None, None], torch.sin(tilt_rad)[:, None, None]
        kt = torch.stack([kx * c, ky.expand_as(kx * c), kx * s], dim=-1)  # (B, P, Q, 3) tomogram frame
        kref = torch.einsum("bpqi,bij->bpqj", kt, rot.to(kt.dtype))  # Aᵀ k as row vectors
        g = 2 * (kref + self.np // 2) / (self.np - 1) - 1
        out = F.grid_sample(self.grid, g[None].to(self.grid.dtype), mode="bilinear", padding_mode="zeros",
                            align_corners=True)[0]  # (2, B, P, Q)
        return torch.complex(out[0], out[1]) * self.inside


def render_objects(canvas: torch.Tensor, pad: int, projector: FourierSliceProjector, centres_A: np.ndarray,
                   matrices: np.ndarray, geom: TiltGeometry, optics: Optics, filters: torch.Tensor,
                   samples_per_chunk: int = 10 ** 6) -> None:
    """Add the contrast of objects sharing one map to ``canvas`` (T, ny+2pad, nx+2pad), in place.

    (object, tilt) pairs are processed in chunks of about ``samples_per_chunk`` Fourier
    samples, which bounds the memory (~100 B per sample).
    """
    if len(centres_A) == 0:
        return
    dev = canvas.device
    t_all, hc, wc = canvas.shape
    ny, nx = geom.image_shape
    p = geom.pixel_size_A
    m = projector.patch
    n_obj, n_tilt = len(centres_A), len(geom.tilts_deg)
    oi, ti = np.meshgrid(np.arange(n_obj), np.arange(n_tilt), indexing="ij")
    oi, ti = oi.ravel(), ti.ravel()
    theta = np.deg2rad(geom.true_tilts_deg[ti])
    c = centres_A[oi]
    x_all, _, h_all = project_to_tilt(centres_A, geom.true_tilts_deg)  # (objects, tilts)
    x_img, h = x_all[oi, ti], h_all[oi, ti]
    col = nx / 2 + x_img / p + geom.shifts_px[ti, 0]
    row = ny / 2 + c[:, 1] / p + geom.shifts_px[ti, 1]
    col0, row0 = np.floor(col), np.floor(row)
    frac = np.stack([col - col0, row - row0], axis=1)
    freq_A = projector.k2d / p
    sigma = interaction_constant(optics.voltage_kV)
    ar = torch.arange(m, device=dev)
    flat = canvas.view(-1)
    chunk = max(1, samples_per_chunk // (m * (m // 2 + 1)))
    dump = flat.numel() - 1  # out-of-canvas pixels land in the last (sacrificial) element
    for start in range(0, len(oi), chunk):
        sl = slice(start, start + chunk)
        b = len(oi[sl])
        rot = torch.as_tensor(matrices[oi[sl]], dtype=torch.float32, device=dev)
        th = torch.as_tensor(theta[sl], dtype=torch.float32, device=dev)
        proj = projector.project(rot, th)
        hh = torch.as_tensor(h[sl], dtype=torch.float32, device=dev).reshape(b, 1, 1)
        tsel = ti[sl]
        du = torch.as_tensor(geom.defocus_u[tsel], dtype=torch.float32, device=dev).reshape(b, 1, 1) + geom.defocus_hand * hh
        dv = torch.as_tensor(geom.defocus_v[tsel], dtype=torch.float32, device=dev).reshape(b, 1, 1) + geom.defocus_hand * hh
        ang = torch.as_tensor(geom.astigmatism_angle_deg[tsel], dtype=torch.float32, device=dev).reshape(b, 1, 1)
        ctf = ctf_2d(freq_A, du, dv, ang, optics.voltage_kV, optics.cs_mm, optics.amplitude_contrast)
        f = proj * ctf * filters[torch.as_tensor(tsel, device=dev)]
        f = phase_shift(f, torch.as_tensor(frac[sl], dtype=torch.float32, device=dev), (m, m))
        patch = ifft_centered(f, (m, m)) * (-2 * sigma * p)  # (b, m, m) contrast
        r = torch.as_tensor(row0[sl], device=dev).long()[:, None, None] - m // 2 + pad + ar[None, :, None]
        q = torch.as_tensor(col0[sl], device=dev).long()[:, None, None] - m // 2 + pad + ar[None, None, :]
        t = torch.as_tensor(tsel, device=dev).long()[:, None, None]
        valid = (r >= 0) & (r < hc) & (q >= 0) & (q < wc)
        idx = torch.where(valid, (t * hc + r) * wc + q, torch.full_like(r, dump))
        flat.index_add_(0, idx.reshape(-1), patch.reshape(-1).to(flat.dtype))
    flat[dump] = 0


class ImageCtfGrid:
    """Frequency-grid quantities of a full (ny, nx) image, computed once per tilt series.

    Evaluates RELION's CTF (``subtomo.ctf.model``) for many defoci cheaply: only the
    defocus-dependent phase term changes between calls.
    """

    def __init__(self, shape: tuple[int, int], pixel_size_A: float, optics: Optics, detector: Detector = Detector(),
                 device=None) -> None:
        freq_A = rfft_frequencies(shape, device=device) / pixel_size_A
        self.shape = shape
        self.s2 = (freq_A ** 2).sum(-1)
        phi = torch.atan2(freq_A[..., 1], freq_A[..., 0])
        self.cos2, self.sin2 = torch.cos(2 * phi), torch.sin(2 * phi)
        self.lam = optics.wavelength_A
        self.k_defocus, k_cs = phase_coefficients(optics.voltage_kV, optics.cs_mm)
        self.cs_term = k_cs * self.s2 ** 2
        self.q0 = optics.amplitude_contrast
        self.ne = critical_exposure(self.s2.sqrt())
        self.static = image_filters(freq_A, np.zeros(1), detector)[0]  # MTF x B envelope (no dose)

    def ctf(self, defocus_A: float, half_astig_A: float, angle_deg: float) -> torch.Tensor:
        a = math.radians(angle_deg)
        d = defocus_A + half_astig_A * (self.cos2 * math.cos(2 * a) + self.sin2 * math.sin(2 * a))
        return ctf_of_phase(self.k_defocus * d * self.s2 + self.cs_term, self.q0)

    def filters(self, dose_e_A2: float) -> torch.Tensor:
        return self.static * torch.exp(-dose_e_A2 / (2 * self.ne))


def ctf_filter_layers(layers: list[tuple[torch.Tensor, float]], geom: TiltGeometry, t: int, grid: ImageCtfGrid,
                      defocus_offset_A: float = 0.0, max_phase_error: float = 0.15) -> torch.Tensor:
    """CTF-filter projections of thin layers (image (ny, nx), height z in Å) of the tilted specimen.

    A plane at height z seen at tilt θ has defocus D_θ + x_img tan θ − z / cos θ at image
    position x_img (``geom.defocus_hand`` −1; +1 flips the sign of the offset). Each layer is filtered at defocus nodes along x spaced so that the CTF
    phase at Nyquist changes by at most ``max_phase_error`` between nodes, and the node
    images are blended linearly along x. Returns the filtered sum (V·Å).
    """
    ny, nx = grid.shape
    p = geom.pixel_size_A
    th = math.radians(geom.true_tilts_deg[t])
    s_nyq2 = (0.5 / p) ** 2
    step_A = 2 * max_phase_error / (math.pi * grid.lam * s_nyq2)
    span = abs(math.tan(th)) * nx * p
    n_nodes = max(2, int(math.ceil(span / step_A)) + 1)
    nodes = torch.linspace(0, nx - 1, n_nodes)
    filt = grid.filters(float(mean_exposure(geom)[t]))
    fts = [fft_centered(img, 2) for img, _ in layers]
    half = float(geom.astigmatism_A[t]) / 2
    ang = float(geom.astigmatism_angle_deg[t])
    stack = []
    for k in range(n_nodes):
        x_img = (float(nodes[k]) - nx / 2) * p
        acc = 0
        for ft, (_, z) in zip(fts, layers):
            d = float(geom.defocus_A[t]) + defocus_offset_A - geom.defocus_hand * (x_img * math.tan(th) - z / math.cos(th))
            acc = acc + ft * grid.ctf(d, half, ang)
        stack.append(acc * filt)
    imgs = ifft_centered(torch.stack(stack), (ny, nx))  # (K, ny, nx)
    pos = torch.arange(nx, dtype=torch.float32)
    spacing = float(nodes[1] - nodes[0])
    w = (1 - (pos[None, :] - nodes[:, None]).abs() / spacing).clamp(min=0)  # (K, nx), sums to 1
    return (imgs * w[:, None, :].to(imgs.dtype)).sum(0)


def ice_texture_field(rng: np.random.Generator, half_extent_A: tuple[float, float], thickness_A: float,
                      length_A: float, std_V: float) -> tuple[torch.Tensor, float]:
    """A smooth random 3D potential (V, zero mean, std ``std_V``, correlation ``length_A``) in the slab.

    Returns the field on a coarse grid (z, y, x) of spacing length/2 and that spacing (Å).
    Covers x in ±half_extent[0], y in ±half_extent[1], z in ±thickness/2.
    """
    from scipy.ndimage import gaussian_filter

    g = length_A / 2
    nx = 2 * int(math.ceil(half_extent_A[0] / g)) + 2
    ny = 2 * int(math.ceil(half_extent_A[1] / g)) + 2
    nz = max(2, int(math.ceil(thickness_A / g)) + 1)
    noise = gaussian_filter(rng.standard_normal((nz + 8, ny, nx)), sigma=2.0, mode="wrap")[4:-4]
    noise *= std_V / max(float(noise.std()), 1e-12)
    return torch.as_tensor(noise, dtype=torch.float32), g


def project_texture(field: torch.Tensor, spacing_A: float, thickness_A: float, tilt_deg: float,
                    shift_px: np.ndarray, image_shape: tuple[int, int], pixel_size_A: float) -> torch.Tensor:
    """Projected potential (V·Å) of the coarse slab field at one tilt, resampled to the image grid."""
    nz, nyf, nxf = field.shape
    ny, nx = image_shape
    th = math.radians(tilt_deg)
    step = spacing_A  # coarse image sampling (Å)
    nxc = int(math.ceil(nx * pixel_size_A / step)) + 3
    nyc = int(math.ceil(ny * pixel_size_A / step)) + 3
    xi = (torch.arange(nxc, dtype=torch.float32) - nxc / 2) * step
    yi = (torch.arange(nyc, dtype=torch.float32) - nyc / 2) * step
    hmax = thickness_A / 2 / max(math.cos(th), 0.05) + spacing_A
    dh = spacing_A / 2
    hs = torch.arange(-hmax, hmax + dh, dh, dtype=torch.float32)
    x_t = xi[None, :] * math.cos(th) - hs[:, None] * math.sin(th)  # (H, X)
    z_t = xi[None, :] * math.sin(th) + hs[:, None] * math.cos(th)
    gx = (x_t / spacing_A + nxf / 2) / (nxf - 1) * 2 - 1
    gz = (z_t / spacing_A + (nz - 1) / 2) / (nz - 1) * 2 - 1
    gy = (yi / spacing_A + nyf / 2) / (nyf - 1) * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[None, :, None], gz[:, None, :]), dim=-1)
    vals = F.grid_sample(field[None, None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)
    proj = vals[0, 0].sum(0) * dh  # (Y, X) V·Å on the coarse grid
    # resample to image pixels (bilinear on the smooth field), honouring the residual shift
    px = (torch.arange(nx, dtype=torch.float32) - nx / 2 - float(shift_px[0])) * pixel_size_A
    py = (torch.arange(ny, dtype=torch.float32) - ny / 2 - float(shift_px[1])) * pixel_size_A
    ux = (px / step + nxc / 2) / (nxc - 1) * 2 - 1
    uy = (py / step + nyc / 2) / (nyc - 1) * 2 - 1
    g2 = torch.stack(torch.broadcast_tensors(ux[None, :], uy[:, None]), dim=-1)
    return F.grid_sample(proj[None, None], g2[None], mode="bicubic", padding_mode="border", align_corners=True)[0, 0]


def water_noise_std(thickness_A: float, tilt_deg: float, pixel_size_A: float, structure_factor: float) -> float:
    """Std (V·Å) per pixel of the projected potential fluctuations of a water layer."""
    path = thickness_A / max(math.cos(math.radians(tilt_deg)), 0.05)
    n_per_column = WATER_MOLECULES_PER_A3 * path * pixel_size_A ** 2
    return WATER_POTENTIAL_INTEGRAL_V_A3 * math.sqrt(structure_factor * n_per_column) / pixel_size_A ** 2


def electrons_per_pixel(geom: TiltGeometry, t: int, thickness_A: float, mean_free_path_A: float | None) -> float:
    """Expected counts per pixel of tilt t: dose × area × zero-loss transmission of the ice path."""
    n0 = geom.dose_per_tilt * geom.pixel_size_A ** 2
    if mean_free_path_A:
        path = thickness_A / max(math.cos(math.radians(geom.true_tilts_deg[t])), 0.05)
        n0 *= math.exp(-path / mean_free_path_A)
    return n0


def shot_noise(contrast: torch.Tensor, n0: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson counts for expected intensity n0 (1 + contrast), clipped at a small positive floor."""
    lam = n0 * np.clip(1.0 + contrast.cpu().numpy().astype(np.float64), MIN_RELATIVE_INTENSITY, None)
    return rng.poisson(lam).astype(np.float32)
