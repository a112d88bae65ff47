"""Job contracts as data: which node types a job takes and which files it makes.

Every :class:`~subtomo.jobs.base.JobSpec` declares its inputs (:class:`InputSpec`: the
parameter, the node type it accepts, and which earlier jobs' outputs it defaults to, newest
first) and its outputs (:class:`OutputSpec`: a file name pattern inside the job directory and
its node type). A GUI's input pickers, the pipeline graph and a scheduler read these without
running the job (``subtomo contracts`` prints them as JSON), and the jobs resolve their
default inputs from the same declarations, so the two cannot drift apart.

Node types keep the labels that ``default_pipeline.star`` has always recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from subtomo.errors import SubtomoError
from subtomo.io.particles import resolve_project_path
from subtomo.jobs.pipeline import Pipeline


class NodeType(str, Enum):
    """Kinds of files that flow between jobs (the labels written to ``default_pipeline.star``)."""

    TOMOGRAM = "TomogramMrc"
    COORDINATES = "TomogramCoordinates"
    TOMOGRAM_SET = "TomogramGroupMetadata"  # all_tomograms.star, ctf_tomograms.star
    CTF_RESULTS = "CtfFindResults"  # per-tilt-series CTF tables
    CTF_MODELS = "TomogramCtfModels"  # per-tomogram 3D CTF model tables
    PARTICLES = "ParticlesData"  # particle STAR (3D subtomograms or their 2D projections)
    MODEL = "ModelStar"  # run_model.star of a classification or refinement
    IMAGE_STACK = "ImageStack"  # 2D class averages
    DENSITY_MAP = "DensityMap"
    MASK = "Mask"
    LOCAL_RESOLUTION = "Image3D.localresmap"
    POSTPROCESS = "ProcessData.star.relion.postprocess"
    IMAGE = "Image"  # a picture (PNG)
    GROUND_TRUTH_PICKS = "GroundTruthPicks"
    GROUND_TRUTH_TILTS = "GroundTruthTilts"
    GROUND_TRUTH_SUMMARY = "GroundTruthSummary"
    FILE = "File"


@dataclass(frozen=True)
class Source:
    """An earlier job's output that an input defaults to: job type and accepted file names."""

    job_type: str
    filenames: tuple[str, ...]


@dataclass(frozen=True)
class InputSpec:
    """One input of a job.

    ``param`` is the parameter (``i`` -> ``--i``); without a value the newest output of a
    finished job matching ``sources`` (tried in order) is used; ``hint`` says what to run
    when there is none.
    """

    param: str
    node_type: NodeType
    sources: tuple[Source, ...] = ()
    hint: str = ""
    required: bool = True
    when: str = ""  # the options under which this declaration applies ("" = always)

    @property
    def option(self) -> str:
        """The command-line option (``--ref``, ``--particles3d``)."""
        return "--" + self.param.replace("_", "-")

    def resolve(self, project: Path, given: str | None) -> Path | None:
        """The file for this input: the user's value, else the newest matching output.

        Raises
        ------
        SubtomoError
            A given file is missing, or a required input has neither a value nor a source.
        """
        if given:
            path = resolve_project_path(project, given)
            if not path.exists():
                raise SubtomoError(f"{self.option} {given}: file not found (looked in {path.parent}). "
                                   "Check the path; relative paths are taken from the project directory.")
            return path
        pipeline = Pipeline(project)
        for source in self.sources:
            node = pipeline.latest_output((source.job_type,), source.filenames)
            if node is not None and (project / node).exists():
                return project / node
        if not self.required:
            return None
        wanted = " or ".join(f"{s.job_type} ({'/'.join(s.filenames)})" for s in self.sources) or "a job"
        raise SubtomoError(f"no {self.option} given and no finished {wanted} job output in {project}. "
                           f"{self.hint or f'Pass {self.option}.'}")

    def as_dict(self) -> dict[str, Any]:
        return {"param": self.param, "option": self.option, "node_type": self.node_type.value,
                "required": self.required, "hint": self.hint, "when": self.when,
                "sources": [{"job_type": s.job_type, "filenames": list(s.filenames)} for s in self.sources]}


@dataclass(frozen=True)
class OutputSpec:
    """One output of a job: a file name inside the job directory and its node type.

    ``filename`` may hold ``{it:03d}`` (iteration) and ``{k:03d}`` (class, 1-based) fields
    and ``*`` for names only known at run time (one file per tomogram). It is relative to
    the job directory, or to the project directory with ``in_project`` (``simulate`` lays
    out ``Tomograms/`` there).
    """

    filename: str
    node_type: NodeType
    description: str = ""
    optional: bool = False
    in_project: bool = False

    def expand(self, iteration: int | None = None, n_classes: int = 1) -> list[str]:
        """File names for one iteration and ``n_classes`` classes (patterns with ``*`` stay)."""
        if "{k" in self.filename:
            return [self.filename.format(it=iteration or 0, k=k) for k in range(1, n_classes + 1)]
        return [self.filename.format(it=iteration or 0)] if "{it" in self.filename else [self.filename]

    def as_dict(self) -> dict[str, Any]:
        return {"filename": self.filename, "node_type": self.node_type.value, "description": self.description,
                "optional": self.optional, "in_project": self.in_project}


def particles_spec(param: str, sources: tuple[Source, ...], hint: str, required: bool = True,
                    when: str = "") -> InputSpec:
    """An input of particle STAR files (the most common contract)."""
    return InputSpec(param, NodeType.PARTICLES, sources, hint, required, when)


# The particle sets a 3D job starts from, newest stage first: a Select job's 3D output
# (Step 21 selection or Step 17 2D->3D mapping), else the Extract job's subtomograms.
SELECTED_OR_EXTRACTED = (Source("Select", ("particles_selected.star", "output_2Dto3D.star")),
                         Source("Extract", ("particles_subtomo.star",)))
