"""What a running job sees: its parameters, directory, log, progress, inputs and outputs.

Also the parameter bases every job model derives from and the one place where ``--device``
becomes a torch device (a GPU asked for and absent is an error, never a silent fall-back).
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from subtomo.errors import SubtomoError
from subtomo.jobs.contracts import NodeType

if TYPE_CHECKING:
    from subtomo.jobs.base import JobSpec

T = TypeVar("T")


class JobParams(BaseModel):
    """Base of every job's parameters. Units go in each field's description."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    output: str | None = Field(None, description="Output job directory (default: <JobType>/jobNNN/ in the project).")


class ComputeParams(JobParams):
    """Parameters of jobs that compute with torch."""

    device: str = Field("auto", description="Compute device: auto, cpu, cuda or cuda:N. A GPU asked for and absent is an error.")
    threads: int = Field(0, ge=0, description="CPU threads for torch (0: all cores).")
    seed: int = Field(0, ge=0, description="Random seed; the same inputs, parameters and seed give the same result.")
    cluster: str = Field("none", description="Where the tasks run (the E-step's particle batches of refine3d, class3d "
                         "and class2d; one tilt series each in ctf; one tomogram each in extract and in prepare's "
                         "--export-relion volumes; blocks of windows in localres; other jobs run in "
                         "this process): none (this process), "
                         "local:N (N worker processes on this machine, --threads threads each), slurm (Dask workers as "
                         "SLURM jobs, from cluster.yaml in the project or --cluster-config), or tcp://HOST:PORT (a "
                         "running Dask scheduler). Needs pip install 'subtomo[cluster]'.")
    cluster_config: str | None = Field(None, description="SLURM description for --cluster slurm (YAML: queue, cores, "
                                       "memory, walltime, gpus, jobs or adaptive; default: cluster.yaml in the project).")

    @field_validator("cluster")
    @classmethod
    def _cluster_syntax(cls, value: str) -> str:
        parse_cluster(value)
        return value.strip()


def parse_cluster(value: str) -> tuple[str, int | str | None]:
    """``--cluster`` as (kind, argument): ("none", None), ("local", N), ("slurm", None) or ("tcp", address)."""
    v = value.strip()
    if v.lower() in ("none", ""):
        return "none", None
    if v.lower() == "slurm":
        return "slurm", None
    if v.lower().startswith("local:"):
        n = v.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"{value!r}: local:N needs a number of worker processes N >= 1, e.g. local:4.")
        return "local", int(n)
    if v.startswith("tcp://"):
        host, _, port = v[len("tcp://"):].rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{value!r}: give a scheduler address as tcp://HOST:PORT, e.g. tcp://10.0.0.5:8786.")
        return "tcp", v
    raise ValueError(f"{value!r}: not a cluster. Use none, local:N, slurm or tcp://HOST:PORT.")


def resolve_device(name: str) -> torch.device:
    """Turn ``--device`` into a torch device; never falls back silently from a GPU."""
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SubtomoError(f"--device {name}: no usable CUDA GPU on this machine. Use --device cpu, or check the driver and torch build.")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SubtomoError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) present.")
        return dev
    if name == "cpu":
        return torch.device("cpu")
    raise SubtomoError(f"--device {name!r}: not a device. Use auto, cpu, cuda or cuda:N.")


class JobContext:
    """What a running job sees: its directory, parameters, logging, progress and nodes."""

    def __init__(self, spec: "JobSpec", params: JobParams, project: Path, job_dir: Path, name: str,
                 state: Any = None, quiet: bool = False) -> None:
        self.spec = spec
        self.params = params
        self.project = project
        self.dir = job_dir
        self.name = name
        self.state = state  # whatever spec.check returned
        self.quiet = quiet
        self.inputs: list[str] = []
        self.outputs: list[tuple[str, str]] = []
        self._out = open(job_dir / "run.out", "a", buffering=1)
        self.device = resolve_device(params.device) if isinstance(params, ComputeParams) else torch.device("cpu")
        if isinstance(params, ComputeParams):
            if params.threads:
                torch.set_num_threads(params.threads)
            torch.manual_seed(params.seed)
            self.rng = np.random.default_rng(params.seed)
        else:
            self.rng = np.random.default_rng(0)

    def log(self, message: str) -> None:
        """A line in run.out and on the terminal."""
        stamp = _dt.datetime.now().strftime("%H:%M:%S")
        self._out.write(f"[{stamp}] {message}\n")
        if not self.quiet:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        self.log(f"WARNING: {message}")
        with open(self.dir / "run.err", "a") as fh:
            fh.write(message + "\n")

    def rel(self, path: str | Path) -> str:
        """Path relative to the project directory (as stored in STAR files)."""
        p = Path(path)
        try:
            return os.path.relpath(p.resolve(), self.project.resolve())
        except ValueError:
            return str(p)

    def path(self, name: str) -> Path:
        """Absolute path of a file inside the job directory."""
        return self.dir / name

    def add_input(self, path: str | Path) -> None:
        self.inputs.append(self.rel(path))

    def add_output(self, path: str | Path, node_type: NodeType | str = NodeType.FILE) -> None:
        label = node_type.value if isinstance(node_type, NodeType) else str(node_type)
        self.outputs.append((self.rel(path), label))

    def input(self, param: str) -> Path:
        """Resolve a declared input (the user's value, else the newest matching output) and record it."""
        path = self.spec.input(param).resolve(self.project, getattr(self.params, param))
        assert path is not None, f"optional input {param} resolved to nothing; use optional_input"
        self.add_input(path)
        return path

    def optional_input(self, param: str) -> Path | None:
        """Like :meth:`input` for inputs that may be absent (``required=False``)."""
        path = self.spec.input(param).resolve(self.project, getattr(self.params, param))
        if path is not None:
            self.add_input(path)
        return path

    def add_declared_outputs(self, iteration: int | None = None, n_classes: int = 1) -> None:
        """Record the declared outputs that exist in the job directory (``*`` patterns globbed)."""
        for out in self.spec.outputs:
            root = self.project if out.in_project else self.dir
            for name in out.expand(iteration, n_classes):
                paths = sorted(root.glob(name)) if "*" in name else [root / name]
                for path in paths:
                    if path.exists():
                        self.add_output(path, out.node_type)
                    elif not out.optional and "*" not in name:
                        raise RuntimeError(f"{self.spec.command}: declared output {name} was not written")

    def progress(self, items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
        """Iterate with progress: a rich bar on a terminal, plain lines (every ~10 %) in the log."""
        total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
        if sys.stdout.isatty() and not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), transient=True) as bar:
                task = bar.add_task(description, total=total)
                for item in items:
                    yield item
                    bar.advance(task)
            self._out.write(f"{description}: done ({total})\n")
            return
        step = max(1, (total or 10) // 10)
        start = time.time()
        for i, item in enumerate(items, start=1):
            yield item
            if total and (i % step == 0 or i == total):
                self._out.write(f"{description}: {i}/{total} ({time.time() - start:.1f} s)\n")

    def close(self) -> None:
        self._out.close()
