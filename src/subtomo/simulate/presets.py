"""Simulation parameters and the named presets (tiny, demo, benchmark).

A preset is a set of overrides of :class:`SimulationConfig`'s defaults; every field can be
overridden again from the command line (``subtomo simulate DIR --preset demo --n-particles 50``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from subtomo.errors import SubtomoError


class SimulationConfig(BaseModel):
    """Everything that defines a simulated project (units in brackets)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    structure: str = Field("default", description="Atomic model (PDB/mmCIF, .gz ok) or MRC map of the particle; 'default' = the shipped T. acidophilum 20S proteasome (PDB 3J9I).")
    symmetry: str | None = Field(None, description="Point group of the structure; C_n/D_n models are rotated into RELION's orientation (default: D7 for the shipped proteasome, else C1).")
    pixel_size: float = Field(8.0, gt=0, description="Pixel size of tilt series, tomogram and maps [Å].")
    box: int = Field(0, ge=0, description="Box of the true maps [px] (0: even, about 1.75x the particle diameter).")
    bfactor: float = Field(50.0, ge=0, description="Atomic B-factor applied to every atom [Å²].")
    map_contrast: float = Field(3.0, gt=0, description="Mean potential above the ice of an MRC map given as --structure [V].")
    n_tomograms: int = Field(2, ge=1, description="Number of tomograms.")
    n_particles: int = Field(100, ge=1, description="Particles per tomogram.")
    class_fractions: list[float] = Field([0.6, 0.4], description="Fraction of particles per class; class 2 is the variant lacking about --variant-mass-fraction of the mass.")
    variant_mass_fraction: float = Field(0.1, gt=0, lt=0.9, description="Mass removed (whole chains around one end) in the class-2 variant [fraction].")
    asymmetric_cut: float = Field(0.0, ge=0, lt=0.5, description="Mass removed from every particle (whole chains nearest a point off all symmetry axes, at the bottom end) so that a symmetric atomic model becomes asymmetric (C1); the variant then loses --variant-mass-fraction of the rest at the top end; 0: off [fraction].")
    tomo_size: list[int] = Field([320, 320, 128], description="Tomogram size x,y,z [px] (x,y = tilt image size).")
    ice_thickness: float = Field(800.0, gt=0, description="Ice slab thickness [Å].")
    layers: int = Field(1, ge=1, le=2, description="1: particles anywhere in the slab; 2: two layers at the top and bottom of the ice.")
    n_fiducials: int = Field(4, ge=0, description="Gold beads per tomogram (on the ice surfaces, picked as false positives).")
    fiducial_diameter: float = Field(100.0, gt=0, description="Gold bead diameter [Å].")
    gold_contrast: float = Field(25.0, gt=0, description="Potential of gold above the ice [V].")
    n_junk: int = Field(6, ge=0, description="Junk blobs per tomogram (picked as false positives).")
    junk_contrast: float = Field(3.0, gt=0, description="Potential of junk blobs above the ice [V].")
    tilt_min: float = Field(-60.0, description="Lowest tilt [deg].")
    tilt_max: float = Field(60.0, description="Highest tilt [deg].")
    tilt_step: float = Field(3.0, gt=0, description="Tilt increment [deg].")
    tilt_scheme: Literal["dose-symmetric", "bidirectional"] = Field("dose-symmetric", description="Acquisition order (accumulated dose per tilt).")
    total_dose: float = Field(120.0, gt=0, description="Total dose of the tilt series [e/Å²].")
    voltage: float = Field(300.0, gt=0, description="Acceleration voltage [kV].")
    cs: float = Field(2.7, ge=0, description="Spherical aberration [mm].")
    amplitude_contrast: float = Field(0.07, ge=0, le=1, description="Amplitude contrast [fraction].")
    defocus: float = Field(3.5, gt=0, description="Mean nominal defocus (underfocus) [µm].")
    defocus_spread: float = Field(1.0, ge=0, description="Defocus range between tomograms (uniform ± half) [µm].")
    defocus_jitter: float = Field(0.1, ge=0, description="Per-tilt defocus error (std) [µm].")
    astigmatism: float = Field(400.0, ge=0, description="Astigmatism, defocus U - V [Å].")
    defocus_handedness: int = Field(-1, ge=-1, le=1, description="Defocus handedness, -1 or +1 (docs/conventions.md): "
                                                                 "-1 (default) defocus D - h; +1 data of the other hand, D + h.")
    image_bfactor: float = Field(50.0, ge=0, description="Image envelope B-factor (drift, vibration) [Å²].")
    mtf: str = Field("k3", description="Detector MTF: none, k3 (shipped Gatan K3 300 kV curve) or a RELION MTF STAR file.")
    detector_pixel_size: float = Field(1.35, gt=0, description="Physical detector pixel (for the MTF) [Å].")
    energy_filter: bool = Field(True, description="Zero-loss energy filter: inelastically scattered electrons are removed.")
    inelastic_mean_free_path: float = Field(3500.0, gt=0, description="Inelastic mean free path in ice [Å].")
    ice_structure_factor: float = Field(0.1, ge=0, description="Low-angle structure factor of amorphous water (scales the broad-band ice noise).")
    ice_texture: float = Field(0.3, ge=0, description="Std of the smooth random ice density [V].")
    ice_texture_length: float = Field(50.0, gt=0, description="Correlation length of the smooth ice density [Å].")
    picking_error: float = Field(1.0, ge=0, description="Std of the error of the .coords positions, per axis [px].")
    misalignment_shift: float = Field(0.3, ge=0, description="Residual alignment error: per-tilt image shift std (not in the files) [px].")
    misalignment_tilt: float = Field(0.1, ge=0, description="Residual alignment error: per-tilt angle std (not in the .tlt) [deg].")
    trials: bool = Field(True, description="Write the .trial stacks (two particle-free images per tilt).")
    trial_defocus_offset: float = Field(200.0, ge=0, description="Std of the trial areas' defocus difference from the exposure [Å].")

    @field_validator("defocus_handedness")
    @classmethod
    def _hand(cls, v: int) -> int:
        if v not in (-1, 1):
            raise ValueError("must be -1 or +1")
        return v


