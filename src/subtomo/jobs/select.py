"""``subtomo select`` (protocol Steps 16, 17 and 21): keep the particles of chosen classes.

Input is a classification result (``run_itNNN_data.star`` or ``run_itNNN_model.star`` of
class2d or class3d). Classes are chosen by number (``--classes``) and/or by rules (class
fraction, estimated resolution, the N largest); the criteria given are combined (a class
must pass all of them).

* 2D input (z-projections of subtomograms): the selected 2D rows are written as
  ``subtomo_proj2d_sel.star`` (Step 16) and mapped back to the 3D subtomograms
  (Step 17, RELION's ``relion_2Dto3D_star.py``): through ``rlnImageOriginalName`` (the 3D
  image each projection was made from), else through tomogram name + particle number as
  the original script did. The 3D rows keep every column and the optics block:
  ``output_2Dto3D.star``.
* 3D input (class3d): the selected rows with all their columns go to
  ``particles_selected.star`` (Step 21).

Everything is computed and validated before the job directory is made, so an unknown class
number, an empty selection or a 2D row without its subtomogram leaves nothing behind.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from subtomo.errors import SubtomoError
from subtomo.io.star import read_star, write_particles, write_star
from subtomo.jobs.base import JobContext, JobParams, JobSpec, default_input
from subtomo.jobs.pipeline import STATUS_SUCCEEDED, Pipeline

_IT_RE = re.compile(r"run_it(\d+)_data\.star$")


class SelectParams(JobParams):
    i: str | None = Field(None, description="Classification result: run_itNNN_data.star or run_itNNN_model.star of class2d/class3d (default: the last iteration of the latest Class2D job).")
    classes: list[int] | None = Field(None, description="Class numbers to keep (1-based), e.g. 1,3,4.")
    min_class_fraction: float | None = Field(None, ge=0, le=1, description="Keep only classes holding at least this fraction of the particles (rlnClassDistribution) [fraction].")
    max_class_resolution: float | None = Field(None, gt=0, description="Keep only classes whose estimated resolution is this or better (rlnEstimatedResolution) [Å].")
    top_n_classes: int | None = Field(None, ge=1, description="Keep only the N largest classes (by rlnClassDistribution).")
    particles3d: str | None = Field(None, description="3D particles STAR to map a 2D selection onto (default: the latest Extract job's particles_subtomo.star).")
    map3d: bool = Field(True, description="For 2D input, also write output_2Dto3D.star with the selected subtomograms (Step 17).")


# ----------------------------------------------------------------------------- pure logic


@dataclass
class ClassTable:
    """Per-class statistics: number (1-based), fraction of particles, resolution (Å, may be NaN)."""

    number: np.ndarray
    fraction: np.ndarray
    resolution_A: np.ndarray


@dataclass
class Selection:
    dimensionality: int
    classes: list[int]
    data_blocks: dict  # blocks of the input data.star (optics kept)
    selected: pd.DataFrame  # selected rows of the input particles block, all columns
    data_path: Path | None = None
    particles3d_path: Path | None = None
    blocks3d: dict | None = None
    selected3d: pd.DataFrame | None = None
    table: ClassTable | None = None  # statistics of every class of the input
    notes: list[str] = field(default_factory=list)


def _particles_block(blocks: dict, path: Path) -> tuple[str, pd.DataFrame]:
    if "particles" in blocks:
        name = "particles"
    else:
        loops = [k for k, v in blocks.items() if isinstance(v, pd.DataFrame) and k not in ("optics",)]
        if not loops:
            raise SubtomoError(f"{path}: no particle table in this STAR file. Give a run_itNNN_data.star.")
        name = loops[0]
    table = blocks[name]
    if isinstance(table, dict):
        table = pd.DataFrame([table])
    return name, table.reset_index(drop=True)


def data_and_model_paths(path: Path) -> tuple[Path, Path | None]:
    """(data.star, model.star or None) for a path naming either of them."""
    name = path.name
    if name.endswith("_model.star"):
        data = path.with_name(name[: -len("_model.star")] + "_data.star")
        if not data.exists():
            raise SubtomoError(f"{path}: the matching particle file {data.name} is missing beside it. Give the _data.star file with --i.")
        return data, path
    if name.endswith("_data.star"):
        model = path.with_name(name[: -len("_data.star")] + "_model.star")
        return path, model if model.exists() else None
    return path, None


def image_dimensionality(blocks: dict, particles: pd.DataFrame) -> int:
    """2 for projection images, 3 for subtomograms (optics rlnImageDimensionality, else image names)."""
    optics = blocks.get("optics")
    if isinstance(optics, dict):
        optics = pd.DataFrame([optics])
    for table in (particles, optics):
        if isinstance(table, pd.DataFrame) and "rlnImageDimensionality" in table.columns and len(table):
            return int(table["rlnImageDimensionality"].iloc[0])
    if "rlnImageName" in particles.columns and len(particles):
        name = str(particles["rlnImageName"].iloc[0])
        return 2 if "@" in name else 3
    return 3


def class_table(model_path: Path | None, particles: pd.DataFrame) -> ClassTable:
    """Class statistics from model_classes (RELION), or from the particles' class numbers."""
    if model_path is not None:
        blocks = read_star(model_path)
        mc = blocks.get("model_classes")
        if isinstance(mc, dict):
            mc = pd.DataFrame([mc])
        if isinstance(mc, pd.DataFrame) and len(mc):
            numbers = np.arange(1, len(mc) + 1)
            if "rlnReferenceImage" in mc.columns:
                parsed = []
                for j, ref in enumerate(mc["rlnReferenceImage"].astype(str)):
                    m = re.match(r"^(\d+)@", ref) or re.search(r"class(\d+)\.mrc$", ref)
                    parsed.append(int(m.group(1)) if m else j + 1)
                numbers = np.asarray(parsed)
            frac = mc["rlnClassDistribution"].to_numpy(float) if "rlnClassDistribution" in mc.columns else None
            res = mc["rlnEstimatedResolution"].to_numpy(float) if "rlnEstimatedResolution" in mc.columns else np.full(len(mc), np.nan)
            if frac is None:
                counts = particles["rlnClassNumber"].value_counts() if "rlnClassNumber" in particles.columns else {}
                frac = np.array([counts.get(k, 0) for k in numbers], float) / max(len(particles), 1)
            return ClassTable(numbers, frac, res)
    if "rlnClassNumber" not in particles.columns:
        raise SubtomoError("the particle table has no rlnClassNumber column: it is not a classification result. Give a run_itNNN_data.star of class2d or class3d.")
    k = int(particles["rlnClassNumber"].max()) if len(particles) else 0
    numbers = np.arange(1, k + 1)
    counts = particles["rlnClassNumber"].astype(int).value_counts()
    frac = np.array([counts.get(c, 0) for c in numbers], float) / max(len(particles), 1)
    return ClassTable(numbers, frac, np.full(k, np.nan))


