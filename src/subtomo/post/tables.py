"""The tables of ``postprocess.star``: RELION's blocks (general, fsc, guinier) plus directional FSCs.

RELION labels where RELION has them (``relion_postprocess`` writes the same blocks, so
RELION's GUI and scripts read our files), ``subtomo*`` labels for what RELION does not
record: why this B-factor was used, the automask threshold and the cone FSCs. Tables
only; the job writes them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from subtomo.post.fsc import DirectionalFsc, FscResult, particle_fraction_fsc
from subtomo.post.sharpen import SharpenResult


def postprocess_blocks(res: FscResult, sh: SharpenResult, dfsc: DirectionalFsc | None, mask_fraction: float,
                       file_names: dict[str, str], automask_threshold: float | None = None) -> dict:
    """The blocks of ``postprocess.star``.

    Parameters
    ----------
    res
        FSC curves and resolution (:func:`subtomo.post.fsc.masked_corrected_fsc`); needs a mask.
    sh
        Sharpening result (B-factor, its source and reason, Guinier curves).
    dfsc
        Directional FSCs, or None.
    mask_fraction
        Mean mask value (fraction of the box).
    file_names
        ``rlnUnfilteredMapHalf1``, ``rlnUnfilteredMapHalf2``, ``rlnMaskName`` -> project-relative names.
    automask_threshold
        Threshold of the automask [grey values], None for a given mask.

    Returns
    -------
    dict
        Block name -> dict (general) or DataFrame (one row per shell, per Guinier point, per cone).
    """
    general = {"rlnFinalResolution": res.resolution_A, "rlnBfactorUsedForSharpening": sh.bfactor_A2,
               **file_names, "rlnRandomiseFrom": res.box * res.pixel_size_A / (res.randomize_from or 1),
               "rlnParticleBoxFractionSolventMask": mask_fraction,
               "subtomoBfactorSource": sh.bfactor_source, "subtomoBfactorReason": sh.bfactor_reason}
    if sh.fit is not None:
        general.update(rlnFittedSlopeGuinierPlot=sh.fit.slope, rlnFittedInterceptGuinierPlot=sh.fit.intercept,
                       rlnCorrelationFitGuinierPlot=sh.fit.correlation)
    if automask_threshold is not None:
        general["subtomoAutomaskThreshold"] = automask_threshold
    shells = {"rlnSpectralIndex": np.arange(len(res.unmasked)), "rlnResolution": res.spatial_frequency_A(),
              "rlnAngstromResolution": res.shell_resolution_A()}
    curves = {name: c.cpu().double().numpy() for name, c in (
        ("rlnFourierShellCorrelationCorrected", res.final), ("rlnFourierShellCorrelationUnmaskedMaps", res.unmasked), ("rlnFourierShellCorrelationMaskedMaps", res.masked),
        ("rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps", res.randomized_masked)) if c is not None}
    g = sh.guinier
    guinier = pd.DataFrame({"rlnResolutionSquared": sh.guinier_x, "rlnLogAmplitudesOriginal": g["original"],
                            "rlnLogAmplitudesMTFCorrected": g["mtf_corrected"], "rlnLogAmplitudesWeighted": g["weighted"],
                            "rlnLogAmplitudesSharpened": g["sharpened"], "rlnLogAmplitudesIntercept": g["intercept"]})
    part = particle_fraction_fsc(res.unmasked, mask_fraction)
    fsc = pd.DataFrame({**shells, **curves})
    fsc.insert(4, "rlnFourierShellCorrelationParticleMaskFraction", part)
    blocks: dict = {"general": general, "fsc": fsc, "guinier": guinier}
    if dfsc is not None:
        axes = dfsc.axes_xyz
        blocks["directional_resolution"] = pd.DataFrame({
            "subtomoConeName": dfsc.names, "subtomoConeAxisX": axes[:, 0], "subtomoConeAxisY": axes[:, 1],
            "subtomoConeAxisZ": axes[:, 2], "subtomoConeHalfAngle": [dfsc.half_angle_deg] * len(dfsc.names),
            "subtomoConeResolution": dfsc.resolutions_A})
        cones = {f"subtomoFscCone_{n}": c for n, c in zip(dfsc.names, dfsc.curves.cpu().double().numpy())}
        blocks["directional_fsc"] = pd.DataFrame({**shells, **cones})
    return blocks
