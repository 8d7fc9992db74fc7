"""The LM seam: every architecture is one ``nn.Module`` with the same surface.

Objectives and the Trainer see only this interface, so a new architecture plugs into
every stage without touching them. ``forward`` is the scoring call (so DDP/FSDP wrappers,
which hook ``forward``, see it); ``token_nll`` is the DESIGN-level shorthand for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from lmpipe.batch import Batch
from lmpipe.errors import ConfigError
from lmpipe.models.transformer import Transformer, TransformerConfig


@dataclass
class TokenScores:
    """Per-token results of scoring a batch; all tensors are (B, L)."""

    nll: Tensor  # NLL (AR) or NELBO share (diffusion); zero where target_mask is False
    target_mask: Tensor  # bool: positions whose nll counts towards the mean
    correct: Tensor  # bool: argmax prediction equals the token, where scored_mask
    scored_mask: Tensor  # bool: positions where a prediction was made (for accuracy)


class LM(nn.Module):
    arch: ClassVar[str]
    exact_likelihood: ClassVar[bool]
    # SFT: pad after a response with EOS (with loss) so the model learns where to stop
    # (LLaDA); the data samplers read this flag through ``pad_target``.
    pads_with_eos: ClassVar[bool] = False

    def __init__(self, config: TransformerConfig, special_ids: dict[str, int] | None = None):
        super().__init__()
        self.config = config
        # The tokenizer's special tokens by name (eos, pad, mask, ...): an architecture that
        # needs one (diffusion's MASK) reads it here; saved with checkpoints.
        self.special_ids = dict(special_ids or {})
        self.backbone = Transformer(config)

    # --- the seam -----------------------------------------------------------------
    def forward(self, batch: Batch, *, generator: torch.Generator | None = None) -> TokenScores:
        raise NotImplementedError

    def token_nll(self, batch: Batch, *, generator: torch.Generator | None = None) -> Tensor:
        """(B, L) per-token NLL (or NELBO share), zero where ``batch.loss_mask`` is 0."""
        return self(batch, generator=generator).nll

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int, **sampling) -> Tensor:
        raise NotImplementedError

    @classmethod
    def pad_target(cls) -> str | None:
        """The special token (by name) that pads SFT rows after a response as a trained
        target, so that the model learns where to stop; None: PAD, never a target."""
        return "eos" if cls.pads_with_eos else None

    def on_train_step(self) -> dict[str, float]:
        """Called by the Trainer once before every optimizer step. An architecture whose
        training follows a schedule of its own (SDD's k-curriculum) advances it here,
        keeping its position in a buffer so that checkpoints carry it, and returns
        metrics to log with the step (``{"k": 4}`` -> ``train/k``). Default: nothing."""
        return {}

    def arch_options(self) -> dict:
        """Constructor arguments beyond the backbone config (saved with checkpoints).
        Subclasses with knobs of their own extend this dict."""
        return {"special_ids": self.special_ids}

    def special_id(self, name: str) -> int:
        if name not in self.special_ids:
            raise ConfigError(
                f"arch={self.arch} needs the tokenizer's '{name}' token, which this model was "
                "not given"
            )
        return self.special_ids[name]

    def config_dict(self) -> dict:
        """Enough to rebuild the module: see ``lmpipe.models.build_from_config_dict``."""
        cls = type(self)
        return {
            "lm_class": f"{cls.__module__}.{cls.__qualname__}",
            "arch": self.arch,
            "model": self.config.to_dict(),
            "arch_options": self.arch_options(),
        }

    # --- shared helpers -----------------------------------------------------------
    @staticmethod
    def row_length(block_size: int) -> int:
        """Tokens per training row for a context of ``block_size`` positions."""
        return block_size

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N + 12*L*H*Q*T (PaLM appendix B / nanoGPT)."""
        c = self.config
        n = self.backbone.num_params(non_embedding=True)
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * seq_len
