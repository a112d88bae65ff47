"""What ``subtomo ctf`` says of each tilt series: its figures, failed fits with their remedies, rerun commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from subtomo.jobs.context import JobContext


_RERUN_OPTIONS = ("box", "res_min", "res_max", "defocus_min", "defocus_max", "defocus_step", "astigmatism",
                  "min_significance", "max_defocus_deviation", "trend_tolerance")


def rerun_command(ctx: "JobContext", inp: Path, name: str, image: int) -> str:
    """The command that re-estimates one image of this job with its options (``--update`` copies the rest)."""
    p = ctx.params
    opts = [f"--i {ctx.rel(inp)}", f"--update {ctx.name}", f"--tomo {name}", f"--image {image}"]
    opts += [f"--{key.replace('_', '-')} {getattr(p, key):g}" for key in _RERUN_OPTIONS]
    opts += ["--no-tilt-gradient"] * (not p.tilt_gradient) + ["--use-trials"] * p.use_trials
    opts += [f"--defocus-handedness {p.defocus_handedness:+d}"] * (p.defocus_handedness != -1)
    if p.lower_tilt_defoci is not None:
        opts.append(f"--lower-tilt-defoci {p.lower_tilt_defoci:g}")
    return "subtomo ctf " + " ".join(opts)


def report_series(ctx: "JobContext", row: pd.Series, table: pd.DataFrame, source: str, out_star: Path) -> None:
    """Log the series' figures and warn about failed fits, with the remedies."""
    p = ctx.params
    name = str(row["rlnTomoName"])
    failed = table.index[table.get("subtomoCtfFitFailed", pd.Series(0, index=table.index)).astype(int) == 1]
    if len(failed) and source != "copied":
        lst = ", ".join(f"{i + 1} ({table['rlnTomoNominalStageTiltAngle'].iloc[i]:.1f} deg)" for i in failed)
        has_trials = bool(int(row.get("subtomoHasTrials", 0) or 0))
        ctx.warn(f"{name}: CTF fit failed or off the series' trend for image(s) {lst} (Fig. 2e); unless the CTF is "
                 "unknown they get the series' defocus trend. Remedies: "
                 + ("--use-trials (a .trial stack exists); " if has_trials and not p.use_trials else "")
                 + "--lower-tilt-defoci 30 (use the mean lower-tilt defocus); re-run single images with other "
                 f"options (relion_subtomo_commands.txt); edit {ctx.rel(out_star)} by hand; or remove the "
                 "images from the tilt series and regenerate the tomogram (Table 1, row 10).")
    if source in ("fit", "trials"):
        ok = table["subtomoCtfFitFailed"].astype(int) == 0
        dmean = (table["rlnDefocusU"] + table["rlnDefocusV"]) / 2
        ctx.log(f"{name}: {len(table)} images, defocus {dmean.min():.0f}-{dmean.max():.0f} A, median fit "
                f"resolution {table['rlnCtfMaxResolution'][ok].median() if ok.any() else float('nan'):.1f} A, "
                f"{int((~ok).sum())} failed or flagged, {int((table['subtomoCtfSource'] == 'trend').sum())} replaced by "
                "the trend")
    if p.plots and "rlnDefocusU" in table.columns:
        from subtomo.plot.ctf import plot_series_summary  # plotting imported on use: keeps `subtomo --help` fast

        plot_series_summary(table, name, ctx.path(f"Diagnostics/{name}_summary.png"))
