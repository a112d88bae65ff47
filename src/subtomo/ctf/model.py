"""The CTF formula (RELION ``CTF::getCTF``), vectorised in torch.

Units: defocus in Å, positive = underfocus (RELION/CTFFIND); voltage in kV; Cs in mm;
amplitude contrast Q0 as a fraction; B-factor in Å² with envelope exp(-B s²/4);
frequencies in 1/Å. Astigmatism angle in degrees, the direction of defocus U measured
from +x towards +y (CTFFIND/RELION).

    chi(s) = -pi lambda dF(s) s² + (pi/2) Cs lambda³ s⁴
    CTF(s) = scale * exp(-B s²/4) * -(sqrt(1 - Q0²) sin chi - Q0 cos chi)
"""

from __future__ import annotations

import math

import torch


def electron_wavelength_A(voltage_kV: float) -> float:
    """Relativistic electron wavelength (Å) at ``voltage_kV``."""
    v = voltage_kV * 1e3
    return 12.2643247 / math.sqrt(v * (1 + 0.978466e-6 * v))


def astigmatic_defocus_A(freq_xy: torch.Tensor, defocus_u_A, defocus_v_A, angle_deg) -> torch.Tensor:
    """Defocus (Å) in the direction of each frequency vector (..., 2) (x, y)."""
    defocus_u_A = torch.as_tensor(defocus_u_A, dtype=freq_xy.dtype, device=freq_xy.device)
    defocus_v_A = torch.as_tensor(defocus_v_A, dtype=freq_xy.dtype, device=freq_xy.device)
    angle = torch.deg2rad(torch.as_tensor(angle_deg, dtype=freq_xy.dtype, device=freq_xy.device))
    phi = torch.atan2(freq_xy[..., 1], freq_xy[..., 0])
    mean = (defocus_u_A + defocus_v_A) / 2
    half_diff = (defocus_u_A - defocus_v_A) / 2
    return mean + half_diff * torch.cos(2 * (phi - angle))


def ctf_from_defocus(s2: torch.Tensor, defocus_A: torch.Tensor, voltage_kV: float, cs_mm: float,
                     amplitude_contrast: float, bfactor_A2=0.0, scale=1.0, phase_shift_deg: float = 0.0) -> torch.Tensor:
    """CTF at squared spatial frequency ``s2`` (1/Å²) for the given (broadcast) defocus."""
    lam = electron_wavelength_A(voltage_kV)
    cs_A = cs_mm * 1e7
    chi = -math.pi * lam * defocus_A * s2 + 0.5 * math.pi * cs_A * lam ** 3 * s2 ** 2
    chi = chi - math.radians(phase_shift_deg)
    q0 = amplitude_contrast
    ctf = -(math.sqrt(max(0.0, 1 - q0 * q0)) * torch.sin(chi) - q0 * torch.cos(chi))
    bfactor_A2 = torch.as_tensor(bfactor_A2, dtype=s2.dtype, device=s2.device)
    scale = torch.as_tensor(scale, dtype=s2.dtype, device=s2.device)
    return scale * torch.exp(-bfactor_A2 * s2 / 4) * ctf


def ctf_2d(freq_xy_A: torch.Tensor, defocus_u_A, defocus_v_A, angle_deg, voltage_kV: float, cs_mm: float,
           amplitude_contrast: float, bfactor_A2=0.0, scale=1.0, phase_shift_deg: float = 0.0) -> torch.Tensor:
    """CTF on a grid of 2D frequencies (..., 2) in 1/Å, with astigmatism.

    Parameters broadcast against the grid's leading dims: pass (B, 1, 1) tensors to get a
    batch of B CTFs on an (H, W) grid.
    """
    s2 = (freq_xy_A ** 2).sum(-1)
    defocus = astigmatic_defocus_A(freq_xy_A, defocus_u_A, defocus_v_A, angle_deg)
    return ctf_from_defocus(s2, defocus, voltage_kV, cs_mm, amplitude_contrast, bfactor_A2, scale, phase_shift_deg)


def ctf_1d(s_A: torch.Tensor, defocus_A, voltage_kV: float, cs_mm: float, amplitude_contrast: float,
           bfactor_A2=0.0, scale=1.0) -> torch.Tensor:
    """Rotationally symmetric CTF at spatial frequencies ``s_A`` (1/Å)."""
    d = torch.as_tensor(defocus_A, dtype=s_A.dtype, device=s_A.device)
    return ctf_from_defocus(s_A ** 2, d, voltage_kV, cs_mm, amplitude_contrast, bfactor_A2, scale)
