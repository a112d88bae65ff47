"""``subtomo postprocess`` (protocol Step 23): mask-corrected FSC, resolution, sharpening, EMDB XML.

Follows ``relion_postprocess`` (reference notes section 4). Inputs: one unfiltered half map
(the other is found by swapping half1/half2 in its name) and a mask, or an automask made
from the average of the halves. The automask threshold defaults to a fraction of the
(low-passed) average's maximum above its median, because RELION's 0.02 only means
something on RELION's own grey scale; the value used is printed and stored.
Outputs: postprocess.mrc (sharpened, low-passed), postprocess_masked.mrc,
postprocess_automask.mrc (when automasked), postprocess.star (general, fsc, guinier +
directional blocks), postprocess_fsc.xml (EMDB), and PNGs of the curves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from subtomo.errors import SubtomoError
from subtomo.fourier import fsc_maps, lowpass
from subtomo.io.mrc import read_mrc, read_mrc_header, write_mrc
from subtomo.io.star import write_star
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec, default_input
from subtomo.post import masks as M
from subtomo.post.emdb import write_fsc_xml
from subtomo.post.fsc import directional_fsc, masked_corrected_fsc, resolution_from_curve
from subtomo.post.sharpen import read_mtf, sharpen

MASK_REMEDY = "Adjust the automask parameters (--mask-threshold, --mask-extend, --mask-lowpass) or make a mask with subtomo mask and pass it with --mask."


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
    adhoc_bfac: float | None = Field(None, description="User B-factor for sharpening (negative sharpens) [Å²] (default: automatic Rosenthal-Henderson fit).")
    autob_lowres: float = Field(10.0, gt=0, description="Low-resolution limit of the automatic B-factor fit [Å].")
    autob_highres: float | None = Field(None, gt=0, description="High-resolution limit of the automatic B-factor fit [Å] (default: the final resolution).")
    skip_fsc_weighting: bool = Field(False, description="Do not multiply by sqrt(2 FSC/(1+FSC)); the low-pass filter alone limits the map.")
    low_pass: float | None = Field(None, ge=0, description="Low-pass filter of the sharpened map [Å] (default: the final resolution; 0: none).")
    directional: bool = Field(True, description="Also compute FSCs in cones around z and x-y directions (missing-wedge anisotropy).")
    cone_angle: float = Field(25.0, gt=0, le=60, description="Half-angle of the directional-FSC cones [deg].")


def other_half(path: Path) -> tuple[Path, Path]:
    """(half1, half2) from either half's path: swaps the last 'half1'/'half2' in the file name."""
    name = path.name
    if "half1" in name:
        i = name.rfind("half1")
        other = path.with_name(name[:i] + "half2" + name[i + 5:])
        pair = (path, other)
    elif "half2" in name:
        i = name.rfind("half2")
        other = path.with_name(name[:i] + "half1" + name[i + 5:])
        pair = (other, path)
    else:
        raise SubtomoError(f"--i {path}: the file name contains neither 'half1' nor 'half2', so the other half map "
                           "cannot be found. Give the unfiltered half map 1 (e.g. run_half1_class001_unfil.mrc).")
    if not other.exists():
        raise SubtomoError(f"half map {other} not found (the partner of {path}). Both {pair[0].name} and "
                           f"{pair[1].name} must be in {path.parent}.")
    return pair


def load_half_maps(project: Path, given: str | None, angpix: float | None) -> tuple[Path, Path, float]:
    """Find and validate both half maps; returns (half1, half2, pixel size)."""
    p = default_input(project, given, ("Refine3D",), "run_half1_class001_unfil.mrc", "--i",
                      "Run subtomo refine3d first, or pass --i <half1 map>.")
    h1, h2 = other_half(p)
    (s1, px1), (s2, px2) = read_mrc_header(h1), read_mrc_header(h2)
    if s1 != s2:
        raise SubtomoError(f"half maps differ in size: {h1} is {s1}, {h2} is {s2}. Give the two halves of one refinement.")
    if len(set(s1)) != 1 or s1[0] % 2:
        raise SubtomoError(f"{h1}: map is {s1}; postprocessing needs a cubic map with an even box.")
    px = angpix or px1
    if not px or px <= 0:
        raise SubtomoError(f"{h1}: no pixel size in the header. Pass --angpix.")
    if angpix is None and abs(px1 - px2) > 1e-3:
        raise SubtomoError(f"half maps have different pixel sizes ({px1} and {px2} Å). Pass --angpix.")
    return h1, h2, float(px)