def choose_classes(table: ClassTable, classes: list[int] | None, min_fraction: float | None,
                   max_resolution_A: float | None, top_n: int | None) -> list[int]:
    """Class numbers that pass every given criterion (sorted). Raises on unknown numbers."""
    if classes is None and min_fraction is None and max_resolution_A is None and top_n is None:
        raise SubtomoError("nothing to select by: give --classes (e.g. 1,3,4) and/or a rule "
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
            raise SubtomoError("--max-class-resolution: the model STAR has no rlnEstimatedResolution per class. Give the run_itNNN_model.star, or select by --classes.")
        keep &= {int(k) for k, r in zip(table.number, table.resolution_A) if np.isfinite(r) and r <= max_resolution_A}
    if top_n is not None:
        order = sorted(zip(table.number, table.fraction), key=lambda kf: (-kf[1], kf[0]))
        keep &= {int(k) for k, _ in order[:top_n]}
    return sorted(keep)


def _tomo_key(df: pd.DataFrame) -> pd.Series:
    if "rlnTomoName" in df.columns:
        return df["rlnTomoName"].astype(str)
    if "rlnMicrographName" in df.columns:
        return df["rlnMicrographName"].astype(str).map(lambda s: Path(s.split("@")[-1]).stem)
    raise SubtomoError("cannot tell the tomogram of each particle: neither rlnTomoName nor rlnMicrographName is present.")


def _number_2d(df: pd.DataFrame) -> pd.Series:
    if "rlnTomoParticleId" in df.columns:
        return df["rlnTomoParticleId"].astype(int)
    return df["rlnImageName"].astype(str).map(lambda s: int(s.split("@")[0]))  # stack index, as the script


def _number_3d(df: pd.DataFrame) -> pd.Series:
    if "rlnTomoParticleId" in df.columns:
        return df["rlnTomoParticleId"].astype(int)

    def last6(name: str) -> int:
        stem = Path(name.split("@")[-1]).stem
        digits = stem[-6:]
        if not digits.isdigit():
            raise SubtomoError(f"3D image name {name!r} does not end in a 6-digit particle number; cannot map 2D to 3D without rlnImageOriginalName.")
        return int(digits)

    return df["rlnImageName"].astype(str).map(last6)


def _norm(p: str) -> str:
    return os.path.normpath(p.split("@")[-1]) if "@" in p else os.path.normpath(p)


def map_2d_to_3d(selected2d: pd.DataFrame, particles3d: pd.DataFrame) -> tuple[np.ndarray, str]:
    """Row indices of ``particles3d`` (in their file order) that the 2D selection came from.

    Exact: every selected 2D row must match exactly one 3D row. First by
    ``rlnImageOriginalName`` == 3D ``rlnImageName``; where that column is missing (or
    matches nothing), by (tomogram name, particle number) as ``relion_2Dto3D_star.py``.
    """
    if len(selected2d) == 0:
        return np.zeros(0, int), "none"
    how = ""
    keys2d = keys3d = None
    if "rlnImageOriginalName" in selected2d.columns and "rlnImageName" in particles3d.columns:
        k2 = selected2d["rlnImageOriginalName"].astype(str).map(_norm)
        k3 = particles3d["rlnImageName"].astype(str).map(_norm)
        if k2.isin(set(k3)).any():
            keys2d, keys3d, how = list(k2), list(k3), "rlnImageOriginalName"
    if keys2d is None:
        t2, n2 = _tomo_key(selected2d), _number_2d(selected2d)
        t3, n3 = _tomo_key(particles3d), _number_3d(particles3d)
        keys2d = list(zip(t2, n2))
        keys3d = list(zip(t3, n3))
        how = "tomogram name + particle number"
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
        raise SubtomoError("the 2D selection lists the same subtomogram more than once; the 2D STAR is not one projection per subtomogram.")
    return np.sort(np.array([pos[k] for k in keys2d], int)), how


def _latest_class2d_data(project: Path) -> Path:
    pipeline = Pipeline(project)
    for proc in reversed(pipeline.processes):
        if proc.job_type == "Class2D" and proc.status == STATUS_SUCCEEDED:
            found = []
            for f in (project / proc.name).glob("run_it*_data.star"):
                m = _IT_RE.search(f.name)
                if m:
                    found.append((int(m.group(1)), f))
            if found:
                return max(found)[1]
    raise SubtomoError(f"no --i given and no finished Class2D job with run_itNNN_data.star in {project}. "
                       "Run subtomo class2d first, or pass --i run_itNNN_data.star.")


def compute_selection(params: SelectParams, project: Path) -> Selection:
    """Everything select writes, computed and validated (no file touched)."""
    given = params.i
    if given:
        src = Path(given) if Path(given).is_absolute() else project / given
        if not src.exists():
            raise SubtomoError(f"--i {given}: file not found.")
    else:
        src = _latest_class2d_data(project)
    data_path, model_path = data_and_model_paths(src)
    blocks = read_star(data_path)
    _, particles = _particles_block(blocks, data_path)
    if "rlnClassNumber" not in particles.columns:
        raise SubtomoError(f"{data_path}: no rlnClassNumber column; it is not a classification result. Give a run_itNNN_data.star of class2d or class3d.")
    table = class_table(model_path, particles)
    chosen = choose_classes(table, params.classes, params.min_class_fraction, params.max_class_resolution, params.top_n_classes)
    if not chosen:
        raise SubtomoError("empty selection: no class passes all the given criteria "
                           f"(classes: {params.classes}, min fraction {params.min_class_fraction}, "
                           f"max resolution {params.max_class_resolution} Å, top {params.top_n_classes}). Relax a criterion.")
    mask = particles["rlnClassNumber"].astype(int).isin(chosen).to_numpy()
    if not mask.any():
        raise SubtomoError(f"empty selection: class(es) {', '.join(map(str, chosen))} hold no particles in {data_path.name}. Choose other classes.")
    sel = Selection(image_dimensionality(blocks, particles), chosen, blocks, particles[mask].reset_index(drop=True),
                    data_path=data_path, table=table)
    sel.notes.append(f"input {data_path} ({len(particles)} particles, {len(table.number)} classes)")
    if model_path is not None:
        sel.notes.append(f"class statistics from {model_path}")
    if sel.dimensionality == 2 and params.map3d:
        p3 = default_input(project, params.particles3d, ("Extract",), "particles_subtomo.star", "--particles3d",
                           "Run subtomo extract first, pass --particles3d, or use --no-map3d.")
        blocks3 = read_star(p3)
        _, parts3 = _particles_block(blocks3, p3)
        rows, how = map_2d_to_3d(sel.selected, parts3)
        sel.particles3d_path, sel.blocks3d = p3, blocks3
        sel.selected3d = parts3.iloc[rows].reset_index(drop=True)
        sel.notes.append(f"mapped {len(sel.selected)} projections to {len(rows)} of {len(parts3)} subtomograms in {p3} by {how}")
    return sel


def _write_subset(path: Path, blocks: dict, subset: pd.DataFrame) -> Path:
    """Write ``subset`` in place of the particle block, keeping the optics block (RELION 3.1 style)."""
    optics = blocks.get("optics")
    if isinstance(optics, dict):
        optics = pd.DataFrame([optics])
    if isinstance(optics, pd.DataFrame):
        return write_star(path, {"optics": optics, "particles": subset})
    return write_particles(path, subset)


def class_images(model_path: Path, project: Path) -> np.ndarray | None:
    """The class averages/maps named by rlnReferenceImage of ``model_path`` (None if any is missing).

    Names may be project-relative (RELION) or relative to the model STAR's directory;
    ``k@stack.mrcs`` picks image k of a stack.
    """
    from subtomo.io.mrc import read_mrc

    mc = read_star(model_path).get("model_classes")
    if isinstance(mc, dict):
        mc = pd.DataFrame([mc])
    if not isinstance(mc, pd.DataFrame) or "rlnReferenceImage" not in mc.columns:
        return None
    stacks: dict[Path, np.ndarray] = {}
    images = []
    for ref in mc["rlnReferenceImage"].astype(str):
        index, _, name = ref.rpartition("@")
        path = next((c for c in (project / name, model_path.parent / name) if c.exists()), None)
        if path is None:
            return None
        if path not in stacks:
            stacks[path] = read_mrc(path)[0]
        data = stacks[path]
        images.append(data[int(index) - 1] if index else data)
    return np.stack(images)


# ----------------------------------------------------------------------------- job


def _check(params: SelectParams, project: Path) -> Selection:
    return compute_selection(params, project)


def _plot_selection(ctx: JobContext, sel: Selection) -> None:
    """``selected_classes.png``: the class gallery with the kept classes framed in green."""
    from subtomo.plot.gallery import class_gallery

    _, model_path = data_and_model_paths(sel.data_path) if sel.data_path is not None else (None, None)
    images = class_images(model_path, ctx.project) if model_path is not None else None
    if images is None:
        return
    table = sel.table
    path = class_gallery(images, table.fraction, ctx.path("selected_classes.png"), table.resolution_A,
                         title=f"kept (green): classes {', '.join(map(str, sel.classes))}", class_numbers=table.number,
                         selected=sel.classes)
    ctx.add_output(path, "Image")
    ctx.log(f"wrote {ctx.rel(path)}")


def _run(ctx: JobContext) -> None:
    sel: Selection = ctx.state
    for note in sel.notes:
        ctx.log(note)
    ctx.add_input(sel.data_path)
    counts = sel.selected["rlnClassNumber"].astype(int).value_counts()
    ctx.log("kept classes: " + ", ".join(f"{k} ({counts.get(k, 0)})" for k in sel.classes)
            + f"; {len(sel.selected)} particles")
    _plot_selection(ctx, sel)
    if sel.dimensionality == 2:
        out2 = _write_subset(ctx.path("subtomo_proj2d_sel.star"), sel.data_blocks, sel.selected)
        ctx.add_output(out2, "ParticlesData")
        ctx.log(f"wrote {ctx.rel(out2)}: {len(sel.selected)} projections")
        if sel.selected3d is not None:
            ctx.add_input(sel.particles3d_path)
            out3 = _write_subset(ctx.path("output_2Dto3D.star"), sel.blocks3d, sel.selected3d)
            ctx.add_output(out3, "ParticlesData")
            ctx.log(f"wrote {ctx.rel(out3)}: {len(sel.selected3d)} subtomograms")
    else:
        out = _write_subset(ctx.path("particles_selected.star"), sel.data_blocks, sel.selected)
        ctx.add_output(out, "ParticlesData")
        ctx.log(f"wrote {ctx.rel(out)}: {len(sel.selected)} subtomograms")


SPEC = JobSpec(
    command="select", job_type="Select", params=SelectParams, run=_run, check=_check,
    summary="Steps 16, 17, 21: keep the particles of chosen classes (by number or rules); map a 2D selection back to the subtomograms (output_2Dto3D.star).",
)
