"""Tilt-series importers (issue 20): SerialEM .mdoc, IMOD tilt.com/.xf/.tlt, AreTomo .aln,
Warp/WarpTools XML and .tomostar, checked against numbers read by hand from real files in
shared/data/formats (or from files written as the program documents them)."""

from __future__ import annotations

import numpy as np
import pytest

from subtomo.errors import SubtomoError
from subtomo.io.importers.aretomo import read_aln
from subtomo.io.importers.imod import read_tilt_com, read_xf, xf_rotation_deg
from subtomo.io.importers.serialem import read_mdoc
from subtomo.io.importers.warp import read_tomostar, read_warp_xml
from subtomo.io.text import read_tlt


@pytest.fixture
def ts017(shared_data):
    d = shared_data / "formats" / "ctf_mdoc_mtf" / "cryocat_TS_017"
    if not d.is_dir():
        pytest.skip(f"{d} not present")
    return d


def test_serialem_mdoc_real_file(ts017):
    m = read_mdoc(ts017 / "017.mdoc")
    assert len(m.tilts_deg) == 60 and m.pixel_size_A == 1.971 and m.voltage_kV == 300
    # [ZValue = 0]: TiltAngle = -52.0064, ExposureDose = 2.23843, PriorRecordDose = 134.379, SubFramePath = 017_01.mrc
    assert m.tilts_deg[0] == -52.0064 and m.exposure_dose[0] == 2.23843 and m.pre_exposure[0] == 134.379
    assert m.movies[0] == "017_01.mrc"
    # dose-symmetric from the lamella's pre-tilt: the first image taken is ZValue 30 (TiltAngle = 7.97729)
    assert m.order[30] == 0 and m.tilts_deg[30] == 7.97729
    # acquisition order by DateTime agrees with the order of PriorRecordDose
    assert np.array_equal(np.argsort(m.order), np.argsort(m.pre_exposure, kind="stable"))
    # cryoCAT's corrected dose list of the same series = dose after each image
    after = np.loadtxt(ts017 / "017_corrected_dose.txt")
    assert np.abs(after - (m.pre_exposure + m.exposure_dose)).max() < 0.005


def test_serialem_mdoc_without_prior_dose(tmp_path):
    text = "PixelSpacing = 2.5\nVoltage = 300\n\n"
    for z, (tilt, time) in enumerate([(-3.0, "22:00:10"), (0.0, "22:00:00"), (3.0, "22:00:20")]):
        text += f"[ZValue = {z}]\nTiltAngle = {tilt}\nExposureDose = 3.0\nDateTime = 06-Jun-23  {time}\n\n"
    (tmp_path / "a.mdoc").write_text(text)
    m = read_mdoc(tmp_path / "a.mdoc")
    assert m.order.tolist() == [1, 0, 2]
    assert m.pre_exposure.tolist() == [3.0, 0.0, 6.0]
    (tmp_path / "b.mdoc").write_text("PixelSpacing = 2.5\n")
    with pytest.raises(SubtomoError, match="no \\[ZValue"):
        read_mdoc(tmp_path / "b.mdoc")


def test_imod_tilt_com_and_tlt_real_files(ts017):
    t = read_tilt_com(ts017 / "tilt.com")
    assert t.thickness == 1500 and t.binned == 1 and t.x_axis_tilt_deg == 0.0 and t.offset_deg == 0.0
    assert t.perpendicular and t.full_image == (4096, 4096) and t.shift == (0.0, 0.0)
    assert t.files == {"INPUTPROJECTIONS": "017.ali", "OUTPUTFILE": "017.rec", "TILTFILE": "017.tlt"}
    tilts = read_tlt(ts017 / "017.tlt")
    assert len(tilts) == 60 and tilts[0] == -52.01 and tilts[1] == -50.01


