"""OME-Zarr tomograms (issue 20): lazy multiscale reading, level chosen by pixel size, and
extraction from OME-Zarr equal to extraction from the same data as MRC, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from subtomo.errors import SubtomoError
from subtomo.io.importers.omezarr import ome_zarr_levels, write_ome_zarr
from subtomo.io.mrc import open_tomogram, read_tomogram_header, write_mrc
from subtomo.tomo.extract import ExtractionSettings, TomogramBoxReader, extract_one

pytest.importorskip("zarr")


@pytest.fixture
def tomogram(tmp_path):
    vol = np.random.default_rng(4).normal(size=(40, 56, 72)).astype(np.float32)
    write_mrc(tmp_path / "t.mrc", vol, 6.0)
    write_ome_zarr(tmp_path / "t.zarr", vol, 6.0, levels=2, chunks=16)
    return tmp_path, vol


def zarr_box_reader(path) -> TomogramBoxReader:
    """The extractor's box reader on an OME-Zarr tomogram (what open_tomogram gives it)."""
    reader = TomogramBoxReader.__new__(TomogramBoxReader)
    reader.path = path
    reader._mrc = open_tomogram(path)
    reader.data = reader._mrc.data
    reader.shape_zyx = tuple(int(n) for n in reader.data.shape)
    reader.pixel_size_A = float(reader._mrc.voxel_size.x)
    reader._mm = None
    return reader


def test_levels_header_and_lazy_slices(tomogram):
    root, vol = tomogram
    assert ome_zarr_levels(root / "t.zarr") == [("0", 6.0), ("1", 12.0)]
    assert read_tomogram_header(root / "t.zarr") == ((40, 56, 72), 6.0)
    assert read_tomogram_header(root / "t.mrc") == ((40, 56, 72), 6.0)
    with open_tomogram(root / "t.zarr") as t:
        assert type(t.data).__module__.startswith("zarr")  # not loaded into memory
        assert np.array_equal(t.data[5:17, 3:40, 60:72], vol[5:17, 3:40, 60:72])
    with open_tomogram(root / "t.zarr", pixel_size_A=12.0) as t:
        assert t.data.shape == (20, 28, 36) and t.voxel_size.x == 12.0
        assert np.allclose(t.data[1, 2, 3], vol[2:4, 4:6, 6:8].mean(), atol=1e-6)
    with pytest.raises(SubtomoError, match="no level at 9.0 A"):
        open_tomogram(root / "t.zarr", pixel_size_A=9.0)


def test_extraction_from_ome_zarr_equals_mrc_bit_for_bit(tomogram):
    root, _ = tomogram
    settings = ExtractionSettings(box=24, bg_radius_A=60.0, pixel_size_A=6.0, project=True)
    coords = [np.array([36.0, 28.0, 20.0]), np.array([3.4, 50.7, 38.2]), np.array([70.0, 1.0, 0.5])]  # inside, edges
    with TomogramBoxReader(root / "t.mrc") as mrc_reader, zarr_box_reader(root / "t.zarr") as zarr_reader:
        for c in coords:
            a = extract_one(mrc_reader, c, settings, np.random.default_rng(1))
            b = extract_one(zarr_reader, c, settings, np.random.default_rng(1))
            assert np.array_equal(a.volume, b.volume) and np.array_equal(a.projection, b.projection)
            assert np.array_equal(a.origin_A, b.origin_A)


def test_not_an_ome_zarr(tmp_path):
    (tmp_path / "x.zarr").mkdir()
    with pytest.raises(SubtomoError, match="not an OME-Zarr group"):
        open_tomogram(tmp_path / "x.zarr")


def test_layout_accepts_an_ome_zarr_tomogram(tmp_path):
    from subtomo.io.layout import scan_layout

    d = tmp_path / "Tomograms" / "t1"
    d.mkdir(parents=True)
    write_ome_zarr(d / "t1.zarr", np.zeros((8, 24, 32), np.float32), 4.0)
    write_mrc(d / "t1.mrcs", np.zeros((3, 24, 32), np.float32), 4.0, stack=True)
    (d / "t1.coords").write_text("10 12 4\n")
    (d / "t1.tlt").write_text("-3\n0\n3\n")
    (d / "t1.order").write_text("0 0\n3 3\n-3 6\n")
    (t,) = scan_layout(tmp_path)
    assert str(t.tomogram) == "Tomograms/t1/t1.zarr" and t.shape_zyx == (8, 24, 32) and t.pixel_size_A == 4.0


# ------------------------------------------------------------------ subtomo import --source portal

