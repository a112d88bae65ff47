"""Per-particle 3D CTF models (RELION >= 3.1 "data/weight" definition, padding 1).

Each tilt image j fills the central Fourier plane with normal ``n_j = (−sin θ_j, 0, cos θ_j)``
and in-plane axes ``u_x = (cos θ_j, 0, sin θ_j)``, ``u_y = (0, 1, 0)`` (docs/conventions.md).
At a Fourier voxel k (integer indices of the box grid, components x, y, z)

    CTF3D(k) = Σ_j w_j(k) CTF_j(k·u_x, k·u_y) / Σ_j w_j(k),    w_j(k) = max(0, 1 − |k·n_j|),

with CTF_j the tilt image's CTF at the particle's position-dependent defocus, multiplied
by its scale factor and B envelope exp(−B s²/4); 0 where no plane passes within one voxel
(the missing wedge, gaps between tilts) and for |k| > box/2. Frequencies are
``index / (box · pixel_size)``. The result uses the internal rfft layout of
:mod:`subtomo.fourier` (unshifted, half axis x) cropped to a "current size" exactly like
:func:`subtomo.fourier.crop_rfft`.

The weight of a tilt does not depend on ky, so for every distinct tilt angle only the
(kz, kx) pairs within one voxel of its plane are visited (about 2·size/cos θ of them),
times all ky: the cost is proportional to (particles × tilts × size²), not × size³.

Models are stored as compact per-tilt parameters (``Prepare/jobNNN/CtfModels/<t>_ctf.star``)
and built on the fly by :class:`ParticleCtfModels`. RELION-style centred N³ volumes for
``rlnCtfImage`` are produced by :func:`to_relion_cube` and read back by
:func:`from_relion_cube`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from subtomo.ctf.model import electron_wavelength_A
from subtomo.errors import SubtomoError
from subtomo.fourier import crop_rfft

# Entries (pairs × voxels) evaluated at once; bounds temporary memory (~10 float32 arrays).
_CHUNK_ENTRIES = 4_000_000

CTF_TABLE_BLOCK = "ctf_models"
CTF_GENERAL_BLOCK = "general"


def _as_2d(x, name: str, device, dtype=torch.float32) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.tensor(np.asarray(x, dtype=np.float64))
    t = t.to(device=device, dtype=dtype)
    if t.ndim == 1:
        t = t[None, :]
    if t.ndim != 2:
        raise ValueError(f"{name}: expected (particles, tilts), got shape {tuple(t.shape)}")
    return t


def grid_indices(size: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer frequency indices (as float) of the cropped rfft grid: kz (size,), ky (size,), kx (size//2+1,)."""
    full = torch.fft.fftfreq(size, d=1.0 / size, device=device, dtype=torch.float32)
    half = torch.arange(size // 2 + 1, device=device, dtype=torch.float32)
    return full, full.clone(), half


def ctf3d_from_tilts(defocus_A, tilt_deg, bfactor_A2, scale, box: int, pixel_size_A: float,
                     voltage_kV: float, cs_mm: float, amplitude_contrast: float, size: int | None = None,
                     skip_ctf: bool = False, device=None, defocus_v_A=None, astig_angle_deg=None) -> torch.Tensor:
    """3D CTF models of a batch of particles: (B, size, size, size//2+1) float32.

    ``defocus_A`` (defocus U, or the mean defocus without astigmatism), ``tilt_deg``,
    ``bfactor_A2`` and ``scale`` are (B, T) per particle and tilt (numpy or torch). A tilt
    given as NaN is absent (lets particles with different numbers of tilts share a batch).
    ``defocus_v_A``/``astig_angle_deg`` (B, T) add astigmatism (angle from image x to y, deg).
    ``skip_ctf`` makes each tilt's CTF 1 (only scale and B envelope remain: wedge-only model).
    ``size`` (even, <= box) is the current size of the cropped rfft grid (default ``box``).
    The device is ``device`` if given, else that of ``defocus_A`` if it is a tensor.
    """
    if device is None:
        device = defocus_A.device if isinstance(defocus_A, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    size = int(box if size is None else size)
    if box % 2 or size % 2 or size > box or size <= 0:
        raise ValueError(f"box {box} and size {size} must be even with 0 < size <= box")
    tilt = _as_2d(tilt_deg, "tilt_deg", device, torch.float64)
    nb, nt = tilt.shape
    shape2 = (nb, nt)
    def_u = _as_2d(defocus_A, "defocus_A", device).expand(shape2)
    bfac = _as_2d(bfactor_A2, "bfactor_A2", device).expand(shape2)
    scl = _as_2d(scale, "scale", device).expand(shape2)
    astig = defocus_v_A is not None and not skip_ctf
    if astig:
        def_v = _as_2d(defocus_v_A, "defocus_v_A", device).expand(shape2)
        ang = _as_2d(astig_angle_deg if astig_angle_deg is not None else torch.zeros(shape2),
                     "astig_angle_deg", device).expand(shape2)
        astig = bool(torch.any(def_u != def_v))
    h = size // 2
    nx = h + 1
    nvox = size * size * nx
    num = torch.zeros(nb, nvox, device=device, dtype=torch.float32)
    kz, ky, kx = grid_indices(size, device)
    inv_len2 = 1.0 / (box * pixel_size_A) ** 2
    lam = electron_wavelength_A(voltage_kV)
    cs_A = cs_mm * 1e7
    q0 = float(amplitude_contrast)
    phase_k = math.asin(max(-1.0, min(1.0, q0)))  # -(sqrt(1-Q0²) sin χ - Q0 cos χ) = -sin(χ - asin Q0)

    valid = ~torch.isnan(tilt)
    b_idx, t_idx = torch.nonzero(valid, as_tuple=True)
    keys_bt = torch.where(valid, torch.round(tilt * 1e4), torch.full_like(tilt, float("inf")))
    # particles sharing the same set of tilt angles share the denominator Σ_j w_j(k)
    sigs, sig_of = torch.unique(torch.sort(keys_bt, dim=1).values, dim=0, return_inverse=True)
    den = torch.zeros(len(sigs), nvox, device=device, dtype=torch.float32)
    per_sig = torch.bincount(sig_of, minlength=len(sigs)).float()
    if b_idx.numel():
        keys = keys_bt[b_idx, t_idx].long()
        uniq, inverse = torch.unique(keys, return_inverse=True)
        order = torch.argsort(inverse)
        counts = torch.bincount(inverse, minlength=len(uniq)).tolist()
        groups = torch.split(order, counts)
        yi = torch.arange(size, device=device)
        for g in groups:
            gb, gt = b_idx[g], t_idx[g]
            theta = math.radians(float(tilt[gb[0], gt[0]]))
            c, s = math.cos(theta), math.sin(theta)
            d = kz[:, None] * c - kx[None, :] * s  # k·n on the (kz, kx) grid
            zsel, xsel = torch.nonzero(d.abs() < 1.0, as_tuple=True)
            if zsel.numel() == 0:
                continue
            w = (1.0 - d[zsel, xsel].abs())[:, None].expand(-1, size).reshape(-1)  # (E,)
            kxp = (kx[xsel] * c + kz[zsel] * s)[:, None]  # in-plane x index
            kyp = ky[None, :]
            r2 = (kxp ** 2 + kyp ** 2).reshape(-1)
            s2 = r2 * inv_len2
            flat = ((zsel[:, None] * size + yi[None, :]) * nx + xsel[:, None]).reshape(-1)
            n_e = flat.numel()
            sg, sg_count = torch.unique(sig_of[gb], return_counts=True)
            mult = sg_count.float() / per_sig[sg]  # how often each particle of the signature has this angle
            den.index_put_((sg[:, None].expand(-1, n_e), flat[None, :].expand(len(sg), -1)),
                           mult[:, None] * w[None, :], accumulate=True)
            if astig:
                rr = r2.clamp(min=1e-12)
                cos2 = ((kxp ** 2 - kyp ** 2).reshape(-1) / rr)
                sin2 = ((2 * kxp * kyp).reshape(-1) / rr)
            step = max(1, _CHUNK_ENTRIES // n_e)
            for start in range(0, len(gb), step):
                pb, pt = gb[start:start + step], gt[start:start + step]
                env = scl[pb, pt][:, None] * torch.exp(-bfac[pb, pt][:, None] * (s2 / 4)[None, :])
                if skip_ctf:
                    val = env
                else:
                    if astig:
                        du, dv = def_u[pb, pt][:, None], def_v[pb, pt][:, None]
                        a2 = torch.deg2rad(ang[pb, pt])[:, None] * 2
                        dfoc = (du + dv) / 2 + (du - dv) / 2 * (cos2[None, :] * torch.cos(a2) + sin2[None, :] * torch.sin(a2))
                    else:
                        dfoc = def_u[pb, pt][:, None]
                    chi = (-math.pi * lam) * dfoc * s2[None, :] + (0.5 * math.pi * cs_A * lam ** 3) * (s2 * s2)[None, :]
                    val = torch.sin(chi - phase_k).mul_(env).neg_()
                num.index_put_((pb[:, None].expand(-1, n_e), flat[None, :].expand(len(pb), -1)),
                               val.mul_(w[None, :]), accumulate=True)
    # num is 0 wherever den is 0, so a clamped division leaves those voxels at 0
    den.clamp_(min=1e-30)
    if len(sigs) == 1:
        num.div_(den)
    else:
        num.div_(den.index_select(0, sig_of))
    out = num.view(nb, size, size, nx)
    sphere = (kz[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2) <= (box / 2) ** 2
    return out.mul_(sphere)


# ----------------------------------------------------------------------------------------
# RELION volumes: centred N³ cubes (DC at N/2), Friedel-symmetric, real values.


def to_relion_cube(half: torch.Tensor) -> torch.Tensor:
    """Internal half layout (..., N, N, N//2+1) -> centred full cube (..., N, N, N), DC at N/2.

    value(k) for kx < 0 is taken from the Friedel mate −k (the model is real and even).
    """
    n = half.shape[-2]
    full = torch.zeros(*half.shape[:-1], n, dtype=half.dtype, device=half.device)
    full[..., : n // 2] = half[..., : n // 2]
    neg = torch.arange(n // 2, n, device=half.device)  # x indices holding kx = idx - n (<0)
    mate = (-torch.arange(n, device=half.device)) % n
    src = half[..., n - neg]  # kx' = n - idx = -kx  (...,N,N,len(neg))
    src = src.index_select(-3, mate).index_select(-2, mate)
    full[..., n // 2:] = src
    return torch.fft.fftshift(full, dim=(-3, -2, -1))


def from_relion_cube(cube: torch.Tensor) -> torch.Tensor:
    """Centred N³ cube (DC at N/2) -> internal half layout (N, N, N//2+1).

    As RELION reads it (``Fctf(k) = cube(−k)``); equal to cube(k) for Friedel-symmetric files.
    """
    n = cube.shape[-1]
    if cube.shape[-3:] != (n, n, n) or n % 2:
        raise SubtomoError(f"3D CTF volume of shape {tuple(cube.shape)}: expected an even cube N×N×N (centred RELION layout).")
    k = torch.fft.fftfreq(n, d=1.0 / n).long()
    zi = (n // 2 - k) % n  # cube index of -k
    xi = n // 2 - torch.arange(n // 2 + 1)
    return cube.index_select(-3, zi).index_select(-2, zi).index_select(-1, xi)


# ----------------------------------------------------------------------------------------
# Per-particle models referenced by rlnCtfImage.


@dataclass
class ParticleCtfModels:
    """Compact 3D CTF parameters of a particle table, built into volumes on demand.

    Arrays are (P, T) with NaN tilts where a particle has fewer tilts; per-particle
    microscope values are (P,). Particles whose ``rlnCtfImage`` is a RELION ``.mrc``
    volume keep that volume (internal half layout) in ``volumes_half``.
    """

    tilt_deg: np.ndarray
    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    astig_angle_deg: np.ndarray
    bfactor_A2: np.ndarray
    scale: np.ndarray
    voltage_kV: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    pixel_size_A: np.ndarray
    skip_ctf: np.ndarray
    volumes_half: dict[int, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pixel_size_A)

    @classmethod
    def from_particles(cls, particles: pd.DataFrame, project_dir: str | Path = ".") -> "ParticleCtfModels":
        """Read every particle's ``rlnCtfImage`` once.

        Accepted references: ``NNNNNN@<path>_ctf.star`` (rows of the compact CTF table with
        ``rlnTomoParticleId`` = NNNNNN) and RELION volumes ``<path>.mrc`` (centred cube).
        The pixel size of each particle is ``rlnImagePixelSize`` when present (e.g. after
        rescaled extraction), else the CTF table's.
        """
        from subtomo.io.mrc import read_mrc
        from subtomo.io.star import read_star

        project = Path(project_dir)
        if "rlnCtfImage" not in particles.columns:
            raise SubtomoError("particle table has no rlnCtfImage column. Run subtomo prepare (Step 9) and extract from its particles_subtomo.star.")
        refs = particles["rlnCtfImage"].astype(str).tolist()
        n = len(refs)
        tables: dict[str, tuple[dict, dict[int, pd.DataFrame]]] = {}
        per: list[pd.DataFrame | None] = [None] * n
        general: list[dict] = [{}] * n
        volumes: dict[int, torch.Tensor] = {}
        px = np.full(n, np.nan)
        for i, ref in enumerate(refs):
            if "@" in ref:
                num, path = ref.split("@", 1)
                if path not in tables:
                    full = project / path
                    blocks = read_star(full)
                    gen = blocks.get(CTF_GENERAL_BLOCK)
                    table = blocks.get(CTF_TABLE_BLOCK)
                    if table is None:
                        table = next((v for k, v in blocks.items() if isinstance(v, pd.DataFrame) and k != CTF_GENERAL_BLOCK), None)
                    if not isinstance(gen, dict) or table is None or "rlnTomoParticleId" not in table.columns:
                        raise SubtomoError(f"{full}: not a subtomo CTF model table (needs a data_{CTF_GENERAL_BLOCK} block and a loop with rlnTomoParticleId). Re-run subtomo prepare.")
                    tables[path] = (gen, {int(k): g for k, g in table.groupby("rlnTomoParticleId", sort=False)})
                gen, groups = tables[path]
                try:
                    pid = int(num)
                except ValueError:
                    raise SubtomoError(f"rlnCtfImage {ref!r}: the part before @ must be a particle number.") from None
                if pid not in groups:
                    raise SubtomoError(f"rlnCtfImage {ref!r}: {path} has no rows with rlnTomoParticleId {pid}. Re-run subtomo prepare.")
                per[i] = groups[pid]
                general[i] = gen
                px[i] = float(gen.get("rlnTomoTiltSeriesPixelSize", np.nan))
            else:
                vol, vpx = read_mrc(project / ref)
                volumes[i] = from_relion_cube(torch.from_numpy(vol))
                px[i] = vpx
        if "rlnImagePixelSize" in particles.columns:
            img_px = pd.to_numeric(particles["rlnImagePixelSize"], errors="coerce").to_numpy(dtype=np.float64)
            px = np.where(np.isfinite(img_px) & (img_px > 0), img_px, px)
        nt = max([len(p) for p in per if p is not None], default=1)
        arrays = {k: np.full((n, nt), np.nan if k == "tilt" else 0.0) for k in ("tilt", "du", "dv", "ang", "b", "s")}
        micro = {k: np.zeros(n) for k in ("kv", "cs", "q0", "skip")}
        for i, p in enumerate(per):
            if p is None:
                continue
            m = len(p)
            arrays["tilt"][i, :m] = p["rlnTomoNominalStageTiltAngle"].to_numpy(float)
            arrays["du"][i, :m] = p["rlnDefocusU"].to_numpy(float)
            arrays["dv"][i, :m] = p["rlnDefocusV"].to_numpy(float) if "rlnDefocusV" in p else arrays["du"][i, :m]
            arrays["ang"][i, :m] = p["rlnDefocusAngle"].to_numpy(float) if "rlnDefocusAngle" in p else 0.0
            arrays["b"][i, :m] = p["rlnCtfBfactor"].to_numpy(float) if "rlnCtfBfactor" in p else 0.0
            arrays["s"][i, :m] = p["rlnCtfScalefactor"].to_numpy(float) if "rlnCtfScalefactor" in p else 1.0
            g = general[i]
            micro["kv"][i] = float(g.get("rlnVoltage", 300.0))
            micro["cs"][i] = float(g.get("rlnSphericalAberration", 2.7))
            micro["q0"][i] = float(g.get("rlnAmplitudeContrast", 0.07))
            micro["skip"][i] = float(g.get("subtomoSkipCtf", 0))
        return cls(arrays["tilt"], arrays["du"], arrays["dv"], arrays["ang"], arrays["b"], arrays["s"],
                   micro["kv"], micro["cs"], micro["q0"], px, micro["skip"] > 0, volumes)

    def volumes(self, rows, box: int, size: int | None = None, device=None,
                pixel_size_A: float | None = None) -> torch.Tensor:
        """3D CTFs of particles ``rows`` (positions in the table): (len(rows), size, size, size//2+1).

        ``box`` is the particle box (pixels at the particle pixel size) and ``size`` the
        current size (default ``box``). ``pixel_size_A`` overrides the per-particle value.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        size = int(box if size is None else size)
        device = torch.device(device) if device is not None else torch.device("cpu")
        out = torch.zeros(len(rows), size, size, size // 2 + 1, device=device)
        is_vol = np.array([int(r) in self.volumes_half for r in rows], dtype=bool)
        for j in np.nonzero(is_vol)[0]:
            v = self.volumes_half[int(rows[j])]
            if v.shape[-2] < size:
                raise SubtomoError(f"3D CTF volume of size {v.shape[-2]} is smaller than the current size {size}; "
                                   f"make the CTF volumes at the subtomogram box size.")
            out[j] = crop_rfft(v, size, 3).to(device)
        pos = np.nonzero(~is_vol)[0]
        if len(pos):
            px = np.full(len(rows), float(pixel_size_A)) if pixel_size_A is not None else self.pixel_size_A[rows]
            keys = np.stack([self.voltage_kV[rows], self.cs_mm[rows], self.amplitude_contrast[rows], px,
                             self.skip_ctf[rows].astype(float)], axis=1)[pos]
            uniq, inv = np.unique(keys, axis=0, return_inverse=True)
            inv = inv.reshape(-1)
            for u, key in enumerate(uniq):
                sel = pos[inv == u]
                r = rows[sel]
                if not np.isfinite(key[3]) or key[3] <= 0:
                    raise SubtomoError("a particle's 3D CTF has no pixel size (rlnImagePixelSize or the CTF table's rlnTomoTiltSeriesPixelSize).")
                vol = ctf3d_from_tilts(
                    self.defocus_u_A[r], self.tilt_deg[r], self.bfactor_A2[r], self.scale[r], box, float(key[3]),
                    float(key[0]), float(key[1]), float(key[2]), size=size, skip_ctf=bool(key[4]), device=device,
                    defocus_v_A=self.defocus_v_A[r], astig_angle_deg=self.astig_angle_deg[r])
                out[torch.as_tensor(sel, device=device)] = vol
        return out
