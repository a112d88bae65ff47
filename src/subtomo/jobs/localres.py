"""``subtomo localres`` (protocol Step 24): local-resolution map from the two half maps.

Windowed FSC in a soft sphere sliding over a grid inside the mask (see
``subtomo.post.localres``). The mask defaults to the one used by the latest postprocess
job (its automask or the mask it was given). Outputs: localres.mrc (Å per voxel, 0
outside the mask), localres_hist.png, localres_slices.png (central sections of the
average coloured by local resolution) and localres.star (one row per window).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from subtomo.errors import SubtomoError
from subtomo.io.mrc import read_mrc, read_mrc_header, write_mrc
from subtomo.io.star import read_star, write_star
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec
from subtomo.jobs.pipeline import Pipeline
from subtomo.jobs.postprocess import load_half_maps, load_mask
from subtomo.post import masks as M
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
    if name and (project / str(name)).exists():
        return project / str(name)
    return None


def _check(params: LocalResParams, project: Path) -> dict:
    h1, h2, px = load_half_maps(project, params.i, params.angpix)
    shape, _ = read_mrc_header(h1)
    mask = load_mask(project, params.mask, shape) if params.mask else _default_mask(project)
    if mask is not None and not params.mask:
        ms, _ = read_mrc_header(mask)
        if tuple(ms) != tuple(shape):
            mask = None
    window_px = (params.window_A / px) if params.window_A else 16.0
    cube, _ = window_geometry(window_px)
    if window_px < 4:
        raise SubtomoError(f"--window-A {params.window_A}: only {window_px:.1f} px; use at least 4 px ({4 * px:.1f} Å).")
    if cube > shape[-1]:
        raise SubtomoError(f"--window-A {params.window_A}: the window cube ({cube} px) exceeds the box ({shape[-1]} px).")
    return {"half1": h1, "half2": h2, "px": px, "mask": mask, "window_px": window_px}


def _run(ctx: JobContext) -> None:
    from subtomo.plot.post import plot_localres

    p: LocalResParams = ctx.params
    st = ctx.state
    px = st["px"]
    h1 = torch.from_numpy(read_mrc(st["half1"])[0]).to(ctx.device)
    h2 = torch.from_numpy(read_mrc(st["half2"])[0]).to(ctx.device)
    ctx.add_input(st["half1"])
    box = h1.shape[-1]
    if st["mask"] is not None:
        mask = torch.from_numpy(read_mrc(st["mask"])[0]).to(ctx.device)
        M.check_mask(mask, ctx.rel(st["mask"]), "Give a suitable mask with --mask (e.g. from subtomo postprocess or subtomo mask).")
        ctx.add_input(st["mask"])
        ctx.log(f"mask {ctx.rel(st['mask'])}")
    else:
        mask = M.sphere_mask(tuple(h1.shape), 0.8 * box, edge_px=0, device=ctx.device)
        ctx.warn("no mask given and no postprocess mask found: windows cover a sphere of 0.8 x the box. "
                 "Run subtomo postprocess first or pass --mask for a meaningful map.")
    cube, edge = window_geometry(st["window_px"])
    ctx.log(f"window: soft sphere of {st['window_px']:.1f} px ({st['window_px'] * px:.1f} A) in a {cube}^3 cube, "
            f"grid step {p.step_px} px, FSC threshold {p.threshold}; shell spacing {cube * px:.1f} A / r")
    res = local_resolution(h1, h2, mask, px, st["window_px"], p.step_px, p.threshold, p.batch or None,
                           progress=ctx.progress)
    s = res.stats()
    ctx.log(f"{len(res.values_A)} windows: local resolution min {s['min']:.2f}, 5% {s['p05']:.2f}, median "
            f"{s['median']:.2f}, 95% {s['p95']:.2f}, max {s['max']:.2f} A")
    out = write_mrc(ctx.path("localres.mrc"), res.map_A.cpu().numpy(), px)
    ctx.add_output(out, "Image3D.localresmap")
    table = pd.DataFrame({"rlnCoordinateX": res.centres_zyx[:, 2], "rlnCoordinateY": res.centres_zyx[:, 1],
                          "rlnCoordinateZ": res.centres_zyx[:, 0], "subtomoLocalResolution": res.values_A})
    general = {"subtomoWindowDiameter": st["window_px"] * px, "subtomoWindowStepPx": p.step_px,
               "subtomoFscThreshold": p.threshold, "subtomoLocalResolutionMedian": s["median"],
               "rlnUnfilteredMapHalf1": ctx.rel(st["half1"]), "rlnUnfilteredMapHalf2": ctx.rel(st["half2"]),
               "rlnMaskName": ctx.rel(st["mask"]) if st["mask"] is not None else "None"}
    star = write_star(ctx.path("localres.star"), {"general": general, "local_resolution": table})
    ctx.add_output(star, "File")
    avg = ((h1 + h2) / 2).cpu().numpy()
    plot_localres(ctx.path("localres_hist.png"), ctx.path("localres_slices.png"), res.map_A.cpu().numpy(),
                  np.asarray(res.values_A), avg)
    ctx.log(f"wrote {ctx.rel(out)}, {ctx.rel(star)} and PNGs")


SPEC = JobSpec(
    command="localres", job_type="LocalRes", params=LocalResParams, run=_run, check=_check,
    summary="Step 24: local-resolution map by windowed FSC of the half maps inside the mask.",
)
