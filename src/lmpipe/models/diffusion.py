"""Masked diffusion LM: MDLM training (Sahoo et al. 2024), MDLM and LLaDA samplers.

The forward process, the NELBO, the RL log-prob estimate and the samplers are in
``masked.py`` (SDD shares them); this denoiser reads the noised sequence as it is: a MASK
token at every masked position.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lmpipe.batch import Batch
from lmpipe.models.base import TokenScores
from lmpipe.models.masked import MaskedDiffusionLM


class DiffusionLM(MaskedDiffusionLM):
    arch = "diffusion"
    pads_with_eos: ClassVar[bool] = True

    def score(self, batch: Batch, *, generator: torch.Generator | None = None) -> TokenScores:
        """One-sample NELBO: all randomness comes from ``generator`` so that two models
        given alike-seeded generators see the same t and masks (DPO / VRPO)."""
        noisy, masked, t = self.noise(batch, generator)
        return self.nelbo(self.denoise(noisy, batch), batch, masked, t)
