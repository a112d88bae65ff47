"""A complete simulated project: ``Tomograms/<t>/`` inputs and the ``GroundTruth/`` beside them.

Layout written (the protocol's Steps 1-7 inputs; nothing of the truth leaks into them)::

    Tomograms/TS_01/TS_01.mrc      WBP tomogram (z, y, x), float32, mean 0 / std 1, protein dark
    Tomograms/TS_01/TS_01.coords   picked centres (px) with picking error, incl. fiducials and junk
    Tomograms/TS_01/TS_01.mrcs     aligned tilt series (counts), tilt axis = y, ascending tilt
    Tomograms/TS_01/TS_01.tlt      refined tilt angles (stack order), without the residual error
    Tomograms/TS_01/TS_01.order    tilt, accumulated dose before the image (acquisition order)
    Tomograms/TS_01/TS_01.trial    two particle-free trial images per tilt (optional)
    GroundTruth/picks.star         one row per .coords line: kind, class, true centre and pose
    GroundTruth/tilts.star         per image: tilt, defocus U/V/angle at the centre, pre-exposure, residual errors
    GroundTruth/class001.mrc ...   the true maps (potential above the ice, V) at the project pixel size
    GroundTruth/simulation.json    all parameters, the structure, per-tomogram summaries and the models used
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mrcfile
import numpy as np
import pandas as pd
import torch

import subtomo
from subtomo.ctf.model import Optics, electron_wavelength_A
from subtomo.errors import SubtomoError
from subtomo.fourier import lowpass
from subtomo.io.mrc import read_mrc, write_mrc
from subtomo.io.mtf import read_mtf
from subtomo.io.star import write_star
from subtomo.io.text import write_text_rows
from subtomo.simulate import potential as pot
from subtomo.simulate.presets import SimulationConfig
from subtomo.simulate.sample import Objects, gold_bead_map, junk_map, place_spheres, random_poses
from subtomo.simulate.tiltseries import (
    WATER_MOLECULES_PER_A3,
    WATER_POTENTIAL_INTEGRAL_V_A3,
    Detector,
    FourierSliceProjector,
    ImageCtfGrid,
    TiltGeometry,
    ctf_filter_layers,
    electrons_per_pixel,
    ice_texture_field,
    image_filters,
    interaction_constant,
    mean_exposure,
    project_texture,
    render_objects,
    shot_noise,
    tilt_scheme,
    water_noise_std,
)
from subtomo.tomo.reconstruct import weighted_backprojection

DATA_DIR = Path(subtomo.__file__).resolve().parent / "data"
DEFAULT_STRUCTURE = DATA_DIR / "3j9i_Tacidophilum_20S_proteasome.pdb.gz"
DEFAULT_SYMMETRY = "D7"
MTF_FILES = {"k3": DATA_DIR / "mtf_k3_standard_300kV_FL2.star"}
BOX_FACTOR = 1.75  # box / particle diameter
N_JUNK_TEMPLATES = 3
MRC_LABEL = b"subtomo simulate"


@dataclass
class Template:
    """A map the objects of one kind share, with its projector."""

    name: str
    volume: torch.Tensor
    radius_A: float
    projector: FourierSliceProjector | None = None


def _even(x: float, minimum: int = 16) -> int:
    return max(minimum, 2 * int(round(x / 2)))


def _fix_label(path: Path) -> None:
    """Replace mrcfile's dated label by a constant one (same seed -> byte-identical files)."""
    with open(path, "r+b") as fh:  # MRC2014: nlabl int32 at byte 220, ten 80-byte labels from 224
        fh.seek(220)
        fh.write(np.int32(1).tobytes() + MRC_LABEL.ljust(80) + bytes(720))


def write_mrc_fixed(path: Path, data: np.ndarray, pixel_size_A: float, stack: bool = False) -> Path:
    write_mrc(path, data, pixel_size_A, stack=stack)
    _fix_label(path)
    return path


def write_star_fixed(path: Path, blocks: dict) -> Path:
    """write_star without the writer's time-stamped comment line (same seed -> identical files)."""
    write_star(path, blocks)
    text = path.read_text()
    path.write_text("".join(line for line in text.splitlines(keepends=True) if not line.startswith("# Created by")))
    return path


