"""2D classification with its E-step as a map-reduce (``--cluster``): groups of image batches as tasks.

:func:`iterate_on` is :func:`subtomo.em.class2d.iterate` with the batches run by a
:class:`subtomo.em.parallel.TaskRunner`: every worker builds the iteration's plan (projectors,
angle grids; deterministic from the model, the settings and the iteration number) once per
iteration, each task returns its :class:`subtomo.em.class2d.Stats2D` and the new poses of its
images, and the sums are added in a tree on the cluster. Same batches, so the same poses; the
sums are added in another order (float32 rounding).
"""

from __future__ import annotations

import operator
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import torch

from subtomo.em import class2d as c2
from subtomo.em.model import EMModel
from subtomo.em.parallel import TaskRunner, contiguous_groups, to_device

_POSE_FIELDS = ("cls", "psi_deg", "origin_px", "max_prob", "log_lik", "n_sig")


@dataclass
class Pass2D:
    """What every task of one 2D iteration reads (sent to each worker once per iteration)."""

    model_state: dict  # EMModel.state(): tensors on cpu
    settings: c2.Class2DSettings
    iteration: int
    box: int
    device_type: str  # "cpu" or "cuda"
    token: str  # names the iteration in the workers' plan cache


_PLANS: dict[str, Any] = {}  # per worker process: the current iteration's plan only
_PLANS_LOCK = threading.Lock()


def _plan(pay: Pass2D, device: torch.device) -> Any:
    """The iteration's plan, built once per worker process and iteration (a pure cache)."""
    with _PLANS_LOCK:
        if pay.token not in _PLANS:
            _PLANS.clear()  # the previous iteration's plan goes before this one is made
            model = EMModel.from_state(pay.model_state, device)
            _PLANS[pay.token] = c2._plan_iteration(pay.box, model, pay.settings, pay.iteration, device)
        return _PLANS[pay.token]


def class2d_task(item: tuple[int, int, c2.Poses2D], images: torch.Tensor,
                 pay: Pass2D) -> tuple[c2.Stats2D, c2.Poses2D]:
    """E-step of images ``a:b`` (whole batches): their sums and their new poses; pure (inputs only read).

    Parameters
    ----------
    item : tuple
        (a, b, poses of images a..b-1 after the previous iteration).
    images : torch.Tensor
        (n, N, N) all images (held by the worker once per run).
    pay : Pass2D
        Model, settings and iteration.

    Returns
    -------
    stats : Stats2D
        The sums of these images (cpu).
    new : Poses2D
        Their new classes, psi [deg], origins [px] and E-step summaries.
    """
    a, b, rows = item
    device = torch.device(pay.device_type)
    plan = _plan(pay, device)
    imgs = images[a:b].to(device)
    stats = c2.Stats2D.zeros(len(pay.model_state["maps"]), plan.n_angles, plan.comps.m, pay.box, device=device)
    new = c2.Poses2D.from_state(rows.state())
    bs = pay.settings.batch_size
    for s in range(0, b - a, bs):
        c2._batch2d(imgs, slice(s, min(b - a, s + bs)), rows, new, stats, plan)
    return to_device(stats, "cpu"), new


def iterate_on(runner: TaskRunner, images: torch.Tensor, model: EMModel, poses: c2.Poses2D,
               settings: c2.Class2DSettings, iteration: int,
               progress: Callable | None = None) -> tuple[EMModel, c2.Poses2D, c2.IterationInfo]:
    """One E/M iteration of 2D classification with the E-step's batches as tasks on ``runner``.

    Parameters
    ----------
    runner : TaskRunner
        Where the tasks run.
    images, model, poses, settings, iteration, progress
        As :func:`subtomo.em.class2d.iterate` (``progress`` wraps the tasks as they finish).

    Returns
    -------
    model : EMModel
        New averages, spectra, class priors and current resolution.
    poses : Poses2D
        New classes, psi [deg], origins [px] and E-step summaries.
    info : IterationInfo
        Time, resolution [Å] and the changes of this iteration.
    """
    t0 = time.time()
    n_img, n = images.shape[0], images.shape[-1]
    plan = c2._plan_iteration(n, model, settings, iteration, images.device)  # the M-step's grids, here
    pay = Pass2D(model.state(), settings, iteration, n, images.device.type, uuid.uuid4().hex)
    bs = settings.batch_size
    items = []
    for ga, gb in contiguous_groups(-(-n_img // bs), 4 * int(runner.workers)):
        a, b = ga * bs, min(n_img, gb * bs)
        items.append((a, b, c2.Poses2D(*(getattr(poses, f)[a:b].copy() for f in _POSE_FIELDS))))
    stats, news = runner.map_reduce(class2d_task, items, (images.cpu(), pay), operator.add, progress)
    new = c2.Poses2D.from_state(poses.state())
    for (a, b, _), rows in zip(items, news):
        for f in _POSE_FIELDS:
            getattr(new, f)[a:b] = getattr(rows, f)
    return c2.finish_iteration(to_device(stats, images.device), model, poses, new, plan, settings, iteration, t0)