def test_imod_xf_written_as_documented(tmp_path):
    c, s = np.cos(np.radians(85.3)), np.sin(np.radians(85.3))
    (tmp_path / "a.xf").write_text(f"{c:.7f} {-s:.7f} {s:.7f} {c:.7f} 12.345 -6.5\n"
                                   "1.0000000 0.0000000 0.0000000 1.0000000 0.000 0.000\n")
    xf = read_xf(tmp_path / "a.xf")
    assert xf.shape == (2, 6) and xf[0, 4] == 12.345 and xf[0, 5] == -6.5
    assert np.allclose(xf_rotation_deg(xf), [85.3, 0.0], atol=1e-4)
    (tmp_path / "b.xf").write_text("1 0 0 1 2\n")
    with pytest.raises(SubtomoError, match="b.xf:1"):
        read_xf(tmp_path / "b.xf")


ALN = """# AreTomo Alignment / Priims bprmMn
# RawSize = 4096 4096 5
# NumPatches = 0
# DarkFrame =     0     0   -60.00
# AlphaOffset =    -1.50
# BetaOffset =     0.00
# SEC     ROT         GMAG       TX          TY      SMEAN     SFIT    SCALE     BASE     TILT
    1    85.4012    1.00000     12.345    -20.500     0.98     0.99     1.00     0.00   -31.50
    2    85.4012    1.00000      3.210     -4.100     0.98     0.99     1.00     0.00    -1.50
    3    85.4012    1.00000     -7.000      9.900     0.98     0.99     1.00     0.00    28.50
    4    85.4012    1.00000     -1.000      0.500     0.98     0.99     1.00     0.00    58.50
# Local Alignment
    1    0    100.0    200.0    1.0    2.0    1.0
"""


def test_aretomo_aln_written_as_documented(tmp_path):
    (tmp_path / "TS_1.aln").write_text(ALN)
    a = read_aln(tmp_path / "TS_1.aln")
    assert a.raw_size == (4096, 4096, 5) and a.dark_sections == [0] and a.alpha_offset_deg == -1.5
    assert a.sections.tolist() == [1, 2, 3, 4]
    assert np.allclose(a.rotation_deg, 85.4012) and np.allclose(a.tilts_deg, [-31.5, -1.5, 28.5, 58.5])
    assert np.allclose(a.shifts_px[0], [12.345, -20.5])
    assert a.num_patches == 0 and a.local_rows == 1  # the local section is counted, not read as global rows
    (tmp_path / "bad.aln").write_text("# SEC ROT\n 1 2 3\n")
    with pytest.raises(SubtomoError, match="bad.aln:2"):
        read_aln(tmp_path / "bad.aln")


def test_warp_xml_real_files(shared_data, ts017):
    w = read_warp_xml(ts017 / "017.xml.gz")  # UTF-16 with a byte-order mark
    assert len(w.tilts_deg) == 60 and w.tilts_deg[0] == -52 and w.pre_exposure[0] == 134.3059
    assert w.axis_angle_deg[0] == 83.22321 and w.use.all() and w.pixel_size_A == 1.971
    assert np.allclose(w.axis_offset_A[0], [51.38024, -95.60207])
    # GridCTF Z=0: 3.409815 µm, GridCTFDefocusDelta 0.01914939 µm, angle 164°
    assert w.defocus_u_A[0] == pytest.approx(34289.6439) and w.defocus_v_A[0] == pytest.approx(33906.6561)
    assert w.defocus_angle_deg[0] == 164 and w.movies[0] == "017_01.mrc"
    g = read_warp_xml(shared_data / "formats" / "star_relion5" / "warp" / "gs04_ts_003.xml.gz")  # UTF-8 with BOM
    assert len(g.tilts_deg) == 47 and g.tilts_deg[0] == 46 and g.pre_exposure[0] == 140.97852
    assert g.pixel_size_A == 0.7303 and g.movies[0] == "../frameseries/gs04_ts_003_00000_-46.0_17.14.00.eer"


