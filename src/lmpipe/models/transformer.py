"""The transformer backbone shared by every architecture.

Pre-norm decoder blocks: RMSNorm (or LayerNorm), RoPE (or learned positions), SDPA
attention, SwiGLU (or GELU) MLP, tied embeddings. The layout with rmsnorm/rope/swiglu is
Llama's and with layernorm/learned/gelu is GPT-2's, so weights can be compared with HF
models of either family. ``causal`` is chosen per call: AR uses it, diffusion does not.

Rows of different lengths in one batch are left-padded (``left_pad``: padding tokens at
the start of each row): padding is never attended to and positions count from each row's
first real token, so a row computes what it would alone -- with or without a KV cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmpipe.errors import ConfigError
from lmpipe.models.segments import PackedSegments, segment_positions

MLP_KINDS = ("swiglu", "gelu", "gelu_tanh")  # gelu_tanh: GPT-2's tanh approximation
NORM_KINDS = ("rmsnorm", "layernorm")
POS_EMB_KINDS = ("rope", "learned")


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    block_size: int = 256  # longest context the model supports
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int | None = None  # default: 4*d_model (gelu) or ~8/3*d_model rounded to 32 (swiglu)
    mlp: str = "swiglu"
    norm: str = "rmsnorm"
    pos_emb: str = "rope"
    rope_theta: float = 10000.0
    dropout: float = 0.0
    bias: bool = False  # biases on every linear layer and LayerNorm (GPT-2)
    qkv_bias: bool = False  # biases on the query/key/value projection only (Qwen2)
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # Recompute each block's activations in the backward pass instead of keeping them:
    # less memory for more compute. A training setting, not part of the model's function.
    activation_checkpointing: bool = False

    def __post_init__(self):
        def bad(key, why):
            raise ConfigError(f"model.{key}={getattr(self, key)!r} {why}")

        for key in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                bad(key, "must be a positive integer")
        if self.d_model % self.n_head:
            bad("d_model", f"must be divisible by model.n_head={self.n_head}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            bad("d_model", "gives an odd head dimension, which RoPE cannot rotate")
        for key, allowed in (("mlp", MLP_KINDS), ("norm", NORM_KINDS), ("pos_emb", POS_EMB_KINDS)):
            if getattr(self, key) not in allowed:
                bad(key, f"is not one of {', '.join(allowed)}")
        if not 0 <= self.dropout < 1:
            bad("dropout", "must be in [0, 1)")
        if not isinstance(self.activation_checkpointing, bool):
            bad("activation_checkpointing", "must be true or false")

    @classmethod
    def from_dict(cls, values: dict) -> TransformerConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp != "swiglu":
            return 4 * self.d_model
        return 32 * math.ceil(8 * self.d_model / 3 / 32)


def _norm(config: TransformerConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


def rope_tables(config: TransformerConfig) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (block_size, head_dim) in the rotate-half (GPT-NeoX / HF) layout."""
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim)
    )
    angles = torch.outer(torch.arange(config.block_size).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the two halves of ``x``'s last dimension (rotate-half layout); ``cos``/``sin``
    broadcast against ``x``. Written on the halves: fewer passes over memory than
    ``x * cos + rotate_half(x) * sin``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[..., :half].to(x.dtype), sin[..., :half].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def padding_mask(
    left_pad: Tensor, start: int, length: int, causal: bool, dtype: torch.dtype
) -> Tensor:
    """(B, 1, length, start + length) additive mask (0 or -inf, in ``dtype``): which keys
    the queries at positions ``start`` to ``start + length`` may see in rows with
    ``left_pad`` leading padding tokens. A padding query sees itself only, so that no
    softmax row is empty (its output is unused). Additive, built once per forward pass: on
    the CPU, SDPA with a boolean mask took twice as long per call (measured, decode step)."""
    device = left_pad.device
    query = torch.arange(start, start + length, device=device)[:, None]
    key = torch.arange(start + length, device=device)[None, :]
    real = key[None] >= left_pad[:, None, None]
    visible = real | (key == query)[None]
    if causal:
        visible &= (key <= query)[None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~visible, float("-inf"))[:, None]


class KVCache:
    """Pre-allocated keys/values for incremental decoding, one slot per layer, for up to
    ``capacity`` positions (default: the block). Sized to what a generation needs, the
    filled part is nearly contiguous: SDPA over a slice of a block-sized cache took ~2x as
    long per decode step on the CPU (measured)."""

    def __init__(self, config: TransformerConfig, capacity: int | None = None):
        self.config = config
        self.capacity = min(capacity or config.block_size, config.block_size)
        self.k: Tensor | None = None  # allocated on first use, in the dtype of the keys
        self.v: Tensor | None = None
        self.length = 0  # positions filled

    def keep_rows(self, rows: Tensor) -> None:
        """Keep the batch rows ``rows`` selects: a bool mask, or row indices (which may
        repeat a row)."""
        if self.k is not None:
            self.k, self.v = self.k[:, rows], self.v[:, rows]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is None:
            c = self.config
            shape = (c.n_layer, k.shape[0], c.n_head, self.capacity, c.head_dim)
            self.k = k.new_zeros(shape)
            self.v = v.new_zeros(shape)
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(
            config.d_model, 3 * config.d_model, bias=config.bias or config.qkv_bias
        )
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        causal: bool,
        cache: KVCache | None,
        segments: PackedSegments | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """``rope``: cos/sin at the positions of ``x``'s tokens: (T, head_dim), per row
        (B, 1, T, head_dim), or for packed rows (B, T, 1, head_dim). ``attn_mask``: which
        keys each query sees (B, 1, T, keys), causality included (left-padded rows)."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)
        if segments is None:  # (B, heads, T, head_dim), as SDPA takes them
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
        else:  # token-major (B, T, heads, head_dim): packed rows are regrouped by token
            q, k, v = qkv.unbind(2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if segments is None:
            y = self.attend(q, k, v, causal, cache, attn_mask).transpose(1, 2)
        else:
            y = segments.attend(
                lambda *qkv, key_mask: self.attend(*qkv, causal, None, key_mask), q, k, v
            )
        return self.resid_dropout(self.proj(y.reshape(B, T, C)))

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        causal: bool,
        cache: KVCache | None,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """Queries, keys and values (N, heads, L, head_dim) of N sequences -> the same shape.
        A ``key_mask`` already holds causality: the kernel is then told nothing more."""
        is_causal = causal and key_mask is None
        if cache is not None:
            first = cache.length == 0
            k, v = cache.update(self.layer, k, v)
            # Prefill of an empty cache is an ordinary (causal) pass; a single new token
            # attends to everything cached; longer chunks after a prefix are not needed.
            assert first or q.shape[2] == 1, "KV cache supports prefill then one token at a time"
            is_causal = is_causal and first
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=key_mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        hidden = config.hidden_dim
        self.gated = config.mlp == "swiglu"
        self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"
        self.up = nn.Linear(config.d_model, 2 * hidden if self.gated else hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)
        if self.gated:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            # exact (erf) GELU, as nanoGPT; the tanh form (GPT-2's) is slow on CPU
            h = F.gelu(h, approximate=self.approximate)
        return self.dropout(self.down(h))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.norm1 = _norm(config)
        self.attn = Attention(config, layer)
        self.norm2 = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, causal, cache, segments=None, attn_mask=None):
        x = x + self.attn(self.norm1(x), rope, causal, cache, segments, attn_mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = (
            nn.Embedding(config.block_size, config.d_model) if config.pos_emb == "learned" else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = _norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if config.pos_emb == "rope":
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections into the residual stream by depth.
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(param, 0.0, config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, 0.0, self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters; ``non_embedding`` leaves out position embeddings (not matmuls)."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding and self.pos_emb is not None:
            total -= self.pos_emb.weight.numel()
        return total

    def hidden_states(
        self,
        idx: Tensor,
        *,
        causal: bool,
        cache: KVCache | None = None,
        segment_ids: Tensor | None = None,
        left_pad: Tensor | None = None,
        embeds: Tensor | None = None,
    ) -> Tensor:
        """Final-norm hidden states (B, T, d_model).

        ``segment_ids`` (B, T) packs several sequences per row: a token attends only to
        tokens of its own segment and positions restart at 0 in every segment, so a packed
        row computes exactly what its segments would compute one by one. ``left_pad`` (B,)
        counts the padding tokens at the start of each row (of the whole sequence, cached
        part included): they are never attended to, and positions start after them.
        ``embeds`` (B, T, d_model), when given, is the input in place of the embeddings of
        ``idx`` (SDD mixes the embeddings of candidate tokens).
        """
        start = cache.length if cache is not None else 0
        T = idx.shape[1]
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}"
            )
        positions = torch.arange(start, start + T, device=idx.device)
        segments = attn_mask = None
        if segment_ids is not None:
            if cache is not None or left_pad is not None:
                raise ValueError("packed segments combine with neither a KV cache nor left_pad")
            segments = PackedSegments(segment_ids, causal)
            positions = segment_positions(segment_ids)
        elif left_pad is not None:
            dtype = self.tok_emb.weight.dtype
            if torch.is_autocast_enabled(idx.device.type):
                dtype = torch.get_autocast_dtype(idx.device.type)
            attn_mask = padding_mask(left_pad, start, T, causal, dtype)
            positions = (positions - left_pad[:, None]).clamp(min=0)
        x = self.tok_emb(idx) if embeds is None else embeds
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            rope = (self.rope_cos[positions], self.rope_sin[positions])
            if segments is not None:  # (B, T, D) -> (B, T, 1, D): broadcast over heads
                rope = (rope[0][:, :, None], rope[1][:, :, None])
            elif positions.ndim == 2:  # per row: (B, 1, T, D) against (B, heads, T, D)
                rope = (rope[0][:, None], rope[1][:, None])
        x = self.drop(x)
        # Only where a backward pass follows: evaluation and sampling run under no_grad, and
        # never with a KV cache. (Not ``self.training``: RL objectives learn in eval mode.)
        recompute = (
            self.config.activation_checkpointing and cache is None and torch.is_grad_enabled()
        )
        for block in self.blocks:
            if recompute:
                x = checkpoint(
                    block, x, rope, causal, None, segments, attn_mask, use_reentrant=False
                )
            else:
                x = block(x, rope, causal, cache, segments, attn_mask)
        if cache is not None:
            cache.length += T
        return self.norm_f(x)

    def forward(
        self,
        idx: Tensor,
        *,
        causal: bool,
        cache: KVCache | None = None,
        segment_ids: Tensor | None = None,
        left_pad: Tensor | None = None,
        embeds: Tensor | None = None,
    ) -> Tensor:
        """Logits of shape (B, T, vocab_size)."""
        return self.lm_head(
            self.hidden_states(
                idx,
                causal=causal,
                cache=cache,
                segment_ids=segment_ids,
                left_pad=left_pad,
                embeds=embeds,
            )
        )
