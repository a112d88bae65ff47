"""``subtomo ctf`` (protocol Steps 8, 10, 11): defocus of every tilt image.

Writes ``CtfFind/jobNNN/<t>_ctffind.star`` per tomogram (one row per image of the
aligned stack, in stack order), ``ctf_tomograms.star`` (the input tomogram rows plus
``rlnCtfFindResultsStar`` and ``subtomoSkipCtf``; later stages default to it), a
diagnostic PNG per image (``Diagnostics/<t>/<t>_NNN.png``) and per series
(``Diagnostics/<t>_summary.png``), and ``relion_subtomo_commands.txt`` with a command
per image that re-estimates just that image with other options (``--update`` copies
everything else from this job).

Manual override (Step 10): ``<t>_ctffind.star`` may be edited by hand (e.g. a defocus
found with another program); later stages read it as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from subtomo.ctf.estimate import CtfFit, CtfSearchParams, Optics, effective_band
from subtomo.ctf.importers import ctffind_to_table, find_result_file, read_ctffind4, read_imod_defocus
from subtomo.ctf.series import (RESULT_COLUMNS, apply_lower_tilt_defoci, estimate_stack, estimate_trials,
                                flag_inconsistent_defoci, results_table, skip_ctf_table)
from subtomo.errors import SubtomoError
from subtomo.io.mrc import read_mrc_header
from subtomo.io.star import read_star_table, write_star
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec, default_input

RESULTS_NODE = "ctf_tomograms.star"


class CtfParams(ComputeParams):
    i: str | None = Field(None, description="Input all_tomograms.star (default: the latest Import job's).")
    box: int = Field(256, ge=32, description="Tile box of the power spectra [px] (reduced for small images).")
    res_min: float = Field(30.0, gt=0, description="Lowest resolution used in the fit [Å] (CTFFIND default; lower resolutions are dominated by the specimen, not Thon rings).")
    res_max: float = Field(8.0, gt=0, description="Highest resolution used in the fit [Å] (kept inside Nyquist).")
    defocus_min: float = Field(5000.0, gt=0, description="Lowest defocus searched [Å] (underfocus positive).")
    defocus_max: float = Field(50000.0, gt=0, description="Highest defocus searched [Å].")
    defocus_step: float = Field(500.0, gt=0, description="Step of the exhaustive defocus search [Å].")
    astigmatism: float = Field(1000.0, ge=0, description="Expected astigmatism |DefocusU - DefocusV| [Å]; fits up to 2x this; 0: none.")
    tilt_gradient: bool = Field(True, description="Model the defocus gradient across tilted images (x tan(tilt)); defocus is reported at the image centre.")
    use_trials: bool = Field(False, description="Estimate on Tomograms/<t>/<t>.trial (2 images per tilt) and use their mean (Step 11).")
    lower_tilt_defoci: float | None = Field(None, gt=0, description="Tilts with |tilt| above this get the mean defocus of those below it (Step 11) [deg].")
    skip_ctf: bool = Field(False, description="No CTF correction (phase plate, low target resolution; Table 1): defocus 0, wedge/dose weighting only.")
    import_ctffind: str | None = Field(None, description="Use CTFFIND4 results instead of fitting: a directory, a pattern with {name}, or a file.")
    import_imod: str | None = Field(None, description="Use IMOD ctfplotter .defocus files: a directory, a pattern with {name}, or a file.")
    tomo: list[str] | None = Field(None, description="Only these tomograms (names); with --update the others are copied.")
    image: list[int] | None = Field(None, description="Only these images of the one --tomo (1-based, stack order); needs --update.")
    update: str | None = Field(None, description="A previous CtfFind job directory whose results are copied for everything not re-estimated.")
    plots: bool = Field(True, description="Write the diagnostic PNGs.")
    batch: int = Field(8, ge=1, description="Images fitted together (memory vs speed).")
    min_significance: float = Field(6.0, ge=0, description="Fits whose Thon-ring amplitude t statistic is below this are flagged as failed.")
    max_defocus_deviation: float = Field(10000.0, ge=0, description="Fits whose defocus is farther than this from the median of the neighbouring tilts are flagged as failed (0: no check) [Å].")
    cc_threshold: float = Field(0.5, gt=0, lt=1, description="Windowed correlation defining the fit resolution.")


def _check(p: CtfParams, project: Path) -> dict:
    problems = []
    if p.import_ctffind and p.import_imod:
        problems.append("--import-ctffind and --import-imod: give one of them.")
    if p.skip_ctf and (p.import_ctffind or p.import_imod or p.use_trials):
        problems.append("--skip-ctf writes defocus 0; it cannot be combined with --use-trials or --import-*.")
    if p.use_trials and (p.import_ctffind or p.import_imod):
        problems.append("--use-trials fits the trial images; it cannot be combined with --import-*.")
    if p.defocus_min >= p.defocus_max:
        problems.append(f"--defocus-min {p.defocus_min:g} must be below --defocus-max {p.defocus_max:g}.")
    if p.res_max >= p.res_min:
        problems.append(f"--res-max {p.res_max:g} A must be finer (smaller) than --res-min {p.res_min:g} A.")
    if p.image:
        if not p.update:
            problems.append("--image needs --update <previous CtfFind job> to copy the other images' results.")
        if not p.tomo or len(p.tomo) != 1:
            problems.append("--image needs exactly one --tomo (the image numbers refer to its stack).")
        if any(i < 1 for i in p.image):
            problems.append("--image numbers start at 1.")
        if p.import_ctffind or p.import_imod or p.skip_ctf:
            problems.append("--image re-fits single images; it cannot be combined with --import-* or --skip-ctf.")
    if problems:
        raise SubtomoError("invalid options for subtomo ctf", problems)
    inp = default_input(project, p.i, ("Import",), "all_tomograms.star", "--i", "Run subtomo import first, or pass --i.")
    tomos = read_star_table(inp)
    for col in ("rlnTomoName", "rlnTomoTiltSeriesName", "rlnTomoTiltSeriesStarFile", "rlnTomoTiltSeriesPixelSize",
                "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        if col not in tomos.columns:
            raise SubtomoError(f"{inp}: column {col} missing; this is not an all_tomograms.star from subtomo import. Re-run subtomo import.")
    names = [str(n) for n in tomos["rlnTomoName"]]
    if p.tomo:
        unknown = [t for t in p.tomo if t not in names]
        if unknown:
            raise SubtomoError(f"--tomo {','.join(unknown)}: not in {inp} (tomograms: {', '.join(names)}).")
    previous: dict[str, Path] = {}
    if p.update:
        upd = Path(p.update) if Path(p.update).is_absolute() else project / p.update
        node = upd / RESULTS_NODE
        if not node.exists():
            raise SubtomoError(f"--update {p.update}: {node} not found. Give a finished CtfFind job directory.")
        prev = read_star_table(node)
        for _, row in prev.iterrows():
            previous[str(row["rlnTomoName"])] = project / str(row["rlnCtfFindResultsStar"])
        missing = [n for n in names if n not in previous and not (p.tomo and n in p.tomo)]
        if missing:
            raise SubtomoError(f"--update {p.update}: has no results for {', '.join(missing)}; give them with --tomo.")
        if p.image and p.tomo[0] not in previous:
            raise SubtomoError(f"--update {p.update}: has no results for {p.tomo[0]} to update single images in.")
    return {"input": inp, "tomograms": tomos, "previous": previous}


def _search_params(p: CtfParams) -> CtfSearchParams:
    return CtfSearchParams(box_px=p.box, res_min_A=p.res_min, res_max_A=p.res_max, defocus_min_A=p.defocus_min,
                           defocus_max_A=p.defocus_max, defocus_step_A=p.defocus_step, astigmatism_A=p.astigmatism,
                           tilt_gradient=p.tilt_gradient, cc_threshold=p.cc_threshold,
                           min_significance=p.min_significance)


def _rerun_command(ctx: JobContext, p: CtfParams, inp: Path, name: str, image: int) -> str:
    opts = [f"--i {ctx.rel(inp)}", f"--update {ctx.name}", f"--tomo {name}", f"--image {image}",
            f"--box {p.box}", f"--res-min {p.res_min:g}", f"--res-max {p.res_max:g}",
            f"--defocus-min {p.defocus_min:g}", f"--defocus-max {p.defocus_max:g}",
            f"--defocus-step {p.defocus_step:g}", f"--astigmatism {p.astigmatism:g}",
            f"--min-significance {p.min_significance:g}", f"--max-defocus-deviation {p.max_defocus_deviation:g}"]
    if not p.tilt_gradient:
        opts.append("--no-tilt-gradient")
    if p.use_trials:
        opts.append("--use-trials")
    if p.lower_tilt_defoci is not None:
        opts.append(f"--lower-tilt-defoci {p.lower_tilt_defoci:g}")
    return "subtomo ctf " + " ".join(opts)


def _tomogram_table(ctx: JobContext, row: pd.Series, prev_path: Path | None) -> tuple[pd.DataFrame, str]:
    """Result table of one selected tomogram (fitted, imported or skipped)."""
    p: CtfParams = ctx.params
    name = str(row["rlnTomoName"])
    stack = ctx.project / str(row["rlnTomoTiltSeriesName"])
    tilts_tab = read_star_table(ctx.project / str(row["rlnTomoTiltSeriesStarFile"]))
    names = [str(v) for v in tilts_tab["rlnMicrographName"]]
    tilts = tilts_tab["rlnTomoNominalStageTiltAngle"].to_numpy(float)
    dose = tilts_tab["rlnMicrographPreExposure"].to_numpy(float)
    n = len(names)
    optics = Optics(float(row["rlnVoltage"]), float(row["rlnSphericalAberration"]),
                    float(row["rlnAmplitudeContrast"]), float(row["rlnTomoTiltSeriesPixelSize"]))
    if p.skip_ctf:
        ctx.log(f"{name}: --skip-ctf, defocus 0 for all {n} images")
        return skip_ctf_table(names, tilts, dose), "skip"
    if p.import_ctffind or p.import_imod:
        spec = p.import_ctffind or p.import_imod
        suffixes = (".txt",) if p.import_ctffind else (".defocus",)
        src = find_result_file(spec, name, ctx.project, suffixes)
        ctx.add_input(src)
        if p.import_ctffind:
            vals = ctffind_to_table(read_ctffind4(src), n, src)
            if np.any(np.abs(vals["phase_shift_rad"]) > 1e-3):
                ctx.warn(f"{src}: non-zero phase shifts are ignored (phase-plate data: consider --skip-ctf).")
            fom, res, source = vals["fom"], vals["max_res_A"], "ctffind"
        else:
            vals = read_imod_defocus(src, n)
            if not vals["covered"].all():
                miss = np.flatnonzero(~vals["covered"]) + 1
                ctx.warn(f"{src}: views {', '.join(map(str, miss))} are not covered; they take the nearest covered view's defocus.")
            fom, res, source = np.zeros(n), np.zeros(n), "imod"
        fit = CtfFit(vals["defocus_u_A"], vals["defocus_v_A"], vals["angle_deg"], fom, res, np.zeros(n, bool),
                     np.zeros(n), [""] * n)
        ctx.log(f"{name}: imported {n} defoci from {ctx.rel(src)}")
        return results_table(names, tilts, dose, fit, source), source
    # fit
    (nz, ny, nx), _ = read_mrc_header(stack)
    if nz != n:
        raise SubtomoError(f"{stack}: {nz} images but {ctx.project / str(row['rlnTomoTiltSeriesStarFile'])} lists {n}. Re-run subtomo import.")
    params = _search_params(p)
    band = effective_band((ny, nx), optics.pixel_size_A, params)
    for note in band.notes:
        ctx.log(f"{name}: {note}")
    sel = [i - 1 for i in p.image] if p.image else list(range(n))
    bad = [i + 1 for i in sel if i >= n]
    if bad:
        raise SubtomoError(f"--image {','.join(map(str, bad))}: {name} has {n} images.")
    if p.use_trials:
        trial = stack.with_suffix(".trial")
        if not trial.exists():
            raise SubtomoError(f"{trial}: not found; --use-trials needs a .trial stack (2 images per tilt) beside {stack.name}.")
        fit, raw = estimate_trials(trial, tilts, optics, params, sel, ctx.device, p.batch, ctx.progress)
        diag_fit, diag_labels = raw, [(i, k) for i in sel for k in (1, 2)]
        source = "trials"
    else:
        fit = estimate_stack(stack, tilts[sel], optics, params, sel, ctx.device, p.batch, diagnostics=p.plots,
                             progress=ctx.progress)
        diag_fit, diag_labels = fit, [(i, 0) for i in sel]
        source = "fit"
    new = results_table([names[i] for i in sel], tilts[sel], dose[sel], fit, source)
    if p.image:
        table = read_star_table(prev_path)
        if len(table) != n:
            raise SubtomoError(f"{prev_path}: {len(table)} rows but {name} has {n} images.")
        for col in RESULT_COLUMNS:
            if col not in table.columns:
                table[col] = 0 if col != "subtomoCtfSource" else "manual"
        table = table[RESULT_COLUMNS].copy()
        for col in RESULT_COLUMNS:
            table[col] = table[col].astype(new[col].dtype)
            table.loc[table.index[sel], col] = new[col].to_numpy()
    else:
        table = new
    # consistency along the series (before any --lower-tilt-defoci replacement, so that
    # outliers neither enter the lower-tilt mean nor hide behind it)
    table, messages = flag_inconsistent_defoci(table, p.max_defocus_deviation, sel)
    for msg in messages:
        ctx.warn(f"{name}: {msg}. Check its diagnostic plot; prepare replaces failed tilts by the mean of the "
                 "successful ones unless you fix the value (edit the STAR file or re-run the image).")
    if p.plots and diag_fit.diagnostics:
        from subtomo.plot.ctf import plot_image_fit

        for (i, k), d in zip(diag_labels, diag_fit.diagnostics):
            tag = f"{name}_{i + 1:03d}" + (f"_trial{k}" if k else "")
            title = (f"{name} image {i + 1} ({'trial ' + str(k) + ', ' if k else ''}tilt {tilts[i]:.1f}°)  "
                     f"res {d['fit_res_A']:.1f} Å, t = {d['significance']:.1f}")
            plot_image_fit(d, title, ctx.path(f"Diagnostics/{name}/{tag}.png"))
    return table, source


def _run(ctx: JobContext) -> None:
    p: CtfParams = ctx.params
    state = ctx.state
    inp: Path = state["input"]
    tomos: pd.DataFrame = state["tomograms"]
    ctx.add_input(inp)
    selected = set(p.tomo) if p.tomo else None
    out_rows = []
    commands = []
    for _, row in tomos.iterrows():
        name = str(row["rlnTomoName"])
        prev = state["previous"].get(name)
        out_star = ctx.path(f"{name}_ctffind.star")
        if selected is not None and name not in selected:
            if prev is None:
                continue
            table = read_star_table(prev)
            ctx.log(f"{name}: results copied from {ctx.rel(prev)}")
            source = "copied"
        else:
            table, source = _tomogram_table(ctx, row, prev)
        if p.lower_tilt_defoci is not None and not p.skip_ctf and "subtomoCtfFitFailed" in table.columns:
            table, n_rep, notes = apply_lower_tilt_defoci(table, p.lower_tilt_defoci, name)
            for note in notes:
                ctx.warn(f"{name}: {note}")
            ctx.log(f"{name}: {n_rep} images with |tilt| > {p.lower_tilt_defoci:g} deg get the mean lower-tilt defocus")
        write_star(out_star, {name: table})
        failed = table.index[table.get("subtomoCtfFitFailed", pd.Series(0, index=table.index)).astype(int) == 1]
        if len(failed) and source not in ("copied",):
            lst = ", ".join(f"{i + 1} ({table['rlnTomoNominalStageTiltAngle'].iloc[i]:.1f} deg)" for i in failed)
            has_trials = bool(int(row.get("rlnTomoHasTrials", 0) or 0))
            ctx.warn(f"{name}: CTF fit failed for image(s) {lst}: no reliable Thon rings (Fig. 2e). Remedies: "
                     + ("--use-trials (a .trial stack exists); " if has_trials and not p.use_trials else "")
                     + "--lower-tilt-defoci 30 (use the mean lower-tilt defocus); re-run single images with other "
                     f"options (relion_subtomo_commands.txt); edit {ctx.rel(out_star)} by hand; or remove the "
                     "images from the tilt series and regenerate the tomogram (Table 1, row 10).")
        if source in ("fit", "trials"):
            ok = table["subtomoCtfFitFailed"].astype(int) == 0
            dmean = (table["rlnDefocusU"] + table["rlnDefocusV"]) / 2
            ctx.log(f"{name}: {len(table)} images, defocus {dmean.min():.0f}-{dmean.max():.0f} A, median fit "
                    f"resolution {table['rlnCtfMaxResolution'][ok].median() if ok.any() else float('nan'):.1f} A, "
                    f"{int((~ok).sum())} failed")
        if p.plots and "rlnDefocusU" in table.columns:
            from subtomo.plot.ctf import plot_series_summary

            plot_series_summary(table, name, ctx.path(f"Diagnostics/{name}_summary.png"))
        for i in range(len(table)):
            commands.append(_rerun_command(ctx, p, inp, name, i + 1))
        r = row.to_dict()
        r["rlnCtfFindResultsStar"] = ctx.rel(out_star)
        r["subtomoSkipCtf"] = int("subtomoCtfSource" in table.columns and bool((table["subtomoCtfSource"] == "skip").all()))
        out_rows.append(r)
    if not out_rows:
        raise SubtomoError("no tomogram selected; check --tomo.")
    (ctx.path("relion_subtomo_commands.txt")).write_text("\n".join(commands) + "\n")
    out = write_star(ctx.path(RESULTS_NODE), pd.DataFrame(out_rows))
    ctx.add_output(out, "TomogramGroupMetadata")
    for r in out_rows:
        ctx.add_output(ctx.project / r["rlnCtfFindResultsStar"], "CtfFindResults")
    ctx.log(f"wrote {ctx.rel(out)}: {len(out_rows)} tomograms")


SPEC = JobSpec(
    command="ctf", job_type="CtfFind", params=CtfParams, run=_run, check=_check,
    summary="Steps 8, 10, 11: defocus and astigmatism of every tilt image (or import CTFFIND/IMOD results), "
            "with trials, lower-tilt defoci and diagnostics.",
)