def test_warp_tomostar_written_as_documented(tmp_path):
    (tmp_path / "TS_1.tomostar").write_text(
        "\ndata_\n\nloop_\n_wrpMovieName #1\n_wrpAngleTilt #2\n_wrpAxisAngle #3\n_wrpDose #4\n"
        "_wrpAverageIntensity #5\n_wrpMaskedFraction #6\n"
        "../frames/TS_1_001_0.0.eer   0.0  84.5   0.00  1.2  0\n"
        "../frames/TS_1_002_3.0.eer   3.0  84.5   3.05  1.1  0\n"
        "../frames/TS_1_003_-3.0.eer -3.0  84.5   6.10  1.1  0\n")
    t = read_tomostar(tmp_path / "TS_1.tomostar")
    assert t["tilts_deg"].tolist() == [0.0, 3.0, -3.0] and t["pre_exposure"].tolist() == [0.0, 3.05, 6.1]
    assert t["movies"][1] == "../frames/TS_1_002_3.0.eer" and t["axis_angle_deg"][0] == 84.5


# ------------------------------------------------------------------ subtomo import --source imod|aretomo|warp

def _mdoc(tilts, pre, dose=3.0) -> str:
    text = "PixelSpacing = 4.0\nVoltage = 300\n\n"
    for z, (t, p) in enumerate(zip(tilts, pre)):
        text += f"[ZValue = {z}]\nTiltAngle = {t}\nExposureDose = {dose}\nPriorRecordDose = {p}\n\n"
    return text


def test_import_from_imod_folder(tmp_path):
    from subtomo.io.mrc import write_mrc
    from subtomo.io.star import read_star_table
    from subtomo.jobs.base import execute
    from subtomo.jobs.import_tomograms import SPEC, ImportParams

    d = tmp_path / "etomo" / "TS_9"
    d.mkdir(parents=True)
    write_mrc(d / "TS_9.ali", np.zeros((5, 24, 32), np.float32), 4.0, stack=True)
    write_mrc(d / "TS_9.rec", np.zeros((8, 24, 32), np.float32), 4.0)
    (d / "TS_9.tlt").write_text("-6.1\n-3.1\n-0.1\n2.9\n5.9\n")
    (d / "tilt.com").write_text("$tilt -StandardInput\nInputProjections TS_9.ali\nOutputFile TS_9.rec\nTHICKNESS 8\n"
                                "OFFSET 0.1\nPERPENDICULAR\nSHIFT 4 -2\nXAXISTILT 0.5\n")
    (d / "TS_9.xf").write_text("1 0 0 1 1.5 -2\n" * 5)
    (d / "TS_9.mdoc").write_text(_mdoc([-6, -3, 0, 3, 6], [9, 3, 0, 6, 12]))
    (tmp_path / "picks").mkdir()
    (tmp_path / "picks" / "TS_9.coords").write_text("10 12 4\n")
    ctx = execute(SPEC, ImportParams(source="imod", source_dir="etomo", coords="picks"), tmp_path, quiet=True)
    t = tmp_path / "Tomograms" / "TS_9"
    assert (t / "TS_9.mrcs").is_symlink() and (t / "TS_9.mrc").resolve() == (d / "TS_9.rec").resolve()
    assert np.allclose(read_tlt(t / "TS_9.tlt"), [-6, -3, 0, 3, 6])  # .tlt + OFFSET of tilt.com
    order = np.loadtxt(t / "TS_9.order")
    assert order.tolist() == [[0, 0], [-3, 3], [3, 6], [-6, 9], [6, 12]]  # acquisition order, dose before each
    table = read_star_table(ctx.path("tilt_series/TS_9.star"))
    assert table["rlnMicrographPreExposure"].tolist() == [9, 3, 0, 6, 12]
    log = (ctx.dir / "run.out").read_text()
    assert "TS_9.xf: 5 transforms" in log and "pixel sizes: TS_9.ali 4.0000 A, TS_9.rec 4.0000 A" in log
    row = read_star_table(ctx.path("all_tomograms.star")).iloc[0]  # SHIFT and XAXISTILT travel to prepare
    assert (row["subtomoTomogramShiftX"], row["subtomoTomogramShiftZ"], row["subtomoTomogramXAxisTilt"]) == (4, -2, 0.5)
    assert "XAXISTILT 0.5 deg turns the missing wedge" in log


