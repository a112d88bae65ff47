"""``--cluster``: the engine's E-step tasks on Dask (a LocalCluster, SLURM through dask-jobqueue, or a scheduler).

:func:`open_runner` turns a job's ``--cluster`` into a :class:`DaskRunner` (the
:class:`subtomo.em.parallel.TaskRunner` of the engine) for the duration of the job, and
closes the cluster afterwards; ``none`` gives None (the engine runs in this process). Dask is
imported only here and only when a cluster is asked for (``pip install 'subtomo[cluster]'``).

SLURM is described by a YAML file (``cluster.yaml`` in the project, or ``--cluster-config``),
checked by :class:`subtomo.jobs._slurm.SlurmConfig` (unknown keys and bad values name the file and the fix).
"""

from __future__ import annotations

import contextlib
import operator
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from subtomo.errors import SubtomoError
from subtomo.jobs._slurm import read_slurm_config, slurm_cluster
from subtomo.jobs.context import parse_cluster

if TYPE_CHECKING:
    from subtomo.em.parallel import MapReduceCall
    from subtomo.jobs.context import JobContext


# Dask's background work, slowed for workers that compute: event-loop ticks every 20 ms, a
# statistical profiler sampling every task thread every 10 ms, system and memory monitors (disk
# counters included) every 0.1-0.5 s. On 2 cores with 2 busy workers (bench_scale.py, refine3d
# E-step of the benchmark preset) they cost 2.0-2.4 s of the client's CPU per iteration and
# 3-5 k context switches per worker; with these, 0.6-0.7 s and about 250.
COMPUTE_WORKER_SETTINGS: dict[str, Any] = {
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.admin.system-monitor.disk": False,
    "distributed.worker.memory.monitor-interval": "1s",
}


def compute_worker_environment() -> dict[str, str]:
    """:data:`COMPUTE_WORKER_SETTINGS` as Dask's environment variables (for worker processes started by SLURM)."""
    return {"DASK_" + k.upper().replace(".", "__").replace("-", "_"): str(v) for k, v in COMPUTE_WORKER_SETTINGS.items()}


def compute_worker_config() -> contextlib.AbstractContextManager:
    """Dask's configuration set to :data:`COMPUTE_WORKER_SETTINGS` while open (local workers inherit it)."""
    import dask

    return dask.config.set(COMPUTE_WORKER_SETTINGS)


_WORKER_READY: list[bool] = []  # per worker process: torch threads set and GPU pinned


def _run_task(item: Any, *shared: Any, fn: Callable[..., Any], gpu: bool) -> Any:
    """``fn(item, *shared)`` on a worker, after setting it up once: one torch thread per task, its own GPU."""
    if not _WORKER_READY:
        import torch
        from distributed import get_worker

        torch.set_num_threads(1)  # a worker runs --threads tasks at once, each on one core
        _malloc_like_a_plain_process()
        if gpu and torch.cuda.is_available():  # one worker process per GPU: pinned by its index
            torch.cuda.set_device(gpu_index(str(get_worker().name), torch.cuda.device_count()))
        _WORKER_READY.append(True)
    return fn(item, *shared)


def gpu_index(worker_name: str, n_gpus: int) -> int:
    """The GPU of a worker: its number within the machine (the name's last ``-``-separated part) modulo the GPUs.

    LocalCluster names its workers 0, 1, ...; dask-jobqueue names the processes of one batch
    job ``<job>-0``, ``<job>-1``, ... (one process per GPU of the job); anything else gets GPU 0.
    """
    tail = worker_name.rsplit("-", 1)[-1]
    return (int(tail) if tail.isdigit() else 0) % max(1, n_gpus)


