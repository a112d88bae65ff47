"""``subtomo localres`` (protocol Step 24): local-resolution map from the two half maps.

Windowed FSC in a soft sphere sliding over a grid inside the mask (see
``subtomo.post.localres``). The mask defaults to the one used by the latest postprocess
job (its automask or the mask it was given). Outputs: localres.mrc (Å per voxel, 0
outside the mask), localres_hist.png, localres_slices.png (central sections of the
average coloured by local resolution) and localres.star (one row per window).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from subtomo.em.parallel import map_tasks
from subtomo.errors import SubtomoError
from subtomo.io.mrc import read_mrc, read_mrc_header, write_mrc
from subtomo.io.particles import resolve_project_path
from subtomo.io.star import read_star, write_star
from subtomo.jobs._cluster import check_cluster, open_runner
from subtomo.jobs._inputs import load_mask
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec
from subtomo.jobs.contracts import InputSpec, NodeType, OutputSpec, Source
from subtomo.jobs.pipeline import Pipeline
from subtomo.post import masks as M
from subtomo.post.halfmaps import HalfMapPair, half_map_pair
from subtomo.post.localres import local_resolution, window_geometry


class LocalResParams(ComputeParams):
    i: str | None = Field(None, description="Unfiltered half map 1 (half2 found by swapping the name) (default: the latest Refine3D job's run_half1_class001_unfil.mrc).")
    angpix: float | None = Field(None, gt=0, description="Pixel size of the half maps [Å] (default: from the MRC header).")
    mask: str | None = Field(None, description="Mask restricting the windows (default: the mask of the latest postprocess job; without any, a sphere of 0.8 × the box).")
    window_A: float | None = Field(None, gt=0, description="Diameter of the sliding soft sphere [Å] (default: 16 pixels).")
    step_px: int = Field(4, ge=1, description="Spacing of the window grid [px]; values between grid points are interpolated.")
    threshold: float = Field(0.143, gt=0, lt=1, description="FSC threshold defining local resolution (0.143 or 0.5) [FSC].")
    batch: int = Field(0, ge=0, description="Windows per batched FFT (0: automatic).")


def _default_mask(project: Path) -> Path | None:
    """The mask recorded in the latest succeeded postprocess job's postprocess.star."""
    node = Pipeline(project).latest_output(("PostProcess",), "postprocess.star")
    if node is None or not (project / node).exists():
        return None
    general = read_star(project / node).get("general")
    if isinstance(general, pd.DataFrame):
        general = general.iloc[0].to_dict()
    name = (general or {}).get("rlnMaskName")
    if name and resolve_project_path(project, str(name), source=project / node, column="rlnMaskName").exists():
        return project / str(name)
    return None


@dataclass
class _State:
    pair: HalfMapPair
    mask: torch.Tensor | None  # None: a sphere of 0.8 x the box
    mask_path: Path | None
    window_px: float


def _check(params: LocalResParams, project: Path) -> _State:
    check_cluster(params, project)
    p = SPEC.input("i").resolve(project, params.i)
    assert p is not None  # a required input
    pair = half_map_pair(p, params.angpix)
    mask_path = resolve_project_path(project, params.mask) if params.mask else _default_mask(project)
    if mask_path is not None and not params.mask and tuple(read_mrc_header(mask_path)[0]) != pair.shape:
        mask_path = None  # the postprocess mask belongs to other maps
    mask = load_mask(mask_path, project, pair.shape, "--mask") if mask_path is not None else None
    if mask is not None:
        M.check_mask(mask, str(mask_path), "Give a suitable mask with --mask (e.g. from subtomo postprocess or subtomo mask).")
    window_px = (params.window_A / pair.pixel_size_A) if params.window_A else 16.0
    cube, _ = window_geometry(window_px)
    if window_px < 4:
        raise SubtomoError(f"--window-A {params.window_A}: only {window_px:.1f} px; use at least 4 px "
                           f"({4 * pair.pixel_size_A:.1f} Å).")
    if cube > pair.box:
        raise SubtomoError(f"--window-A {params.window_A}: the window cube ({cube} px) exceeds the box ({pair.box} px).")
    return _State(pair, mask, mask_path, window_px)