def test_import_from_imod_refuses_unrotated_tomogram_and_writes_nothing(tmp_path):
    from subtomo.io.mrc import write_mrc
    from subtomo.jobs.base import execute
    from subtomo.jobs.import_tomograms import SPEC, ImportParams

    d = tmp_path / "etomo" / "TS_9"
    d.mkdir(parents=True)
    write_mrc(d / "TS_9.ali", np.zeros((5, 24, 32), np.float32), 4.0, stack=True)
    write_mrc(d / "TS_9.rec", np.zeros((24, 8, 32), np.float32), 4.0)  # y is the thickness
    (d / "TS_9.tlt").write_text("-6\n-3\n0\n3\n6\n")
    (d / "tilt.com").write_text("THICKNESS 8\nPERPENDICULAR\n")
    (tmp_path / "picks").mkdir()
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SubtomoError, match="trimvol -rx"):
        execute(SPEC, ImportParams(source="imod", source_dir="etomo", coords="picks"), tmp_path, quiet=True)
    assert sorted(tmp_path.rglob("*")) == before


def test_import_from_aretomo_folder_matches_doses_through_sections(tmp_path):
    from subtomo.io.mrc import write_mrc
    from subtomo.jobs.base import execute
    from subtomo.jobs.import_tomograms import SPEC, ImportParams

    d = tmp_path / "aretomo"
    d.mkdir()
    (d / "TS_1.aln").write_text(ALN)
    write_mrc(d / "TS_1_ali.mrc", np.zeros((4, 24, 32), np.float32), 4.0, stack=True)
    write_mrc(d / "TS_1_Vol.mrc", np.zeros((8, 24, 32), np.float32), 4.0)
    (d / "TS_1.mdoc").write_text(_mdoc([-60, -30, 0, 30, 60], [12, 6, 0, 3, 9]))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "TS_1.coords").write_text("3 4 5\n")
    execute(SPEC, ImportParams(source="aretomo", source_dir="aretomo", coords="c"), tmp_path, quiet=True)
    t = tmp_path / "Tomograms" / "TS_1"
    assert np.allclose(read_tlt(t / "TS_1.tlt"), [-31.5, -1.5, 28.5, 58.5])
    order = np.loadtxt(t / "TS_1.order")  # SEC 1..4 of the raw stack; SEC 0 (-60°, dark) dropped
    assert order.tolist() == [[-1.5, 0], [28.5, 3], [-31.5, 6], [58.5, 9]]


def test_import_from_aretomo_warns_that_the_local_alignment_is_ignored(tmp_path):
    from subtomo.io.mrc import write_mrc
    from subtomo.jobs.base import execute
    from subtomo.jobs.import_tomograms import SPEC, ImportParams

    d = tmp_path / "aretomo"
    d.mkdir()
    # patch tracking with 2 patches: one local row (SEC PATCH X Y SX SY GOOD) per kept image and patch
    local = "".join(f"{sec:5d} {p:5d} {x:9.2f} {y:9.2f} {0.5 * p:7.2f} {-0.25 * sec:7.2f}  1.0\n"
                    for sec in range(4) for p, (x, y) in enumerate([(-1024.0, 0.0), (1024.0, 0.0)]))
    aln = ALN.replace("# NumPatches = 0", "# NumPatches = 2").split("# Local Alignment")[0] + "# Local Alignment\n" + local
    (d / "TS_1.aln").write_text(aln)
    a = read_aln(d / "TS_1.aln")
    assert a.num_patches == 2 and a.local_rows == 8 and len(a.tilts_deg) == 4
    write_mrc(d / "TS_1_ali.mrc", np.zeros((4, 24, 32), np.float32), 4.0, stack=True)
    write_mrc(d / "TS_1_Vol.mrc", np.zeros((8, 24, 32), np.float32), 4.0)
    (d / "TS_1.mdoc").write_text(_mdoc([-60, -30, 0, 30, 60], [12, 6, 0, 3, 9]))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "TS_1.coords").write_text("3 4 5\n")
    ctx = execute(SPEC, ImportParams(source="aretomo", source_dir="aretomo", coords="c"), tmp_path, quiet=True)
    log = (ctx.dir / "run.out").read_text() + (ctx.dir / "run.err").read_text()
    assert "TS_1.aln: local alignment (2 patches, 8 rows) ignored" in log and "subtomo reconstruct --i" in log


