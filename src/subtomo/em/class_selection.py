"""Choosing classes of a classification and mapping a 2D selection back to the subtomograms.

Protocol Steps 16, 17 and 21. Three parts, all pure (tables and arrays in, answers out):

* **Class tables and rules** - :class:`ClassTable` (number, fraction, estimated resolution
  per class) and :func:`choose_classes` (by number, class fraction, resolution, the N
  largest; every criterion given must hold).
* **Automatic 2D class selection** - :func:`score_classes` scores every class average by
  what RELION's class ranker and cryoSPARC's selection look at, and keeps the classes that
  look like particles. The picks of a tomogram hold particles, gold fiducials, ice or
  carbon edges and empty (noise) positions; each kind leaves a signature on its class
  average (a disc of the mask diameter ``D`` is "the mask" below):

  - *contrast*: the RMS of the average inside the mask, relative to the reference contrast
    (the class-size-weighted median over the classes that pass the two tests below). A gold
    bead scatters ~10x more than protein, so its class is a compact disc several times
    brighter than any particle class: ``contrast ratio >= CONTRAST_REJECT`` (3.0) scores 0,
    ``<= CONTRAST_KEEP`` (2.0) scores 1, linear between.
  - *fine detail* (spectral content): the fraction of the average's power (inside the mask)
    at spatial frequencies above ``DETAIL_DIAMETERS / D`` (3/D: structure finer than a
    third of the particle), relative to the reference (weighted median of all classes).
    A smooth blob (aggregate, contamination, a lump of ice) has almost none. How much
    detail is demanded depends on how clearly the class shows anything (its concentration,
    below): a clear class (concentration >= 0.9) scores 0 at ``detail ratio <= 0.2`` and 1
    at ``>= 0.3``; a faint class of a few particles (concentration <= 0.6), whose fine
    "detail" is mostly noise, 0 at ``<= 0.06`` and 1 at ``>= 0.12``; linear between.
    Measured on simulated projects: blob classes 0.03-0.10 (clear), particle classes
    0.68-1.4 (clear), faint particle classes of 1-3 particles 0.16-0.27.
  - *concentration* (radial profile against the particle diameter): the share of the
    average's power inside the mask, rescaled so that 0 is what noise spread evenly over
    the box gives (the mask's area fraction) and 1 is all of it inside. Empty/noise classes
    and edges (density running through the box, or off centre) score low:
    ``<= CONCENTRATION_REJECT`` (0.2) scores 0, ``>= CONCENTRATION_KEEP`` (0.4) scores 1.

  The score is the product of the three (0..1); a class is kept when its score is at least
  ``KEEP_SCORE`` (0.5) and it holds particles. Class size and estimated resolution are
  reported but do not decide: a small class at low resolution can be a perfectly good
  view of the particle (the protocol says as much for 3D classes, Step 20), while a bead's
  class has the *best* resolution of all. The references are medians over classes, so
  the rule assumes that most picks are particles (as after any sensible picking).

* **2D -> 3D mapping** - :func:`map_2d_to_3d`, RELION's ``relion_2Dto3D_star.py``: by
  ``rlnImageOriginalName``, else by tomogram name + particle number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from subtomo.errors import SubtomoError
from subtomo.io.particles import parse_image_name

CONTRAST_KEEP, CONTRAST_REJECT = 2.0, 3.0
DETAIL_KEEP, DETAIL_REJECT = 0.12, 0.06  # for a faint class (mostly noise)
DETAIL_KEEP_CLEAR, DETAIL_REJECT_CLEAR = 0.3, 0.2  # for a clear class (all its power inside the mask)
CLARITY_FAINT, CLARITY_CLEAR = 0.6, 0.9  # concentration of a faint and of a clear class
CONCENTRATION_KEEP, CONCENTRATION_REJECT = 0.4, 0.2
DETAIL_DIAMETERS = 3.0
KEEP_SCORE = 0.5


# ----------------------------------------------------------------------------- class tables and rules


@dataclass
class ClassTable:
    """Per-class statistics of a classification.

    Attributes
    ----------
    number : numpy.ndarray
        (K,) int class numbers (1-based).
    fraction : numpy.ndarray
        (K,) float64 fraction of the particles in each class.
    resolution_A : numpy.ndarray
        (K,) float64 estimated resolution [Å] (NaN where unknown).
    """

    number: np.ndarray
    fraction: np.ndarray
    resolution_A: np.ndarray


def _reference_numbers(references: pd.Series) -> np.ndarray:
    """Class numbers from rlnReferenceImage (``k@stack.mrcs`` or ``..._classNNN.mrc``), else 1..K."""
    parsed = []
    for j, ref in enumerate(references.astype(str)):
        index, name = parse_image_name(ref)
        digits = Path(name).stem.rsplit("class", 1)[-1] if "class" in Path(name).stem else ""
        parsed.append(index if index is not None else int(digits) if digits.isdigit() else j + 1)
    return np.asarray(parsed, int)


def class_table(model_classes: pd.DataFrame | None, class_numbers: np.ndarray) -> ClassTable:
    """Class statistics from a model STAR's ``model_classes`` block, or from the particles' classes.

    Parameters
    ----------
    model_classes
        The ``model_classes`` table (rlnReferenceImage, rlnClassDistribution,
        rlnEstimatedResolution), or None.
    class_numbers
        (n,) int rlnClassNumber of every particle.

    Returns
    -------
    ClassTable
        One entry per class.
    """
    class_numbers = np.asarray(class_numbers, int)
    n = max(len(class_numbers), 1)
    if model_classes is not None and len(model_classes):
        mc = model_classes
        numbers = (_reference_numbers(mc["rlnReferenceImage"]) if "rlnReferenceImage" in mc.columns
                   else np.arange(1, len(mc) + 1))
        if "rlnClassDistribution" in mc.columns:
            frac = mc["rlnClassDistribution"].to_numpy(float)
        else:
            frac = np.array([(class_numbers == k).sum() for k in numbers], float) / n
        res = (mc["rlnEstimatedResolution"].to_numpy(float) if "rlnEstimatedResolution" in mc.columns
               else np.full(len(mc), np.nan))
        return ClassTable(numbers, frac, res)
    k = int(class_numbers.max()) if len(class_numbers) else 0
    numbers = np.arange(1, k + 1)
    frac = np.array([(class_numbers == c).sum() for c in numbers], float) / n
    return ClassTable(numbers, frac, np.full(k, np.nan))


def choose_classes(table: ClassTable, classes: list[int] | None, min_fraction: float | None,
                   max_resolution_A: float | None, top_n: int | None) -> list[int]:
    """Class numbers that pass every given criterion.

    Parameters
    ----------
    table
        The classes.
    classes
        Class numbers to keep (1-based), or None.
    min_fraction
        Smallest class fraction kept, or None.
    max_resolution_A
        Worst estimated resolution kept [Å], or None.
    top_n
        Keep only the N largest classes, or None.

    Returns
    -------
    list of int
        Sorted class numbers. Raises SubtomoError on unknown numbers or no criterion.
    """
    if classes is None and min_fraction is None and max_resolution_A is None and top_n is None:
        raise SubtomoError("nothing to select by: give --classes (e.g. 1,3,4), --auto, and/or a rule "
                           "(--min-class-fraction, --max-class-resolution, --top-n-classes).")
    known = set(int(k) for k in table.number)
    keep = set(known)
    if classes is not None:
        unknown = sorted(set(int(c) for c in classes) - known)
        if unknown:
            raise SubtomoError(f"--classes: class number(s) {', '.join(map(str, unknown))} do not exist; "
                               f"this classification has classes {min(known)}..{max(known)}." if known else
                               "--classes: the classification has no classes.")
        keep &= set(int(c) for c in classes)
    if min_fraction is not None:
        keep &= {int(k) for k, f in zip(table.number, table.fraction) if f >= min_fraction}
    if max_resolution_A is not None:
        if np.all(np.isnan(table.resolution_A)):
            raise SubtomoError("--max-class-resolution: the model STAR has no rlnEstimatedResolution per class. "
                               "Give the run_itNNN_model.star, or select by --classes.")
        keep &= {int(k) for k, r in zip(table.number, table.resolution_A) if np.isfinite(r) and r <= max_resolution_A}
    if top_n is not None:
        order = sorted(zip(table.number, table.fraction), key=lambda kf: (-kf[1], kf[0]))
        keep &= {int(k) for k, _ in order[:top_n]}
    return sorted(keep)


# ----------------------------------------------------------------------------- automatic selection


@dataclass
class ClassScores:
    """Measurements and scores of every class average (see the module docstring).

    All arrays are (K,), in the order of the images given to :func:`score_classes`.
    """

    contrast: np.ndarray  # RMS inside the mask [grey values]
    contrast_ratio: np.ndarray  # contrast / reference contrast
    detail: np.ndarray  # power fraction beyond DETAIL_DIAMETERS / D
    detail_ratio: np.ndarray  # detail / reference detail
    concentration: np.ndarray  # 0 = spread like noise, 1 = all power inside the mask
    radius80_A: np.ndarray  # radius holding 80 % of the power [Å]
    score_contrast: np.ndarray  # 0..1
    score_detail: np.ndarray  # 0..1
    score_concentration: np.ndarray  # 0..1
    score: np.ndarray  # product, 0..1
    keep: np.ndarray  # bool
    verdict: list[str]  # "particle", or why not: "bead-like", "smooth blob", "noise/edge", "empty"


def _ramp(x: np.ndarray, zero_at: float, one_at: float) -> np.ndarray:
    """0 at ``zero_at``, 1 at ``one_at``, linear between, clipped (either direction)."""
    return np.clip((x - zero_at) / (one_at - zero_at), 0.0, 1.0)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """Median of ``values`` with ``weights`` (falls back to the plain median without weight)."""
    if weights.sum() <= 0:
        return float(np.median(values)) if len(values) else float("nan")
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def class_average_features(images: np.ndarray, pixel_size_A: float, diameter_A: float) -> dict[str, np.ndarray]:
    """Contrast, fine detail, concentration and 80 %-power radius of 2D class averages.

    Parameters
    ----------
    images
        (K, N, N) class averages.
    pixel_size_A
        Pixel size [Å].
    diameter_A
        Particle (mask) diameter [Å]; clipped to 90 % of the box.

    Returns
    -------
    dict of numpy.ndarray
        ``contrast`` (RMS inside the mask after removing the background median),
        ``detail`` (power fraction beyond ``DETAIL_DIAMETERS / D``), ``concentration``
        (0..1), ``radius80_A`` [Å]; each (K,) float64.
    """
    imgs = np.asarray(images, np.float64)
    n = imgs.shape[-1]
    yy, xx = np.mgrid[:n, :n] - n // 2
    r_A = np.hypot(yy, xx) * pixel_size_A
    radius = min(diameter_A, 0.9 * n * pixel_size_A) / 2
    inside = r_A <= radius
    area = inside.mean()
    k_A = np.fft.fftshift(np.hypot(*np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), indexing="ij"))) / pixel_size_A
    fine = k_A >= min(DETAIL_DIAMETERS / (2 * radius), 0.8 / (2 * pixel_size_A))
    out: dict[str, list[float]] = {"contrast": [], "detail": [], "concentration": [], "radius80_A": []}
    order = np.argsort(r_A.ravel())
    for img in imgs:
        centred = img - np.median(img[~inside]) if (~inside).any() else img - img.mean()
        power = centred ** 2
        total = power.sum()
        out["contrast"].append(float(np.sqrt(power[inside].mean())))
        spectrum = np.abs(np.fft.fftshift(np.fft.fft2(centred * inside))) ** 2
        spectrum[n // 2, n // 2] = 0.0
        out["detail"].append(float(spectrum[fine].sum() / spectrum.sum()) if spectrum.sum() > 0 else 0.0)
        share = power[inside].sum() / total if total > 0 else 0.0
        out["concentration"].append(float(np.clip((share - area) / (1 - area), 0, 1)))
        cum = np.cumsum(power.ravel()[order])
        out["radius80_A"].append(float(r_A.ravel()[order][np.searchsorted(cum, 0.8 * cum[-1])]) if total > 0 else 0.0)
    return {key: np.asarray(v) for key, v in out.items()}


def _verdict(counts: np.ndarray, s_contrast: np.ndarray, s_detail: np.ndarray, s_conc: np.ndarray,
             keep: np.ndarray) -> list[str]:
    """One word per class: particle, or the weakest reason it was not kept."""
    out = []
    for k in range(len(keep)):
        if counts[k] <= 0:
            out.append("empty")
        elif keep[k]:
            out.append("particle")
        else:
            worst = int(np.argmin([s_contrast[k], s_detail[k], s_conc[k]]))
            out.append(("bead-like", "smooth blob", "noise/edge")[worst])
    return out


def score_classes(images: np.ndarray, counts: np.ndarray, pixel_size_A: float, diameter_A: float) -> ClassScores:
    """Automatic 2D class selection: score every class average, keep the particle-like ones.

    Parameters
    ----------
    images
        (K, N, N) class averages.
    counts
        (K,) number of particles in each class (weights of the reference medians; 0 = empty).
    pixel_size_A
        Pixel size [Å].
    diameter_A
        Particle (mask) diameter [Å].

    Returns
    -------
    ClassScores
        Measurements, sub-scores, score, keep flag and verdict per class.
    """
    f = class_average_features(images, pixel_size_A, diameter_A)
    w = np.asarray(counts, float)
    detail_ratio = f["detail"] / max(_weighted_median(f["detail"], w), 1e-12)
    clarity = _ramp(f["concentration"], CLARITY_FAINT, CLARITY_CLEAR)
    reject_at = DETAIL_REJECT + clarity * (DETAIL_REJECT_CLEAR - DETAIL_REJECT)
    keep_at = DETAIL_KEEP + clarity * (DETAIL_KEEP_CLEAR - DETAIL_KEEP)
    s_detail = np.clip((detail_ratio - reject_at) / (keep_at - reject_at), 0.0, 1.0)
    s_conc = _ramp(f["concentration"], CONCENTRATION_REJECT, CONCENTRATION_KEEP)
    usable = (s_detail * s_conc >= KEEP_SCORE) & (w > 0)
    ref_contrast = _weighted_median(f["contrast"][usable], w[usable]) if usable.any() else \
        _weighted_median(f["contrast"], w)
    contrast_ratio = f["contrast"] / max(ref_contrast, 1e-12)
    s_contrast = _ramp(contrast_ratio, CONTRAST_REJECT, CONTRAST_KEEP)
    score = s_contrast * s_detail * s_conc
    keep = (score >= KEEP_SCORE) & (w > 0)
    return ClassScores(f["contrast"], contrast_ratio, f["detail"], detail_ratio, f["concentration"], f["radius80_A"],
                       s_contrast, s_detail, s_conc, score, keep, _verdict(w, s_contrast, s_detail, s_conc, keep))


def scores_table(numbers: np.ndarray, table: ClassTable, scores: ClassScores) -> pd.DataFrame:
    """The per-class scores as a STAR table (RELION labels where they exist, ``subtomo*`` otherwise).

    Parameters
    ----------
    numbers
        (K,) class numbers, in the order of ``scores``.
    table
        Class fractions and resolutions (same order).
    scores
        :func:`score_classes`'s result.

    Returns
    -------
    pandas.DataFrame
        One row per class.
    """
    return pd.DataFrame({
        "rlnClassNumber": np.asarray(numbers, int), "rlnClassDistribution": table.fraction,
        "rlnEstimatedResolution": table.resolution_A, "subtomoContrast": scores.contrast,
        "subtomoContrastRatio": scores.contrast_ratio, "subtomoFineDetail": scores.detail,
        "subtomoFineDetailRatio": scores.detail_ratio, "subtomoConcentration": scores.concentration,
        "subtomoRadius80Angst": scores.radius80_A, "subtomoScoreContrast": scores.score_contrast,
        "subtomoScoreDetail": scores.score_detail, "subtomoScoreConcentration": scores.score_concentration,
        "subtomoClassScore": scores.score, "subtomoClassKept": scores.keep.astype(int),
        "subtomoClassVerdict": scores.verdict,
    })


# ----------------------------------------------------------------------------- 2D -> 3D


def image_dimensionality(optics: pd.DataFrame | None, particles: pd.DataFrame) -> int:
    """2 for projection images, 3 for subtomograms.

    Parameters
    ----------
    optics
        Optics table or None.
    particles
        Particle rows.

    Returns
    -------
    int
        rlnImageDimensionality of the rows or optics, else 2 when image names are
        ``index@stack``, else 3.
    """
    for table in (particles, optics):
        if isinstance(table, pd.DataFrame) and "rlnImageDimensionality" in table.columns and len(table):
            return int(table["rlnImageDimensionality"].iloc[0])
    if "rlnImageName" in particles.columns and len(particles):
        return 2 if "@" in str(particles["rlnImageName"].iloc[0]) else 3
    return 3


def _tomo_key(df: pd.DataFrame) -> pd.Series:
    if "rlnTomoName" in df.columns:
        return df["rlnTomoName"].astype(str)
    if "rlnMicrographName" in df.columns:
        return df["rlnMicrographName"].astype(str).map(lambda s: Path(parse_image_name(s)[1]).stem)
    raise SubtomoError("cannot tell the tomogram of each particle: neither rlnTomoName nor rlnMicrographName is present.")


def _number_2d(df: pd.DataFrame) -> pd.Series:
    if "rlnTomoParticleId" in df.columns:
        return df["rlnTomoParticleId"].astype(int)
    return df["rlnImageName"].astype(str).map(lambda s: parse_image_name(s)[0] or 0)  # stack index, as the script


def _number_3d(df: pd.DataFrame) -> pd.Series:
    if "rlnTomoParticleId" in df.columns:
        return df["rlnTomoParticleId"].astype(int)

    def last6(name: str) -> int:
        digits = Path(parse_image_name(name)[1]).stem[-6:]
        if not digits.isdigit():
            raise SubtomoError(f"3D image name {name!r} does not end in a 6-digit particle number; cannot map 2D to 3D "
                               "without rlnImageOriginalName.")
        return int(digits)

    return df["rlnImageName"].astype(str).map(last6)


def _norm(p: str) -> str:
    return os.path.normpath(parse_image_name(p)[1])


def _mapping_keys(selected2d: pd.DataFrame, particles3d: pd.DataFrame) -> tuple[list, list, str]:
    """Keys of the 2D rows and the 3D rows, and how they were made."""
    if "rlnImageOriginalName" in selected2d.columns and "rlnImageName" in particles3d.columns:
        k2 = selected2d["rlnImageOriginalName"].astype(str).map(_norm)
        k3 = particles3d["rlnImageName"].astype(str).map(_norm)
        if k2.isin(set(k3)).any():
            return list(k2), list(k3), "rlnImageOriginalName"
    keys2d = list(zip(_tomo_key(selected2d), _number_2d(selected2d)))
    keys3d = list(zip(_tomo_key(particles3d), _number_3d(particles3d)))
    return keys2d, keys3d, "tomogram name + particle number"


def map_2d_to_3d(selected2d: pd.DataFrame, particles3d: pd.DataFrame) -> tuple[np.ndarray, str]:
    """Row indices of ``particles3d`` that the 2D selection came from.

    Exact: every selected 2D row must match exactly one 3D row. First by
    ``rlnImageOriginalName`` == 3D ``rlnImageName``; where that column is missing (or
    matches nothing), by (tomogram name, particle number) as ``relion_2Dto3D_star.py``.

    Parameters
    ----------
    selected2d
        The selected 2D projection rows.
    particles3d
        The 3D particle rows they were made from.

    Returns
    -------
    tuple of (numpy.ndarray, str)
        (m,) int sorted row positions in ``particles3d``, and how they were matched.
    """
    if len(selected2d) == 0:
        return np.zeros(0, int), "none"
    keys2d, keys3d, how = _mapping_keys(selected2d, particles3d)
    pos: dict = {}
    dup = []
    for i, k in enumerate(keys3d):
        if k in pos:
            dup.append(k)
        pos[k] = i
    wanted = set(keys2d)
    dup = [d for d in dup if d in wanted]
    if dup:
        raise SubtomoError(f"the 3D particles STAR has duplicate entries for {len(dup)} selected particle(s) (e.g. {dup[0]}); "
                           "the 2D-to-3D mapping would be ambiguous. Give the particles_subtomo.star the projections were made from.")
    missing = [k for k in keys2d if k not in pos]
    if missing:
        raise SubtomoError(f"{len(missing)} of {len(keys2d)} selected projections have no subtomogram in the 3D particles STAR "
                           f"(matched by {how}; e.g. {missing[0]}). Give the particles_subtomo.star of the extraction that "
                           "wrote the projections with --particles3d.")
    if len(set(keys2d)) != len(keys2d):
        raise SubtomoError("the 2D selection lists the same subtomogram more than once; the 2D STAR is not one projection "
                           "per subtomogram.")
    return np.sort(np.array([pos[k] for k in keys2d], int)), how