def load_mask(project: Path, given: str, shape: tuple[int, int, int]) -> Path:
    mp = Path(given) if Path(given).is_absolute() else project / given
    if not mp.exists():
        raise SubtomoError(f"--mask {given}: file not found.")
    ms, _ = read_mrc_header(mp)
    if tuple(ms) != tuple(shape):
        raise SubtomoError(f"--mask {given}: size {ms} differs from the maps' {shape}. Make the mask on the map's box "
                           "(subtomo mask --i <map>).")
    return mp


@dataclass
class _State:
    half1: Path
    half2: Path
    pixel_size_A: float
    mask: Path | None
    mtf: tuple[np.ndarray, np.ndarray] | None
    mtf_path: Path | None


def _check(params: PostProcessParams, project: Path) -> _State:
    h1, h2, px = load_half_maps(project, params.i, params.angpix)
    shape, _ = read_mrc_header(h1)
    mask = load_mask(project, params.mask, shape) if params.mask else None
    if mask is not None:  # refuse an unusable mask before the job directory exists
        M.check_mask(torch.from_numpy(read_mrc(mask)[0]), f"--mask {params.mask}", MASK_REMEDY)
    mtf = mtf_path = None
    if params.mtf:
        mtf_path = Path(params.mtf) if Path(params.mtf).is_absolute() else project / params.mtf
        if not mtf_path.exists():
            raise SubtomoError(f"--mtf {params.mtf}: file not found.")
        mtf = read_mtf(mtf_path)
    for name in ("autob_lowres", "autob_highres", "low_pass", "mask_lowpass"):
        v = getattr(params, name)
        if name == "autob_lowres" and name not in params.model_fields_set:
            continue  # the 10 Å default beyond Nyquist (coarse maps): sharpen() falls back to 1.5x the resolution
        if v and v < 2 * px:
            raise SubtomoError(f"--{name.replace('_', '-')} {v} Å is beyond Nyquist ({2 * px:.2f} Å at {px} Å/px).")
    return _State(h1, h2, px, mask, mtf, mtf_path)


def _tensor(path: Path, device) -> torch.Tensor:
    return torch.from_numpy(read_mrc(path)[0]).to(device)


def make_automask(ctx: JobContext, h1: torch.Tensor, h2: torch.Tensor, px: float) -> tuple[torch.Tensor, float, float | None]:
    """Automask of the average of the halves; returns (mask, threshold, low-pass used)."""
    p: PostProcessParams = ctx.params
    box = h1.shape[-1]
    avg = (h1 + h2) / 2
    lp = p.mask_lowpass
    if lp is None:
        res_u, _ = resolution_from_curve(fsc_maps(h1, h2), box, px, p.fsc_threshold)
        lp = res_u if res_u > 2.5 * px else 0.0
    mask, thr = M.automask(avg, px, p.mask_threshold, p.mask_extend, p.mask_soft_edge, lp or None,
                           p.mask_threshold_fraction)
    noise = (h1 - h2) / 2
    if lp:
        noise = lowpass(noise, lp, px)
    sigma = float(noise.std())
    how = "given" if p.mask_threshold is not None else f"default: median + {p.mask_threshold_fraction:g} x (max - median)"
    ctx.log(f"automask: average of the halves{f' low-passed to {lp:.1f} A' if lp else ''}, threshold {thr:.4g} ({how}; "
            f"noise sigma of the average {sigma:.3g}), extend {p.mask_extend:g} px, soft edge {p.mask_soft_edge:g} px")
    M.check_mask(mask, "automask", MASK_REMEDY)
    if sigma > 0 and thr < 3 * sigma:
        ctx.warn(f"automask threshold {thr:.3g} is below 3x the noise sigma ({sigma:.3g}): the mask may contain noise "
                 "islands in the solvent. Raise --mask-threshold or --mask-lowpass, or check postprocess_automask.mrc.")
    return mask, thr, lp or None