WARP_XML = """<?xml version="1.0" encoding="utf-8"?>
<TiltSeries AreAnglesInverted="False" PlaneNormal="0, 0, 1">
  <Angles>0
3
-3</Angles>
  <Dose>0
3.05
6.1</Dose>
  <UseTilt>True
True
True</UseTilt>
  <AxisAngle>84.5
84.5
84.5</AxisAngle>
  <CTF>
    <Param Name="PixelSize" Value="1.0" />
    <Param Name="Defocus" Value="3.0" />
    <Param Name="DefocusDelta" Value="0.1" />
    <Param Name="DefocusAngle" Value="30" />
  </CTF>
  <GridCTF Width="1" Height="1" Depth="3" MarginX="0" MarginY="0" MarginZ="0">
    <Node X="0" Y="0" Z="0" Value="3.0" />
    <Node X="0" Y="0" Z="1" Value="3.1" />
    <Node X="0" Y="0" Z="2" Value="2.9" />
  </GridCTF>
</TiltSeries>
"""


def test_import_from_warp_folder(tmp_path):
    from subtomo.io.mrc import write_mrc
    from subtomo.jobs.base import execute
    from subtomo.jobs.import_tomograms import SPEC, ImportParams

    d = tmp_path / "warp"
    (d / "reconstruction").mkdir(parents=True)
    (d / "TS_2.xml").write_text(WARP_XML)
    w = read_warp_xml(d / "TS_2.xml")
    assert np.allclose(w.defocus_u_A, [31000, 32000, 30000]) and np.allclose(w.defocus_angle_deg, 30)
    write_mrc(d / "TS_2.ali", np.zeros((3, 24, 32), np.float32), 4.0, stack=True)
    write_mrc(d / "reconstruction" / "TS_2_4.00Apx.mrc", np.zeros((8, 24, 32), np.float32), 4.0)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "TS_2.coords").write_text("3 4 5\n")
    execute(SPEC, ImportParams(source="warp", source_dir="warp", coords="c"), tmp_path, quiet=True)
    order = np.loadtxt(tmp_path / "Tomograms" / "TS_2" / "TS_2.order")
    assert order.tolist() == [[0, 0], [3, 3.05], [-3, 6.1]]


# ------------------------------------------------------------------ tilt.com SHIFT / XAXISTILT / OFFSET

def test_tilt_com_geometry_as_imod_documents_it(tmp_path):
    from subtomo.io.importers.imod import geometry_columns, imod_to_tilt_geometry

    # an etomo tilt.com (bin 2): SHIFT and THICKNESS in unbinned pixels, an all-zero .xtilt, local alignments
    (tmp_path / "g.xtilt").write_text("0.0\n0.0\n0.0\n")
    (tmp_path / "tilt.com").write_text(
        "# Command file to run Tilt\n$tilt -StandardInput\nInputProjections g.ali\nOutputFile g.rec\nIMAGEBINNED 2\n"
        "TILTFILE g.tlt\nXTILTFILE g.xtilt\nLOCALFILE g_local.xf\nTHICKNESS 300\nXAXISTILT 1.1459\nPERPENDICULAR\n"
        "OFFSET -0.75\nSHIFT 20.0 -30.0\n$if (-e ./savework) ./savework\n")
    com = read_tilt_com(tmp_path / "tilt.com")
    assert com.offset_deg == -0.75 and com.shift == (20.0, -30.0) and com.x_axis_tilt_deg == 1.1459 and com.binned == 2
    assert com.ignored == ("LOCALFILE g_local.xf",)  # the zero .xtilt is no x-tilt
    cols = geometry_columns(com)
    assert cols == {"subtomoTomogramShiftX": 10.0, "subtomoTomogramShiftZ": -15.0, "subtomoTomogramXAxisTilt": 1.1459}
    # SHIFT: the voxel at the centre of a 64x48x32 output shows the specimen 10 px left of and 15 px above the axis
    size = (64, 48, 32)
    assert np.allclose(imod_to_tilt_geometry(np.array([[32.0, 24.0, 16.0]]), size, (10.0, -15.0)), [[22, 24, 31]])
    # XAXISTILT, IMOD's example: 500 slices, a section 5 px below the middle in the first slice and 5 px above in the
    # last is flat after XAXISTILT asin(10/500) = 1.1459 deg: its flat ends go back to z = middle -+ 5
    alpha = np.degrees(np.arcsin(10 / 500))
    ends = np.array([[50.0, 0.0, 20.0], [50.0, 500.0, 20.0]])  # y = 0 and 500 at the middle height of a 40-px volume
    back = imod_to_tilt_geometry(ends, (100, 500, 40), (0.0, 0.0), alpha)
    assert np.allclose(back[:, 2], [15.0, 25.0], atol=1e-9) and np.allclose(back[:, 1], 250 - 250 * np.cos(
        np.radians(alpha)) * np.array([1, -1]))
    (tmp_path / "g.xtilt").write_text("0.0\n0.5\n0.0\n")
    assert "XTILTFILE g.xtilt" in " ".join(read_tilt_com(tmp_path / "tilt.com").ignored)