# ---------------------------------------------------------------------------------------- structure
@dataclass
class TrueMaps:
    maps: list[torch.Tensor]  # imaged potential (V above the ice) per class
    box: int
    diameter_A: float
    info: dict


def build_true_maps(cfg: SimulationConfig, n_classes: int, log: Callable[[str], None]) -> TrueMaps:
    """The class maps at the project pixel size, from an atomic model or an MRC map."""
    src = DEFAULT_STRUCTURE if cfg.structure == "default" else Path(cfg.structure)
    p = cfg.pixel_size
    ice_V = WATER_MOLECULES_PER_A3 * WATER_POTENTIAL_INTEGRAL_V_A3
    if src.suffix.lower() in (".mrc", ".map", ".rec") or src.name.lower().endswith((".mrc.gz", ".map.gz")):
        return _maps_from_mrc(src, cfg, n_classes, log)
    model = pot.read_atomic_model(src)
    symmetry = cfg.symmetry or (DEFAULT_SYMMETRY if cfg.structure == "default" else "C1")
    model, sym_rms = pot.orient_for_symmetry(model, symmetry)
    if sym_rms > 3.0:
        log(f"WARNING: {src.name} deviates from {symmetry} (in RELION's orientation) by {sym_rms:.1f} A RMS; "
            f"its map is not {symmetry}-symmetric as RELION expects. T/O/I models must come in RELION's orientation.")
    cut_chains: list[str] = []
    if cfg.asymmetric_cut > 0:  # an asymmetric particle: drop a patch of chains off every symmetry axis
        cut = pot.chains_near_point(model, pot.asymmetric_point(model), cfg.asymmetric_cut)
        cut_chains = sorted(set(model.chains[cut].tolist()))
        model = model.subset(~cut)
        symmetry, sym_rms = "C1", 0.0
        log(f"asymmetric cut: chains {','.join(cut_chains)} removed ({cut.mean():.3f} of the atoms); symmetry C1")
    diameter = 2 * float(np.linalg.norm(model.xyz_A, axis=1).max())
    box = cfg.box or _even(BOX_FACTOR * diameter / p)
    log(f"structure {src.name}: {len(model)} atoms, {model.mass_Da() / 1e3:.0f} kDa, diameter {diameter:.0f} A, "
        f"symmetry {symmetry} (RMS {sym_rms:.2f} A), box {box} px at {p:g} A")
    full = pot.potential_map(model, box, p, cfg.bfactor, centre_A=np.zeros(3))
    maps, masses, removed_chains = [], [], []
    parts = [(model, full)]
    if n_classes > 1:
        remove = pot.chains_for_variant(model, cfg.variant_mass_fraction)
        part = pot.potential_map(model.subset(remove), box, p, cfg.bfactor, centre_A=np.zeros(3))
        parts.append((model.subset(~remove), full - part))
        removed_chains = sorted(set(model.chains[remove].tolist()))
    for m, v in parts:
        mass = m.mass_Da()
        env = pot.molecular_envelope(v, p, mass * pot.PROTEIN_VOLUME_A3_PER_DA)
        maps.append(v - ice_V * env)
        masses.append(mass)
    info = {
        "source": src.name if cfg.structure == "default" else str(src), "kind": "atomic model", "n_atoms": len(model), "symmetry": symmetry,
        "symmetry_rms_A": round(sym_rms, 4), "asymmetric_cut_chains": cut_chains, "diameter_A": round(diameter, 1), "bfactor_A2": cfg.bfactor,
        "mass_kDa": [round(x / 1e3, 1) for x in masses], "variant_removed_chains": removed_chains,
        "variant_mass_fraction": round(1 - masses[1] / masses[0], 4) if n_classes > 1 else 0.0,
        "potential": "Peng 1996 five-Gaussian scattering factors, implicit hydrogens, minus the ice potential "
                     f"({ice_V:.2f} V) over the molecular envelope (1.21 A^3/Da)",
        "orientation": "centred on the atoms' centroid; C_n/D_n axes in RELION's orientation",
    }
    return TrueMaps(maps, box, diameter, info)


