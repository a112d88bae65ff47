"""RELION's run files of an iterative job (refine3d, class3d, class2d): names, writers, optimiser state.

Per iteration NNN: ``run_itNNN_data.star`` (particles with poses), ``run_itNNN_model.star``
(model_general, model_classes, model_class_K, model_groups, model_group_1; labels from
relion-internals §5.3), maps (``run_itNNN_half1_class001.mrc``, ``run_itNNN_class001.mrc``,
``run_itNNN_classes.mrcs``) and the optimiser state ``run_itNNN_optimiser.pt`` from which
``--continue-job`` resumes; the last iteration of a refinement also as ``run_*`` without the
iteration. The engine (:mod:`subtomo.em`) computes and returns; the jobs write through here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from subtomo.io.mrc import write_mrc
from subtomo.io.particles import ParticleSet
from subtomo.io.star import write_star

_OPTIMISER_RE = re.compile(r"run_it(\d{3,})_optimiser\.pt$")


class ModelSpectra(Protocol):
    """What a model.star is written from (``subtomo.em.model.EMModel`` has all of it).

    Tensors: ``maps`` (K, N, ...) , ``sigma2`` (N//2+1,), ``tau2``, ``data_vs_prior``, ``fsc``
    (K, N//2+1), ``class_priors`` (K,); ``pixel_size_A`` Å, ``sigma_offset_px`` px.
    """

    sigma2: torch.Tensor
    tau2: torch.Tensor
    data_vs_prior: torch.Tensor
    fsc: torch.Tensor
    class_priors: torch.Tensor
    pixel_size_A: float
    tau2_fudge: float
    sigma_offset_px: float
    current_size: int
    ndim: int
    log_lik: float
    extra: dict

    @property
    def box(self) -> int:
        """Box size N [px]."""
        ...

    @property
    def n_classes(self) -> int:
        """Number of references K."""
        ...

    @property
    def n_shells(self) -> int:
        """N//2 + 1."""
        ...

    @property
    def current_resolution_A(self) -> float:
        """Current resolution [Å]."""
        ...


class PoseColumns(Protocol):
    """Per-particle results of an iteration (``subtomo.em.iteration.PoseTable``).

    ``rot`` (n, 3, 3) matrices A, ``offset_px`` (n, 3) px, ``cls`` (n,) 0-based class,
    ``max_prob``, ``log_lik``, ``n_sig`` (n,).
    """

    rot: np.ndarray
    offset_px: np.ndarray
    cls: np.ndarray
    max_prob: np.ndarray
    log_lik: np.ndarray
    n_sig: np.ndarray


def run_root(iteration: int | None) -> str:
    """``run_itNNN`` for an iteration, ``run`` for the final files (iteration None).

    Parameters
    ----------
    iteration : int or None
        Iteration number (0 = the initial state).

    Returns
    -------
    str
        The file-name root, e.g. ``run_it007``.
    """
    return "run" if iteration is None else f"run_it{iteration:03d}"


def write_map(path: str | Path, volume: torch.Tensor | np.ndarray, pixel_size_A: float, stack: bool = False) -> Path:
    """Write a map (or with ``stack`` a stack of 2D images) as float32 MRC.

    Parameters
    ----------
    path : str or Path
        Output file.
    volume : torch.Tensor or numpy.ndarray
        (N, N, N) map, or (K, N, N) images with ``stack``.
    pixel_size_A : float
        Voxel size written to the header [Å].
    stack : bool
        Write an image stack (``.mrcs``).

    Returns
    -------
    Path
    """
    data = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    return write_mrc(path, data.astype(np.float32), pixel_size_A, stack=stack)


def write_data_star(path: str | Path, particles: ParticleSet, poses: PoseColumns,
                    halves: np.ndarray | None = None) -> Path:
    """A run_data.star: the input particles with their new poses and E-step results.

    Parameters
    ----------
    path : str or Path
        Output file.
    particles : ParticleSet
        The input particles (n rows, optics kept).
    poses : PoseColumns
        New rotations (n, 3, 3), origins (n, 3) [px], classes (0-based), Pmax, log-likelihood
        contributions and numbers of significant samples.
    halves : numpy.ndarray, optional
        (n,) gold-standard half (rlnRandomSubset, 1/2) of each particle.

    Returns
    -------
    Path
    """
    out = particles.with_poses(poses.rot, poses.offset_px)
    if halves is not None:
        out = out.with_columns(rlnRandomSubset=np.asarray(halves).astype(int))
    out = out.with_columns(rlnClassNumber=np.asarray(poses.cls).astype(int) + 1,
                           rlnMaxValueProbDistribution=poses.max_prob,
                           rlnLogLikeliContribution=poses.log_lik,
                           rlnNrOfSignificantSamples=np.asarray(poses.n_sig).astype(int))
    return out.write(path)


def write_model_star(path: str | Path, model: ModelSpectra, map_names: list[str], extra_general: dict | None = None,
                     class_resolutions_A: list[float] | None = None, accuracy_rot_deg: float | None = None,
                     accuracy_trans_px: float | None = None) -> Path:
    """RELION's model.star (labels from relion-internals §5.3).

    Parameters
    ----------
    path : str or Path
        Output file.
    model : ModelSpectra
        K references, spectra (N//2 + 1 shells) and priors.
    map_names : list of str
        rlnReferenceImage of each class (file names or ``k@stack``).
    extra_general : dict, optional
        More model_general labels (e.g. rlnCurrentIteration).
    class_resolutions_A : list of float, optional
        rlnEstimatedResolution per class [Å]; default: the current resolution.
    accuracy_rot_deg : float, optional
        Expected angular accuracy [deg]; 999 when unknown.
    accuracy_trans_px : float, optional
        Expected translational accuracy [px]; 999 Å when unknown.

    Returns
    -------
    Path
    """
    n, px, k = model.box, model.pixel_size_A, model.n_classes
    r = np.arange(model.n_shells)
    spectral = r / (n * px)
    res = np.where(r > 0, n * px / np.maximum(r, 1), 999.0)
    blocks: dict = {"model_general": _model_general(model, extra_general)}
    blocks["model_classes"] = pd.DataFrame({
        "rlnReferenceImage": map_names,
        "rlnClassDistribution": _np(model.class_priors),
        "rlnAccuracyRotations": [accuracy_rot_deg if accuracy_rot_deg is not None else 999.0] * k,
        "rlnAccuracyTranslationsAngst": [accuracy_trans_px * px if accuracy_trans_px is not None else 999.0] * k,
        "rlnEstimatedResolution": class_resolutions_A or [model.current_resolution_A] * k,
        "rlnOverallFourierCompleteness": [1.0] * k,
    })
    for c in range(k):
        blocks[f"model_class_{c + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": r, "rlnResolution": spectral, "rlnAngstromResolution": res,
            "rlnSsnrMap": _np(model.data_vs_prior[c]), "rlnGoldStandardFsc": _np(model.fsc[c]),
            "rlnReferenceSigma2": _np(model.tau2[c]) / 2, "rlnReferenceTau2": _np(model.tau2[c]),
        })
    blocks["model_groups"] = pd.DataFrame({"rlnGroupNumber": [1], "rlnGroupName": ["group_1"],
                                           "rlnGroupNrParticles": [int(model.extra.get("n_particles", 0))],
                                           "rlnGroupScaleCorrection": [1.0]})
    blocks["model_group_1"] = pd.DataFrame({"rlnSpectralIndex": r, "rlnResolution": spectral,
                                            "rlnSigma2Noise": _np(model.sigma2)})
    return write_star(path, blocks)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _model_general(model: ModelSpectra, extra: dict | None) -> dict:
    n, px = model.box, model.pixel_size_A
    general = {
        "rlnReferenceDimensionality": model.ndim, "rlnDataDimensionality": model.ndim,
        "rlnOriginalImageSize": n, "rlnCurrentResolution": 1.0 / model.current_resolution_A,
        "rlnCurrentImageSize": model.current_size or n, "rlnPaddingFactor": 2,
        "rlnFourierSpaceInterpolator": 1, "rlnMinRadiusNnInterpolation": 10,
        "rlnPixelSize": px, "rlnNrClasses": model.n_classes, "rlnNrBodies": 1, "rlnNrGroups": 1,
        "rlnTau2FudgeFactor": model.tau2_fudge, "rlnNormCorrectionAverage": 1.0,
        "rlnSigmaOffsetsAngst": model.sigma_offset_px * px, "rlnOrientationalPriorMode": 0,
        "rlnSigmaPriorRotAngle": 0.0, "rlnSigmaPriorTiltAngle": 0.0, "rlnSigmaPriorPsiAngle": 0.0,
        "rlnLogLikelihood": model.log_lik, "rlnAveragePmax": float(model.extra.get("average_pmax", 0.0)),
    }
    general.update(extra or {})
    return general


def save_optimiser_state(directory: str | Path, iteration: int, state: dict) -> Path:
    """Write ``run_itNNN_optimiser.pt`` atomically (what ``--continue-job`` resumes from).

    Parameters
    ----------
    directory : str or Path
        The job directory.
    iteration : int
        The iteration the state is after.
    state : dict
        Plain contents (tensors on cpu, numpy arrays, dataclasses of the engine).

    Returns
    -------
    Path
    """
    path = Path(directory) / f"{run_root(iteration)}_optimiser.pt"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def latest_optimiser_state(directory: str | Path) -> tuple[int, dict, Path] | None:
    """The optimiser state of the last finished iteration in a job directory.

    Parameters
    ----------
    directory : str or Path
        The job directory.

    Returns
    -------
    tuple of (int, dict, Path) or None
        (iteration, state, file), or None when no iteration has finished.
    """
    found = [(int(m.group(1)), f) for f in Path(directory).glob("run_it*_optimiser.pt")
             if (m := _OPTIMISER_RE.search(f.name))]
    if not found:
        return None
    iteration, path = max(found)
    return iteration, torch.load(path, weights_only=False), path
