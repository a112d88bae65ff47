"""Map-reduce over independent tasks: the seam between the engine and wherever its tasks run.

The E-step is a map (groups of particle batches -> partial :class:`SufficientStats` and the
new poses of those particles) followed by a reduce (a sum: the statistics are additive).
The engine hands that map-reduce to a :class:`TaskRunner`. :class:`SerialRunner` runs it in
this process (the reference, and what tests use); the Dask runner (``--cluster local:N``,
``slurm``, ``tcp://``) lives in the job layer (``subtomo.jobs._cluster``), so the engine
never imports a cluster library. Both reduce in the same pairwise tree
(:func:`tree_reduce`), so the same tasks give the same sums wherever they ran.

Task functions must be pure: they may read their shared inputs but never change them, so
that a task lost with a dying worker can be rerun elsewhere with the same result.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch


@dataclasses.dataclass
class MapReduceCall:
    """One map-reduce: ``fn(item, *shared) -> (partial, extra)`` per item, partials reduced with ``combine``."""

    fn: Callable[..., tuple[Any, Any]]
    items: Sequence[Any]
    shared: Sequence[Any]
    combine: Callable[[Any, Any], Any]


class TaskRunner(Protocol):
    """Runs ``fn(item, *shared) -> (partial, extra)`` for every item and reduces the partials.

    ``workers`` is how many tasks run at once (the engine makes a few tasks per worker).
    ``shared`` holds the inputs every task reads (the particle source, a pass's references):
    a cluster runner sends each of them to the workers once, not once per task.
    """

    workers: int

    def map_reduce(self, fn: Callable[..., tuple[Any, Any]], items: Sequence[Any], shared: Sequence[Any],
                   combine: Callable[[Any, Any], Any],
                   progress: Callable[[Iterable], Iterable] | None = None) -> tuple[Any, list[Any]]:
        """(``combine``-reduction of the partials in :func:`tree_reduce` order, the extras in item order)."""
        ...

    def map_reduce_many(self, calls: Sequence[MapReduceCall],
                        progress: Callable[[Iterable], Iterable] | None = None) -> list[tuple[Any, list[Any]]]:
        """Independent map-reduces at once (the two halves of a gold-standard E-step); results in call order.

        A cluster runner gives each call its own share of the workers, so that what a call's tasks
        prepare once per worker (a pass's projected references) is prepared on fewer workers.
        """
        ...


class SerialRunner:
    """The map-reduce in this process, one task after another (same tasks and tree as a cluster).

    Parameters
    ----------
    workers : int
        How many workers to plan tasks for (more tasks per pass; results do not depend on it).
    """

    def __init__(self, workers: int = 1) -> None:
        self.workers = int(workers)

    def map_reduce(self, fn: Callable[..., tuple[Any, Any]], items: Sequence[Any], shared: Sequence[Any],
                   combine: Callable[[Any, Any], Any],
                   progress: Callable[[Iterable], Iterable] | None = None) -> tuple[Any, list[Any]]:
        """Run every task here; (reduced partials, extras in item order)."""
        order = progress(range(len(items))) if progress else range(len(items))
        results = {i: fn(items[i], *shared) for i in order}
        return tree_reduce([results[i][0] for i in range(len(items))], combine), [results[i][1] for i in range(len(items))]

    def map_reduce_many(self, calls: Sequence[MapReduceCall],
                        progress: Callable[[Iterable], Iterable] | None = None) -> list[tuple[Any, list[Any]]]:
        """The calls one after another, here."""
        return [self.map_reduce(c.fn, c.items, c.shared, c.combine, progress) for c in calls]


def map_tasks(runner: TaskRunner | None, fn: Callable[..., Any], items: Sequence[Any], shared: Sequence[Any] = (),
              progress: Callable[[Iterable], Iterable] | None = None) -> list[Any]:
    """``fn(item, *shared)`` for every item, as tasks on ``runner`` or here; the results in item order.

    The per-tomogram stages (CTF fits, extraction) use it: nothing to reduce, one result each.

    Parameters
    ----------
    runner : TaskRunner or None
        Where the tasks run; None: here, one after another.
    fn : callable
        A module-level (picklable) pure function.
    items : sequence
        One task each.
    shared : sequence
        Inputs every task reads (sent to each worker once).
    progress : callable, optional
        Wraps the items (here) or the finishing tasks (on a runner).

    Returns
    -------
    list
        ``fn``'s results, in item order.
    """
    if runner is None:
        return [fn(item, *shared) for item in (progress(items) if progress else items)]
    if not len(items):
        return []
    sized = (lambda done: progress(_Sized(done, len(items)))) if progress else None  # noqa: E731
    _, extras = runner.map_reduce(_unreduced_task, items, (fn, *shared), _nothing, sized)
    return extras


class _Sized:
    """An iterable with a known length (tasks as they finish), for progress bars that show a total."""

    def __init__(self, it: Iterable, n: int) -> None:
        self.it, self.n = it, n

    def __iter__(self):
        return iter(self.it)

    def __len__(self) -> int:
        return self.n


def _unreduced_task(item: Any, fn: Callable[..., Any], *shared: Any) -> tuple[None, Any]:
    return None, fn(item, *shared)


def _nothing(a: Any, b: Any) -> None:
    return None


def tree_reduce(parts: Sequence[Any], combine: Callable[[Any, Any], Any]) -> Any:
    """Pairwise reduction: level by level, neighbours (0, 1), (2, 3), ... combined; an odd last one carried up.

    Parameters
    ----------
    parts : sequence
        The partial results (at least one).
    combine : callable
        ``combine(a, b)``: an associative sum.

    Returns
    -------
    object
        The reduction (``parts[0]`` when there is one part).
    """
    level = list(parts)
    if not level:
        raise ValueError("tree_reduce of nothing")
    while len(level) > 1:
        nxt = [combine(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        level = nxt + ([level[-1]] if len(level) % 2 else [])
    return level[0]


def tree_pairs(n: int) -> list[list[tuple[int, int]]]:
    """The pairs :func:`tree_reduce` combines at each level, as indices into that level's list.

    Parameters
    ----------
    n : int
        Number of partial results.

    Returns
    -------
    list of list of (int, int)
        Per level, the (left, right) positions combined; a cluster runner submits one task per pair.
    """
    levels = []
    while n > 1:
        levels.append([(i, i + 1) for i in range(0, n - 1, 2)])
        n = (n + 1) // 2
    return levels


def contiguous_groups(n_items: int, n_groups: int) -> list[tuple[int, int]]:
    """Split ``range(n_items)`` into at most ``n_groups`` contiguous, nearly equal (start, stop) ranges.

    Parameters
    ----------
    n_items : int
        Number of items (batches).
    n_groups : int
        Groups wanted (at least 1).

    Returns
    -------
    list of (int, int)
        Non-empty ranges in order, covering every item once.
    """
    g = max(1, min(int(n_groups), int(n_items)))
    bounds = [round(i * n_items / g) for i in range(g + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def to_device(obj: Any, device: torch.device | str) -> Any:
    """A copy of ``obj`` with every tensor moved to ``device`` (inside dataclasses, lists, tuples and dicts).

    Parameters
    ----------
    obj : object
        Tensors, dataclasses (init fields), sequences, dicts; anything else is kept as it is.
    device : torch.device or str
        Where the tensors go.

    Returns
    -------
    object
        The same structure; the input is not changed.
    """
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
