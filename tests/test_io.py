"""STAR and MRC round trips, text readers, extended-header tilt angles."""

from __future__ import annotations

import struct

import mrcfile
import numpy as np
import pandas as pd
import pytest

from subtomo.errors import SubtomoError
from subtomo.io.mrc import read_mrc, read_mrc_header, read_tilt_angles_from_header, write_mrc
from subtomo.io.particles import read_particles
from subtomo.io.star import read_star, read_star_table, write_particles, write_star
from subtomo.io.text import match_order_to_tilts, read_coords, read_order, read_tlt


def test_mrc_round_trip_keeps_data_and_pixel_size(tmp_path):
    data = np.random.default_rng(1).normal(size=(6, 8, 10)).astype(np.float32)
    write_mrc(tmp_path / "v.mrc", data, 3.37)
    back, px = read_mrc(tmp_path / "v.mrc")
    assert np.array_equal(back, data)
    assert px == pytest.approx(3.37, rel=1e-6)
    assert read_mrc_header(tmp_path / "v.mrc") == ((6, 8, 10), pytest.approx(3.37, rel=1e-6))
    assert not list(tmp_path.glob(".*tmp*")), "atomic write left a temporary file"


def test_read_mrc_errors_name_the_file(tmp_path):
    with pytest.raises(SubtomoError, match="missing.mrc: file not found"):
        read_mrc(tmp_path / "missing.mrc")
    (tmp_path / "bad.mrc").write_bytes(b"not an mrc file" * 10)
    with pytest.raises(SubtomoError, match="bad.mrc"):
        read_mrc(tmp_path / "bad.mrc")


def test_star_round_trip_small_floats_and_strings(tmp_path):
    df = pd.DataFrame({"rlnImageName": ["a@b.mrcs", "c@d.mrcs"], "rlnDefocusU": [12345.5, 2.5e-9],
                       "rlnClassNumber": [1, 2]})
    write_star(tmp_path / "t.star", {"particles": df})
    back = read_star_table(tmp_path / "t.star")
    assert list(back["rlnImageName"]) == ["a@b.mrcs", "c@d.mrcs"]
    assert back["rlnDefocusU"][1] == pytest.approx(2.5e-9, rel=1e-6), "small float lost (starfile default format)"
    assert list(back["rlnClassNumber"]) == [1, 2]


def test_particles_optics_split_and_merge(tmp_path):
    df = pd.DataFrame({"rlnImageName": ["p1.mrc", "p2.mrc"], "rlnCoordinateX": [1.0, 2.0],
                       "rlnImagePixelSize": [4.0, 4.0], "rlnImageSize": [64, 64], "rlnVoltage": [300.0, 300.0]})
    write_particles(tmp_path / "p.star", df)
    blocks = read_star(tmp_path / "p.star")
    assert set(blocks) == {"optics", "particles"}
    assert "rlnImagePixelSize" not in blocks["particles"].columns
    merged, optics = read_particles(tmp_path / "p.star")
    assert optics is not None and merged["rlnImagePixelSize"].tolist() == [4.0, 4.0]


def test_reads_real_relion5_and_warp_files(shared_data):
    fmt = shared_data / "formats" / "star_relion5"
    parts, optics = read_particles(fmt / "cryocat_relion5_tutorial_empiar10164" / "R5_tutorial_run_data.star.gz")
    assert optics is not None and len(parts) > 100
    assert {"rlnTomoName", "rlnAngleRot", "rlnImagePixelSize"} <= set(parts.columns)
    warp, warp_optics = read_particles(fmt / "warp" / "warp2_particles_matching.star")
    assert len(warp) > 0 and warp_optics is not None and (warp["rlnImageSize"] == 64).all()
    tilt = read_star_table(fmt / "cryocat_relion5_tutorial_empiar10164" / "relion5_TS_01_tilt.star")
    assert len(tilt) > 10


