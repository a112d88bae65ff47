"""The demo's scorecard: every stage of a finished simulated project against its ground truth.

:func:`evaluate_project` reads the jobs the demo ran (their STAR files, maps and job.json
resource records) and ``GroundTruth/``, and returns the figures of the summary table
(particles kept, CTF error, selection and classification accuracy, resolutions, FSC against
the true map, time and memory per stage) plus the pictures made for the report;
:func:`write_report` turns them into ``report.html``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from subtomo.fourier import resolution_at_threshold, soft_sphere_mask
from subtomo.geometry.euler import euler_to_matrix
from subtomo.geometry.symmetry import symmetry_matrices
from subtomo.io.mrc import read_mrc
from subtomo.io.particles import read_particles
from subtomo.io.star import read_star, read_star_table
from subtomo.plot.html import Figure, Section, Table, write_html_report
from subtomo.simulate import scoring

LOW_TILT_DEG = 30.0  # CTF errors are reported separately up to and beyond this tilt


@dataclass
class StageUsage:
    command: str
    job: str
    wall_s: float
    peak_rss_MB: float | None


@dataclass
class DemoResult:
    """What the demo measured: ``figures`` (name -> value, units in the name) and pictures."""

    figures: dict[str, float | int | str] = field(default_factory=dict)
    stages: list[StageUsage] = field(default_factory=list)
    pictures: dict[str, Path] = field(default_factory=dict)


def stage_usage(project: Path, command: str, job: str) -> StageUsage:
    """Wall time and peak memory of a finished job, from its job.json."""
    record = json.loads((project / job / "job.json").read_text())
    res = record.get("resources", {})
    return StageUsage(command, job, float(res.get("wall_s", float("nan"))), res.get("peak_rss_MB"))


def _ctf_figures(project: Path, ctf_job: str, out: Path, result: DemoResult) -> None:
    from subtomo.plot.ctf import plot_defocus_vs_truth

    tables = {}
    for f in sorted((project / ctf_job).glob("*_ctffind.star")):
        tables[f.name[: -len("_ctffind.star")]] = read_star_table(f)
    err = scoring.ctf_errors(tables, read_star_table(project / "GroundTruth" / "tilts.star"))
    if err.empty:
        return
    low = err["tilt_deg"].abs() <= LOW_TILT_DEG
    estimated = low & (err["source"] == "fit")
    result.figures["ctf.median_abs_error_low_tilt_A"] = float(err.loc[estimated, "error_A"].abs().median())
    result.figures["ctf.median_abs_error_all_used_A"] = float(err["error_A"].abs().median())
    result.figures["ctf.flagged_images"] = int(err["flagged"].sum())
    result.figures["ctf.images"] = len(err)
    result.pictures["ctf_truth"] = plot_defocus_vs_truth(err, out / "ctf_vs_truth.png")


def _selection_figures(project: Path, extract_job: str, select_job: str, picks: pd.DataFrame, result: DemoResult) -> None:
    candidates, _ = read_particles(project / extract_job / "particles_subtomo.star")
    kept, _ = read_particles(project / select_job / "output_2Dto3D.star")
    score = scoring.selection_scores(kept, candidates, picks)
    result.figures.update({"particles.picked": len(candidates), "particles.true_among_picked": score.true_particles,
                           "particles.kept_by_2d_selection": score.kept,
                           "select2d.precision": score.precision, "select2d.recall": score.recall})


def _fsc_050_A(curve: np.ndarray, box: int, px: float) -> float:
    return resolution_at_threshold(torch.as_tensor(curve), box, px, 0.5)


def _refine_figures(project: Path, refine_job: str, symmetry: str, diameter_A: float, result: DemoResult) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """Pose errors, FSC(refined map, truth), FSC(oracle map, truth); returns the curves and the aligned truth."""
    from subtomo.simulate.scoring import oracle_poses

    job = project / refine_job
    df, _ = read_particles(job / "run_data.star")
    truth_np, px = read_mrc(project / "GroundTruth" / "class001.mrc")
    truth = torch.from_numpy(truth_np.astype(np.float32))
    refined = torch.from_numpy(read_mrc(job / "run_class001.mrc")[0].astype(np.float32))
    box = truth.shape[-1]
    true_rot, _ = oracle_poses(df, "GroundTruth/picks.star", project, px)
    est = euler_to_matrix(df["rlnAngleRot"].to_numpy(), df["rlnAngleTilt"].to_numpy(), df["rlnAnglePsi"].to_numpy())
    g_mat, err = scoring.global_rotation(est, true_rot, symmetry_matrices(symmetry))
    mask = soft_sphere_mask((box,) * 3, diameter_A / 2 / px, 3.0)
    aligned = scoring.truth_in_map_frame(truth, refined, g_mat, mask)
    curves = {"refined map vs truth": aligned.fsc}
    result.figures.update({"refine3d.median_angular_error_deg": float(np.median(err)),
                           "refine3d.fraction_within_10deg": float((err < 10).mean()),
                           "refine3d.hand": aligned.hand,
                           "refine3d.fsc_truth_0.5_A": _fsc_050_A(aligned.fsc, box, px)})
    oracle_path = job / "oracle_class001.mrc"
    if oracle_path.exists():
        from subtomo.fourier import fsc_maps

        oracle_map = torch.from_numpy(read_mrc(oracle_path)[0].astype(np.float32))
        curves["oracle map vs truth"] = fsc_maps(oracle_map * mask, truth * mask).numpy()
        result.figures["oracle.fsc_truth_0.5_A"] = _fsc_050_A(curves["oracle map vs truth"], box, px)
    orc = job / "oracle.star"
    if orc.exists():
        table = read_star(orc)["oracle"]
        result.figures["refine3d.gold_standard_A"] = float(table["subtomoRefinedResolution"])
        result.figures["oracle.gold_standard_A"] = float(table["rlnFinalResolution"])
    return curves, aligned.volume


def _post_figures(project: Path, post_job: str, truth_curves: dict[str, np.ndarray], aligned_truth: torch.Tensor | None,
                  out: Path, result: DemoResult) -> None:
    from subtomo.plot.maps import plot_class_slices
    from subtomo.plot.post import plot_fsc

    blocks = read_star(project / post_job / "postprocess.star")
    final = float(blocks["general"]["rlnFinalResolution"])
    result.figures["postprocess.final_resolution_A"] = final
    fsc = blocks["fsc"]
    s_A = fsc["rlnResolution"].to_numpy(float)
    curves = {"half maps, unmasked": fsc["rlnFourierShellCorrelationUnmaskedMaps"].to_numpy(float),
              "half maps, masked": fsc["rlnFourierShellCorrelationMaskedMaps"].to_numpy(float),
              "corrected (gold standard)": fsc["rlnFourierShellCorrelationCorrected"].to_numpy(float)}
    curves.update({name: np.asarray(c)[: len(s_A)] for name, c in truth_curves.items()})
    n = min(len(c) for c in curves.values())
    result.pictures["fsc"] = plot_fsc(out / "fsc_with_truth.png", s_A[:n], {k: c[:n] for k, c in curves.items()},
                                      final, 0.143, other_thresholds=(0.5,))
    if aligned_truth is not None:
        sharpened = read_mrc(project / post_job / "postprocess_masked.mrc")[0]
        result.pictures["maps"] = plot_class_slices([sharpened, aligned_truth.numpy()], out / "map_vs_truth.png",
                                                    ["final map (sharpened, masked)", "true map (aligned to it)"])


def _class3d_figures(project: Path, class3d_job: str, picks: pd.DataFrame, result: DemoResult) -> None:
    data = sorted((project / class3d_job).glob("run_it*_data.star"))
    if not data:
        return
    particles, _ = read_particles(data[-1])
    accuracy, _ = scoring.classification_accuracy(particles, picks)
    result.figures["class3d.accuracy"] = accuracy


def evaluate_project(project: Path, jobs: dict[str, str], out: Path) -> DemoResult:
    """Score the jobs ``{command: job name}`` of a simulated project; pictures go to ``out``."""
    result = DemoResult()
    truth = json.loads((project / "GroundTruth" / "simulation.json").read_text())
    picks = scoring.load_picks(project)
    result.figures["pixel_size_A"] = float(truth["pixel_size_A"])
    result.figures["nyquist_A"] = 2 * float(truth["pixel_size_A"])
    if "ctf" in jobs:
        _ctf_figures(project, jobs["ctf"], out, result)
    if "select" in jobs:
        _selection_figures(project, jobs["extract"], jobs["select"], picks, result)
    curves: dict[str, np.ndarray] = {}
    aligned = None
    if "refine3d" in jobs:
        curves, aligned = _refine_figures(project, jobs["refine3d"], truth["structure"].get("symmetry") or "C1",
                                 float(truth["structure"]["diameter_A"]) * 1.1, result)
    if "class3d" in jobs:
        _class3d_figures(project, jobs["class3d"], picks, result)
    if "postprocess" in jobs:
        _post_figures(project, jobs["postprocess"], curves, aligned, out, result)
    result.stages = [stage_usage(project, command, job) for command, job in jobs.items()]
    return result


SUMMARY_ROWS = [  # (figure key, label, format)
    ("particles.picked", "subtomograms extracted (all picks)", "{:d}"),
    ("particles.true_among_picked", "  of which real particles (truth)", "{:d}"),
    ("particles.kept_by_2d_selection", "kept by 2D classification + selection", "{:d}"),
    ("select2d.precision", "  selection precision (real / kept)", "{:.1%}"),
    ("select2d.recall", "  selection recall (kept / real)", "{:.1%}"),
    ("ctf.median_abs_error_low_tilt_A", f"CTF: median |defocus error|, fitted tilts <= {LOW_TILT_DEG:g}° [Å]", "{:.0f}"),
    ("ctf.median_abs_error_all_used_A", "CTF: median |defocus error|, all tilts as used [Å]", "{:.0f}"),
    ("ctf.flagged_images", "CTF: images flagged as failed fits", "{:d}"),
    ("refine3d.gold_standard_A", "refine3d from random orientations, gold-standard FSC 0.143 [Å]", "{:.1f}"),
    ("oracle.gold_standard_A", "oracle (true poses), gold-standard FSC 0.143 [Å]", "{:.1f}"),
    ("refine3d.over_oracle", "  refined / oracle", "{:.3f}"),
    ("postprocess.final_resolution_A", "final resolution after postprocessing (corrected FSC 0.143) [Å]", "{:.1f}"),
    ("refine3d.fsc_truth_0.5_A", "FSC(refined map, true map) = 0.5 [Å]", "{:.1f}"),
    ("oracle.fsc_truth_0.5_A", "FSC(oracle map, true map) = 0.5 [Å]", "{:.1f}"),
    ("refine3d.median_angular_error_deg", "median angular error of the refined poses [°]", "{:.2f}"),
    ("class3d.accuracy", "3D classification accuracy (real particles, best label match)", "{:.1%}"),
    ("nyquist_A", "Nyquist [Å]", "{:.1f}"),
    ("stages_wall_s", "time for all stages [s]", "{:.0f}"),
]


def summary_rows(result: DemoResult) -> list[tuple[str, str]]:
    """(label, formatted value) for each figure present, in SUMMARY_ROWS order."""
    f = dict(result.figures)
    if "refine3d.gold_standard_A" in f and "oracle.gold_standard_A" in f:
        f["refine3d.over_oracle"] = f["refine3d.gold_standard_A"] / f["oracle.gold_standard_A"]
    rows = []
    for key, label, fmt in SUMMARY_ROWS:
        if key in f and f[key] is not None and not (isinstance(f[key], float) and np.isnan(f[key])):
            value = int(f[key]) if fmt == "{:d}" else f[key]
            rows.append((label, fmt.format(value)))
    return rows


def stage_rows(result: DemoResult) -> list[tuple[str, str, str, str]]:
    return [(s.command, s.job, f"{s.wall_s:.1f}", "-" if s.peak_rss_MB is None else f"{s.peak_rss_MB:.0f}")
            for s in result.stages]


def write_report(path: Path, project: Path, jobs: dict[str, str], result: DemoResult, title: str, lead: str) -> Path:
    """``report.html``: summary, CTF, 2D classes, FSC, maps, local resolution, time and memory."""
    def first(job: str | None, pattern: str) -> Path | None:
        found = sorted((project / job).glob(pattern)) if job else []
        return found[-1] if found else None

    ctf_summaries = sorted((project / jobs["ctf"]).glob("Diagnostics/*summary*.png")) if "ctf" in jobs else []
    sections = [
        Section("Summary", "Each figure is measured against the simulator's ground truth (GroundTruth/).",
                tables=[Table(["figure", "value"], summary_rows(result))]),
        Section("CTF estimation (Steps 8-11)", "Per-tilt defocus fits of each tilt series, and the estimates against the truth.",
                figures=[Figure(p, f"CTF per tilt: {p.stem.replace('_summary', '')}", 520) for p in ctf_summaries]
                + [Figure(result.pictures.get("ctf_truth"), "estimated vs true defocus", 520)]),
        Section("2D classification and selection (Steps 15-17)", "Class averages of the z-projections, largest first; "
                "the classes kept by the selection rule are framed in green.",
                figures=[Figure(first(jobs.get("select"), "selected_classes.png"), "2D classes, selected in green")]),
        Section("3D classification (Steps 19-21)",
                figures=[Figure(first(jobs.get("class3d"), "run_it*_classes.png"), "3D classes: central slices")]),
        Section("Resolution (Step 23)", "Gold-standard FSC of the half maps (unmasked, masked, corrected) and FSC of the "
                "refined and oracle maps against the true map (0.5 threshold), both within a sphere of the particle diameter.",
                figures=[Figure(result.pictures.get("fsc"), "FSC curves", 640),
                         Figure(first(jobs.get("postprocess"), "postprocess_guinier.png"), "Guinier plot", 480),
                         Figure(first(jobs.get("postprocess"), "postprocess_directional_fsc.png"), "directional FSC (missing wedge)", 480)]),
        Section("Final map and the truth", "Central slices (XY, XZ, YZ) of the sharpened final map and of the true map "
                "rotated and shifted into the refined frame.",
                figures=[Figure(result.pictures.get("maps"), "final map vs true map", 560)]),
        Section("Local resolution (Step 24)",
                figures=[Figure(first(jobs.get("localres"), "localres_slices.png"), "local resolution, central slices", 560),
                         Figure(first(jobs.get("localres"), "localres_hist.png"), "local resolution histogram", 420)]),
        Section("Time and memory per stage", "Wall time and peak resident memory of each job (job.json).",
                tables=[Table(["stage", "job", "wall time [s]", "peak memory [MB]"], stage_rows(result))]),
    ]
    return write_html_report(path, title, lead, sections)
