"""Results scored against the simulator's ground truth (``GroundTruth/`` of a simulated project).

A de novo refinement finds the structure in a frame of its own: a global rotation (and, for a
symmetric structure, a symmetry operator per particle) away from the true frame, possibly
with the opposite hand. Everything here first removes that gauge freedom, then compares:

* :func:`global_rotation` - the rotation G with ``est_i ~ true_i g_i G`` and the residual
  per-particle angular errors (minimum over the point group);
* :func:`truth_in_map_frame` - the true map rotated by G, shifted to the refined map by
  cross-correlation, the hand tried both ways; then FSC(map, truth) is meaningful;
* :func:`oracle_poses` - the true poses of extracted particles (for the oracle reconstruction);
* :func:`ctf_errors`, :func:`selection_scores`, :func:`classification_accuracy` - the
  CTF, 2D-selection and 3D-classification stages against the true defoci, kinds and classes.

Rotation convention: RELION's (``docs/conventions.md``); a particle's volume is
``ref(A r)``-rotated by ``A = euler_to_matrix(rot, tilt, psi)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from subtomo.em.maps import rotate_map
from subtomo.errors import SubtomoError
from subtomo.fourier import fft_centered, fsc_maps, ifft_centered, phase_shift
from subtomo.geometry.euler import angular_distance_deg, euler_to_matrix
from subtomo.io.particles import resolve_project_path
from subtomo.io.star import read_star_table

TRUTH_KEY = ["rlnTomoName", "rlnTomoParticleId"]


def global_rotation(est: np.ndarray, true: np.ndarray, sym: np.ndarray,
                    tol_deg: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """The rotation G with ``est_i ~ true_i g_i G`` (g_i in the point group ``sym``) and the errors.

    Robust to symmetry flips and outliers: candidates ``G = true_i^T est_i`` from up to 60
    particles; the one with most particles within ``tol_deg`` (minimum over g) is refined
    by the chordal mean of the inliers. Returns ``(G (3, 3), per-particle error (n,) deg)``.
    """
    rel = np.einsum("nji,njk->nik", true, est)  # true_i^T est_i = g_i G

    def errors(g_mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        angles = angular_distance_deg(rel[:, None], (sym @ g_mat)[None])  # angle of rel_i (g G)^T
        return angles.min(1), angles.argmin(1)

    best, best_inliers = rel[0], -1
    for candidate in rel[:: max(1, len(rel) // 60)]:
        inliers = int((errors(candidate)[0] < tol_deg).sum())
        if inliers > best_inliers:
            best, best_inliers = candidate, inliers
    err, g_index = errors(best)
    ok = err < 3 * tol_deg
    m = np.einsum("nji,njk->ik", sym[g_index[ok]], rel[ok])  # sum g_i^T rel_i ~ G
    u, _, vt = np.linalg.svd(m)
    g_mat = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt
    return g_mat, errors(g_mat)[0]


def align_by_translation(moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``moving`` shifted by whole voxels to its cross-correlation peak with ``fixed``, and the CC there."""
    shape = tuple(fixed.shape)
    cc = ifft_centered(fft_centered(fixed, 3) * fft_centered(moving, 3).conj(), shape)
    peak = np.unravel_index(int(torch.argmax(cc)), shape)
    shift_xyz = [float(i - s // 2) for i, s in zip(peak[::-1], shape[::-1])]
    out = ifft_centered(phase_shift(fft_centered(moving, 3), torch.tensor(shift_xyz), shape), shape)
    norm = float(moving.norm() * fixed.norm()) or 1.0
    return out, float((out * fixed).sum()) / norm


@dataclass
class AlignedTruth:
    """The true map in the refined map's frame, and how well they agree."""

    volume: torch.Tensor
    hand: str  # "as is" or "mirrored" (the refinement found the other hand)
    correlation: float
    fsc: np.ndarray  # FSC(refined map, aligned truth) per shell


def truth_in_map_frame(truth: torch.Tensor, refined: torch.Tensor, g_mat: np.ndarray,
                       mask: torch.Tensor | None = None) -> AlignedTruth:
    """Rotate the truth into the refined frame (``ref_est(v) = ref_true(G v)``), shift, try both hands.

    With ``mask``, the FSC compares ``refined * mask`` with ``truth * mask`` (the solvent of a
    noisy reconstruction is left out, as for a masked gold-standard FSC).
    """
    best: AlignedTruth | None = None
    for hand, t in (("as is", truth), ("mirrored", torch.flip(truth, dims=(0,)))):
        moved, cc = align_by_translation(rotate_map(t, g_mat.T), refined)
        if best is None or cc > best.correlation:
            best = AlignedTruth(moved, hand, cc, np.empty(0))
    assert best is not None
    m = mask if mask is not None else torch.ones_like(refined)
    best.fsc = fsc_maps(refined * m, best.volume * m).numpy()
    return best


def oracle_poses(particles: pd.DataFrame, truth_star: str | Path, project: Path,
                 pixel_size_A: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """True rotations and origins (px) of extracted particles from the simulator's picks.star.

    Rows are matched by rlnTomoName + rlnTomoParticleId. The true origin follows from the
    true centre: particle centre = box centre - origin, and extraction put floor(coordinate)
    at the box centre, so origin = floor(coordinate) - true centre (+ the extraction origin
    already in the STAR file accounts for the fractional part of the picked coordinate).
    Returns ``(rotations (n, 3, 3), origins (n, 3) px)``; ``pixel_size_A`` is not needed
    (coordinates are in the particles' pixels) and kept for the callers' signature.
    """
    path = resolve_project_path(project, truth_star)
    gt = read_star_table(path)
    key = ["rlnTomoName", "rlnTomoParticleId"]
    m = particles[key + ["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].merge(
        gt[key + ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]],
        on=key, how="left", suffixes=("", "_true"))
    if m["rlnAngleRot"].isna().any():
        raise SubtomoError(f"--oracle {truth_star}: {int(m['rlnAngleRot'].isna().sum())} particles have no ground-truth "
                           "row (matched by rlnTomoName + rlnTomoParticleId). Give the picks.star of the simulation "
                           "these particles were extracted from.")
    rot = euler_to_matrix(m["rlnAngleRot"].to_numpy(), m["rlnAngleTilt"].to_numpy(), m["rlnAnglePsi"].to_numpy())
    picked = np.floor(m[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy(dtype=np.float64))
    true_c = m[["rlnCoordinateX_true", "rlnCoordinateY_true", "rlnCoordinateZ_true"]].to_numpy(dtype=np.float64)
    return rot, picked - true_c


# ----------------------------------------------------------------------------- stages


def ctf_errors(ctf_tables: dict[str, pd.DataFrame], truth_tilts: pd.DataFrame) -> pd.DataFrame:
    """Per tilt image: tilt, estimated and true mean defocus (Å), error, fit flag, source.

    ``ctf_tables`` maps tomogram name to its ``<t>_ctffind.star`` table; ``truth_tilts`` is
    ``GroundTruth/tilts.star``. Rows are matched by tomogram and image (rlnMicrographName).
    """
    rows = []
    for name, table in ctf_tables.items():
        gt = truth_tilts[truth_tilts["rlnTomoName"].astype(str) == str(name)]
        m = table.merge(gt[["rlnMicrographName", "rlnDefocusU", "rlnDefocusV"]], on="rlnMicrographName",
                        suffixes=("", "_true"), how="inner")
        est = (m["rlnDefocusU"].to_numpy(float) + m["rlnDefocusV"].to_numpy(float)) / 2
        true = (m["rlnDefocusU_true"].to_numpy(float) + m["rlnDefocusV_true"].to_numpy(float)) / 2
        rows.append(pd.DataFrame({
            "tomogram": name, "tilt_deg": m["rlnTomoNominalStageTiltAngle"].to_numpy(float),
            "estimated_A": est, "true_A": true, "error_A": est - true,
            "flagged": m.get("subtomoCtfFitFailed", pd.Series(0, index=m.index)).to_numpy(int) > 0,
            "source": m.get("subtomoCtfSource", pd.Series("fit", index=m.index)).astype(str).to_numpy(),
        }))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def _with_truth(particles: pd.DataFrame, picks: pd.DataFrame) -> pd.DataFrame:
    """``particles`` with the true kind and class (``true_class``) of each, matched by tomogram + particle id."""
    truth = picks[TRUTH_KEY + ["subtomoKind", "rlnClassNumber"]].rename(columns={"rlnClassNumber": "true_class"})
    truth = truth.astype({"rlnTomoName": str, "rlnTomoParticleId": int})
    return particles.astype({"rlnTomoName": str, "rlnTomoParticleId": int}).merge(truth, on=TRUTH_KEY, how="left")


@dataclass
class SelectionScore:
    kept: int
    kept_particles: int
    true_particles: int  # real particles among all the candidates
    precision: float  # kept that are real particles
    recall: float  # real particles that were kept


def selection_scores(kept: pd.DataFrame, candidates: pd.DataFrame, picks: pd.DataFrame) -> SelectionScore:
    """How well a selection (``kept`` out of ``candidates``) separates real particles from false picks."""
    kept_kind = _with_truth(kept, picks)["subtomoKind"]
    all_kind = _with_truth(candidates, picks)["subtomoKind"]
    n_good = int((kept_kind == "particle").sum())
    n_true = int((all_kind == "particle").sum())
    return SelectionScore(len(kept), n_good, n_true, n_good / max(len(kept), 1), n_good / max(n_true, 1))


def classification_accuracy(particles: pd.DataFrame, picks: pd.DataFrame) -> tuple[float, np.ndarray]:
    """Fraction of real particles whose class matches the truth under the best class-label matching.

    Returns ``(accuracy, contingency)`` with ``contingency[true class - 1, assigned class - 1]``
    counted over the real particles (false picks are left out: they have no true class).
    """
    from scipy.optimize import linear_sum_assignment

    m = _with_truth(particles, picks)
    m = m[m["subtomoKind"] == "particle"]
    true = m["true_class"].to_numpy(int)
    assigned = m["rlnClassNumber"].to_numpy(int)
    if len(m) == 0:
        return float("nan"), np.zeros((0, 0), int)
    table = np.zeros((true.max(), max(assigned.max(), true.max())), int)
    np.add.at(table, (true - 1, assigned - 1), 1)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum()) / len(m), table


def load_picks(project: Path) -> pd.DataFrame:
    """``GroundTruth/picks.star``: every pick with its kind, true class, centre and pose."""
    return read_star_table(Path(project) / "GroundTruth" / "picks.star")