PRESETS: dict[str, dict] = {
    # tests: one small tomogram, seconds
    "tiny": dict(pixel_size=10.0, n_tomograms=1, n_particles=10, tomo_size=[128, 128, 64], ice_thickness=500.0,
                 tilt_step=6.0, n_fiducials=2, n_junk=2, class_fractions=[0.5, 0.5], picking_error=0.0,
                 misalignment_shift=0.0, misalignment_tilt=0.0),
    # README demo: a few minutes downstream on 2 cores
    "demo": dict(pixel_size=8.0, n_tomograms=2, n_particles=100, tomo_size=[320, 320, 128], ice_thickness=800.0,
                 tilt_step=3.0, n_fiducials=4, n_junk=8),
    # benchmarks: several hundred particles, box 64
    "benchmark": dict(pixel_size=5.0, n_tomograms=2, n_particles=200, tomo_size=[512, 512, 192], ice_thickness=800.0,
                      tilt_step=3.0, n_fiducials=6, n_junk=12),
}


def config_for(preset: str, overrides: dict) -> SimulationConfig:
    """The preset's configuration with ``overrides`` (None values ignored) applied and checked."""
    if preset not in PRESETS:
        raise SubtomoError(f"--preset {preset!r}: unknown. Choose one of {', '.join(PRESETS)}.")
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = SimulationConfig(**values)
    problems = []
    if len(cfg.tomo_size) != 3 or any(s < 16 or s % 2 for s in cfg.tomo_size):
        problems.append(f"--tomo-size {cfg.tomo_size}: give three even sizes x,y,z of at least 16 px.")
    if not cfg.class_fractions or any(f < 0 for f in cfg.class_fractions) or abs(sum(cfg.class_fractions) - 1) > 1e-3:
        problems.append(f"--class-fractions {cfg.class_fractions}: give non-negative fractions that sum to 1.")
    if len(cfg.class_fractions) > 2:
        problems.append("--class-fractions: at most two classes (the structure and its variant).")
    if cfg.asymmetric_cut > 0 and cfg.structure != "default" and Path(cfg.structure).suffix.lower() not in (".pdb", ".cif", ".gz", ".ent", ".mmcif"):
        problems.append("--asymmetric-cut removes whole chains: give an atomic model (or the default structure), not a map.")
    if cfg.tilt_min >= cfg.tilt_max or cfg.tilt_min < -80 or cfg.tilt_max > 80:
        problems.append(f"tilt range {cfg.tilt_min}..{cfg.tilt_max} deg: needs -80 <= min < max <= 80.")
    if cfg.box % 2:
        problems.append(f"--box {cfg.box}: must be even.")
    if cfg.tomo_size and len(cfg.tomo_size) == 3 and cfg.ice_thickness > cfg.tomo_size[2] * cfg.pixel_size:
        problems.append(f"--ice-thickness {cfg.ice_thickness:g} A is thicker than the tomogram "
                        f"({cfg.tomo_size[2]} px x {cfg.pixel_size:g} A). Fix: a larger z in --tomo-size or thinner ice.")
    if cfg.mtf.lower() not in ("none", "k3") and not Path(cfg.mtf).exists():
        problems.append(f"--mtf {cfg.mtf}: not 'none', 'k3' or an existing RELION MTF STAR file.")
    if problems:
        raise SubtomoError("invalid simulation parameters", problems)
    return cfg
