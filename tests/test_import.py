"""`subtomo import`: a good layout is imported; each broken layout fails with its message and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from subtomo.errors import SubtomoError
from subtomo.io.mrc import write_mrc
from subtomo.io.star import read_star, read_star_table
from subtomo.jobs.base import execute
from subtomo.jobs.import_tomograms import SPEC, ImportParams

TILTS = [-6.0, -3.0, 0.0, 3.0, 6.0]


def make_layout(root: Path, name: str = "tomo1", pixel_size: float = 4.0, stack_pixel: float | None = None,
                n_images: int = 5, trial_images: int | None = None, tlt: bool = True) -> Path:
    d = root / "Tomograms" / name
    d.mkdir(parents=True)
    write_mrc(d / f"{name}.mrc", np.zeros((8, 24, 32), np.float32), pixel_size)
    write_mrc(d / f"{name}.mrcs", np.zeros((n_images, 24, 32), np.float32), stack_pixel or pixel_size, stack=True)
    (d / f"{name}.coords").write_text("10 12 4\n20.5 6 3\n")
    if tlt:
        (d / f"{name}.tlt").write_text("\n".join(f"{t:.2f}" for t in TILTS) + "\n")
    (d / f"{name}.order").write_text("".join(f"{t + 0.3:.1f} {i * 2.0:.1f}\n" for i, t in enumerate([0, 3, -3, 6, -6])))
    if trial_images is not None:
        write_mrc(d / f"{name}.trial", np.zeros((trial_images, 24, 32), np.float32), pixel_size, stack=True)
    return d


def run_import(root: Path, **kw):
    return execute(SPEC, ImportParams(**kw), root, quiet=True)


def assert_fails_and_writes_nothing(root: Path, *fragments: str) -> str:
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.raises(SubtomoError) as err:
        run_import(root)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    after = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert before == after, "a failed import wrote files"
    return message


def test_good_layout_writes_all_tomograms_star(tmp_path):
    make_layout(tmp_path, "tomo1")
    make_layout(tmp_path, "tomo2")
    ctx = run_import(tmp_path)
    table = read_star_table(ctx.path("all_tomograms.star"))
    assert table["rlnMicrographName"].tolist() == ["Tomograms/tomo1/tomo1.mrc", "Tomograms/tomo2/tomo2.mrc"]
    assert table["subtomoNumberOfParticles"].tolist() == [2, 2]
    tilts = read_star_table(ctx.path("tilt_series/tomo1.star"))
    assert tilts["rlnTomoNominalStageTiltAngle"].tolist() == TILTS
    # .order lists nominal angles 0.3 deg off; each refined tilt takes the closest line's dose
    assert tilts["rlnMicrographPreExposure"].tolist() == [8.0, 4.0, 0.0, 2.0, 6.0]
    assert (ctx.dir / "RELION_JOB_EXIT_SUCCESS").exists()
    assert (ctx.dir / "coordinates" / "tomo1.png").stat().st_size > 1000
    pipeline = read_star(tmp_path / "default_pipeline.star")
    assert "Import/job001/all_tomograms.star" in pipeline["pipeline_nodes"]["rlnPipeLineNodeName"].tolist()


def test_missing_tomograms_directory(tmp_path):
    assert_fails_and_writes_nothing(tmp_path, "Tomograms: directory not found", "Steps 1-2")


def test_missing_file(tmp_path):
    d = make_layout(tmp_path)
    (d / "tomo1.coords").unlink()
    assert_fails_and_writes_nothing(tmp_path, "Tomograms/tomo1/tomo1.coords: file not found (particle coordinates)",
                                    "Step 3")


def test_tilt_count_differs_from_images(tmp_path):
    make_layout(tmp_path, n_images=4)
    assert_fails_and_writes_nothing(
        tmp_path, "the number of tilt angles (5) and the number of images in Tomograms/tomo1/tomo1.mrcs (4) are different",
        "use only the tilt angles of the images that are in the aligned tilt series")


def test_no_tlt_and_no_header_angles(tmp_path):
    make_layout(tmp_path, tlt=False)
    assert_fails_and_writes_nothing(tmp_path, "Tomograms/tomo1/tomo1.tlt: file not found and",
                                    "has no tilt angles in its extended header")


def test_order_without_matching_tilt(tmp_path):
    d = make_layout(tmp_path)
    (d / "tomo1.order").write_text("0 0\n1 2\n-1 4\n2 6\n-2 8\n")
    assert_fails_and_writes_nothing(tmp_path, "tomo1.order: no line with a tilt angle within 3.25 deg of the refined tilt")


@pytest.mark.parametrize("lines", [4, 6])
def test_order_with_another_number_of_lines_than_images(tmp_path, lines):
    d = make_layout(tmp_path)
    angles = [0, 3, -3, 6, -6, 9][:lines]
    (d / "tomo1.order").write_text("".join(f"{t:.1f} {i * 2.0:.1f}\n" for i, t in enumerate(angles)))
    assert_fails_and_writes_nothing(tmp_path, f"tomo1.order: {lines} lines for the 5 images of the tilt series",
                                    "one line per image")


def test_repeated_zero_tilt_gets_its_own_dose():
    from subtomo.io.text import match_order_to_tilts

    tilts = np.array([0.1, 3.0, -0.1, -3.0])  # two images near 0 deg (start and return of a bidirectional series)
    order = np.array([[0.0, 0.0], [3.0, 3.0], [0.0, 6.0], [-3.0, 9.0]])
    dose, diff = match_order_to_tilts(tilts, order)
    assert sorted(dose[[0, 2]].tolist()) == [0.0, 6.0] and dose[1] == 3.0 and dose[3] == 9.0
    assert diff.max() < 0.2


def test_trial_must_hold_twice_the_images(tmp_path):
    make_layout(tmp_path, trial_images=7)
    assert_fails_and_writes_nothing(tmp_path, "tomo1.trial: holds 7 images but must hold exactly twice the 5 images")


def test_good_trial_is_accepted(tmp_path):
    make_layout(tmp_path, trial_images=10)
    ctx = run_import(tmp_path)
    assert read_star_table(ctx.path("all_tomograms.star"))["subtomoHasTrials"].tolist() == [1]


def test_coordinates_outside_tomogram(tmp_path):
    d = make_layout(tmp_path)
    (d / "tomo1.coords").write_text("10 12 4\n40 6 3\n")
    assert_fails_and_writes_nothing(tmp_path, "tomo1.coords:2: coordinate (40, 6, 3) lies outside the tomogram (32 x 24 x 8 pixels)")


def test_unparsable_line(tmp_path):
    d = make_layout(tmp_path)
    (d / "tomo1.coords").write_text("10 12 4\n20 six 3\n")
    assert_fails_and_writes_nothing(tmp_path, "tomo1.coords:2: cannot parse '20 six 3'")


def test_pixel_size_of_stack_differs(tmp_path):
    make_layout(tmp_path, stack_pixel=2.0)
    assert_fails_and_writes_nothing(tmp_path, "tomo1.mrc: pixel size 4.0000 A differs from that of Tomograms/tomo1/tomo1.mrcs (2.0000 A)")


def test_pixel_sizes_differ_between_tomograms(tmp_path):
    make_layout(tmp_path, "a", pixel_size=4.0)
    make_layout(tmp_path, "b", pixel_size=5.0)
    assert_fails_and_writes_nothing(tmp_path, "inconsistent pixel sizes between tomograms (a: 4.000 A, b: 5.000 A)")


def test_all_problems_are_collected(tmp_path):
    d = make_layout(tmp_path, "a", trial_images=3)
    (d / "a.coords").write_text("100 1 1\n")
    message = assert_fails_and_writes_nothing(tmp_path, "2 problem(s)")
    assert "a.trial" in message and "a.coords:1" in message


def test_cli_exits_nonzero_with_message(tmp_path):
    d = make_layout(tmp_path)
    (d / "tomo1.order").unlink()
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "subtomo", "import"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert "tomo1.order: file not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "Import").exists() and not (tmp_path / "default_pipeline.star").exists()


def test_cli_help_lists_jobs_in_workflow_order():
    from click.testing import CliRunner

    from subtomo.cli.main import build_cli
    from subtomo.jobs.registry import all_specs

    proc = subprocess.run([sys.executable, "-m", "subtomo", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    names = [s.command for s in all_specs()]
    positions = [proc.stdout.index(f"  {n} ") for n in names]
    assert positions == sorted(positions)
    cli = build_cli()
    for spec in all_specs():
        result = CliRunner().invoke(cli, [spec.command, "--help"])
        assert result.exit_code == 0, result.output
        for field in spec.params.model_fields.values():
            assert field.description, f"{spec.command}: an option has no help text"
        for name in spec.params.model_fields:
            extra = spec.params.model_fields[name].json_schema_extra or {}
            if not extra.get("positional"):
                assert "--" + name.replace("_", "-") in result.output, f"{spec.command}: --{name} not in --help"
