"""Atomic model -> electrostatic potential map (volts) at the project pixel size.

Each atom's electron scattering factor is a sum of five Gaussians (Peng, Ren, Dudarev &
Whelan, Acta Cryst. A52, 257-276, 1996, neutral atoms, parameters for 0 <= s <= 6 1/Å):

    f_e(q) = sum_i a_i exp(-b_i q² / 4)        (q = 2 sin(theta)/lambda in 1/Å, a_i in Å, b_i in Å²)

and a B-factor multiplies it by exp(-B q²/4). The potential is its Fourier transform times
h²/(2 pi m0 e) = 47.878 V·Å², so in real space

    V(r) = 47.878 sum_i a_i (4 pi / (b_i + B))^{3/2} exp(-4 pi² r² / (b_i + B))   [V]

and the integral of one atom's potential is 47.878 * sum_i a_i [V·Å³].

The map is computed in Fourier space (accurate band limit at the pixel size, no aliasing
of the sub-pixel-wide atomic cores): atom centres are spread trilinearly on a grid
``oversample`` times finer, per element, Fourier transformed, multiplied by the element's
scattering factor and divided by the transfer function of the trilinear spreading, then
cropped to the project's Nyquist frequency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from subtomo.errors import SubtomoError
from subtomo.fourier import crop_rfft, fft_centered, ifft_centered, lowpass, rfft_frequencies
from subtomo.geometry.symmetry import symmetry_matrices

POTENTIAL_CONSTANT_V_A2 = 47.878  # h² / (2 pi m0 e) in V·Å²
PROTEIN_VOLUME_A3_PER_DA = 1.21  # partial specific volume 0.73 cm³/g

# Peng et al. (1996), Table 1 (neutral atoms, 0-6 1/Å): element -> (a_1..a_5 [Å], b_1..b_5 [Å²])
PENG_1996: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "H": ((0.0349, 0.1201, 0.1970, 0.0573, 0.1195), (0.5347, 3.5867, 12.3471, 18.9525, 38.6269)),
    "C": ((0.0893, 0.2563, 0.7570, 1.0487, 0.3575), (0.2465, 1.7100, 6.4094, 18.6113, 50.2523)),
    "N": ((0.1022, 0.3219, 0.7982, 0.8197, 0.1715), (0.2451, 1.7481, 6.1925, 17.3894, 48.1431)),
    "O": ((0.0974, 0.2921, 0.6910, 0.6990, 0.2039), (0.2067, 1.3815, 4.6943, 12.7105, 32.4726)),
    "NA": ((0.2142, 0.6853, 0.7692, 1.6589, 1.4482), (0.3334, 2.3446, 10.0830, 48.3037, 138.2700)),
    "MG": ((0.2314, 0.6866, 0.9677, 2.1882, 1.1339), (0.3278, 2.2720, 10.9241, 39.2898, 101.9748)),
    "P": ((0.2548, 0.6106, 1.4541, 2.3204, 0.8477), (0.2908, 1.8740, 8.5176, 24.3434, 63.2996)),
    "S": ((0.2497, 0.5628, 1.3899, 2.1865, 0.7715), (0.2681, 1.6711, 7.0267, 19.5377, 50.3888)),
    "CL": ((0.2443, 0.5397, 1.3919, 2.0197, 0.6621), (0.2468, 1.5242, 6.1537, 16.6687, 42.3086)),
    "K": ((0.4115, 1.4031, 2.2784, 2.6742, 2.2162), (0.3703, 3.3874, 13.1029, 68.9592, 194.4329)),
    "CA": ((0.4054, 1.3880, 2.1602, 3.7532, 2.2063), (0.3499, 3.0991, 11.9608, 53.9353, 142.3892)),
    "FE": ((0.3946, 1.2725, 1.7031, 2.3140, 1.4795), (0.2717, 2.0443, 7.6007, 29.9714, 86.2265)),
    "ZN": ((0.4288, 1.2646, 1.4472, 1.8294, 1.0934), (0.2593, 1.7998, 6.7500, 25.5860, 73.5284)),
    "SE": ((0.4477, 1.1678, 1.5843, 2.8087, 1.1956), (0.2405, 1.5442, 6.3231, 19.4610, 52.0233)),
    "AU": ((0.9674, 1.8916, 3.3993, 3.0524, 1.2607), (0.2358, 1.4712, 5.6758, 18.7119, 61.5286)),
}
ATOMIC_MASS_DA = {"H": 1.008, "C": 12.011, "N": 14.007, "O": 15.999, "NA": 22.99, "MG": 24.305, "P": 30.974,
                  "S": 32.06, "CL": 35.45, "K": 39.098, "CA": 40.078, "FE": 55.845, "ZN": 65.38, "SE": 78.97,
                  "AU": 196.97}
# Hydrogens per heavy atom in proteins (≈ 7.8 H per residue), added at the heavy atom ("united atoms")
# when the model has no explicit hydrogens.
IMPLICIT_HYDROGENS = {"C": 1.2, "N": 1.0, "O": 0.3, "S": 0.5}


@dataclass
class AtomicModel:
    """Atom positions (n, 3) in Å (x, y, z), element symbols (upper case) and chain names."""

    xyz_A: np.ndarray
    elements: np.ndarray
    chains: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.xyz_A)

    def subset(self, keep: np.ndarray) -> "AtomicModel":
        return AtomicModel(self.xyz_A[keep], self.elements[keep], self.chains[keep], self.source)

    def mass_Da(self, implicit_hydrogens: bool = True) -> float:
        mass = sum(ATOMIC_MASS_DA.get(e, 12.0) for e in self.elements)
        if implicit_hydrogens and not np.any(self.elements == "H"):
            mass += sum(IMPLICIT_HYDROGENS.get(e, 0.0) * ATOMIC_MASS_DA["H"] for e in self.elements)
        return float(mass)


def read_atomic_model(path: str | Path) -> AtomicModel:
    """Read a PDB or mmCIF file (optionally .gz) with gemmi; waters are dropped."""
    import gemmi

    path = Path(path)
    if not path.exists():
        raise SubtomoError(f"--structure {path}: file not found. Give a PDB/mmCIF file (.gz ok) or an MRC map.")
    try:
        st = gemmi.read_structure(str(path))
    except Exception as exc:  # gemmi raises RuntimeError/ValueError with its own text
        raise SubtomoError(f"--structure {path}: not a readable PDB/mmCIF file ({exc}).") from exc
    st.remove_waters()
    if len(st) == 0:
        raise SubtomoError(f"--structure {path}: the file holds no model.")
    xyz, elem, chain = [], [], []
    for ch in st[0]:
        for res in ch:
            for atom in res:
                if atom.altloc not in ("\0", "A"):
                    continue
                p = atom.pos
                xyz.append((p.x, p.y, p.z))
                elem.append(atom.element.name.upper())
                chain.append(ch.name)
    if not xyz:
        raise SubtomoError(f"--structure {path}: no atoms found.")
    return AtomicModel(np.asarray(xyz, dtype=np.float64), np.asarray(elem), np.asarray(chain), str(path))


def scattering_parameters(element: str) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of Peng's five-Gaussian fit; unknown elements fall back to the nearest tabulated mass."""
    el = element.upper()
    if el not in PENG_1996:
        mass = ATOMIC_MASS_DA.get(el)
        if mass is None:
            el = "C"
        else:
            el = min(PENG_1996, key=lambda e: abs(ATOMIC_MASS_DA[e] - mass))
    a, b = PENG_1996[el]
    return np.asarray(a), np.asarray(b)


