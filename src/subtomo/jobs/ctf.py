"""``subtomo ctf`` (protocol Steps 8, 10, 11): defocus of every tilt image.

Writes ``CtfFind/jobNNN/<t>_ctffind.star`` per tomogram (one row per image of the
aligned stack, in stack order), ``ctf_tomograms.star`` (the input tomogram rows plus
``subtomoCtfResultsStar``, ``subtomoSkipCtf``, ``subtomoCtfReplacedByTrend`` (images given the
series' defocus trend, :mod:`subtomo.ctf.trend`) and ``subtomoCtfUnknown``; later stages default to it), a
diagnostic PNG per image (``Diagnostics/<t>/<t>_NNN.png``) and per series
(``Diagnostics/<t>_summary.png``), and ``relion_subtomo_commands.txt`` with a command
per image that re-estimates just that image with other options (``--update`` copies
everything else from this job).

Manual override (Step 10): ``<t>_ctffind.star`` may be edited by hand (e.g. a defocus
found with another program); later stages read it as it is.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from pydantic import Field

from subtomo.ctf.estimate import CtfSearchParams
from subtomo.ctf.importers import find_result_file, imported_fit
from subtomo.ctf.series import (
    TOMOGRAM_COLUMNS,
    Progress,
    SeriesEstimate,
    TiltSeries,
    apply_lower_tilt_defoci,
    estimate_series,
    handedness_report,
    previous_results,
    read_tilt_series,
    results_table,
    series_columns,
    series_ctf_unknown,
    skip_ctf_table,
)
from subtomo.em.parallel import TaskRunner, map_tasks
from subtomo.errors import SubtomoError
from subtomo.io.particles import path_component
from subtomo.io.relion import upgrade_legacy_labels
from subtomo.io.star import read_star_table, write_star
from subtomo.jobs._cluster import check_cluster, open_runner
from subtomo.jobs._ctf_report import report_series, rerun_command
from subtomo.jobs.base import ComputeParams, JobContext, JobSpec
from subtomo.jobs.contracts import InputSpec, NodeType, OutputSpec, Source

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
    defocus_handedness: int = Field(-1, description="Hand of that gradient, -1 or +1 (docs/conventions.md): -1 (default) the right side (x > 0) is more underfocused at positive tilt; the log reports which hand fits the highest tilts better (both scores).")
    use_trials: bool = Field(False, description="Estimate on Tomograms/<t>/<t>.trial (2 images per tilt) and use their mean (Step 11).")
    lower_tilt_defoci: float | None = Field(None, gt=0, lt=90, description="Tilts with |tilt| above this get the mean defocus of those below it (Step 11) [deg].")
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
    trend_tolerance: float = Field(3.0, ge=0, description="Fits farther from the series' defocus trend (tilt, acquisition order) than this many expected precisions (sigma0 / cos tilt) are flagged; flagged and failed fits get the trend (0: flag none).")
    cc_threshold: float = Field(0.5, gt=0, lt=1, description="Windowed correlation defining the fit resolution.")


def _check(p: CtfParams, project: Path) -> dict:
    problems = []
    if p.import_ctffind and p.import_imod:
        problems.append("--import-ctffind and --import-imod: give one of them.")
    if p.defocus_handedness not in (-1, 1):
        problems.append(f"--defocus-handedness {p.defocus_handedness}: must be -1 or +1.")
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
    check_cluster(p, project)
    inp = SPEC.input("i").resolve(project, p.i)
    tomos = upgrade_legacy_labels(read_star_table(inp))  # files of older versions
    for col in TOMOGRAM_COLUMNS:
        if col not in tomos.columns:
            raise SubtomoError(f"{inp}: column {col} missing; this is not an all_tomograms.star from subtomo import. Re-run subtomo import.")
    names = [path_component(n, "rlnTomoName", inp) for n in tomos["rlnTomoName"]]  # outputs are named after them
    if p.tomo:
        if unknown := [t for t in p.tomo if t not in names]:
            raise SubtomoError(f"--tomo {','.join(unknown)}: not in {inp} (tomograms: {', '.join(names)}).")
    previous = previous_results(project, p.update, RESULTS_NODE) if p.update else {}
    if missing := [n for n in names if p.update and n not in previous and not (p.tomo and n in p.tomo)]:
        raise SubtomoError(f"--update {p.update}: has no results for {', '.join(missing)}; give them with --tomo.")
    if p.image and p.tomo and p.tomo[0] not in previous:
        raise SubtomoError(f"--update {p.update}: has no results for {p.tomo[0]} to update single images in.")
    return {"input": inp, "tomograms": tomos, "previous": previous}


def _search_params(p: CtfParams) -> CtfSearchParams:
    return CtfSearchParams(box_px=p.box, res_min_A=p.res_min, res_max_A=p.res_max, defocus_min_A=p.defocus_min,
                           defocus_max_A=p.defocus_max, defocus_step_A=p.defocus_step, astigmatism_A=p.astigmatism,
                           tilt_gradient=p.tilt_gradient, cc_threshold=p.cc_threshold,
                           min_significance=p.min_significance)


def _fit_item(ctx: JobContext, row: pd.Series) -> tuple[TiltSeries, list[int], pd.DataFrame | None, Path | None]:
    """What the fit of one selected series needs: the series, its 0-based images to fit, the table they update."""
    p: CtfParams = ctx.params
    series = read_tilt_series(ctx.project, row, source=ctx.state["input"])
    prev = ctx.state["previous"].get(series.name)
    previous = read_star_table(prev) if p.image and prev else None
    return series, [i - 1 for i in p.image] if p.image else list(range(len(series))), previous, prev


def fit_series_task(item: tuple[TiltSeries, list[int], pd.DataFrame | None, Path | None], p: CtfParams,
                    device: str, progress: Progress | None = None) -> tuple[SeriesEstimate, tuple[str, bool] | None]:
    """The fit of one tilt series and, for a whole series, its handedness report (a task of ``--cluster``)."""
    series, sel, previous, prev_path = item
    est = estimate_series(series, _search_params(p), sel, previous, prev_path, p.max_defocus_deviation,
                          p.trend_tolerance, p.use_trials, device, p.batch, p.plots, progress, p.defocus_handedness)
    return est, None if p.image else handedness_report(series, _search_params(p), p.defocus_handedness, device)


def _tomogram_table(ctx: JobContext, row: pd.Series, fitted: tuple | None) -> tuple[pd.DataFrame, str]:
    """Result table of one selected tomogram (fitted here or given ``fitted`` by a task, imported or skipped)."""
    p: CtfParams = ctx.params
    series = read_tilt_series(ctx.project, row, source=ctx.state["input"])
    name, n = series.name, len(series)
    if p.skip_ctf:
        ctx.log(f"{name}: --skip-ctf, defocus 0 for all {n} images")
        return skip_ctf_table(series.image_names, series.tilts_deg, series.pre_exposure), "skip"
    if p.import_ctffind or p.import_imod:
        kind, spec = ("ctffind", p.import_ctffind) if p.import_ctffind else ("imod", p.import_imod)
        src = find_result_file(spec, name, ctx.project, (".txt",) if kind == "ctffind" else (".defocus",))
        ctx.add_input(src)
        fit, source, warnings = imported_fit(src, kind, n)
        for warning in warnings:
            ctx.warn(warning)
        ctx.log(f"{name}: imported {n} defoci from {ctx.rel(src)}")
        return results_table(series.image_names, series.tilts_deg, series.pre_exposure, fit, source), source
    est, hand = fitted or fit_series_task(_fit_item(ctx, row), p, str(ctx.device), ctx.progress)
    if hand:
        (ctx.warn if hand[1] else ctx.log)(f"{name}: {hand[0]}")
    for note in est.notes:
        ctx.log(f"{name}: {note}")
    for warning in est.warnings:
        ctx.warn(f"{name}: {warning}.")
    if p.plots and est.diagnostic_fit.diagnostics:
        from subtomo.plot.ctf import plot_image_fits  # plotting imported on use: keeps `subtomo --help` fast

        plot_image_fits(est.diagnostic_fit.diagnostics, est.labels, name, series.tilts_deg, ctx.path(f"Diagnostics/{name}"))
    return est.table, est.source


def _run(ctx: JobContext) -> None:
    with open_runner(ctx) as runner:  # --cluster: one task per tilt series to fit (None: each fitted in turn)
        _run_on(ctx, runner)


def _run_on(ctx: JobContext, runner: TaskRunner | None) -> None:
    p: CtfParams = ctx.params
    state = ctx.state
    inp, tomos = state["input"], state["tomograms"]
    ctx.add_input(inp)
    selected = set(p.tomo) if p.tomo else None
    rows = [row for _, row in tomos.iterrows()]
    fits: dict[str, tuple] = {}
    if runner is not None and not (p.skip_ctf or p.import_ctffind or p.import_imod):
        items = [_fit_item(ctx, r) for r in rows if selected is None or str(r["rlnTomoName"]) in selected]
        done = map_tasks(runner, fit_series_task, items, (p, ctx.device.type), lambda it: ctx.progress(it, None, "CTF fits"))
        fits = {item[0].name: res for item, res in zip(items, done)}
    out_rows, commands = [], []
    for row in rows:
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
            table, source = _tomogram_table(ctx, row, fits.pop(name, None))
        if p.lower_tilt_defoci is not None and not p.skip_ctf and "subtomoCtfFitFailed" in table.columns:
            if series_ctf_unknown(table):
                ctx.warn(f"{name}: CTF unknown (no successful fit with |tilt| <= 30 deg): --lower-tilt-defoci not applied.")
            else:
                table, n_rep, _ = apply_lower_tilt_defoci(table, p.lower_tilt_defoci, name)
                ctx.log(f"{name}: {n_rep} images with |tilt| > {p.lower_tilt_defoci:g} deg get the mean lower-tilt defocus")
        write_star(out_star, {name: table})
        report_series(ctx, row, table, source, out_star)
        commands.extend(rerun_command(ctx, inp, name, i + 1) for i in range(len(table)))
        out_rows.append({**row.to_dict(), "subtomoCtfResultsStar": ctx.rel(out_star), **series_columns(table)})
    if not out_rows:
        raise SubtomoError("no tomogram selected; check --tomo.")
    (ctx.path("relion_subtomo_commands.txt")).write_text("\n".join(commands) + "\n")
    ctx.add_output(out := write_star(ctx.path(RESULTS_NODE), pd.DataFrame(out_rows)), "TomogramGroupMetadata")
    for r in out_rows:
        ctx.add_output(ctx.path(f"{r['rlnTomoName']}_ctffind.star"), "CtfFindResults")
    ctx.log(f"wrote {ctx.rel(out)}: {len(out_rows)} tomograms"
            + "".join(f"; {r['rlnTomoName']}: {r['subtomoCtfReplacedByTrend']} replaced by the trend"
                      + (", CTF UNKNOWN" if r["subtomoCtfUnknown"] else "") for r in out_rows))


SPEC = JobSpec(
    command="ctf", job_type="CtfFind", params=CtfParams, run=_run, check=_check,
    summary="Steps 8, 10, 11: defocus and astigmatism of every tilt image (or import CTFFIND/IMOD results), "
            "with trials, lower-tilt defoci and diagnostics.",
    inputs=(InputSpec("i", NodeType.TOMOGRAM_SET, (Source("Import", ("all_tomograms.star",)),),
                      "Run subtomo import first, or pass --i."),),
    outputs=(
        OutputSpec("ctf_tomograms.star", NodeType.TOMOGRAM_SET, "all_tomograms.star with each series' CTF table"),
        OutputSpec("*_ctffind.star", NodeType.CTF_RESULTS, "per-tilt defocus, astigmatism and fit quality", optional=True),
        OutputSpec("Diagnostics/*_summary.png", NodeType.IMAGE, "defocus against tilt per series", optional=True),
        OutputSpec("relion_subtomo_commands.txt", NodeType.FILE, "the equivalent RELION commands"),
    ),
)