def _portal_run(root, vol):
    """A Data Portal run as downloaded: the tomogram (10 Å, 2 levels) and one oriented-point annotation."""
    from subtomo.geometry.euler import euler_to_matrix
    from subtomo.io.importers.picks import Picks
    from subtomo.io.importers.portal import write_portal_ndjson

    vs = root / "portal" / "run_1" / "Reconstructions" / "VoxelSpacing10.000"
    (vs / "Tomograms" / "100").mkdir(parents=True)
    (vs / "Annotations" / "100").mkdir(parents=True)
    write_ome_zarr(vs / "Tomograms" / "100" / "run_1.zarr", vol, 10.0, levels=2, chunks=16)
    rot = euler_to_matrix(np.array([10.0, -170.0]), np.array([40.0, 100.0]), np.array([-30.0, 75.0]))
    picks = Picks(tomo=np.array(["run_1"] * 2), coords_px=np.array([[30.0, 20.0, 10.0], [64.5, 50.25, 30.0]]),
                  rotations=rot)
    write_portal_ndjson(vs / "Annotations" / "100" / "ribosome-1.0_orientedpoint.ndjson", picks)
    return rot


def test_import_portal_run_level_by_pixel_size_and_prepare_with_its_orientations(tmp_path):
    from subtomo.geometry.euler import angular_distance_deg
    from subtomo.io.particles import ParticleSet
    from subtomo.io.star import read_star_table
    from subtomo.jobs.base import execute
    from subtomo.jobs.import_tomograms import SPEC, ImportParams
    from subtomo.jobs.prepare import SPEC as PREPARE
    from subtomo.jobs.prepare import PrepareParams

    vol = np.random.default_rng(2).normal(size=(40, 56, 72)).astype(np.float32)
    rot = _portal_run(tmp_path, vol)
    params = dict(source="portal", source_dir="portal", pixel_size=19.0)  # nearest level: 20 Å
    ctx = execute(SPEC, ImportParams(**params), tmp_path, quiet=True)
    t = tmp_path / "Tomograms" / "run_1"
    assert read_tomogram_header(t / "run_1.zarr") == ((20, 28, 36), 20.0)
    assert (t / "run_1.zarr" / "0").is_symlink()  # linked, not copied
    with open_tomogram(t / "run_1.zarr") as tomo:
        assert np.allclose(tomo.data[3, 4, 5], vol[6:8, 8:10, 10:12].mean(), atol=1e-6)
    assert np.allclose(np.loadtxt(t / "run_1.coords"), [[15, 10, 5], [32.25, 25.125, 15]])  # 10 Å voxels at 20 Å
    row = read_star_table(ctx.path("all_tomograms.star")).iloc[0]
    assert row["rlnMicrographName"] == "Tomograms/run_1/run_1.zarr" and row["subtomoTomogramPixelSize"] == 20.0
    assert "rlnTomoTiltSeriesStarFile" not in row
    log = (ctx.dir / "run.out").read_text()
    assert "level 1 at 20.000 A chosen" in log and "2 particles inside, 0 outside" in log
    # without tilt angles prepare refuses, saying what to do
    with pytest.raises(SubtomoError, match="no tilt angles.*--tilt-range"):
        execute(PREPARE, PrepareParams(i=ctx.name + "all_tomograms.star", skip_ctf=True, device="cpu"), tmp_path,
                quiet=True)
    # with them: .tlt / .order (dose-symmetric) and prepare --skip-ctf --particles carries the portal's orientations
    import shutil

    shutil.rmtree(tmp_path / "Tomograms")
    ctx = execute(SPEC, ImportParams(**params, tilt_range=[-60, 60, 30], dose_per_tilt=3.0), tmp_path, quiet=True)
    assert np.loadtxt(t / "run_1.tlt").tolist() == [-60, -30, 0, 30, 60]
    assert np.loadtxt(t / "run_1.order").tolist() == [[0, 0], [30, 3], [-30, 6], [60, 9], [-60, 12]]
    prep = execute(PREPARE, PrepareParams(i=ctx.name + "all_tomograms.star", skip_ctf=True, plot_box=16, device="cpu",
                                          particles=ctx.name + "particles.star"), tmp_path, quiet=True)
    parts = ParticleSet.read(prep.path("particles_subtomo.star"), tmp_path)
    assert angular_distance_deg(parts.rotations(), rot).max() < 0.01
    assert np.allclose(parts.table["rlnCoordinateX"], [15, 32.25])
    assert parts.pixel_size_A == 20.0


def test_import_portal_needs_one_annotation_per_run(tmp_path):
    from subtomo.jobs.base import execute
    from subtomo.jobs.import_tomograms import SPEC, ImportParams

    vol = np.zeros((8, 8, 8), np.float32)
    _portal_run(tmp_path, vol)
    extra = next((tmp_path / "portal").rglob("*.ndjson")).with_name("membrane-1.0_point.ndjson")
    extra.write_text('{"type": "point", "location": {"x": 1, "y": 2, "z": 3}}\n')
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SubtomoError, match="2 annotation files match.*--annotation"):
        execute(SPEC, ImportParams(source="portal", source_dir="portal"), tmp_path, quiet=True)
    assert sorted(tmp_path.rglob("*")) == before
    ctx = execute(SPEC, ImportParams(source="portal", source_dir="portal", annotation="ribosome*.ndjson"), tmp_path,
                  quiet=True)
    assert "level 0 at 10.000 A chosen" in (ctx.dir / "run.out").read_text()