def atom_potential_integral_V_A3(element: str) -> float:
    """Analytic integral of one atom's potential (V·Å³) = 47.878 * f_e(0)."""
    a, _ = scattering_parameters(element)
    return POTENTIAL_CONSTANT_V_A2 * float(a.sum())


def atom_potential_radial_V(element: str, r_A: np.ndarray, bfactor_A2: float = 0.0) -> np.ndarray:
    """Analytic potential (V) of one atom at distances ``r_A`` (Å) from its centre."""
    a, b = scattering_parameters(element)
    bb = b + bfactor_A2
    r2 = np.asarray(r_A, dtype=np.float64)[..., None] ** 2
    return POTENTIAL_CONSTANT_V_A2 * np.sum(a * (4 * math.pi / bb) ** 1.5 * np.exp(-4 * math.pi ** 2 * r2 / bb), axis=-1)


def _spread_trilinear(pos: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """Spread weighted points (fine-grid index coordinates, (m, 3) x,y,z) on an n³ grid (periodic)."""
    grid = torch.zeros(n * n * n, dtype=torch.float32, device=pos.device)
    i0 = torch.floor(pos)
    f = pos - i0
    i0 = i0.long()
    for dx in (0, 1):
        wx = f[:, 0] if dx else 1 - f[:, 0]
        ix = (i0[:, 0] + dx) % n
        for dy in (0, 1):
            wy = f[:, 1] if dy else 1 - f[:, 1]
            iy = (i0[:, 1] + dy) % n
            for dz in (0, 1):
                wz = f[:, 2] if dz else 1 - f[:, 2]
                iz = (i0[:, 2] + dz) % n
                grid.index_add_(0, (iz * n + iy) * n + ix, (weights * wx * wy * wz).float())
    return grid.reshape(n, n, n)


def potential_map(model: AtomicModel, box: int, pixel_size_A: float, bfactor_A2: float = 0.0,
                  centre_A: np.ndarray | None = None, implicit_hydrogens: bool = True,
                  oversample: int | None = None, device=None) -> torch.Tensor:
    """Potential (V) of ``model`` on a ``box``³ grid at ``pixel_size_A``, band-limited to Nyquist.

    ``centre_A`` (x, y, z) lands on voxel index box//2 (default: the atoms' centroid).
    Atoms outside the box wrap around (choose the box large enough). Returns float32 (z, y, x).
    """
    if box % 2:
        raise SubtomoError(f"box {box}: must be even.")
    device = torch.device("cpu") if device is None else torch.device(device)
    centre = model.xyz_A.mean(0) if centre_A is None else np.asarray(centre_A, dtype=np.float64)
    # the spread atom centres alias into the band through the trilinear kernel's side lobes,
    # sinc²(1 - 1/(2 ovs)) at Nyquist: 3.6 % of the power at ovs = 3, less at lower frequencies
    ovs = oversample or 3
    nf = box * ovs
    pf = pixel_size_A / ovs
    k = rfft_frequencies((box, box, box), device=device, dtype=torch.float64) / pixel_size_A  # 1/Å, (x,y,z)
    q2 = (k ** 2).sum(-1)
    # transfer function of trilinear spreading on the fine grid (sinc² per axis), divided out
    kf = (k * pf).clamp(-0.5, 0.5)
    spread_tf = (torch.sinc(kf) ** 2).prod(-1)
    explicit_h = bool(np.any(model.elements == "H"))
    total = torch.zeros(q2.shape, dtype=torch.complex128, device=device)
    pos_all = torch.as_tensor((model.xyz_A - centre) / pf + nf // 2, dtype=torch.float64, device=device)
    for el in sorted(set(model.elements.tolist())):
        sel = torch.as_tensor(model.elements == el, device=device)
        pos = pos_all[sel]
        a, b = scattering_parameters(el)
        fe = sum(float(ai) * torch.exp(-(float(bi) + bfactor_A2) * q2 / 4) for ai, bi in zip(a, b))
        if implicit_hydrogens and not explicit_h and el in IMPLICIT_HYDROGENS:
            ah, bh = scattering_parameters("H")
            fe = fe + IMPLICIT_HYDROGENS[el] * sum(float(ai) * torch.exp(-(float(bi) + bfactor_A2) * q2 / 4)
                                                   for ai, bi in zip(ah, bh))
        grid = _spread_trilinear(pos, torch.ones(len(pos), dtype=torch.float64, device=device), nf)
        f = crop_rfft(fft_centered(grid, 3), box, 3).to(torch.complex128)
        total += f * fe
    total *= POTENTIAL_CONSTANT_V_A2 / pixel_size_A ** 3 / spread_tf
    return ifft_centered(total, (box, box, box)).float()


def molecular_envelope(volume: torch.Tensor, pixel_size_A: float, volume_A3: float, smooth_A: float = 10.0) -> torch.Tensor:
    """Soft mask of the molecule: the ``volume_A3`` largest voxels of the smoothed map, soft edge, integral = volume."""
    smooth = lowpass(volume, max(smooth_A, 2.01 * pixel_size_A), pixel_size_A)
    n_vox = int(round(volume_A3 / pixel_size_A ** 3))
    n_vox = max(1, min(n_vox, smooth.numel() - 1))
    thr = torch.topk(smooth.flatten(), n_vox).values[-1]
    hard = (smooth >= thr).float()
    soft = lowpass(hard, 2.01 * pixel_size_A, pixel_size_A).clamp(0, 1)
    return soft * (volume_A3 / pixel_size_A ** 3 / soft.sum().clamp(min=1e-6))  # integral = volume_A3


def principal_axes(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors (columns) of the coordinate covariance."""
    c = np.cov((xyz - xyz.mean(0)).T)
    w, v = np.linalg.eigh(c)
    return w, v


def orient_for_symmetry(model: AtomicModel, symmetry: str) -> tuple[AtomicModel, float]:
    """Rotate a C_n/D_n model into RELION's orientation (n-fold on z, D_n 2-fold on x).

    Returns the rotated, centred model and the RMS distance (Å) from each atom's symmetry
    copies to the nearest atom (small = the model has the symmetry in RELION's orientation).
    T, O and I models are only centred (they must already be in RELION's orientation; the
    RMS tells whether they are).
    """
    import re

    from scipy.spatial import cKDTree

    xyz = model.xyz_A - model.xyz_A.mean(0)
    m = re.fullmatch(r"([CD])(\d+)", symmetry.strip().upper())
    if not m or int(m.group(2)) < 2:
        ops = symmetry_matrices(symmetry)[1:]
        if len(ops) == 0:
            return AtomicModel(xyz, model.elements, model.chains, model.source), 0.0
        tree = cKDTree(xyz)  # T/O/I: not re-oriented; report how well RELION's operators hold as is
        pts = xyz[:: max(1, len(xyz) // 2000)]
        d = np.concatenate([tree.query(pts @ op.T)[0] for op in ops])
        return AtomicModel(xyz, model.elements, model.chains, model.source), float(np.sqrt(np.mean(d ** 2)))
    kind, n = m.group(1), int(m.group(2))
    w, v = principal_axes(xyz)
    # unique axis of a symmetric top: the eigenvalue farthest from the other two
    gaps = [abs(w[i] - np.mean(np.delete(w, i))) for i in range(3)]
    axis = v[:, int(np.argmax(gaps))]
    # rotation taking axis -> z
    zx = np.cross(axis, [0, 0, 1.0])
    s, c = np.linalg.norm(zx), float(axis[2])
    if s < 1e-9:
        r0 = np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])
    else:
        kx = np.array([[0, -zx[2], zx[1]], [zx[2], 0, -zx[0]], [-zx[1], zx[0], 0]]) / s
        ang = math.atan2(s, c)
        r0 = np.eye(3) + math.sin(ang) * kx + (1 - math.cos(ang)) * kx @ kx
    xyz = xyz @ r0.T
    tree = cKDTree(xyz)

    def rz(phi: float) -> np.ndarray:
        cp, sp = math.cos(phi), math.sin(phi)
        return np.array([[cp, -sp, 0], [sp, cp, 0], [0, 0, 1.0]])

    def score(pts: np.ndarray, rot: np.ndarray, ops: np.ndarray) -> float:
        """RMS distance from symmetry copies of ``pts`` (in the frame rot @ model) to the model."""
        q = pts @ rot.T
        d = [tree.query(q @ op.T @ rot)[0] for op in ops]
        return float(np.sqrt(np.mean(np.concatenate(d) ** 2)))

    sample = xyz[:: max(1, len(xyz) // 2000)]
    rot = np.eye(3)
    if kind == "D":
        two_fold = np.diag([1.0, -1.0, -1.0])[None]  # 180 deg about x
        period = math.pi / n
        best = min(np.linspace(0, period, 60, endpoint=False), key=lambda p: score(sample, rz(-p), two_fold))
        for step in (period / 120, period / 1200):
            best = min(best + np.arange(-5, 6) * step, key=lambda p: score(sample, rz(-p), two_fold))
        rot = rz(-best)
    xyz = xyz @ rot.T
    tree = cKDTree(xyz)
    ops = symmetry_matrices(f"{kind}{n}")[1:]
    rms = score(xyz[:: max(1, len(xyz) // 2000)], np.eye(3), ops)
    return AtomicModel(xyz, model.elements, model.chains, model.source), rms


def chains_near_point(model: AtomicModel, point_A: np.ndarray, mass_fraction: float) -> np.ndarray:
    """Boolean mask of the atoms of the whole chains nearest ``point_A`` (by chain centroid), taken
    until at least ``mass_fraction`` of the atoms are selected (a contiguous patch of subunits)."""
    chains = np.unique(model.chains)
    if len(chains) < 3:
        raise ValueError(f"{len(chains)} chain(s): removing whole chains needs a model of at least 3 chains")
    cent = {c: model.xyz_A[model.chains == c].mean(0) for c in chains}
    remove = np.zeros(len(model), dtype=bool)
    for c in sorted(chains, key=lambda c: np.linalg.norm(cent[c] - point_A)):
        if remove.sum() >= mass_fraction * len(model):
            break
        remove |= model.chains == c
    return remove


def asymmetric_point(model: AtomicModel) -> np.ndarray:
    """A point near the bottom end of a model oriented for its symmetry (RELION: axis along z),
    off every C_n/D_n axis (not on z, not in the z = 0 plane of the D_n two-fold axes)."""
    xyz = model.xyz_A
    r_xy = float(np.linalg.norm(xyz[:, :2], axis=1).max())
    return np.array([0.8 * r_xy * math.cos(0.3), 0.8 * r_xy * math.sin(0.3), float(xyz[:, 2].min())])


def chains_for_variant(model: AtomicModel, mass_fraction: float) -> np.ndarray:
    """Boolean mask of atoms to remove for the conformational variant.

    Whole chains nearest to the chain with the highest centroid (largest z) are taken until
    ``mass_fraction`` of the atoms is reached: a contiguous missing patch (e.g. a lost subunit
    cluster). Models with a single chain lose the atoms nearest to their top instead.
    """
    chains = np.unique(model.chains)
    n_target = mass_fraction * len(model)
    if len(chains) < 3:
        top = model.xyz_A[np.argmax(model.xyz_A[:, 2])]
        d = np.linalg.norm(model.xyz_A - top, axis=1)
        return d <= np.quantile(d, mass_fraction)
    cent = {c: model.xyz_A[model.chains == c].mean(0) for c in chains}
    seed = max(chains, key=lambda c: cent[c][2])
    order = sorted(chains, key=lambda c: np.linalg.norm(cent[c] - cent[seed]))
    remove = np.zeros(len(model), dtype=bool)
    for c in order:
        if remove.sum() >= n_target * 0.85:
            break
        remove |= model.chains == c
    return remove