def _maps_from_mrc(src: Path, cfg: SimulationConfig, n_classes: int, log: Callable[[str], None]) -> TrueMaps:
    from scipy.ndimage import zoom

    data, px_in = read_mrc(src)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise SubtomoError(f"--structure {src}: a cubic 3D map is needed (found shape {data.shape}).")
    p = cfg.pixel_size
    vol = torch.as_tensor(data, dtype=torch.float32)
    if px_in < p:
        vol = lowpass(vol, 2.0 * p, px_in)
    vol = torch.as_tensor(zoom(vol.numpy(), px_in / p, order=1), dtype=torch.float32)
    vol = vol - torch.median(torch.cat([vol[0].flatten(), vol[-1].flatten()]))
    thr = 0.2 * float(vol.max())
    inside = vol > thr
    if not inside.any():
        raise SubtomoError(f"--structure {src}: the map has no positive density.")
    zz, yy, xx = torch.nonzero(inside, as_tuple=True)
    c = vol.shape[0] // 2
    radius = float(torch.sqrt(((zz - c) ** 2 + (yy - c) ** 2 + (xx - c) ** 2).float()).max()) * p
    diameter = 2 * radius
    box = cfg.box or _even(BOX_FACTOR * diameter / p)
    n = vol.shape[0]
    out = torch.zeros(box, box, box)
    lo_src, lo_dst = max(0, n // 2 - box // 2), max(0, box // 2 - n // 2)
    m = min(n, box)
    out[lo_dst:lo_dst + m, lo_dst:lo_dst + m, lo_dst:lo_dst + m] = vol[lo_src:lo_src + m, lo_src:lo_src + m, lo_src:lo_src + m]
    out = out * (cfg.map_contrast / float(out[out > thr].mean()))
    maps = [out]
    if n_classes > 1:
        ax = (torch.arange(box) - box // 2).float()
        z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
        top = torch.nonzero(out > thr)[:, 0].max().item() - box // 2
        d = torch.sqrt(x ** 2 + y ** 2 + (z - top) ** 2)
        dens = torch.where(out > thr, out, torch.zeros_like(out))
        order = torch.argsort(d.flatten())
        cum = torch.cumsum(dens.flatten()[order], 0)
        cut = d.flatten()[order][int(torch.searchsorted(cum, cfg.variant_mass_fraction * cum[-1]))]
        weight = torch.clamp((d - cut) / 2.0 + 0.5, 0, 1)
        maps.append(out * weight)
    log(f"structure {src.name}: map {n}^3 at {px_in:g} A -> box {box} at {p:g} A, diameter {diameter:.0f} A")
    info = {"source": str(src), "kind": "map", "symmetry": cfg.symmetry or "C1", "diameter_A": round(diameter, 1),
            "map_contrast_V": cfg.map_contrast, "input_pixel_size_A": px_in}
    return TrueMaps(maps, box, diameter, info)


# ---------------------------------------------------------------------------------------- geometry
def tilt_geometry(cfg: SimulationConfig, rng: np.random.Generator) -> TiltGeometry:
    tilts, acq = tilt_scheme(cfg.tilt_min, cfg.tilt_max, cfg.tilt_step, cfg.tilt_scheme)
    n = len(tilts)
    dose = cfg.total_dose / n
    nominal = (cfg.defocus + rng.uniform(-0.5, 0.5) * cfg.defocus_spread) * 1e4
    defocus = nominal + rng.normal(0, cfg.defocus_jitter * 1e4, n)
    astig = np.abs(cfg.astigmatism * (1 + rng.normal(0, 0.1, n)))
    angle = (rng.uniform(0, 180) + rng.normal(0, 3.0, n)) % 180
    true_tilts = tilts + rng.normal(0, cfg.misalignment_tilt, n) if cfg.misalignment_tilt else tilts.copy()
    shifts = rng.normal(0, cfg.misalignment_shift, (n, 2)) if cfg.misalignment_shift else np.zeros((n, 2))
    nx, ny, _ = cfg.tomo_size
    return TiltGeometry(tilts_deg=tilts, true_tilts_deg=true_tilts, shifts_px=shifts, acquisition=acq,
                        pre_dose=acq * dose, dose_per_tilt=dose, defocus_A=defocus, astigmatism_A=astig,
                        astigmatism_angle_deg=angle, image_shape=(ny, nx), pixel_size_A=cfg.pixel_size,
                        defocus_hand=cfg.defocus_handedness)


def make_objects(cfg: SimulationConfig, templates: list[Template], n_classes: int,
                 rng: np.random.Generator) -> Objects:
    """Classes, kinds, non-overlapping positions and random poses of one tomogram's objects."""
    n_p = cfg.n_particles
    counts = np.floor(np.asarray(cfg.class_fractions[:n_classes]) * n_p).astype(int)
    counts[-1] += n_p - counts.sum()
    classes = rng.permutation(np.repeat(np.arange(1, n_classes + 1), counts))
    gold_idx = n_classes
    junk_first = n_classes + 1
    n_jt = len(templates) - junk_first
    template = np.concatenate([np.full(cfg.n_fiducials, gold_idx), classes - 1,
                               junk_first + rng.integers(0, max(n_jt, 1), cfg.n_junk)]).astype(int)
    kind = np.array(["fiducial"] * cfg.n_fiducials + ["particle"] * n_p + ["junk"] * cfg.n_junk)
    class_number = np.concatenate([np.zeros(cfg.n_fiducials, int), classes, np.zeros(cfg.n_junk, int)])
    radii = np.array([templates[t].radius_A for t in template])
    if cfg.layers == 2:
        z_mode = np.concatenate([rng.choice([-1, 1], cfg.n_fiducials), np.where(np.arange(n_p) % 2, 1, -1),
                                 np.zeros(cfg.n_junk, int)])
    else:
        z_mode = np.concatenate([rng.choice([-1, 1], cfg.n_fiducials), np.zeros(n_p + cfg.n_junk, int)])
    nx, ny, _ = cfg.tomo_size
    centres = place_spheres(radii, (nx * cfg.pixel_size, ny * cfg.pixel_size), cfg.ice_thickness, z_mode, rng)
    angles, mats = random_poses(len(kind), rng)
    return Objects(kind, template, class_number, centres, angles, mats)


# ---------------------------------------------------------------------------------------- images
def ice_contrast(cfg: SimulationConfig, geom: TiltGeometry, optics: Optics, t: int, texture_proj: torch.Tensor,
                 rng: np.random.Generator, grid: ImageCtfGrid, defocus_offset_A: float = 0.0) -> torch.Tensor:
    """Contrast of the ice at tilt t: two water layers (broad-band) + the smooth texture, CTF-filtered."""
    ny, nx = geom.image_shape
    std = water_noise_std(cfg.ice_thickness / 2, float(geom.true_tilts_deg[t]), cfg.pixel_size, cfg.ice_structure_factor)
    layers = []
    for z_layer in (-cfg.ice_thickness / 4, cfg.ice_thickness / 4):
        layer = torch.from_numpy(rng.standard_normal((ny, nx), dtype=np.float32)) * std + texture_proj / 2
        layers.append((layer, z_layer))
    return ctf_filter_layers(layers, geom, t, grid, defocus_offset_A) * (-2 * interaction_constant(optics.voltage_kV))


def smooth_texture_2d(rng: np.random.Generator, shape: tuple[int, int], length_px: float, std: float) -> torch.Tensor:
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal(shape), sigma=max(length_px, 0.5), mode="wrap")
    return torch.as_tensor(f * (std / max(float(f.std()), 1e-12)), dtype=torch.float32)


def _per_tilt_images(cfg: SimulationConfig, geom: TiltGeometry, optics: Optics, grid: ImageCtfGrid,
                     field: torch.Tensor, spacing: float, contrast: torch.Tensor, trng: np.random.Generator,
                     images: np.ndarray, trials: np.ndarray | None, trial_defocus: np.ndarray, n0s: np.ndarray) -> None:
    """Ice, trials and shot noise of every tilt (fills ``images``, ``trials``, ``trial_defocus``, ``n0s``)."""
    ny, nx = geom.image_shape
    p = cfg.pixel_size
    for t in range(len(geom.tilts_deg)):
        tex = project_texture(field, spacing, cfg.ice_thickness, float(geom.true_tilts_deg[t]), geom.shifts_px[t],
                              (ny, nx), p) if cfg.ice_texture > 0 else torch.zeros(ny, nx)
        c = contrast[t] + ice_contrast(cfg, geom, optics, t, tex, trng, grid)
        n0s[t] = electrons_per_pixel(geom, t, cfg.ice_thickness, cfg.inelastic_mean_free_path if cfg.energy_filter else None)
        images[t] = shot_noise(c, n0s[t], trng)
        if trials is not None:
            for k in range(2):
                offset = float(trng.normal(0, cfg.trial_defocus_offset)) if cfg.trial_defocus_offset else 0.0
                trial_defocus[t, k] = geom.defocus_A[t] + offset
                tex2 = smooth_texture_2d(trng, (ny, nx), cfg.ice_texture_length / p, float(tex.std()))
                trials[2 * t + k] = shot_noise(ice_contrast(cfg, geom, optics, t, tex2, trng, grid, offset), n0s[t], trng)


@contextmanager
def single_thread():
    """Run a block with one torch thread (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_tomogram(path: Path, images: np.ndarray, geom: TiltGeometry, nz: int, pixel_size_A: float) -> None:
    """WBP of the normalised tilt series into ``path`` slab by slab, then scaled to mean 0 / std 1."""
    ny, nx = geom.image_shape
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    contrast = torch.as_tensor(images, dtype=torch.float32)
    contrast = contrast / contrast.mean(dim=(1, 2), keepdim=True) - 1
    stats = [0.0, 0.0]
    try:
        with mrcfile.new_mmap(tmp, shape=(nz, ny, nx), mrc_mode=2, overwrite=True) as m:
            def write(z0: int, block: torch.Tensor) -> None:
                b = block.double()
                stats[0] += float(b.sum())
                stats[1] += float((b * b).sum())
                m.data[z0:z0 + block.shape[0]] = block.numpy()

            weighted_backprojection(contrast, geom.tilts_deg, nz, write)
            count = nz * ny * nx
            mean = stats[0] / count
            std = math.sqrt(max(stats[1] / count - mean * mean, 1e-30))
            for z0 in range(0, nz, 32):
                m.data[z0:z0 + 32] = ((m.data[z0:z0 + 32] - mean) / std).astype(np.float32)
            m.voxel_size = pixel_size_A
            m.update_header_stats()
            m.header.label[0] = MRC_LABEL.ljust(80)
            m.header.nlabl = 1
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------------------- project
def simulate_project(cfg: SimulationConfig, project: Path, seed: int, log: Callable[[str], None] = print,
                     device: torch.device | None = None) -> dict:
    """Write a complete simulated project into ``project``; returns the simulation summary."""
    device = device or torch.device("cpu")
    project = Path(project)
    n_classes = len(cfg.class_fractions)
    truth = build_true_maps(cfg, n_classes, log)
    p = cfg.pixel_size
    lam = electron_wavelength_A(cfg.voltage)
    max_defocus = (cfg.defocus + cfg.defocus_spread / 2 + 4 * cfg.defocus_jitter) * 1e4 + cfg.ice_thickness
    deloc_px = int(math.ceil(lam * max_defocus / (2 * p) / p)) + 2

    templates = [Template(f"class{k + 1:03d}", v, truth.diameter_A / 2 + 5) for k, v in enumerate(truth.maps)]
    gold_box = _even(1.5 * cfg.fiducial_diameter / p, 8)
    templates.append(Template("gold", gold_bead_map(cfg.fiducial_diameter, cfg.gold_contrast, gold_box, p),
                              cfg.fiducial_diameter / 2 + 5))
    junk_rng = np.random.default_rng([seed, 1])
    for j in range(N_JUNK_TEMPLATES):
        r = float(junk_rng.uniform(0.3, 0.5) * truth.diameter_A)
        templates.append(Template(f"junk{j}", junk_map(junk_rng, r, cfg.junk_contrast, _even(2.4 * r / p), p), r + 5))
    for tp in templates:
        n = tp.volume.shape[-1]
        tp.projector = FourierSliceProjector(tp.volume.to(device), _even(n + 2 * deloc_px))

    mtf = None
    if cfg.mtf.lower() != "none":
        mtf_path = MTF_FILES.get(cfg.mtf.lower(), Path(cfg.mtf))
        if not mtf_path.exists():
            raise SubtomoError(f"--mtf {cfg.mtf}: not 'none', 'k3' or an existing RELION MTF STAR file.")
        mtf = read_mtf(mtf_path)
    optics = Optics(cfg.voltage, cfg.cs, cfg.amplitude_contrast, p)
    detector = Detector(cfg.image_bfactor, mtf, cfg.detector_pixel_size)

    # acquisition and specimen of every tomogram first: a crowded slab fails before anything is written
    specimens = []
    for it in range(cfg.n_tomograms):
        trng = np.random.default_rng([seed, 100 + it])
        specimens.append((f"TS_{it + 1:02d}", trng, tilt_geometry(cfg, trng), make_objects(cfg, templates, n_classes, trng)))

    gt_dir = project / "GroundTruth"
    gt_dir.mkdir(parents=True, exist_ok=True)
    for k, v in enumerate(truth.maps):
        write_mrc_fixed(gt_dir / f"class{k + 1:03d}.mrc", v.numpy(), p)

    nx, ny, nz = cfg.tomo_size
    picks_rows, tilt_rows, tomo_info = [], [], []
    for name, trng, geom, objs in specimens:
        n_t = len(geom.tilts_deg)
        pad = max(tp.projector.patch for tp in templates)
        canvas = torch.zeros(n_t, ny + 2 * pad, nx + 2 * pad, device=device)
        for ti_, tp in enumerate(templates):
            sel = np.nonzero(objs.template == ti_)[0]
            if len(sel) == 0:
                continue
            filt = image_filters(tp.projector.k2d / p, mean_exposure(geom), detector)
            render_objects(canvas, pad, tp.projector, objs.centre_A[sel], objs.matrices[sel], geom, optics, filt)
        contrast = canvas[:, pad:pad + ny, pad:pad + nx].cpu()
        del canvas
        field, spacing = ice_texture_field(
            trng, (nx * p / 2 / math.cos(math.radians(max(abs(cfg.tilt_min), abs(cfg.tilt_max)))) + cfg.ice_thickness,
                   ny * p / 2 + cfg.ice_texture_length), cfg.ice_thickness, cfg.ice_texture_length, cfg.ice_texture)
        images = np.zeros((n_t, ny, nx), np.float32)
        grid = ImageCtfGrid((ny, nx), p, optics, detector)
        trials = np.zeros((2 * n_t, ny, nx), np.float32) if cfg.trials else None
        trial_defocus = np.zeros((n_t, 2))
        n0s = np.zeros(n_t)
        with single_thread():  # per-image work is many small ops: threads only add overhead
            _per_tilt_images(cfg, geom, optics, grid, field, spacing, contrast, trng, images, trials, trial_defocus, n0s)
        del contrast
        tdir = project / "Tomograms" / name
        tdir.mkdir(parents=True, exist_ok=True)
        write_mrc_fixed(tdir / f"{name}.mrcs", images, p, stack=True)
        if trials is not None:
            write_mrc_fixed(tdir / f"{name}.trial", trials, p, stack=True)
        (tdir / f"{name}.tlt").write_text("".join(f"{a:.2f}\n" for a in geom.tilts_deg))
        acq_order = np.argsort(geom.acquisition)
        write_text_rows(tdir / f"{name}.order", np.stack([geom.tilts_deg[acq_order], geom.pre_dose[acq_order]], 1), "%.2f")
        _write_tomogram(tdir / f"{name}.mrc", images, geom, nz, p)

        # picks: every object, shuffled as a picker's list would be; truth rows in the same order
        order = trng.permutation(len(objs))
        size = np.array([nx, ny, nz], dtype=np.float64)
        true_px = objs.centre_A[order] / p + size / 2
        picked = true_px + (trng.normal(0, cfg.picking_error, true_px.shape) if cfg.picking_error else 0.0)
        picked = np.clip(picked, 0, size)
        write_text_rows(tdir / f"{name}.coords", picked, "%.2f")
        for line, o in enumerate(order, start=1):
            picks_rows.append({
                "rlnTomoName": name, "rlnTomoParticleId": line, "subtomoKind": str(objs.kind[o]),
                "rlnClassNumber": int(objs.class_number[o]),
                "rlnCoordinateX": true_px[line - 1, 0], "rlnCoordinateY": true_px[line - 1, 1],
                "rlnCoordinateZ": true_px[line - 1, 2],
                "rlnAngleRot": objs.angles_deg[o, 0], "rlnAngleTilt": objs.angles_deg[o, 1], "rlnAnglePsi": objs.angles_deg[o, 2],
                "subtomoPickedX": picked[line - 1, 0], "subtomoPickedY": picked[line - 1, 1], "subtomoPickedZ": picked[line - 1, 2],
            })
        for t in range(n_t):
            row = {
                "rlnTomoName": name, "rlnMicrographName": f"{t + 1}@Tomograms/{name}/{name}.mrcs",
                "rlnTomoNominalStageTiltAngle": geom.tilts_deg[t],
                "rlnDefocusU": geom.defocus_u[t], "rlnDefocusV": geom.defocus_v[t],
                "rlnDefocusAngle": geom.astigmatism_angle_deg[t], "rlnMicrographPreExposure": geom.pre_dose[t],
                "subtomoAcquisitionIndex": int(geom.acquisition[t]) + 1,
                "subtomoTrueTiltAngle": geom.true_tilts_deg[t],
                "subtomoShiftXPx": geom.shifts_px[t, 0], "subtomoShiftYPx": geom.shifts_px[t, 1],
                "subtomoElectronsPerPixel": n0s[t],
            }
            if cfg.trials:
                row["subtomoTrialDefocus1"] = trial_defocus[t, 0]
                row["subtomoTrialDefocus2"] = trial_defocus[t, 1]
            tilt_rows.append(row)
        per_class = {f"class{k + 1:03d}": int(np.sum(objs.class_number == k + 1)) for k in range(n_classes)}
        tomo_info.append({"name": name, "size_xyz_px": [nx, ny, nz], "n_tilts": n_t,
                          "particles": per_class, "fiducials": int(np.sum(objs.kind == "fiducial")),
                          "junk": int(np.sum(objs.kind == "junk")),
                          "mean_defocus_A": round(float(geom.defocus_A.mean()), 1),
                          "electrons_per_pixel_at_0deg": round(float(n0s[np.argmin(np.abs(geom.tilts_deg))]), 2)})
        log(f"{name}: {len(objs)} objects ({cfg.n_particles} particles, {cfg.n_fiducials} fiducials, {cfg.n_junk} junk), "
            f"{n_t} tilts, mean defocus {geom.defocus_A.mean() / 1e4:.2f} um, {nx}x{ny}x{nz} px")

    write_star_fixed(gt_dir / "picks.star", {"picks": pd.DataFrame(picks_rows)})
    write_star_fixed(gt_dir / "tilts.star", {"tilts": pd.DataFrame(tilt_rows)})
    summary = {
        "subtomo_version": subtomo.__version__, "seed": seed, "parameters": cfg.model_dump(),
        "pixel_size_A": p, "box_px": truth.box, "structure": truth.info,
        "classes": [f"class{k + 1:03d}.mrc" for k in range(n_classes)],
        "tomograms": tomo_info,
        "constants": {"interaction_constant_rad_per_V_A": interaction_constant(cfg.voltage),
                      "ice_mean_potential_V": WATER_MOLECULES_PER_A3 * WATER_POTENTIAL_INTEGRAL_V_A3,
                      "wavelength_A": lam},
        "models": {
            "image": "weak-phase: contrast = -2 sigma_e (CTF x filters) * projected potential; Fourier-slice projection per object",
            "ctf": "RELION CTF per object at defocus D_theta - h (h along the beam), tilt astigmatism",
            "dose": "Grant & Grigorieff 2015 critical exposure, amplitude exp(-N/2Ne) at the mean accumulated dose of the image",
            "ice": "two water layers (broad-band, variance ~ path) + smooth 3D texture, CTF with the defocus gradient",
            "noise": "Poisson counts; zero-loss transmission exp(-path/mfp) if energy-filtered",
            "tomogram": "R-weighted back-projection with the .tlt angles (residual misalignment not corrected)",
        },
        "coordinates": "px, origin at the lower-left (IMOD); picks.star rlnCoordinate = true centre, subtomoPicked = .coords value",
    }
    (gt_dir / "simulation.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary
