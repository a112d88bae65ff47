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
from typing import Callable, Protocol, Sequence

import numpy as np
import pandas as pd
import torch

from subtomo.errors import SubtomoError
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
        "rlnReferenceImage": [project_relative_name(path, m) for m in map_names],
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


_JOB_DIR_RE = re.compile(r"job\d{3,}$")


def project_relative_name(star_path: str | Path, name: str) -> str:
    """A file name inside a job directory as RELION writes it: relative to the project.

    ``run_class001.mrc`` (or ``k@run_it003_classes.mrcs``) of a STAR file in
    ``<project>/<JobType>/jobNNN/`` becomes ``<JobType>/jobNNN/run_class001.mrc``; names that
    already contain a directory, and files outside a job directory, are kept.

    Parameters
    ----------
    star_path : str or Path
        The STAR file being written.
    name : str
        A file name, optionally ``index@name``.

    Returns
    -------
    str
    """
    index, sep, file = name.rpartition("@") if "@" in name else ("", "", name)
    job = Path(star_path).parent
    if "/" in file or not _JOB_DIR_RE.match(job.name):
        return name
    return f"{index}{sep}{job.parent.name}/{job.name}/{file}"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _model_general(model: ModelSpectra, extra: dict | None) -> dict:
    n, px = model.box, model.pixel_size_A
    general = {
        "rlnReferenceDimensionality": model.ndim, "rlnDataDimensionality": model.ndim,
        "rlnOriginalImageSize": n, "rlnCurrentResolution": model.current_resolution_A,  # Å, as RELION writes it
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


def _checkpoint_globals() -> list:
    """The non-tensor types an optimiser state may hold: numpy arrays and their dtypes."""
    multiarray = getattr(np, "_core", None) or np.core
    dtypes = [t for t in vars(np.dtypes).values() if isinstance(t, type)]
    return [np.ndarray, np.dtype, multiarray.multiarray._reconstruct, *dtypes]


def load_optimiser_state(path: str | Path, allowed_types: Sequence[type] = ()) -> dict:
    """Read one optimiser state without unpickling arbitrary objects.

    Parameters
    ----------
    path : str or Path
        A ``run_itNNN_optimiser.pt`` file.
    allowed_types : sequence of type
        The caller's own (data)classes the state may hold, besides tensors and numpy arrays.

    Returns
    -------
    dict
        The state.

    Raises
    ------
    SubtomoError
        The file is damaged, or holds objects of other types (a checkpoint from elsewhere must
        not run code when it is read).
    """
    try:
        with torch.serialization.safe_globals([*_checkpoint_globals(), *allowed_types]):
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise SubtomoError(f"{path}: cannot read this optimiser state ({type(exc).__name__}: {str(exc)[:200]}). It is "
                           "damaged, or holds objects a checkpoint may not hold.") from exc


def latest_optimiser_state(directory: str | Path, allowed_types: Sequence[type] = (),
                           warn: Callable[[str], None] | None = None) -> tuple[int, dict, Path] | None:
    """The optimiser state of the last finished iteration that can be read.

    A damaged newest state (a job killed while writing it) is skipped with a warning and the
    one before it is used.

    Parameters
    ----------
    directory : str or Path
        The job directory.
    allowed_types : sequence of type
        Passed to :func:`load_optimiser_state`.
    warn : callable, optional
        Receives a message for every state that is skipped.

    Returns
    -------
    tuple of (int, dict, Path) or None
        (iteration, state, file), or None when no iteration has finished.
    """
    found = sorted(((int(m.group(1)), f) for f in Path(directory).glob("run_it*_optimiser.pt")
                    if (m := _OPTIMISER_RE.search(f.name))), reverse=True)
    for iteration, path in found:
        try:
            return iteration, load_optimiser_state(path, allowed_types), path
        except SubtomoError as exc:
            if warn is not None:
                warn(f"{exc} Falling back to the iteration before.")
    if found:
        raise SubtomoError(f"{directory}: none of the {len(found)} optimiser states can be read; the job cannot be "
                           "continued. Start a new job.")
    return None
