"""``--cluster slurm``: cluster.yaml, checked, and the dask-jobqueue SLURMCluster it describes.

Every key is checked (:class:`SlurmConfig`); a bad file stops the job with a SubtomoError
naming the file, the key and the fix. GPUs: ``gpus: N`` asks ``--gres=gpu:N`` and starts one
worker process per GPU, each running one task at a time (the job still books all its cores).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from subtomo.errors import SubtomoError


class AdaptiveBounds(BaseModel):
    model_config = ConfigDict(extra="forbid")
    minimum: int = Field(0, ge=0, description="fewest SLURM jobs kept")
    maximum: int = Field(..., ge=1, description="most SLURM jobs started")


class SlurmConfig(BaseModel):
    """cluster.yaml: what each SLURM job of Dask workers asks for, and how many jobs."""

    model_config = ConfigDict(extra="forbid")
    queue: str | None = Field(None, description="partition (#SBATCH -p)")
    account: str | None = Field(None, description="account (#SBATCH -A)")
    cores: int = Field(..., ge=1, description="CPU cores per job")
    memory: str = Field(..., description="memory per job, e.g. 64GB")
    walltime: str = Field("01:00:00", pattern=r"^(\d+-)?\d{1,3}:\d{2}:\d{2}$", description="[D-]HH:MM:SS")
    gpus: int = Field(0, ge=0, description="GPUs per job (--gres=gpu:N); one worker process per GPU")
    processes: int | None = Field(None, ge=1, description="worker processes per job (default: gpus, else 1)")
    jobs: int | None = Field(None, ge=1, description="a fixed number of jobs (default 1 without adaptive)")
    adaptive: AdaptiveBounds | None = None
    job_extra_directives: list[str] = Field(default_factory=list, description="more #SBATCH lines")
    job_script_prologue: list[str] = Field(default_factory=list, description="shell lines before the worker starts")
    local_directory: str | None = None
    interface: str | None = None
    python: str | None = None

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        from dask.utils import parse_bytes

        try:
            parse_bytes(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an amount of memory; write e.g. 64GB") from None
        return v

    @model_validator(mode="after")
    def _jobs_or_adaptive(self) -> "SlurmConfig":
        if self.jobs is not None and self.adaptive is not None:
            raise ValueError("give either jobs (a fixed number) or adaptive (minimum/maximum), not both")
        return self

    def cluster_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of dask_jobqueue.SLURMCluster."""
        extra = list(self.job_extra_directives) + ([f"--gres=gpu:{self.gpus}"] if self.gpus else [])
        kw: dict[str, Any] = {"queue": self.queue, "account": self.account, "cores": self.cores, "memory": self.memory,
                              "walltime": self.walltime, "processes": self.processes or max(self.gpus, 1),
                              "job_extra_directives": extra, "job_script_prologue": list(self.job_script_prologue)}
        if self.gpus:  # a GPU worker runs one task at a time; the job still books all its cores
            kw.update(cores=kw["processes"], job_cpu=self.cores)
        for key in ("local_directory", "interface", "python"):
            if getattr(self, key) is not None:
                kw[key] = getattr(self, key)
        return {k: v for k, v in kw.items() if v is not None}


def read_slurm_config(path: Path) -> SlurmConfig:
    """Read and check a cluster.yaml; every problem is a SubtomoError naming the file and the fix."""
    import yaml

    if not path.is_file():
        raise SubtomoError(f"--cluster slurm: {path} does not exist. Write a cluster.yaml in the project (see README, "
                           "'Running on a cluster') or give one with --cluster-config FILE.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SubtomoError(f"{path}: not valid YAML ({exc}). Fix the file (key: value lines).") from None
    if not isinstance(data, dict):
        raise SubtomoError(f"{path}: expected key: value lines (queue, cores, memory, walltime, gpus, jobs or "
                           "adaptive), found none. See README, 'Running on a cluster'.")
    try:
        return SlurmConfig(**data)
    except ValidationError as exc:
        msgs = [f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors()]
        raise SubtomoError(f"{path}: {'; '.join(msgs)}. Allowed keys: {', '.join(SlurmConfig.model_fields)}.") from None


def slurm_cluster(cfg: SlurmConfig, environment: dict[str, str] | None = None) -> Any:
    """A dask_jobqueue.SLURMCluster from a checked config (no job is submitted until it is scaled).

    ``environment``: variables exported in the job script before the user's prologue (the Dask
    settings of the workers, :func:`subtomo.jobs._cluster.compute_worker_environment`).
    """
    from dask_jobqueue import SLURMCluster

    kwargs = cfg.cluster_kwargs()
    exports = [f"export {k}={v}" for k, v in (environment or {}).items()]
    return SLURMCluster(**{**kwargs, "job_script_prologue": exports + kwargs["job_script_prologue"]})