def test_relion5_file_round_trip(shared_data, tmp_path):
    src = shared_data / "formats" / "star_relion5" / "warp" / "warp2_particles_matching.star"
    blocks = read_star(src)
    write_star(tmp_path / "copy.star", blocks)
    again = read_star(tmp_path / "copy.star")
    assert list(again) == list(blocks)
    a, b = blocks["particles"], again["particles"]
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        if pd.api.types.is_numeric_dtype(a[col]):
            assert np.allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-6, atol=1e-6)
        else:
            assert a[col].astype(str).tolist() == b[col].astype(str).tolist()


def test_coords_with_thousands_separators(tmp_path):
    f = tmp_path / "t.coords"
    f.write_text("100.0      355.0      200.0\n2,034.0    1,100.0    561.0\n\n3,011.0 2,539.0 321.0\n")
    assert read_coords(f).tolist() == [[100, 355, 200], [2034, 1100, 561], [3011, 2539, 321]]


def test_text_reader_reports_line_and_fix(tmp_path):
    f = tmp_path / "t.order"
    f.write_text("61.1 0.0\n57.3 abc\n54.2\n")
    with pytest.raises(SubtomoError) as err:
        read_order(f)
    text = str(err.value)
    assert "t.order:2: cannot parse '57.3 abc'" in text
    assert "t.order:3: expected 2 numbers" in text


def test_order_matched_to_closest_refined_tilt(tmp_path):
    tilts = np.array([59.44, 56.44, 53.43, -0.2])
    order = np.array([[61.1, 0.0], [57.3, 2.0], [54.2, 4.0], [0.0, 6.0]])
    dose, diff = match_order_to_tilts(tilts, order)
    assert dose.tolist() == [0.0, 2.0, 4.0, 6.0]
    assert diff.max() == pytest.approx(1.66)


def test_tlt_reader(tmp_path):
    (tmp_path / "a.tlt").write_text("59.44\n56.44\n53.43\n")
    assert read_tlt(tmp_path / "a.tlt").tolist() == [59.44, 56.44, 53.43]


def test_fei_extended_header_tilt_angles(tmp_path):
    angles = np.array([-60.0, -30.0, 0.0, 30.0, 60.0])
    path = tmp_path / "fei.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((5, 8, 8), np.float32))
        dtype = mrcfile.dtypes.get_ext_header_dtype(b"FEI1")
        ext = np.zeros(5, dtype=dtype)
        ext["Metadata size"] = dtype.itemsize
        ext["Alpha tilt"] = angles
        mrc.set_extended_header(ext)
        mrc.header.exttyp = b"FEI1"
    assert np.allclose(read_tilt_angles_from_header(path), angles)


def test_serialem_extended_header_tilt_angles(tmp_path):
    angles = [-54.01, -3.0, 0.0, 27.5]
    path = tmp_path / "seri.mrcs"
    record = 32
    ext = bytearray(record * len(angles))
    for i, a in enumerate(angles):
        struct.pack_into("<h", ext, i * record, int(round(a * 100)))
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((4, 8, 8), np.float32))
        mrc.set_extended_header(np.frombuffer(bytes(ext), dtype="V1"))
        mrc.header.exttyp = b"SERI"
        extra2 = bytearray(bytes(mrc.header.extra2))
        struct.pack_into("<hh", extra2, 128 - 112, record, 1 | 16)  # nint, nreal (tilt + intensity)
        mrc.header.extra2 = bytes(extra2)
    assert np.allclose(read_tilt_angles_from_header(path), angles)


def test_no_extended_header_gives_none(tmp_path):
    write_mrc(tmp_path / "plain.mrcs", np.zeros((3, 4, 4)), 2.0, stack=True)
    assert read_tilt_angles_from_header(tmp_path / "plain.mrcs") is None


def test_truncated_mrc_is_refused_by_header_reads(tmp_path):
    from subtomo.io.mrc import open_mrc_mmap, read_mrc_header

    path = write_mrc(tmp_path / "t.mrc", np.ones((4, 8, 8), np.float32), 2.0)
    assert read_mrc_header(path) == ((4, 8, 8), 2.0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])  # an interrupted copy
    for reader in (read_mrc_header, read_mrc, open_mrc_mmap):
        with pytest.raises(SubtomoError, match=r"t.mrc: the file is truncated \(.* needs 2048\)"):
            reader(path)
