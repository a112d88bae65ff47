"""``subtomo mask`` (``relion_mask_create``; protocol Steps 23 and 25): solvent and focus masks.

From a map (``--i``): optional low-pass, threshold, extend, soft edge (RELION's algorithm).
Or geometric: ``--sphere DIAMETER_A`` / ``--cylinder DIAMETER_A`` (with ``--length``,
``--center``, ``--axis``), on the box and pixel size of ``--ref`` (or ``--box`` and
``--angpix``). ``--add``/``--subtract`` combine with existing masks (union / and-not), e.g.
a mask white only in a flexible region for focused classification (Step 25).
The mask is built and checked before the job directory is made, so an all-black or
all-white result is refused with nothing written. Outputs: mask.mrc, mask_slices.png.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from subtomo.errors import SubtomoError
from subtomo.io.mrc import read_mrc, read_mrc_header, write_mrc
from subtomo.io.particles import resolve_project_path
from subtomo.jobs.base import JobContext, JobParams, JobSpec
from subtomo.jobs.contracts import InputSpec, NodeType, OutputSpec
from subtomo.post import masks as M

REMEDY = ("Change --threshold (or --threshold-fraction), --lowpass or --extend, or the sphere/cylinder geometry, "
          "and check the map with the central-slice picture.")


class MaskParams(JobParams):
    i: str | None = Field(None, description="Map to make the mask from (threshold/extend/soft edge).")
    ref: str | None = Field(None, description="Map that defines box size and pixel size for geometric masks (default: --i or the first --add mask).")
    box: int | None = Field(None, gt=0, description="Box size when no reference map is given [px].")
    angpix: float | None = Field(None, gt=0, description="Pixel size [Å] (default: from the reference map's header).")
    lowpass: float | None = Field(None, gt=0, description="Low-pass the map before thresholding [Å].")
    threshold: float | None = Field(None, description="Binarisation threshold [map grey values] (default: median + --threshold-fraction × (max − median) of the (low-passed) map).")
    threshold_fraction: float = Field(M.DEFAULT_THRESHOLD_FRACTION, gt=0, lt=1, description="Default threshold as a fraction of the map's maximum above its median [fraction].")
    extend: float = Field(3.0, description="Extend the binary mask by this many pixels (negative erodes) [px].")
    soft_edge: float = Field(6.0, ge=0, description="Width of the raised-cosine soft edge (also for spheres and cylinders) [px].")
    sphere: float | None = Field(None, gt=0, description="Make a sphere of this diameter [Å].")
    cylinder: float | None = Field(None, gt=0, description="Make a cylinder of this diameter [Å].")
    length: float | None = Field(None, gt=0, description="Cylinder length along its axis [Å] (default: through the whole box).")
    center: list[float] | None = Field(None, description="Centre of the sphere/cylinder x,y,z [px] (default: the box centre N//2).")
    axis: list[float] | None = Field(None, description="Cylinder axis direction x,y,z (default: 0,0,1).")
    add: list[str] | None = Field(None, description="Masks to add (voxel-wise maximum).")
    subtract: list[str] | None = Field(None, description="Masks to subtract (min(mask, 1 - other)).")


def _abs(project: Path, p: str, option: str) -> Path:
    path = resolve_project_path(project, p)
    if not path.exists():
        raise SubtomoError(f"{option} {p}: file not found.")
    return path


def build_mask(params: MaskParams, project: Path) -> dict:
    """Build and validate the mask (no files written). Returns the mask and a description."""
    primaries = [n for n in ("i", "sphere", "cylinder") if getattr(params, n) is not None]
    if len(primaries) > 1:
        raise SubtomoError(f"give only one of --i, --sphere, --cylinder (got {', '.join('--' + n for n in primaries)}); "
                           "combine shapes with --add/--subtract of saved masks.")
    if not primaries and not params.add:
        raise SubtomoError("nothing to make: give --i MAP, --sphere DIAMETER_A, --cylinder DIAMETER_A, or --add masks.")
    adds = [_abs(project, a, "--add") for a in params.add or []]
    subs = [_abs(project, s, "--subtract") for s in params.subtract or []]
    ref = _abs(project, params.ref, "--ref") if params.ref else (
        _abs(project, params.i, "--i") if params.i else (adds[0] if adds else None))
    if ref is not None:
        shape, px_ref = read_mrc_header(ref)
        px = params.angpix or px_ref
    else:
        if not params.box or not params.angpix:
            raise SubtomoError("geometric mask without a reference map: give --ref MAP, or both --box and --angpix.")
        shape, px = (params.box,) * 3, params.angpix
    shape = tuple(int(s) for s in shape)
    if not px or px <= 0:
        raise SubtomoError(f"{ref}: no pixel size in the header; pass --angpix.")
    desc = []
    thr = None
    if params.i:
        vol = torch.from_numpy(read_mrc(_abs(project, params.i, "--i"))[0])
        mask, thr = M.automask(vol, px, params.threshold, params.extend, params.soft_edge, params.lowpass,
                               params.threshold_fraction)
        how = "given" if params.threshold is not None else f"default: median + {params.threshold_fraction:g} x (max - median)"
        desc.append(f"from {params.i}{f' low-passed to {params.lowpass:g} A' if params.lowpass else ''}: threshold "
                    f"{thr:.4g} ({how}), extend {params.extend:g} px, soft edge {params.soft_edge:g} px")
    elif params.sphere or params.cylinder:
        if params.center is not None and len(params.center) != 3:
            raise SubtomoError(f"--center {params.center}: give three values x,y,z in pixels.")
        if params.sphere:
            mask = M.sphere_mask(shape, params.sphere / px, params.center, params.soft_edge)
            desc.append(f"sphere of {params.sphere:g} A ({params.sphere / px:.1f} px) at "
                        f"{params.center or 'the box centre'}, soft edge {params.soft_edge:g} px")
        else:
            axis = params.axis or [0.0, 0.0, 1.0]
            if len(axis) != 3:
                raise SubtomoError(f"--axis {axis}: give three values x,y,z.")
            mask = M.cylinder_mask(shape, params.cylinder / px, params.length / px if params.length else None,
                                   params.center, axis, params.soft_edge)
            desc.append(f"cylinder of diameter {params.cylinder:g} A, length "
                        f"{f'{params.length:g} A' if params.length else 'the whole box'}, axis {axis}, soft edge "
                        f"{params.soft_edge:g} px")
    else:
        mask = torch.zeros(shape)
    for path in adds:
        other = _load_same(path, shape, "--add")
        mask = M.union(mask, other)
        desc.append(f"+ {path.name}")
    for path in subs:
        other = _load_same(path, shape, "--subtract")
        mask = M.subtract(mask, other)
        desc.append(f"- {path.name}")
    stats = M.check_mask(mask, "mask", REMEDY)
    return {"mask": mask, "px": float(px), "threshold": thr, "description": "; ".join(desc), "stats": stats,
            "inputs": [p for p in [ref, *adds, *subs] if p is not None]}


def _load_same(path: Path, shape: tuple, option: str) -> torch.Tensor:
    data, _ = read_mrc(path)
    if tuple(data.shape) != tuple(shape):
        raise SubtomoError(f"{option} {path}: size {data.shape} differs from the mask box {shape}.")
    return torch.from_numpy(data)


def _check(params: MaskParams, project: Path) -> dict:
    return build_mask(params, project)


def _run(ctx: JobContext) -> None:
    # imported here to keep `subtomo --help` fast (matplotlib)
    from subtomo.plot.post import plot_central_slices

    st = ctx.state
    mask = st["mask"]
    ctx.log(f"mask {st['description']}")
    s = st["stats"]
    ctx.log(f"{tuple(mask.shape)} at {st['px']:.3f} A/px: {100 * s.fraction:.1f}% of the box, {s.n_ones} voxels at 1, "
            f"{s.n_soft} in the soft edge")
    if s.touches_box_edge:
        ctx.warn("the mask reaches the box edge.")
    for p in st["inputs"]:
        ctx.add_input(p)
    out = write_mrc(ctx.path("mask.mrc"), mask.numpy(), st["px"])
    ctx.add_output(out, "Mask")
    background = None
    if ctx.params.i:
        background = read_mrc(resolve_project_path(ctx.project, ctx.params.i))[0]
    plot_central_slices(ctx.path("mask_slices.png"), background if background is not None else mask.numpy(),
                        "mask (red contour at 0.5)", overlay=mask.numpy())
    ctx.log(f"wrote {ctx.rel(out)}")


SPEC = JobSpec(
    command="mask", job_type="MaskCreate", params=MaskParams, run=_run, check=_check,
    summary="Steps 23/25: make a soft mask from a map (threshold, extend, soft edge) or a sphere/cylinder; add/subtract masks.",
    inputs=(
        InputSpec("i", NodeType.DENSITY_MAP, required=False, when="threshold masks"),
        InputSpec("ref", NodeType.DENSITY_MAP, required=False, when="geometric masks"),
    ),
    outputs=(
        OutputSpec("mask.mrc", NodeType.MASK, "the soft mask (0..1)"),
        OutputSpec("mask_slices.png", NodeType.IMAGE, "central sections", optional=True),
    ),
)
