"""Files of a classification job (class2d, class3d): data/model STAR pairs, class averages, the latest run.

Shared by the jobs that read classification results (``select``; job modules do not import
each other). Reading only.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from subtomo.errors import SubtomoError
from subtomo.io.mrc import read_mrc
from subtomo.io.particles import parse_image_name, resolve_project_path
from subtomo.io.star import read_star, table_of
from subtomo.jobs.pipeline import STATUS_SUCCEEDED, Pipeline

_IT_RE = re.compile(r"run_it(\d+)_data\.star$")


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


def read_model_classes(model_path: Path | None) -> pd.DataFrame | None:
    block = read_star(model_path).get("model_classes") if model_path is not None else None
    return table_of(block) if block is not None else None


def class_images(model_classes: pd.DataFrame | None, model_path: Path, project: Path) -> tuple[np.ndarray, float] | None:
    """The class averages/maps named by rlnReferenceImage and their pixel size (None if any is missing).

    Names may be project-relative (RELION) or relative to the model STAR's directory;
    ``k@stack.mrcs`` picks image k of a stack.
    """
    if model_classes is None or "rlnReferenceImage" not in model_classes.columns:
        return None
    stacks: dict[Path, tuple[np.ndarray, float]] = {}
    images = []
    for ref in model_classes["rlnReferenceImage"].astype(str):
        index, name = parse_image_name(ref)
        path = next((c for c in (resolve_project_path(project, name, source=model_path, column="rlnReferenceImage"),
                                 model_path.parent / name) if c.exists()), None)
        if path is None:
            return None
        if path not in stacks:
            stacks[path] = read_mrc(path)
        data = stacks[path][0]
        images.append(data[index - 1] if index else data)
    return np.stack(images), float(next(iter(stacks.values()))[1])


def latest_class2d_data(project: Path) -> Path:
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