def _run(ctx: JobContext) -> None:
    # imported here to keep `subtomo --help` fast (matplotlib)
    from subtomo.plot.post import plot_localres

    p: LocalResParams = ctx.params
    st: _State = ctx.state
    px = st.pair.pixel_size_A
    h1 = torch.from_numpy(read_mrc(st.pair.half1)[0]).to(ctx.device)
    h2 = torch.from_numpy(read_mrc(st.pair.half2)[0]).to(ctx.device)
    ctx.add_input(st.pair.half1)
    box = h1.shape[-1]
    if st.mask is not None and st.mask_path is not None:
        mask = st.mask.to(ctx.device)
        ctx.add_input(st.mask_path)
        ctx.log(f"mask {ctx.rel(st.mask_path)}")
    else:
        mask = M.sphere_mask(tuple(h1.shape), 0.8 * box, edge_px=0, device=ctx.device)
        ctx.warn("no mask given and no postprocess mask found: windows cover a sphere of 0.8 x the box. "
                 "Run subtomo postprocess first or pass --mask for a meaningful map.")
    cube, edge = window_geometry(st.window_px)
    ctx.log(f"window: soft sphere of {st.window_px:.1f} px ({st.window_px * px:.1f} A) in a {cube}^3 cube, "
            f"grid step {p.step_px} px, FSC threshold {p.threshold}; shell spacing {cube * px:.1f} A / r")
    with open_runner(ctx) as runner:  # --cluster: blocks of windows as tasks (None: here)
        blocks = None if runner is None else partial(map_tasks, runner,
                                                     progress=lambda it: ctx.progress(it, None, "local resolution window blocks"))
        res = local_resolution(h1, h2, mask, px, st.window_px, p.step_px, p.threshold, p.batch or None,
                               progress=ctx.progress, map_blocks=blocks)
    s = res.stats()
    ctx.log(f"{len(res.values_A)} windows: local resolution min {s['min']:.2f}, 5% {s['p05']:.2f}, median "
            f"{s['median']:.2f}, 95% {s['p95']:.2f}, max {s['max']:.2f} A")
    out = write_mrc(ctx.path("localres.mrc"), res.map_A.cpu().numpy(), px)
    ctx.add_output(out, "Image3D.localresmap")
    table = pd.DataFrame({"rlnCoordinateX": res.centres_zyx[:, 2], "rlnCoordinateY": res.centres_zyx[:, 1],
                          "rlnCoordinateZ": res.centres_zyx[:, 0], "subtomoLocalResolution": res.values_A})
    general = {"subtomoWindowDiameter": st.window_px * px, "subtomoWindowStepPx": p.step_px,
               "subtomoFscThreshold": p.threshold, "subtomoLocalResolutionMedian": s["median"],
               "rlnUnfilteredMapHalf1": ctx.rel(st.pair.half1), "rlnUnfilteredMapHalf2": ctx.rel(st.pair.half2),
               "rlnMaskName": ctx.rel(st.mask_path) if st.mask_path is not None else "None"}
    star = write_star(ctx.path("localres.star"), {"general": general, "local_resolution": table})
    ctx.add_output(star, "File")
    avg = ((h1 + h2) / 2).cpu().numpy()
    plot_localres(ctx.path("localres_hist.png"), ctx.path("localres_slices.png"), res.map_A.cpu().numpy(),
                  np.asarray(res.values_A), avg)
    ctx.log(f"wrote {ctx.rel(out)}, {ctx.rel(star)} and PNGs")


SPEC = JobSpec(
    command="localres", job_type="LocalRes", params=LocalResParams, run=_run, check=_check,
    summary="Step 24: local-resolution map by windowed FSC of the half maps inside the mask.",
    inputs=(
        InputSpec("i", NodeType.DENSITY_MAP, (Source("Refine3D", ("run_half1_class001_unfil.mrc",)),),
                  "Run subtomo refine3d first, or pass --i <half1 map>."),
        InputSpec("mask", NodeType.MASK, (Source("PostProcess", ("postprocess.star",)),), required=False,
                  hint="default: the mask recorded in the latest postprocess.star"),
    ),
    outputs=(
        OutputSpec("localres.mrc", NodeType.LOCAL_RESOLUTION, "local resolution [Å] at every voxel"),
        OutputSpec("localres.star", NodeType.FILE, "summary and histogram of local resolution"),
        OutputSpec("localres_*.png", NodeType.IMAGE, "histogram and slices", optional=True),
    ),
)
