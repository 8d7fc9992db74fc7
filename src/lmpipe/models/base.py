"""The LM seam: every architecture is one ``nn.Module`` with the same surface.

Objectives and the Trainer see only this interface, so a new architecture plugs into
every stage without touching them. ``forward`` is the one call that wrappers (DDP, FSDP,
``torch.compile``) see, so every training-time computation goes through it and is named
by ``output``: ``"scores"`` (per-token NLL or NELBO share: pre-training, SFT, DPO),
``"logps"`` (per-token log-probabilities at a temperature: RL; with ``with_features`` also
the hidden states they were predicted from, for a value head in the same pass) or
``"features"`` (final hidden states: reward heads). ``token_nll`` is the DESIGN-level
shorthand.
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


@dataclass
class TokenLogps:
    """Per-token log-probabilities of a batch's target tokens; both tensors are (B, L)."""

    logps: Tensor  # log p(token) at the temperature, where loss_mask is 1; zero elsewhere
    entropy: Tensor  # entropy of the predicted distribution there (detached, for logging)
    # (B, L, d_model) with ``with_features``: the final hidden state each target token was
    # predicted from (what a value head reads: the state before the token is chosen).
    features: Tensor | None = None


OUTPUTS = ("scores", "logps", "features")


class LM(nn.Module):
    arch: ClassVar[str]
    exact_likelihood: ClassVar[bool]
    causal: ClassVar[bool]  # a position sees only the tokens before it (AR)
    # SFT: pad after a response with EOS (with loss) so the model learns where to stop
    # (LLaDA); the data samplers read this flag through ``pad_target``.
    pads_with_eos: ClassVar[bool] = False
    streams: ClassVar[bool] = False  # ``stream`` yields tokens one at a time (KV cache)

    def __init__(self, config: TransformerConfig, special_ids: dict[str, int] | None = None):
        super().__init__()
        self.config = config
        # The tokenizer's special tokens by name (eos, pad, mask, ...): an architecture that
        # needs one (diffusion's MASK) reads it here; saved with checkpoints.
        self.special_ids = dict(special_ids or {})
        self.backbone = Transformer(config)

    # --- the seam -----------------------------------------------------------------
    def forward(
        self,
        batch: Batch,
        *,
        output: str = "scores",
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        with_features: bool = False,
    ) -> TokenScores | TokenLogps | Tensor:
        """``score(batch, generator)``, ``token_logps(batch, temperature, with_features)``
        or ``features(batch)``, as ``output`` names it."""
        if output == "scores":
            return self.score(batch, generator=generator)
        if output == "logps":
            return self.token_logps(batch, temperature=temperature, with_features=with_features)
        if output == "features":
            return self.features(batch)
        raise ValueError(f"output={output!r} is not one of {', '.join(OUTPUTS)}")

    def score(self, batch: Batch, *, generator: torch.Generator | None = None) -> TokenScores:
        """Per-token NLL (or NELBO share) of the loss-mask tokens; noise from ``generator``."""
        raise NotImplementedError

    def token_nll(self, batch: Batch, *, generator: torch.Generator | None = None) -> Tensor:
        """(B, L) per-token NLL (or NELBO share), zero where ``batch.loss_mask`` is 0."""
        return self(batch, generator=generator).nll

    def token_logps(
        self, batch: Batch, *, temperature: float = 1.0, with_features: bool = False
    ) -> TokenLogps:
        """Log-probabilities of the loss-mask tokens under the logits divided by
        ``temperature`` (as sampling draws them): exact for AR, an estimate for an
        architecture without a tractable likelihood. Noise, if any, comes from
        ``batch.noise_seeds`` (one seed per row) so that two calls on the same rows agree.
        ``with_features``: also the hidden states the predictions came from."""
        raise NotImplementedError

    def features(self, batch: Batch) -> Tensor:
        """(B, L, d_model) final hidden states of the clean rows as the architecture reads
        them (causal for AR, bidirectional otherwise): what a reward or value head scores."""
        return self.backbone.hidden_states(
            batch.input_ids,
            causal=self.causal,
            segment_ids=batch.segment_ids,
            left_pad=batch.left_pad,
        )

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        *,
        left_pad: Tensor | None = None,
        copies: int = 1,
        **sampling,
    ) -> Tensor:
        """(B, T) prompts -> (B x copies, T + n) with the completions appended, ``copies``
        independent ones per prompt in consecutive rows. Prompts of different lengths are
        left-padded, ``left_pad`` (B,) counting the padding."""
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
    def logps_at(
        self, hidden: Tensor, targets: Tensor, temperature: float, with_features: bool
    ) -> TokenLogps:
        """(N, d) hidden states and (N,) target ids -> (N,) log-probabilities of the targets
        at ``temperature``, the (detached) entropies, in float32, and the hidden states as
        features if asked for. An architecture may constrain the logits (``lm_logits``)."""
        logp = (self.lm_logits(hidden).float() / temperature).log_softmax(dim=-1)
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(dim=-1)
        picked = logp.gather(-1, targets[:, None]).squeeze(-1)
        return TokenLogps(picked, entropy, hidden if with_features else None)

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """Logits of final hidden states."""
        return self.backbone.lm_head(hidden)

    @staticmethod
    def placed(found: TokenLogps, mask: Tensor) -> TokenLogps:
        """Values at the (B, L) ``mask``'s positions (in row-major order) -> (B, L, ...)
        tensors, zero elsewhere."""

        def place(values: Tensor | None) -> Tensor | None:
            if values is None:
                return None
            out = values.new_zeros((*mask.shape, *values.shape[1:]))
            return out.index_put(mask.nonzero(as_tuple=True), values)

        return TokenLogps(place(found.logps), place(found.entropy), place(found.features))

    @staticmethod
    def row_length(block_size: int) -> int:
        """Tokens per training row for a context of ``block_size`` positions."""
        return block_size

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N + 12*L*H*Q*T (PaLM appendix B / nanoGPT)."""
        c = self.config
        n = self.backbone.num_params(non_embedding=True)
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * seq_len


def unwrap(model: nn.Module) -> LM:
    """The LM inside its wrappers (DDP's ``module``, ``torch.compile``'s ``_orig_mod``):
    what generation and checkpoints use."""
    while not isinstance(model, LM):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"{type(model).__name__} wraps no lmpipe LM")
        model = inner
    return model
