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
