"""Simulated tilt images with a known CTF (tests and benchmarks of CTF estimation).

Not the project simulator (:mod:`subtomo.simulate`): a random-phase object times the CTF
with the tilted-plane defocus, which is what the estimator models, and nothing else.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from subtomo.ctf.model import Optics, ctf_from_defocus


def synthetic_tilt_images(defocus_u_A, defocus_v_A, angle_deg, tilt_deg, optics: Optics, size: int = 512,
                          snr: float = 0.3, bfactor_A2: float = 150.0, seed: int = 0,
                          device=None) -> torch.Tensor:
    """Simulated tilt images with known CTF, for tests and benchmarks.

    A random-phase object (white noise with a mild low-pass), multiplied by the CTF with
    the tilted-plane defocus ``D + x tan θ`` across x (Å from the centre), an envelope
    exp(-B s²/4), scaled to variance ``snr`` (0: no signal), plus unit white noise and a
    slowly varying background.

    Parameters
    ----------
    defocus_u_A, defocus_v_A : array_like
        (n,) defocus U and V at the image centre [Å], positive = underfocus (scalars for n = 1).
    angle_deg : array_like
        (n,) astigmatism angle of U from x towards y [deg].
    tilt_deg : array_like
        (n,) tilt angle θ of each image [deg] (the defocus gradient runs along x).
    optics : Optics
        Voltage [kV], Cs [mm], amplitude contrast and pixel size [Å].
    size : int
        Image size [px].
    snr : float
        Variance of the CTF-modulated signal relative to the unit-variance noise.
    bfactor_A2 : float
        B-factor of the envelope [Å²].
    seed : int
        Seed of the object and the noise.
    device : torch.device or str, optional
        Device of the result (computed on the CPU).

    Returns
    -------
    torch.Tensor
        (n, size, size) float32 images (y, x), grey values: signal + noise + background (about ±0.5)
        + a constant 10.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    du, dv, an, tl = (np.atleast_1d(np.asarray(v, float)) for v in (defocus_u_A, defocus_v_A, angle_deg, tilt_deg))
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
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    background = 0.5 * torch.cos(2.0 * xx + 1.0) * torch.cos(1.5 * yy)  # slowly varying, the same in every image
    out = torch.empty(n, size, size)
    for i in range(n):
        obj = torch.fft.rfft2(torch.randn(size, size, generator=gen)) * shape
        ddef = (du[i] - dv[i]) / 2 * torch.cos(2 * (phi - math.radians(an[i])))
        img = _tilted_plane_image(obj * env, s2, (du[i] + dv[i]) / 2 + ddef, math.tan(math.radians(tl[i])), x_A, optics)
        sig = img / img.std() * math.sqrt(max(snr, 0.0))
        out[i] = sig + torch.randn(size, size, generator=gen) + background + 10.0
    return out.to(device) if device is not None else out


def _tilted_plane_image(spectrum: torch.Tensor, s2: torch.Tensor, defocus_A: torch.Tensor, gradient: float,
                        x_A: torch.Tensor, optics: Optics) -> torch.Tensor:
    """Image of ``spectrum`` (size, size//2+1) under a CTF whose defocus grows by ``gradient`` per Å of x.

    The defocus offsets across the image are sampled every ≤ 100 Å and the layers interpolated
    linearly along x; ``defocus_A`` (size, size//2+1) holds the centre defocus with astigmatism [Å].
    """
    size = spectrum.shape[0]
    span = float(x_A.abs().max()) * abs(gradient)
    k = max(2, int(math.ceil(2 * span / 100.0)) + 1) if span > 0 else 1
    offsets = np.linspace(-span, span, k) if k > 1 else np.zeros(1)
    layers = [torch.fft.irfft2(spectrum * ctf_from_defocus(s2, defocus_A + off, optics.voltage_kV, optics.cs_mm,
                                                           optics.amplitude_contrast), s=(size, size))
              for off in offsets]
    if k == 1:
        return layers[0]
    pos = torch.from_numpy(np.interp((x_A * gradient).numpy(), offsets, np.arange(k))).float()
    lo = pos.floor().long().clamp(max=k - 2)
    w = pos - lo
    stack = torch.stack(layers)  # (k, y, x)
    cols = torch.arange(size)
    return stack[lo, :, cols].T * (1 - w) + stack[lo + 1, :, cols].T * w
