"""The CTF formula (RELION ``CTF::getCTF``), vectorised in torch: the one home of the CTF.

Units: defocus in Å, positive = underfocus (RELION/CTFFIND); voltage in kV; Cs in mm
(converted to Å by :func:`cs_to_angstrom`, nowhere else); amplitude contrast Q0 as a
fraction; B-factor in Å² with envelope exp(-B s²/4); frequencies in 1/Å. Astigmatism angle
in degrees, the direction of defocus U measured from +x towards +y (CTFFIND/RELION).

    chi(s) = -pi lambda dF(s) s² + (pi/2) Cs lambda³ s⁴        (:func:`chi`)
    CTF(s) = scale * exp(-B s²/4) * -(sqrt(1 - Q0²) sin chi - Q0 cos chi)

CTF estimation (:mod:`subtomo.ctf.estimate`), the 3D CTF models (:mod:`subtomo.tomo.ctf3d`)
and the simulator (:mod:`subtomo.simulate.tiltseries`) all evaluate the phase through
:func:`chi` (or its two coefficients, :func:`phase_coefficients`, where a hot loop reuses
them) and describe the microscope by :class:`Optics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ANGSTROM_PER_MM = 1e7


def electron_wavelength_A(voltage_kV: float) -> float:
    """Relativistic electron wavelength.

    Parameters
    ----------
    voltage_kV : float
        Acceleration voltage [kV].

    Returns
    -------
    float
        Wavelength [Å] (0.0197 Å at 300 kV).
    """
    v = voltage_kV * 1e3
    return 12.2643247 / math.sqrt(v * (1 + 0.978466e-6 * v))


def cs_to_angstrom(cs_mm: float) -> float:
    """Spherical aberration in Å from the microscope's value in mm (the one conversion).

    Parameters
    ----------
    cs_mm : float
        Spherical aberration [mm].

    Returns
    -------
    float
        Spherical aberration [Å].
    """
    return cs_mm * ANGSTROM_PER_MM


@dataclass(frozen=True)
class Optics:
    """Microscope settings that the CTF depends on, and the pixel size of the images.

    Attributes
    ----------
    voltage_kV : float
        Acceleration voltage [kV].
    cs_mm : float
        Spherical aberration [mm].
    amplitude_contrast : float
        Amplitude contrast Q0 (fraction, 0..1).
    pixel_size_A : float
        Pixel size of the images the CTF applies to [Å].
    """

    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07
    pixel_size_A: float = 1.0

    @property
    def wavelength_A(self) -> float:
        """Electron wavelength [Å]."""
        return electron_wavelength_A(self.voltage_kV)

    @property
    def cs_A(self) -> float:
        """Spherical aberration [Å]."""
        return cs_to_angstrom(self.cs_mm)


def phase_coefficients(voltage_kV: float, cs_mm: float) -> tuple[float, float]:
    """The two coefficients of the CTF phase: ``chi = k_defocus dF s² + k_cs s⁴``.

    Parameters
    ----------
    voltage_kV : float
        Acceleration voltage [kV].
    cs_mm : float
        Spherical aberration [mm].

    Returns
    -------
    k_defocus : float
        ``-pi lambda`` [rad / (Å · Å⁻²)], multiplies defocus [Å] times s² [1/Å²].
    k_cs : float
        ``(pi/2) Cs lambda³`` [rad Å⁴], multiplies s⁴ [1/Å⁴].
    """
    lam = electron_wavelength_A(voltage_kV)
    return -math.pi * lam, 0.5 * math.pi * cs_to_angstrom(cs_mm) * lam ** 3


def chi(s2: torch.Tensor, defocus_A, voltage_kV: float, cs_mm: float, phase_shift_deg: float = 0.0) -> torch.Tensor:
    """CTF phase (rad) at squared spatial frequency ``s2``.

    Parameters
    ----------
    s2 : torch.Tensor
        Squared spatial frequency [1/Å²], any shape.
    defocus_A : torch.Tensor or float
        Defocus [Å] (positive = underfocus), broadcast against ``s2``.
    voltage_kV : float
        Acceleration voltage [kV].
    cs_mm : float
        Spherical aberration [mm].
    phase_shift_deg : float
        Additional phase shift (phase plate) [deg], subtracted from the phase.

    Returns
    -------
    torch.Tensor
        ``-pi lambda dF s² + (pi/2) Cs lambda³ s⁴ - phase shift`` [rad], broadcast shape.
    """
    k_defocus, k_cs = phase_coefficients(voltage_kV, cs_mm)
    phase = k_defocus * defocus_A * s2 + k_cs * s2 ** 2
    if phase_shift_deg:
        phase = phase - math.radians(phase_shift_deg)
    return phase


def ctf_of_phase(phase: torch.Tensor, amplitude_contrast: float) -> torch.Tensor:
    """CTF value ``-(sqrt(1 - Q0²) sin chi - Q0 cos chi)`` of a phase (no envelope).

    Parameters
    ----------
    phase : torch.Tensor
        CTF phase chi [rad], any shape.
    amplitude_contrast : float
        Amplitude contrast Q0 (fraction).

    Returns
    -------
    torch.Tensor
        CTF values in [-1, 1], same shape as ``phase``.
    """
    q0 = amplitude_contrast
    return -(math.sqrt(max(0.0, 1 - q0 * q0)) * torch.sin(phase) - q0 * torch.cos(phase))


def astigmatic_defocus_A(freq_xy: torch.Tensor, defocus_u_A, defocus_v_A, angle_deg) -> torch.Tensor:
    """Defocus in the direction of each frequency vector.

    Parameters
    ----------
    freq_xy : torch.Tensor
        Frequencies (..., 2), components (x, y) [1/Å].
    defocus_u_A, defocus_v_A : torch.Tensor or float
        Defocus along the U direction and perpendicular to it [Å], broadcast against (...).
    angle_deg : torch.Tensor or float
        Angle of the U direction from +x towards +y [deg].

    Returns
    -------
    torch.Tensor
        Defocus [Å], shape (...).
    """
    defocus_u_A = torch.as_tensor(defocus_u_A, dtype=freq_xy.dtype, device=freq_xy.device)
    defocus_v_A = torch.as_tensor(defocus_v_A, dtype=freq_xy.dtype, device=freq_xy.device)
    angle = torch.deg2rad(torch.as_tensor(angle_deg, dtype=freq_xy.dtype, device=freq_xy.device))
    phi = torch.atan2(freq_xy[..., 1], freq_xy[..., 0])
    mean = (defocus_u_A + defocus_v_A) / 2
    half_diff = (defocus_u_A - defocus_v_A) / 2
    return mean + half_diff * torch.cos(2 * (phi - angle))


def ctf_from_defocus(s2: torch.Tensor, defocus_A: torch.Tensor, voltage_kV: float, cs_mm: float,
                     amplitude_contrast: float, bfactor_A2=0.0, scale=1.0, phase_shift_deg: float = 0.0) -> torch.Tensor:
    """CTF at squared spatial frequency ``s2`` for the given (broadcast) defocus.

    Parameters
    ----------
    s2 : torch.Tensor
        Squared spatial frequency [1/Å²], any shape.
    defocus_A : torch.Tensor
        Defocus [Å], broadcast against ``s2``.
    voltage_kV, cs_mm, amplitude_contrast : float
        Microscope [kV], [mm], Q0 [fraction].
    bfactor_A2 : torch.Tensor or float
        B-factor of the envelope exp(-B s²/4) [Å²].
    scale : torch.Tensor or float
        Scale factor (e.g. cos tilt).
    phase_shift_deg : float
        Additional phase shift [deg].

    Returns
    -------
    torch.Tensor
        CTF values, broadcast shape.
    """
    phase = chi(s2, defocus_A, voltage_kV, cs_mm, phase_shift_deg)
    ctf = ctf_of_phase(phase, amplitude_contrast)
    bfactor_A2 = torch.as_tensor(bfactor_A2, dtype=s2.dtype, device=s2.device)
    scale = torch.as_tensor(scale, dtype=s2.dtype, device=s2.device)
    return scale * torch.exp(-bfactor_A2 * s2 / 4) * ctf


def ctf_2d(freq_xy_A: torch.Tensor, defocus_u_A, defocus_v_A, angle_deg, voltage_kV: float, cs_mm: float,
           amplitude_contrast: float, bfactor_A2=0.0, scale=1.0, phase_shift_deg: float = 0.0) -> torch.Tensor:
    """CTF on a grid of 2D frequencies, with astigmatism.

    Parameters
    ----------
    freq_xy_A : torch.Tensor
        Frequencies (..., 2), components (x, y) [1/Å].
    defocus_u_A, defocus_v_A, angle_deg : torch.Tensor or float
        Astigmatic defocus [Å] and angle of U [deg]; pass (B, 1, 1) tensors to get a batch
        of B CTFs on an (H, W) grid.
    voltage_kV, cs_mm, amplitude_contrast : float
        Microscope [kV], [mm], Q0 [fraction].
    bfactor_A2, scale : torch.Tensor or float
        Envelope B-factor [Å²] and scale factor.
    phase_shift_deg : float
        Additional phase shift [deg].

    Returns
    -------
    torch.Tensor
        CTF values, shape broadcast of (...) and the parameters.
    """
    s2 = (freq_xy_A ** 2).sum(-1)
    defocus = astigmatic_defocus_A(freq_xy_A, defocus_u_A, defocus_v_A, angle_deg)
    return ctf_from_defocus(s2, defocus, voltage_kV, cs_mm, amplitude_contrast, bfactor_A2, scale, phase_shift_deg)


def ctf_1d(s_A: torch.Tensor, defocus_A, voltage_kV: float, cs_mm: float, amplitude_contrast: float,
           bfactor_A2=0.0, scale=1.0) -> torch.Tensor:
    """Rotationally symmetric CTF.

    Parameters
    ----------
    s_A : torch.Tensor
        Spatial frequencies [1/Å], any shape.
    defocus_A : torch.Tensor or float
        Defocus [Å], broadcast against ``s_A``.
    voltage_kV, cs_mm, amplitude_contrast : float
        Microscope [kV], [mm], Q0 [fraction].
    bfactor_A2, scale : torch.Tensor or float
        Envelope B-factor [Å²] and scale factor.

    Returns
    -------
    torch.Tensor
        CTF values, broadcast shape.
    """
    d = torch.as_tensor(defocus_A, dtype=s_A.dtype, device=s_A.device)
    return ctf_from_defocus(s_A ** 2, d, voltage_kV, cs_mm, amplitude_contrast, bfactor_A2, scale)


def ctf_squared(s2: torch.Tensor, defocus_A, optics: Optics) -> torch.Tensor:
    """CTF² without envelope, identical to ``ctf_from_defocus(...)**2`` but cheaper (hot loops).

    With ``CTF = -(sqrt(1-Q²) sin χ - Q cos χ) = -sin(χ - α)``, ``α = atan2(Q, sqrt(1-Q²))``,
    ``CTF² = (1 - cos(2χ - 2α)) / 2``.

    Parameters
    ----------
    s2 : torch.Tensor
        Squared spatial frequency [1/Å²], any shape.
    defocus_A : torch.Tensor or float
        Defocus [Å], broadcast against ``s2``.
    optics : Optics
        Microscope.

    Returns
    -------
    torch.Tensor
        CTF² in [0, 1], broadcast shape.
    """
    k_defocus, k_cs = phase_coefficients(optics.voltage_kV, optics.cs_mm)
    q = optics.amplitude_contrast
    alpha = math.atan2(q, math.sqrt(max(0.0, 1 - q * q)))
    quartic = (2 * k_cs) * s2 * s2 - 2 * alpha  # 2x the Cs term, minus 2α
    two_chi = (2 * k_defocus) * s2 * defocus_A + quartic
    return 0.5 - 0.5 * torch.cos(two_chi)


def phase_periods(s2: torch.Tensor, defocus_A, optics: Optics) -> torch.Tensor:
    """CTF phase in periods of CTF², ``u = -chi / pi`` (CTF² = sin²(pi u + alpha): period 1 in u).

    Parameters
    ----------
    s2, defocus_A, optics
        As for :func:`ctf_squared`: s² [1/Å²], defocus [Å] (broadcast), microscope.

    Returns
    -------
    torch.Tensor
        u (dimensionless, grows with s for underfocus), broadcast shape.
    """
    k_defocus, k_cs = phase_coefficients(optics.voltage_kV, optics.cs_mm)
    return (-k_defocus / math.pi) * defocus_A * s2 - (k_cs / math.pi) * s2 * s2
