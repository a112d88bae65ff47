"""The job types in workflow order (the order ``subtomo --help`` lists them).

Each entry is a module under ``subtomo.jobs`` that defines ``SPEC``. Modules are imported
lazily, so ``subtomo --help`` stays fast and importing the package has no side effects.
"""

from __future__ import annotations

import importlib

from subtomo.jobs.base import JobSpec

JOB_MODULES: tuple[str, ...] = (
    "simulate",
    "reconstruct",
    "import_tomograms",
    "import_particles",
    "import_relion",
    "ctf",
    "prepare",
    "extract",
    "class2d",
    "select",
    "refine3d",
    "class3d",
    "mask",
    "postprocess",
    "localres",
    "export_relion",
    "demo",
)


def load_spec(module: str) -> JobSpec:
    return importlib.import_module(f"subtomo.jobs.{module}").SPEC


def all_specs() -> list[JobSpec]:
    return [load_spec(m) for m in JOB_MODULES]