def _malloc_like_a_plain_process() -> None:
    """Undo the nanny's MALLOC_TRIM_THRESHOLD_=64 KiB (glibc): with it every large tensor is a fresh mmap.

    Measured: 2.7x the CPU time of the same E-step in a plain process (page faults). glibc's own
    dynamic limits end at 32 MiB (mmap) and 64 MiB (trim), which mallopt sets back here.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 32 * 2 ** 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 2 ** 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to undo
        pass


class DaskRunner:
    """The engine's TaskRunner on a dask.distributed Client: tasks, a tree of sums, results gathered."""

    def __init__(self, client: Any, planned_workers: int = 1, progress: Callable[[Iterable, int], Iterable] | None = None,
                 gpu: bool = False, count_bytes: bool = False) -> None:
        self.client, self.planned, self.progress, self.gpu = client, planned_workers, progress, gpu
        self._shared: dict[int, tuple[Any, Any]] = {}
        self.count_bytes = count_bytes  # serialise each shared input once more to count its bytes (benchmarks)
        self.bytes_scattered = 0  # bytes of the shared inputs sent (to each worker), with count_bytes

    @property
    def workers(self) -> int:
        """Task slots now (threads over all workers), or the planned number while workers are starting."""
        slots = sum(self.client.nthreads().values())
        return slots if slots else self.planned

    def _share(self, objs: Sequence[Any]) -> list[Any]:
        """Each shared input sent once (the particle source once per run, a pass's inputs per pass), as a task.

        Not ``scatter``: scattered data lost with a dying worker cannot be made again (and the
        scheduler keeps one replica of it), while a task's result is recomputed from its inputs.
        Workers fetch it from each other once, then hold it for every task of the pass.
        """
        kept = {}
        for o in objs:
            hit = self._shared.get(id(o)) or kept.get(id(o))
            if hit is None:
                light = o  # a file-backed source pickles without its cache (SubtomogramSource.__getstate__)
                with warnings.catch_warnings():  # a pass's references are a "large graph" of a few MB: meant so
                    warnings.simplefilter("ignore", UserWarning)
                    hit = (o, self.client.submit(_identity, light, pure=False))
                self.bytes_scattered += _nbytes(light) if self.count_bytes else 0
            kept[id(o)] = hit
        self._shared = kept  # what the last call did not use is released on the workers
        return [kept[id(o)][1] for o in objs]

    def _worker_groups(self, n_calls: int) -> list[list[str] | None]:
        """Disjoint shares of the workers, one per call (None: any worker, when there are fewer workers than calls)."""
        addresses = sorted(self.client.scheduler_info(n_workers=-1)["workers"])
        if n_calls < 2 or len(addresses) < n_calls:
            return [None] * n_calls
        return [addresses[j::n_calls] for j in range(n_calls)]

    def map_reduce(self, fn: Callable[..., tuple[Any, Any]], items: Sequence[Any], shared: Sequence[Any],
                   combine: Callable[[Any, Any], Any],
                   progress: Callable[[Iterable], Iterable] | None = None) -> tuple[Any, list[Any]]:
        """Tasks ``fn(item, *shared)``; the partials summed in the tree of :func:`subtomo.em.parallel.tree_pairs`."""
        from subtomo.em.parallel import MapReduceCall

        return self.map_reduce_many([MapReduceCall(fn, items, shared, combine)], progress)[0]

    def map_reduce_many(self, calls: Sequence["MapReduceCall"],
                        progress: Callable[[Iterable], Iterable] | None = None) -> list[tuple[Any, list[Any]]]:
        """All calls' tasks at once, each call preferring its own share of the workers; results in call order.

        The preference is loose (``allow_other_workers``): a worker that dies, or one that is idle
        while another share still has work, takes tasks of another call; results do not change.
        """
        from distributed import as_completed

        from subtomo.em.parallel import tree_pairs

        shared = self._share([o for c in calls for o in c.shared])
        heads, extras_of, futs = [], [], []
        for call, group in zip(calls, self._worker_groups(len(calls))):
            n, mine = len(call.items), shared[:len(call.shared)]
            shared = shared[len(call.shared):]
            where = dict(workers=group, allow_other_workers=True) if group else {}
            tasks = self.client.map(_run_task, list(call.items), *[[f] * n for f in mine], fn=call.fn, gpu=self.gpu,
                                    pure=False, **where)
            level = self.client.map(operator.itemgetter(0), tasks, pure=False, **where)
            extras_of.append(self.client.map(operator.itemgetter(1), tasks, pure=False, **where))
            for pairs in tree_pairs(n):
                odd = [level[-1]] if len(level) % 2 else []
                level = [self.client.submit(call.combine, level[a], level[b], pure=False, **where) for a, b in pairs] + odd
            heads.append(level[0])
            futs.extend(tasks)
        done = as_completed(futs)
        for _ in (progress(done) if progress else self.progress(done, len(futs)) if self.progress else done):
            pass
        out = self.client.gather([heads, extras_of])
        return list(zip(out[0], out[1]))


