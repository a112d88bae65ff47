"""The model of one optimisation (one half-set in auto-refine): references and noise/prior spectra.

K real reference maps (N^ndim), noise power sigma^2(r), prior power tau^2_k(r), FSC and
data_vs_prior per class, class priors pi_k, the regularisation parameter T, the offset
prior width and the current resolution/size. ``write_model_star`` writes RELION's
model.star blocks (model_general, model_classes, model_class_N, model_group_1) with
RELION labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from subtomo.io.star import write_star


@dataclass
class EMModel:
    maps: torch.Tensor  # (K, N, N[, N]) real
    sigma2: torch.Tensor  # (n_shells,) noise power per shell
    tau2: torch.Tensor  # (K, n_shells)
    data_vs_prior: torch.Tensor  # (K, n_shells)
    fsc: torch.Tensor  # (K, n_shells) (gold-standard FSC in refine; zeros in classification)
    class_priors: torch.Tensor  # (K,)
    pixel_size_A: float
    tau2_fudge: float = 1.0
    sigma_offset_px: float = 3.0
    current_shell: int = 1
    current_size: int = 0
    ndim: int = 3
    log_lik: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def box(self) -> int:
        return int(self.maps.shape[-1])

    @property
    def n_classes(self) -> int:
        return int(self.maps.shape[0])

    @property
    def n_shells(self) -> int:
        return self.box // 2 + 1

    @property
    def current_resolution_A(self) -> float:
        return self.box * self.pixel_size_A / max(self.current_shell, 1)

    def state(self) -> dict:
        out = {}
        for k, v in self.__dict__.items():
            out[k] = v.cpu() if isinstance(v, torch.Tensor) else v
        return out

    @staticmethod
    def from_state(state: dict, device=None) -> "EMModel":
        kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
        return EMModel(**kw)


def write_model_star(path: str | Path, model: EMModel, map_names: list[str], extra_general: dict | None = None,
                     class_resolutions_A: list[float] | None = None, accuracy_rot_deg: float | None = None,
                     accuracy_trans_px: float | None = None) -> Path:
    """RELION-style model.star (labels from relion-internals §5.3)."""
    n = model.box
    px = model.pixel_size_A
    n_sh = model.n_shells
    r = np.arange(n_sh)
    spectral = r / (n * px)
    res = np.where(r > 0, n * px / np.maximum(r, 1), 999.0)
    general = {
        "rlnReferenceDimensionality": model.ndim, "rlnDataDimensionality": model.ndim,
        "rlnOriginalImageSize": n, "rlnCurrentResolution": 1.0 / model.current_resolution_A,
        "rlnCurrentImageSize": model.current_size or n, "rlnPaddingFactor": 2,
        "rlnFourierSpaceInterpolator": 1, "rlnMinRadiusNnInterpolation": 10,
        "rlnPixelSize": px, "rlnNrClasses": model.n_classes, "rlnNrBodies": 1, "rlnNrGroups": 1,
        "rlnTau2FudgeFactor": model.tau2_fudge, "rlnNormCorrectionAverage": 1.0,
        "rlnSigmaOffsetsAngst": model.sigma_offset_px * px, "rlnOrientationalPriorMode": 0,
        "rlnSigmaPriorRotAngle": 0.0, "rlnSigmaPriorTiltAngle": 0.0, "rlnSigmaPriorPsiAngle": 0.0,
        "rlnLogLikelihood": model.log_lik, "rlnAveragePmax": float(model.extra.get("average_pmax", 0.0)),
    }
    if extra_general:
        general.update(extra_general)
    classes = pd.DataFrame({
        "rlnReferenceImage": map_names,
        "rlnClassDistribution": model.class_priors.detach().cpu().double().numpy(),
        "rlnAccuracyRotations": [accuracy_rot_deg if accuracy_rot_deg is not None else 999.0] * model.n_classes,
        "rlnAccuracyTranslationsAngst": [accuracy_trans_px * px if accuracy_trans_px is not None else 999.0] * model.n_classes,
        "rlnEstimatedResolution": class_resolutions_A or [model.current_resolution_A] * model.n_classes,
        "rlnOverallFourierCompleteness": [1.0] * model.n_classes,
    })
    blocks: dict = {"model_general": general, "model_classes": classes}
    for k in range(model.n_classes):
        blocks[f"model_class_{k + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": r, "rlnResolution": spectral, "rlnAngstromResolution": res,
            "rlnSsnrMap": model.data_vs_prior[k].detach().cpu().double().numpy(),
            "rlnGoldStandardFsc": model.fsc[k].detach().cpu().double().numpy(),
            "rlnReferenceSigma2": model.tau2[k].detach().cpu().double().numpy() / 2,
            "rlnReferenceTau2": model.tau2[k].detach().cpu().double().numpy(),
        })
    blocks["model_groups"] = pd.DataFrame({"rlnGroupNumber": [1], "rlnGroupName": ["group_1"],
                                           "rlnGroupNrParticles": [int(model.extra.get("n_particles", 0))],
                                           "rlnGroupScaleCorrection": [1.0]})
    blocks["model_group_1"] = pd.DataFrame({"rlnSpectralIndex": r, "rlnResolution": spectral,
                                            "rlnSigma2Noise": model.sigma2.detach().cpu().double().numpy()})
    return write_star(path, blocks)
