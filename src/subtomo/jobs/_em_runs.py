"""Job-side files of the engine's iterative runs (refine3d, class3d): write, draw, resume.

The engine (:mod:`subtomo.em`) hands every iteration to a callback and writes nothing;
the writers here turn those typed results into RELION's run files (through
:mod:`subtomo.io.run_files`) and pictures (through :mod:`subtomo.plot`), and read the last
optimiser state back for ``--continue-job``. Jobs do not import each other: what refine3d
and class3d share about their runs lives here.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from subtomo.em.classify import ClassifyIteration, ClassifyState
from subtomo.em.iteration import PoseTable
from subtomo.em.model import EMModel
from subtomo.em.refine import RefineIteration, RefineState
from subtomo.errors import SubtomoError
from subtomo.fourier import resolution_at_threshold
from subtomo.geometry.symmetry import symmetry_generators
from subtomo.io.particles import ParticleSet
from subtomo.io.run_files import (
    latest_optimiser_state,
    run_root,
    save_optimiser_state,
    write_data_star,
    write_map,
    write_model_star,
)
from subtomo.plot.maps import plot_class_slices, plot_slices
from subtomo.plot.post import plot_fsc

S = TypeVar("S", RefineState, ClassifyState)
# the engine's own classes an optimiser state may hold (nothing else is unpickled on --continue-job)
CHECKPOINT_TYPES: tuple[type, ...] = (PoseTable,)
# files of a finished stage that a run reads back besides its optimiser state (refine3d's C1 stage of
# --denovo-symmetry c1-then-align), copied with the state when a finished job is continued as a new one
STAGE_FILES = ("c1_stage/run_class001.mrc", "c1_stage/run_data.star", "c1_stage/run_model.star")


def resume_state(directory: Path, from_dict: Callable[[dict, object], S], device, log: Callable[[str], None]) -> S | None:
    """The engine state of the last finished iteration in ``directory`` (``--continue-job``), or None."""
    found = latest_optimiser_state(directory, CHECKPOINT_TYPES, warn=log)
    if found is None:
        return None
    iteration, state, path = found
    log(f"continuing from {path.name} (iteration {iteration})")
    return from_dict(state, device)


def check_symmetry(sym: str, option: str = "--sym") -> None:
    """Refuse an unknown point group before a job directory is made (the message names the option)."""
    try:
        symmetry_generators(sym)
    except SubtomoError as exc:
        raise SubtomoError(f"{option} {sym}: {exc}") from exc


def last_finished_state(directory: Path) -> tuple[int, Path, bool] | None:
    """(iteration, file, converged) of the last readable optimiser state in ``directory``, or None.

    ``converged``: a refinement that stopped on convergence, not on ``--max-iter`` (its last
    state is the one before the final iteration; more iterations would only repeat that one).
    """
    found = latest_optimiser_state(directory, CHECKPOINT_TYPES)
    if found is None:
        return None
    iteration, state, path = found
    sampling = state.get("sampling")
    return iteration, path, bool(isinstance(sampling, dict) and sampling.get("converged"))


def copy_resume_files(old_dir: Path, state_file: Path, new_dir: Path) -> list[str]:
    """Copy an optimiser state and the finished stages' files into a new job directory; their names.

    The new job resumes from the copies (``--continue-job`` of a finished job): the old job's
    files are only read.
    """
    copied = [state_file.name]
    shutil.copyfile(state_file, new_dir / state_file.name)
    for name in STAGE_FILES:
        if (old_dir / name).is_file():
            (new_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(old_dir / name, new_dir / name)
            copied.append(name)
    return copied


class _RunFiles:
    """The directory, input particles and pixel size [Å] that a run's files are written with."""

    def __init__(self, directory: Path, particles: ParticleSet, pixel_size_A: float) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.particles = particles
        self.px = pixel_size_A


class RefineFiles(_RunFiles):
    """Writes a refinement's run_itNNN_* files as iterations arrive, and the final run_* files and PNGs."""

    def __call__(self, result: RefineIteration) -> None:
        root = run_root(result.iteration)
        for h, vol in enumerate(result.half_maps):
            write_map(self.dir / f"{root}_half{h + 1}_class001.mrc", vol, self.px)
        if result.record is None:  # iteration 0: the starting references only
            return
        write_data_star(self.dir / f"{root}_data.star", self.particles, result.poses, result.halves)
        write_model_star(self.dir / f"{root}_model.star", result.models[0], [f"{root}_half1_class001.mrc"],
                         accuracy_rot_deg=result.record.acc_rot_deg)
        if result.final is not None:
            self._final(result)
        elif result.state is not None:
            save_optimiser_state(self.dir, result.iteration, result.state.to_dict())

    def _final(self, result: RefineIteration) -> None:
        final = result.final
        assert final is not None
        write_map(self.dir / "run_class001.mrc", final.map, self.px)
        for h, vol in enumerate(final.unfiltered):
            write_map(self.dir / f"run_half{h + 1}_class001_unfil.mrc", vol, self.px)
        write_data_star(self.dir / "run_data.star", self.particles, result.poses, result.halves)
        write_model_star(self.dir / "run_model.star", final.model, ["run_class001.mrc"])
        plot_slices(final.map.numpy(), self.dir / "run_class001_slices.png", title="run_class001.mrc")
        fsc = final.model.fsc[0].cpu()
        box = final.map.shape[-1]
        s_A = np.arange(len(fsc)) / (box * self.px)
        plot_fsc(self.dir / "run_fsc.png", s_A, {"gold-standard FSC": fsc.numpy()},
                 resolution_at_threshold(fsc, box, self.px, 0.143), 0.143, (0.5,))


class ClassifyFiles(_RunFiles):
    """Writes a classification's run_itNNN_classNNN.mrc, _data.star, _model.star and optimiser state."""

    def __call__(self, result: ClassifyIteration) -> None:
        root = run_root(result.iteration)
        model = result.model
        names = [f"{root}_class{k + 1:03d}.mrc" for k in range(model.n_classes)]
        for k, name in enumerate(names):
            write_map(self.dir / name, model.maps[k], self.px)
        write_data_star(self.dir / f"{root}_data.star", self.particles, result.poses)
        write_model_star(self.dir / f"{root}_model.star", model, names, class_resolutions_A=result.class_resolutions_A)
        save_optimiser_state(self.dir, result.iteration, result.state.to_dict())

    def gallery(self, model: EMModel, iteration: int) -> Path:
        """Central slices of all classes of an iteration (``run_itNNN_classes.png``)."""
        return plot_class_slices([m.cpu().numpy() for m in model.maps], self.dir / f"{run_root(iteration)}_classes.png",
                                 [f"class {k + 1}: {p:.2f}" for k, p in enumerate(model.class_priors.tolist())])