def test_prepare_places_an_imod_tomogram_with_its_shift(tmp_path):
    """The position-dependent defocus of a particle follows tilt.com's SHIFT (ctf_tomograms.star carries it)."""
    import pandas as pd

    from subtomo.io.mrc import write_mrc
    from subtomo.io.star import read_star, write_star
    from subtomo.jobs.base import execute
    from subtomo.jobs.prepare import SPEC, PrepareParams

    d = tmp_path / "Tomograms" / "t1"
    d.mkdir(parents=True)
    write_mrc(d / "t1.mrc", np.zeros((32, 48, 64), np.float32), 10.0)
    (d / "t1.coords").write_text("32 24 16\n")  # the tomogram's centre
    tilts = np.array([-30.0, 0.0, 30.0])
    write_star(tmp_path / "CtfFind/job002/t1_ctffind.star", {"t1": pd.DataFrame({
        "rlnMicrographName": [f"{i + 1}@Tomograms/t1/t1.mrcs" for i in range(3)], "rlnTomoNominalStageTiltAngle": tilts,
        "rlnMicrographPreExposure": [3.0, 0.0, 6.0], "rlnDefocusU": 30000.0, "rlnDefocusV": 30000.0,
        "rlnDefocusAngle": 0.0})})
    row = {"rlnMicrographName": "Tomograms/t1/t1.mrc", "rlnTomoName": "t1", "rlnTomoTiltSeriesPixelSize": 10.0,
           "rlnCtfFindResultsStar": "CtfFind/job002/t1_ctffind.star", "subtomoTomogramShiftX": 10.0,
           "subtomoTomogramShiftZ": -15.0, "subtomoTomogramXAxisTilt": 0.0}
    write_star(tmp_path / "CtfFind/job002/ctf_tomograms.star", pd.DataFrame([row]))
    ctx = execute(SPEC, PrepareParams(i="CtfFind/job002/ctf_tomograms.star", plot_box=16, device="cpu"), tmp_path,
                  quiet=True)
    table = read_star(ctx.path("CtfModels/t1_ctf.star"))["ctf_models"]
    # specimen at (-10, 0, +15) px = (-100, 0, 150) A from the axis: h = 100 sin(t) + 150 cos(t), defocus = D - h
    h = 100 * np.sin(np.radians(tilts)) + 150 * np.cos(np.radians(tilts))
    assert np.allclose(table["rlnDefocusU"].to_numpy(float), 30000 - h, atol=0.01)
    assert np.allclose(h, [79.90, 150.0, 179.90], atol=0.01)  # by hand
    parts = read_star(ctx.path("particles_subtomo.star"))["particles"]
    assert float(parts["rlnCoordinateZ"][0]) == 16.0  # the particle stays where it is in the tomogram
