"""The model of one optimisation (one half-set in auto-refine): references and noise/prior spectra.

K real reference maps (N^ndim), noise power sigma^2(r), prior power tau^2_k(r), FSC and
data_vs_prior per class, class priors pi_k, the regularisation parameter T, the offset
prior width and the current resolution/size. RELION's model.star is written from it by
:func:`subtomo.io.run_files.write_model_star` (the engine does not write files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class EMModel:
    """References, spectra and priors of one optimisation (one half of a refinement, or all classes).

    Attributes
    ----------
    maps : torch.Tensor
        (K, N, N[, N]) real references.
    sigma2 : torch.Tensor
        (N//2 + 1,) noise power per shell.
    tau2, data_vs_prior, fsc : torch.Tensor
        (K, N//2 + 1) prior power, data-vs-prior (SSNR) and FSC per class and shell.
    class_priors : torch.Tensor
        (K,) class distribution.
    pixel_size_A : float
        Pixel size [Å].
    tau2_fudge : float
        Regularisation parameter T.
    sigma_offset_px : float
        Width of the Gaussian offset prior [px].
    current_shell, current_size : int
        Current resolution shell and image size [px].
    """

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
        """Box size N [px]."""
        return int(self.maps.shape[-1])

    @property
    def n_classes(self) -> int:
        """Number of references K."""
        return int(self.maps.shape[0])

    @property
    def n_shells(self) -> int:
        """Number of Fourier shells, N//2 + 1."""
        return self.box // 2 + 1

    @property
    def current_resolution_A(self) -> float:
        """Resolution of the current shell [Å]."""
        return self.box * self.pixel_size_A / max(self.current_shell, 1)

    def state(self) -> dict:
        """Plain contents with tensors on cpu (for ``torch.save``)."""
        out = {}
        for k, v in self.__dict__.items():
            out[k] = v.cpu() if isinstance(v, torch.Tensor) else v
        return out

    @staticmethod
    def from_state(state: dict, device=None) -> "EMModel":
        """Inverse of :meth:`state`, tensors moved to ``device``."""
        kw: dict[str, Any] = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
        return EMModel(**kw)