def _identity(obj: Any) -> Any:
    return obj


def _nbytes(obj: Any) -> int:
    from distributed.protocol import serialize_bytes

    return len(serialize_bytes(obj))


def slurm_config_path(params: Any, project: Path) -> Path:
    """The cluster.yaml of ``--cluster slurm``: ``--cluster-config`` (absolute or project-relative), else the project's."""
    path = Path(params.cluster_config).expanduser() if params.cluster_config else Path("cluster.yaml")
    return path if path.is_absolute() else project / path


def check_cluster(params: Any, project: Path) -> None:
    """Refuse a bad ``--cluster slurm`` configuration in the job's check, before its directory exists."""
    if parse_cluster(params.cluster)[0] == "slurm":
        read_slurm_config(slurm_config_path(params, project))


@contextlib.contextmanager
def open_runner(ctx: "JobContext") -> Iterator[DaskRunner | None]:
    """The job's TaskRunner for ``--cluster`` (None for ``none``); the cluster is closed when the job ends."""
    kind, arg = parse_cluster(ctx.params.cluster)
    if ctx.params.cluster_config and kind != "slurm":
        ctx.warn(f"--cluster-config {ctx.params.cluster_config} is read only with --cluster slurm; ignored.")
    if kind == "none":
        yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise SubtomoError(f"--cluster {ctx.params.cluster} needs Dask: pip install 'subtomo[cluster]' "
                           "(dask, distributed, dask-jobqueue), or use --cluster none.") from None
    gpu = ctx.device.type == "cuda"
    with contextlib.ExitStack() as stack:
        stack.enter_context(compute_worker_config())
        if kind == "local":
            threads = ctx.params.threads or max(1, (os.cpu_count() or 1) // int(arg or 1))
            cluster = stack.enter_context(LocalCluster(n_workers=int(arg or 1), threads_per_worker=threads,
                                                       processes=True, dashboard_address=":0", silence_logs=40))
            planned = int(arg or 1) * threads
        elif kind == "slurm":
            cfg = read_slurm_config(slurm_config_path(ctx.params, ctx.project))
            cluster = stack.enter_context(slurm_cluster(cfg, compute_worker_environment()))
            if cfg.adaptive is not None:
                cluster.adapt(minimum_jobs=cfg.adaptive.minimum, maximum_jobs=cfg.adaptive.maximum)
            else:
                cluster.scale(jobs=cfg.jobs or 1)
            planned = (cfg.jobs or (cfg.adaptive.maximum if cfg.adaptive else 1)) * cfg.cluster_kwargs()["cores"]
            ctx.log(f"SLURM job script of the Dask workers:\n{cluster.job_script()}")
        else:
            cluster, planned = str(arg), 1
        try:
            client = stack.enter_context(Client(cluster, timeout="20s"))
        except OSError as exc:
            raise SubtomoError(f"--cluster {ctx.params.cluster}: no Dask scheduler answered ({exc}). Start one "
                               "(dask scheduler; dask worker ADDRESS on each node) or fix the address.") from None
        ctx.log(f"Dask cluster {ctx.params.cluster}: dashboard {client.dashboard_link}")
        yield DaskRunner(client, planned, lambda it, n: ctx.progress(it, n, "E-step tasks"), gpu)
