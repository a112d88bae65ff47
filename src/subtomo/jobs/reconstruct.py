"""``subtomo reconstruct``: a tomogram from an aligned tilt stack by weighted back-projection.

For users who have aligned tilt series but no tomograms: the stack (``.mrcs``, ``.ali``,
``.st`` of an aligned series; tilt axis = y) is read memory-mapped, block of rows by block
of rows, binned (``--bin``, block averages), turned into relative contrast (each image
divided by its mean, minus 1), R-weighted (or with a SIRT-like filter, ``--sirt-like N``)
and back-projected with torch (:mod:`subtomo.tomo.reconstruct`) into ``<name>.mrc`` of
``--thickness`` voxels, scaled to mean 0 and standard deviation 1. Angles come from
``--tlt`` (default: ``<stack>.tlt`` beside the stack, else the stack's extended header).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pydantic import Field

from subtomo.errors import SubtomoError
from subtomo.io.mrc import read_mrc_header, read_tilt_angles_from_header
from subtomo.io.particles import resolve_project_path
from subtomo.io.text import read_tlt
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec
from subtomo.jobs.contracts import InputSpec, NodeType, OutputSpec

INPUT = InputSpec("i", NodeType.FILE, (), "Give the aligned tilt stack: --i Tomograms/<name>/<name>.mrcs (or an IMOD .ali).")


class ReconstructParams(ComputeParams):
    i: str = Field(..., description="Aligned tilt stack (MRC: .mrcs, .ali, .st), tilt axis along y.")
    tlt: str | None = Field(None, description="Tilt angles, one per image in stack order [deg] (default: the .tlt beside "
                                              "the stack with its name, else the stack's extended header).")
    thickness: int | None = Field(None, gt=0, description="Tomogram thickness [px after binning] (default: a quarter of "
                                                          "the binned image width, even).")
    bin: int = Field(1, ge=1, description="Binning: images are averaged in bin x bin blocks before back-projection.")
    rows_per_block: int = Field(64, ge=1, description="Rows of the tomogram reconstructed at once (memory: about "
                                                      "(tilts + 9 x thickness) x rows x width x 4 bytes).")
    sirt_like: int = Field(0, ge=0, description="SIRT-like filter: weight equivalent to this many SIRT iterations "
                                                "(fewer = smoother; 0 = plain R-weighted back-projection).")
    normalise: bool = Field(True, description="Scale the tomogram to mean 0 and standard deviation 1.")


def _tilts(params: ReconstructParams, project: Path, stack: Path, n_images: int) -> tuple[np.ndarray, str]:
    if params.tlt:
        path = resolve_project_path(project, params.tlt)
        tilts, source = read_tlt(path), params.tlt
    elif stack.with_suffix(".tlt").is_file():
        tilts, source = read_tlt(stack.with_suffix(".tlt")), str(stack.with_suffix(".tlt"))
    else:
        header = read_tilt_angles_from_header(stack)
        if header is None:
            raise SubtomoError(f"{stack}: no tilt angles: no {stack.with_suffix('.tlt').name} beside it and none in its "
                               "header. Give --tlt with one angle per image [deg].")
        tilts, source = header, f"{stack} (extended header)"
    if len(tilts) != n_images:
        raise SubtomoError(f"{source}: {len(tilts)} tilt angles for {n_images} images in {stack}. Give one angle per "
                           "image, in stack order.")
    return np.asarray(tilts, np.float64), source


def _check(params: ReconstructParams, project: Path):
    stack = resolve_project_path(project, params.i)
    (n_images, ny, nx), px = read_mrc_header(stack)
    if n_images < 2:
        raise SubtomoError(f"{stack}: {n_images} image(s); a tilt series needs at least two. Give the aligned stack.")
    if nx // params.bin < 8 or ny // params.bin < 1:
        raise SubtomoError(f"--bin {params.bin}: the {nx}x{ny} images would be binned to under 8 pixels. Use a smaller --bin.")
    tilts, source = _tilts(params, project, stack, n_images)
    return stack, tilts, source, px


def _run(ctx: JobContext) -> None:
    import mrcfile

    from subtomo.io.mrc import open_mrc_mmap
    from subtomo.tomo.reconstruct import reconstruct_stack

    p: ReconstructParams = ctx.params
    stack, tilts, source, px = ctx.state
    ctx.add_input(stack)
    with open_mrc_mmap(stack) as m:
        n, ny, nx = m.data.shape
        ny_out, nx_out = ny // p.bin, nx // p.bin
        nz = p.thickness or max(2, 2 * round(nx_out / 8))
        ctx.log(f"{stack.name}: {n} images {nx}x{ny} px at {px:.3f} A, tilts {tilts.min():.1f} to {tilts.max():.1f} deg "
                f"({source}); tomogram {nx_out}x{ny_out}x{nz} px at {px * p.bin:.3f} A on {ctx.device}")
        out = ctx.path(f"{stack.stem}.mrc")
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        try:
            with mrcfile.new_mmap(tmp, shape=(nz, ny_out, nx_out), mrc_mode=2, overwrite=True) as o:
                mean, std = reconstruct_stack(m.data, tilts, nz, o.data, p.bin, ctx.device, p.rows_per_block, p.sirt_like)
                if p.normalise and std > 0:
                    for z0 in range(0, nz, 16):
                        o.data[z0:z0 + 16] = ((o.data[z0:z0 + 16] - mean) / std).astype(np.float32)
                o.voxel_size = px * p.bin
                o.update_header_stats()
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                tmp.unlink()
    ctx.log(f"wrote {ctx.rel(out)}")
    ctx.add_declared_outputs()


SPEC = JobSpec(
    command="reconstruct", job_type="Reconstruct", params=ReconstructParams, run=_run, check=_check,
    summary="A tomogram from an aligned tilt stack and its angles by weighted back-projection (binning, thickness).",
    inputs=(INPUT,),
    outputs=(OutputSpec("*.mrc", NodeType.TOMOGRAM, "the tomogram (mean 0, std 1), named after the stack"),),
)