def _run(ctx: JobContext) -> None:
    from subtomo.plot.post import plot_central_slices, plot_directional, plot_fsc, plot_guinier

    p: PostProcessParams = ctx.params
    st: _State = ctx.state
    px = st.pixel_size_A
    h1, h2 = _tensor(st.half1, ctx.device), _tensor(st.half2, ctx.device)
    box = h1.shape[-1]
    ctx.add_input(st.half1)
    ctx.log(f"half maps {ctx.rel(st.half1)}, {ctx.rel(st.half2)}: {box}^3 at {px:.3f} A/px (Nyquist {2 * px:.2f} A)")
    automasked = st.mask is None
    thr = lp_mask = None
    if automasked:
        mask, thr, lp_mask = make_automask(ctx, h1, h2, px)
    else:
        ctx.add_input(st.mask)
        mask = _tensor(st.mask, ctx.device)
        M.check_mask(mask, f"--mask {p.mask}", MASK_REMEDY)
    stats = M.mask_stats(mask)
    ctx.log(f"mask: {100 * stats.fraction:.1f}% of the box, {stats.n_ones} voxels at 1, {stats.n_soft} in the soft edge")
    if stats.touches_box_edge:
        ctx.warn("the mask reaches the box edge; FSC correction is most reliable with a mask well inside the box.")

    res, transforms = masked_corrected_fsc(h1, h2, mask, px, p.randomize_at_fsc, p.fsc_threshold, p.seed, p.force_mask)
    for w in res.warnings:
        ctx.warn(w)
    rand_A = box * px / res.randomize_from
    res_unmasked = resolution_from_curve(res.unmasked, box, px, p.fsc_threshold)[0]
    res_masked = resolution_from_curve(res.masked, box, px, p.fsc_threshold)[0]
    ctx.log(f"FSC {p.fsc_threshold}: unmasked {res_unmasked:.2f} A, masked {res_masked:.2f} A; phases randomised "
            f"from shell {res.randomize_from} ({rand_A:.2f} A)")
    ctx.log(f"FINAL RESOLUTION: {res.resolution_A:.2f} A (corrected FSC at {p.fsc_threshold})")

    dfsc = None
    if p.directional:
        dfsc = directional_fsc(transforms, box, px, p.cone_angle, p.fsc_threshold, res.randomize_from)
        lo, hi = dfsc.spread_A()
        ctx.log("directional FSC (cones of +-%g deg): %s; spread %.1f-%.1f A" % (
            p.cone_angle, ", ".join(f"{n} {r:.1f} A" for n, r in zip(dfsc.names, dfsc.resolutions_A)), lo, hi))
    del transforms

    average = (h1 + h2) / 2
    sh = sharpen(average, res.final, res.resolution_A, px, st.mtf, p.mtf_angpix, p.adhoc_bfac, p.autob_lowres,
                 p.autob_highres, p.skip_fsc_weighting, p.low_pass)
    for w in sh.warnings:
        ctx.warn(w)
    if sh.fit is not None:
        ctx.log(f"Guinier fit {sh.fit.lowres_A:.1f}-{sh.fit.highres_A:.1f} A ({sh.fit.n_points} shells): slope "
                f"{sh.fit.slope:.2f}, intercept {sh.fit.intercept:.2f}, correlation {sh.fit.correlation:.3f}")
    ctx.log(f"B-factor used for sharpening: {sh.bfactor_A2:.1f} A^2"
            + (" (user)" if p.adhoc_bfac is not None else "")
            + (f"; low-pass {sh.lowpass_A:.2f} A" if sh.lowpass_A else "; no low-pass")
            + (f"; MTF {ctx.rel(st.mtf_path)}" if st.mtf_path else "; no MTF correction"))

    # ---- everything computed; write outputs ----
    sharp = sh.map
    out_map = write_mrc(ctx.path("postprocess.mrc"), sharp.cpu().numpy(), px)
    out_masked = write_mrc(ctx.path("postprocess_masked.mrc"), (sharp * mask).cpu().numpy(), px)
    ctx.add_output(out_map, "DensityMap")
    ctx.add_output(out_masked, "DensityMap")
    if automasked:
        mpath = write_mrc(ctx.path("postprocess_automask.mrc"), mask.cpu().numpy(), px)
        ctx.add_output(mpath, "Mask")
    else:
        mpath = st.mask

    s_A = res.spatial_frequency_A()
    n = len(s_A)
    ang = np.where(s_A > 0, 1 / np.where(s_A > 0, s_A, 1), 999.0)
    general = {
        "rlnFinalResolution": res.resolution_A,
        "rlnBfactorUsedForSharpening": sh.bfactor_A2,
        "rlnUnfilteredMapHalf1": ctx.rel(st.half1),
        "rlnUnfilteredMapHalf2": ctx.rel(st.half2),
        "rlnMaskName": ctx.rel(mpath),
        "rlnRandomiseFrom": rand_A,
        "rlnParticleBoxFractionSolventMask": stats.fraction,
    }
    if sh.fit is not None:
        general.update(rlnFittedSlopeGuinierPlot=sh.fit.slope, rlnFittedInterceptGuinierPlot=sh.fit.intercept,
                       rlnCorrelationFitGuinierPlot=sh.fit.correlation)
    if thr is not None:
        general["subtomoAutomaskThreshold"] = thr
    # cisTEM-style "part FSC" of the unmasked curve: solvent dilution L = V_box / V_particle with the
    # particle volume estimated as 0.476 x the mask volume (approximation, see the report).
    frac = max(stats.fraction * 0.476, 1e-6)
    L = 1.0 / frac
    fu = res.unmasked.cpu().double().numpy()
    part = L * fu / (1 + (L - 1) * fu)
    fsc_table = pd.DataFrame({
        "rlnSpectralIndex": np.arange(n),
        "rlnResolution": s_A,
        "rlnAngstromResolution": ang,
        "rlnFourierShellCorrelationCorrected": res.final.cpu().double().numpy(),
        "rlnFourierShellCorrelationParticleMaskFraction": part,
        "rlnFourierShellCorrelationUnmaskedMaps": fu,
        "rlnFourierShellCorrelationMaskedMaps": res.masked.cpu().double().numpy(),
        "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps": res.randomized_masked.cpu().double().numpy(),
    })
    g = sh.guinier
    guinier_table = pd.DataFrame({
        "rlnResolutionSquared": sh.guinier_x,
        "rlnLogAmplitudesOriginal": g["original"],
        "rlnLogAmplitudesMTFCorrected": g["mtf_corrected"],
        "rlnLogAmplitudesWeighted": g["weighted"],
        "rlnLogAmplitudesSharpened": g["sharpened"],
        "rlnLogAmplitudesIntercept": g["intercept"],
    })
    blocks: dict = {"general": general, "fsc": fsc_table, "guinier": guinier_table}
    if dfsc is not None:
        blocks["directional_resolution"] = pd.DataFrame({
            "subtomoConeName": dfsc.names,
            "subtomoConeAxisX": dfsc.axes_xyz[:, 0], "subtomoConeAxisY": dfsc.axes_xyz[:, 1],
            "subtomoConeAxisZ": dfsc.axes_xyz[:, 2],
            "subtomoConeHalfAngle": [dfsc.half_angle_deg] * len(dfsc.names),
            "subtomoConeResolution": dfsc.resolutions_A,
        })
        d = {"rlnSpectralIndex": np.arange(n), "rlnResolution": s_A, "rlnAngstromResolution": ang}
        for name, c in zip(dfsc.names, dfsc.curves.cpu().double().numpy()):
            d[f"subtomoFscCone_{name}"] = c
        blocks["directional_fsc"] = pd.DataFrame(d)
    star = write_star(ctx.path("postprocess.star"), blocks)
    ctx.add_output(star, "ProcessData.star.relion.postprocess")
    xml = write_fsc_xml(ctx.path("postprocess_fsc.xml"), s_A, res.final.cpu().double().numpy())
    ctx.add_output(xml, "File")

    curves = {"corrected": fsc_table["rlnFourierShellCorrelationCorrected"].to_numpy(),
              "unmasked": fu, "masked": fsc_table["rlnFourierShellCorrelationMaskedMaps"].to_numpy(),
              "phase-randomised masked": fsc_table["rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"].to_numpy()}
    plot_fsc(ctx.path("postprocess_fsc.png"), s_A, curves, res.resolution_A, p.fsc_threshold)
    fit_range = (sh.fit.lowres_A, sh.fit.highres_A) if sh.fit is not None else None
    plot_guinier(ctx.path("postprocess_guinier.png"), sh.guinier_x,
                 {"original": g["original"], "MTF-corrected": g["mtf_corrected"], "weighted": g["weighted"],
                  "sharpened": g["sharpened"], "intercept": g["intercept"]}, fit_range, sh.bfactor_A2)
    if dfsc is not None:
        plot_directional(ctx.path("postprocess_directional_fsc.png"), s_A, dfsc.names,
                         dfsc.curves.cpu().double().numpy(), dfsc.resolutions_A, dfsc.half_angle_deg, p.fsc_threshold)
    plot_central_slices(ctx.path("postprocess_slices.png"), sharp.cpu().numpy(), "sharpened map, mask contour",
                        overlay=mask.cpu().numpy())
    ctx.log(f"wrote {ctx.rel(out_map)}, {ctx.rel(star)}, {ctx.rel(xml)} and PNGs")


SPEC = JobSpec(
    command="postprocess", job_type="PostProcess", params=PostProcessParams, run=_run, check=_check,
    summary="Step 23: mask-corrected gold-standard FSC and resolution, MTF correction, B-factor sharpening, EMDB FSC XML.",
)
