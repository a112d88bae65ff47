"""refine3d ``--from-input-angles``: start from the poses the particles STAR carries (imported or refined).

RELION's way of refining from given angles (``--healpix_order N --auto_local_healpix_order N
--sigma_ang S``): the searches are local from the first iteration, a Gaussian prior of width
``--sigma-ang`` centred on each particle's current pose, starting at ``--healpix-step``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from subtomo.em.healpix import angular_step_deg
from subtomo.em.refine import RefineOptions
from subtomo.errors import SubtomoError
from subtomo.io.particles import ParticleSet
from subtomo.jobs.base import JobContext


def check_input_angles(star: str | Path | None, particles: ParticleSet, from_input_angles: bool,
                       sigma_ang: float) -> None:
    """Refuse --from-input-angles when the STAR does not give every particle rlnAngleRot/Tilt/Psi,
    and --sigma-ang without it (it would be ignored)."""
    if sigma_ang and not from_input_angles:
        raise SubtomoError("--sigma-ang is the prior of --from-input-angles: add --from-input-angles, or leave out "
                           "--sigma-ang (the refinement's own local searches set their prior from the step).")
    if from_input_angles and not particles.has_angles():
        raise SubtomoError(
            f"{star}: --from-input-angles needs rlnAngleRot, rlnAngleTilt and rlnAnglePsi on every particle, and this "
            "file has none (or some are empty). Give a STAR with orientations (subtomo import-particles of a "
            "Dynamo/STOPGAP/pytom/RELION table, then prepare --particles and extract; or a refine3d run_data.star), "
            "or leave out --from-input-angles to refine from random orientations.")


def input_angles_start(ctx: JobContext, star: Path, particles: ParticleSet, opts: RefineOptions,
                       sigma_ang: float, given_ref: bool) -> tuple[RefineOptions, np.ndarray]:
    """The refinement options with local searches from iteration 1, and the input poses (n, 3, 3).

    ``sigma_ang`` [deg]: width of the prior; 0: three times the initial (oversampled) step.
    """
    rot = particles.rotations()
    assert rot is not None  # checked by check_input_angles before the job started
    step = angular_step_deg(opts.healpix_order) / 2
    sigma = sigma_ang or 3 * step
    ctx.log(f"starting from the input angles (rlnAngleRot/Tilt/Psi) and origins of {ctx.rel(star)}: local searches "
            f"from iteration 1, step {step:g} deg, Gaussian prior sigma {sigma:g} deg (searched to 3 sigma) around "
            f"each particle's current pose; initial reference: "
            f"{'--ref' if given_ref else 'each half reconstructed at the input poses'}, low-pass {opts.ini_high_A:g} A")
    return replace(opts, initial_sigma_ang_deg=float(sigma)), rot
