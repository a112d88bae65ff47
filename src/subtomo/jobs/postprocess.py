"""``subtomo postprocess`` (protocol Step 23): mask-corrected FSC, resolution, sharpening, EMDB XML.

Follows ``relion_postprocess`` (reference notes section 4). Inputs: one unfiltered half map
(the other is found by swapping half1/half2 in its name) and a mask, or an automask made
from the average of the halves. The automask threshold defaults to a fraction of the
(low-passed) average's maximum above its median, because RELION's 0.02 only means
something on RELION's own grey scale; the value used is printed and stored. Maps not better
than --autob-lowres (10 Å) are not sharpened automatically (subtomo.post.sharpen says why);
the B-factor used, its source and the reason are in the log and in postprocess.star.
Outputs: postprocess.mrc (sharpened, low-passed), postprocess_masked.mrc,
postprocess_automask.mrc (when automasked), postprocess.star (general, fsc, guinier +
directional blocks), postprocess_fsc.xml (EMDB), and PNGs of the curves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from subtomo.errors import SubtomoError
from subtomo.io.mrc import read_mrc, write_mrc
from subtomo.io.mtf import read_mtf
from subtomo.io.particles import resolve_project_path
from subtomo.io.star import write_star
from subtomo.jobs._inputs import load_mask
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec
from subtomo.jobs.contracts import InputSpec, NodeType, OutputSpec, Source
from subtomo.post import masks as M
from subtomo.post.emdb import write_fsc_xml
from subtomo.post.fsc import DirectionalFsc, FscResult, directional_fsc, masked_corrected_fsc, resolution_from_curve
from subtomo.post.halfmaps import HalfMapPair, half_map_pair
from subtomo.post.masks import HalfMapAutomask
from subtomo.post.sharpen import SharpenResult, sharpen
from subtomo.post.tables import postprocess_blocks

MASK_REMEDY = "Adjust the automask parameters (--mask-threshold, --mask-extend, --mask-lowpass) or make a mask with subtomo mask and pass it with --mask."


INPUT_HALF_MAP = InputSpec("i", NodeType.DENSITY_MAP, (Source("Refine3D", ("run_half1_class001_unfil.mrc",)),),
                           "Run subtomo refine3d first, or pass --i <half1 map>.")


class PostProcessParams(ComputeParams):
    i: str | None = Field(None, description="Unfiltered half map 1 (name containing 'half1'; half2 is found by swapping the name) (default: the latest Refine3D job's run_half1_class001_unfil.mrc).")
    angpix: float | None = Field(None, gt=0, description="Pixel size of the half maps [Å] (default: from the MRC header).")
    mask: str | None = Field(None, description="Solvent mask (values 0..1, same box as the maps); without it an automask is made from the average of the half maps.")
    mask_threshold: float | None = Field(None, description="Automask: binarisation threshold on the (low-passed) average map [map grey values] (default: median + --mask-threshold-fraction × (max − median)).")
    mask_threshold_fraction: float = Field(M.DEFAULT_THRESHOLD_FRACTION, gt=0, lt=1, description="Automask: default threshold as a fraction of the map's maximum above its median [fraction].")
    mask_lowpass: float | None = Field(None, ge=0, description="Automask: low-pass the average before thresholding [Å] (default: the unmasked-FSC resolution; 0: none).")
    mask_extend: float = Field(3.0, description="Automask: extend the binary mask by this many pixels (negative erodes) [px].")
    mask_soft_edge: float = Field(6.0, ge=0, description="Automask: width of the raised-cosine soft edge [px].")
    randomize_at_fsc: float = Field(0.8, gt=0, lt=1, description="Randomise phases beyond the first shell where the unmasked FSC drops below this value [FSC].")
    fsc_threshold: float = Field(0.143, gt=0, lt=1, description="FSC threshold for the resolution [FSC].")
    force_mask: bool = Field(False, description="Use the mask-corrected FSC even when the unmasked FSC reaches further.")
    mtf: str | None = Field(None, description="Detector MTF curve (RELION STAR: rlnResolutionInversePixel, rlnMtfValue); without it no MTF correction.")
    mtf_angpix: float | None = Field(None, gt=0, description="Pixel size of the detector the MTF refers to (unbinned tilt-series pixel) [Å] (default: the map pixel size).")
    adhoc_bfac: float | None = Field(None, description="User B-factor for sharpening (negative sharpens) [Å²] (default: automatic Rosenthal-Henderson fit, only for maps better than --autob-lowres).")
    autob_lowres: float = Field(10.0, gt=0, description="Low-resolution limit of the automatic B-factor fit [Å]; maps not better than this are not sharpened automatically (the fit would measure shape, not blur).")
    autob_highres: float | None = Field(None, gt=0, description="High-resolution limit of the automatic B-factor fit [Å] (default: the final resolution).")
    skip_fsc_weighting: bool = Field(False, description="Do not multiply by sqrt(2 FSC/(1+FSC)); the low-pass filter alone limits the map.")
    low_pass: float | None = Field(None, ge=0, description="Low-pass filter of the sharpened map [Å] (default: the final resolution; 0: none).")
    directional: bool = Field(True, description="Also compute FSCs in cones around z and x-y directions (missing-wedge anisotropy).")
    cone_angle: float = Field(25.0, gt=0, le=60, description="Half-angle of the directional-FSC cones [deg].")


@dataclass
class _State:
    pair: HalfMapPair
    mask: torch.Tensor | None  # a given mask (checked), None: automask
    mask_path: Path | None
    mtf: tuple[np.ndarray, np.ndarray] | None
    mtf_path: Path | None


def _check(params: PostProcessParams, project: Path) -> _State:
    if params.autob_highres and params.autob_highres >= params.autob_lowres:
        raise SubtomoError(f"--autob-highres {params.autob_highres:g} Å must be finer (smaller) than --autob-lowres "
                           f"{params.autob_lowres:g} Å: the B-factor is fitted between the two.")
    half1 = SPEC.input("i").resolve(project, params.i)
    assert half1 is not None  # a required input
    pair = half_map_pair(half1, params.angpix)  # its partner, box and pixel size
    px = pair.pixel_size_A
    mask = mask_path = None
    if params.mask:  # refuse an unusable mask before the job directory exists
        mask_path = resolve_project_path(project, params.mask)
        mask = load_mask(params.mask, project, pair.shape, "--mask")
        M.check_mask(mask, f"--mask {params.mask}", MASK_REMEDY)
    mtf = mtf_path = None
    if params.mtf:
        mtf_path = resolve_project_path(project, params.mtf)
        if not mtf_path.exists():
            raise SubtomoError(f"--mtf {params.mtf}: file not found.")
        mtf = read_mtf(mtf_path)
    for name in ("autob_lowres", "autob_highres", "low_pass", "mask_lowpass"):
        v = getattr(params, name)
        if name == "autob_lowres" and name not in params.model_fields_set:
            continue  # the 10 Å default beyond Nyquist (coarse maps): such maps are never auto-sharpened
        if v and v < 2 * px:
            raise SubtomoError(f"--{name.replace('_', '-')} {v} Å is beyond Nyquist ({2 * px:.2f} Å at {px} Å/px).")
    return _State(pair, mask, mask_path, mtf, mtf_path)


def _tensor(path: Path, device) -> torch.Tensor:
    return torch.from_numpy(read_mrc(path)[0]).to(device)


def _mask(ctx: JobContext, h1: torch.Tensor, h2: torch.Tensor, px: float) -> tuple[torch.Tensor, HalfMapAutomask | None]:
    """The given mask, or an automask of the average of the halves (logged)."""
    p: PostProcessParams = ctx.params
    st: _State = ctx.state
    if st.mask is not None and st.mask_path is not None:
        ctx.add_input(st.mask_path)
        return st.mask.to(ctx.device), None
    auto = M.automask_from_halves(h1, h2, px, p.mask_threshold, p.mask_extend, p.mask_soft_edge, p.mask_lowpass,
                                  p.mask_threshold_fraction, p.fsc_threshold, MASK_REMEDY)
    lp = auto.lowpass_A
    how = "given" if p.mask_threshold is not None else f"default: median + {p.mask_threshold_fraction:g} x (max - median)"
    ctx.log(f"automask: average of the halves{f' low-passed to {lp:.1f} A' if lp else ''}, threshold {auto.threshold:.4g} "
            f"({how}; noise sigma of the average {auto.noise_sigma:.3g}), extend {p.mask_extend:g} px, soft edge "
            f"{p.mask_soft_edge:g} px")
    for w in auto.warnings:
        ctx.warn(w)
    return auto.mask, auto


def _fsc(ctx: JobContext, h1: torch.Tensor, h2: torch.Tensor, mask: torch.Tensor, px: float
         ) -> tuple[FscResult, DirectionalFsc | None]:
    """Corrected FSC (and directional FSCs), logged."""
    p: PostProcessParams = ctx.params
    box = h1.shape[-1]
    res, transforms = masked_corrected_fsc(h1, h2, mask, px, p.randomize_at_fsc, p.fsc_threshold, p.seed, p.force_mask)
    for w in res.warnings:
        ctx.warn(w)
    res_unmasked = resolution_from_curve(res.unmasked, box, px, p.fsc_threshold)[0]
    res_masked = resolution_from_curve(res.masked, box, px, p.fsc_threshold)[0]
    ctx.log(f"FSC {p.fsc_threshold}: unmasked {res_unmasked:.2f} A, masked {res_masked:.2f} A; phases randomised "
            f"from shell {res.randomize_from} ({box * px / res.randomize_from:.2f} A)")
    ctx.log(f"FINAL RESOLUTION: {res.resolution_A:.2f} A (corrected FSC at {p.fsc_threshold})")
    if not p.directional:
        return res, None
    dfsc = directional_fsc(transforms, box, px, p.cone_angle, p.fsc_threshold, res.randomize_from)
    lo, hi = dfsc.spread_A()
    ctx.log("directional FSC (cones of +-%g deg): %s; spread %.1f-%.1f A" % (
        p.cone_angle, ", ".join(f"{n} {r:.1f} A" for n, r in zip(dfsc.names, dfsc.resolutions_A)), lo, hi))
    return res, dfsc


def _sharpen(ctx: JobContext, average: torch.Tensor, res: FscResult, px: float) -> SharpenResult:
    """MTF, FSC weighting, B-factor (user, fitted or none, with the reason) and low-pass, logged."""
    p: PostProcessParams = ctx.params
    st: _State = ctx.state
    sh = sharpen(average, res.final, res.resolution_A, px, st.mtf, p.mtf_angpix, p.adhoc_bfac, p.autob_lowres,
                 p.autob_highres, p.skip_fsc_weighting, p.low_pass)
    for w in sh.warnings:
        ctx.warn(w)
    if sh.fit is not None:
        ctx.log(f"Guinier fit {sh.fit.lowres_A:.1f}-{sh.fit.highres_A:.1f} A ({sh.fit.n_points} shells): slope "
                f"{sh.fit.slope:.2f}, intercept {sh.fit.intercept:.2f}, correlation {sh.fit.correlation:.3f}")
    if sh.bfactor_source == "none" and not sh.warnings:
        ctx.log(sh.bfactor_reason)
    ctx.log(f"B-factor used for sharpening: {sh.bfactor_A2:.1f} A^2 ({sh.bfactor_source})"
            + (f"; low-pass {sh.lowpass_A:.2f} A" if sh.lowpass_A else "; no low-pass")
            + (f"; MTF {ctx.rel(st.mtf_path)}" if st.mtf_path else "; no MTF correction"))
    return sh


def _draw(ctx: JobContext, blocks: dict, res: FscResult, sh: SharpenResult, dfsc: DirectionalFsc | None,
          mask: torch.Tensor) -> None:
    """The PNGs: FSC curves, Guinier plot, directional FSC, central slices with the mask contour."""
    # imported here to keep `subtomo --help` fast (matplotlib)
    from subtomo.plot.post import plot_central_slices, plot_directional, plot_fsc, plot_guinier

    p: PostProcessParams = ctx.params
    fsc, s_A = blocks["fsc"], res.spatial_frequency_A()
    curves = {"corrected": fsc["rlnFourierShellCorrelationCorrected"].to_numpy(),
              "unmasked": fsc["rlnFourierShellCorrelationUnmaskedMaps"].to_numpy(),
              "masked": fsc["rlnFourierShellCorrelationMaskedMaps"].to_numpy(),
              "phase-randomised masked": fsc["rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"].to_numpy()}
    plot_fsc(ctx.path("postprocess_fsc.png"), s_A, curves, res.resolution_A, p.fsc_threshold)
    g = sh.guinier
    fit_range = (sh.fit.lowres_A, sh.fit.highres_A) if sh.fit is not None else None
    plot_guinier(ctx.path("postprocess_guinier.png"), sh.guinier_x,
                 {"original": g["original"], "MTF-corrected": g["mtf_corrected"], "weighted": g["weighted"],
                  "sharpened": g["sharpened"], "intercept": g["intercept"]}, fit_range, sh.bfactor_A2)
    if dfsc is not None:
        plot_directional(ctx.path("postprocess_directional_fsc.png"), s_A, dfsc.names,
                         dfsc.curves.cpu().double().numpy(), dfsc.resolutions_A, dfsc.half_angle_deg, p.fsc_threshold)
    plot_central_slices(ctx.path("postprocess_slices.png"), sh.map.cpu().numpy(), "sharpened map, mask contour",
                        overlay=mask.cpu().numpy())


def _run(ctx: JobContext) -> None:
    st: _State = ctx.state
    px = st.pair.pixel_size_A
    h1, h2 = _tensor(st.pair.half1, ctx.device), _tensor(st.pair.half2, ctx.device)
    ctx.add_input(st.pair.half1)
    ctx.log(f"half maps {ctx.rel(st.pair.half1)}, {ctx.rel(st.pair.half2)}: {st.pair.box}^3 at {px:.3f} A/px "
            f"(Nyquist {2 * px:.2f} A)")
    mask, auto = _mask(ctx, h1, h2, px)
    stats = M.mask_stats(mask)
    ctx.log(f"mask: {100 * stats.fraction:.1f}% of the box, {stats.n_ones} voxels at 1, {stats.n_soft} in the soft edge")
    if stats.touches_box_edge:
        ctx.warn("the mask reaches the box edge; FSC correction is most reliable with a mask well inside the box.")
    res, dfsc = _fsc(ctx, h1, h2, mask, px)
    sh = _sharpen(ctx, (h1 + h2) / 2, res, px)

    out_map = write_mrc(ctx.path("postprocess.mrc"), sh.map.cpu().numpy(), px)
    out_masked = write_mrc(ctx.path("postprocess_masked.mrc"), (sh.map * mask).cpu().numpy(), px)
    ctx.add_output(out_map, "DensityMap")
    ctx.add_output(out_masked, "DensityMap")
    if auto is not None:
        mask_path = write_mrc(ctx.path("postprocess_automask.mrc"), mask.cpu().numpy(), px)
        ctx.add_output(mask_path, "Mask")
    else:
        mask_path = st.mask_path
    names = {"rlnUnfilteredMapHalf1": ctx.rel(st.pair.half1), "rlnUnfilteredMapHalf2": ctx.rel(st.pair.half2),
             "rlnMaskName": ctx.rel(mask_path)}
    blocks = postprocess_blocks(res, sh, dfsc, stats.fraction, names, auto.threshold if auto is not None else None)
    star = write_star(ctx.path("postprocess.star"), blocks)
    ctx.add_output(star, "ProcessData.star.relion.postprocess")
    xml = write_fsc_xml(ctx.path("postprocess_fsc.xml"), res.spatial_frequency_A(), res.final.cpu().double().numpy())
    ctx.add_output(xml, "File")
    _draw(ctx, blocks, res, sh, dfsc, mask)
    ctx.log(f"wrote {ctx.rel(out_map)}, {ctx.rel(star)}, {ctx.rel(xml)} and PNGs")


SPEC = JobSpec(
    command="postprocess", job_type="PostProcess", params=PostProcessParams, run=_run, check=_check,
    summary="Step 23: mask-corrected gold-standard FSC and resolution, MTF correction, B-factor sharpening, EMDB FSC XML.",
    inputs=(
        INPUT_HALF_MAP,
        InputSpec("mask", NodeType.MASK, (Source("MaskCreate", ("mask.mrc",)),), required=False),
        InputSpec("mtf", NodeType.FILE, required=False),
    ),
    outputs=(
        OutputSpec("postprocess.mrc", NodeType.DENSITY_MAP, "sharpened, FSC-weighted, low-passed map"),
        OutputSpec("postprocess_masked.mrc", NodeType.DENSITY_MAP, "the same, masked"),
        OutputSpec("postprocess_automask.mrc", NodeType.MASK, "the automatic mask (without --mask)", optional=True),
        OutputSpec("postprocess.star", NodeType.POSTPROCESS, "FSC curves, resolution, B-factor, Guinier plot"),
        OutputSpec("postprocess_fsc.xml", NodeType.FILE, "FSC for EMDB deposition"),
        OutputSpec("postprocess_*.png", NodeType.IMAGE, "FSC, Guinier, directional FSC, slices", optional=True),
    ),
)
