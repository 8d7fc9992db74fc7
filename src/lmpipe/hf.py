"""Hugging Face ``transformers`` causal LMs in and out of lmpipe's AR transformer.

Out (``to_hf``, ``export``): the same weights in LlamaForCausalLM, Qwen2ForCausalLM or
GPT2LMHeadModel, so that its numbers can be checked against (and served by) HF code; a
reward model (its scalar head) in ...ForSequenceClassification. In (``hf_checkpoint``,
``init_from=hf:<folder>``): a folder written by ``save_pretrained`` (config.json,
model.safetensors, tokenizer.json) as a starting checkpoint for any stage.

The backbone's rmsnorm/rope/swiglu layout is Llama's (Qwen2's: with q/k/v biases alone)
and its layernorm/learned/gelu layout is GPT-2's (``mlp=gelu`` is the exact erf GELU, HF's
``gelu``; ``mlp=gelu_tanh`` GPT-2's default tanh approximation, HF's ``gelu_new``). lmpipe fuses the q/k/v projections into one ``qkv`` and the SwiGLU gate
and value into one ``up``; HF keeps them apart. GPT-2's Conv1D stores weights as (in, out),
the transpose of ``nn.Linear``, and always has biases: a model without them exports zero
biases. Each family's names (config keys and weights) are written once, in ``Family``,
and read in both directions; what lmpipe's transformer cannot represent is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lmpipe.cli import one_line
from lmpipe.errors import CheckpointError, ConfigError
from lmpipe.models import LM
from lmpipe.models.ar import ARLM
from lmpipe.models.transformer import TransformerConfig
from lmpipe.training.checkpoint import HF_PREFIX, Checkpoint

if TYPE_CHECKING:
    from lmpipe.data.tokenizer import Tokenizer

LLAMA = ("rmsnorm", "rope")  # norm, pos_emb
GPT2 = ("layernorm", "learned")
# Buffers some HF checkpoints carry besides the weights (GPT-2's causal mask, old RoPE
# frequencies): recomputed by lmpipe, so skipped on import.
BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


@dataclass(frozen=True)
class Piece:
    """One HF tensor: part ``index`` of ``parts`` (along dim 0) of lmpipe's parameter
    ``ours``, transposed where ``transpose`` (GPT-2's Conv1D)."""

    hf: str
    ours: str
    index: int = 0
    parts: int = 1
    transpose: bool = False

    def to_hf(self, tensor: Tensor) -> Tensor:
        part = tensor.chunk(self.parts, dim=0)[self.index]
        return part.t() if self.transpose else part


def _llama_pieces(n_layer: int) -> list[Piece]:
    pieces = [
        Piece("model.embed_tokens.weight", "backbone.tok_emb.weight"),
        Piece("model.norm.weight", "backbone.norm_f.weight"),
        Piece("lm_head.weight", "backbone.lm_head.weight"),
    ]
    for i in range(n_layer):
        hf, ours = f"model.layers.{i}.", f"backbone.blocks.{i}."
        pieces += [
            Piece(hf + "input_layernorm.weight", ours + "norm1.weight"),
            Piece(hf + "post_attention_layernorm.weight", ours + "norm2.weight"),
        ]
        for name, module, index, parts in (
            ("self_attn.q_proj", "attn.qkv", 0, 3),
            ("self_attn.k_proj", "attn.qkv", 1, 3),
            ("self_attn.v_proj", "attn.qkv", 2, 3),
            ("self_attn.o_proj", "attn.proj", 0, 1),
            ("mlp.gate_proj", "mlp.up", 0, 2),
            ("mlp.up_proj", "mlp.up", 1, 2),
            ("mlp.down_proj", "mlp.down", 0, 1),
        ):
            for kind in ("weight", "bias"):
                pieces.append(Piece(f"{hf}{name}.{kind}", f"{ours}{module}.{kind}", index, parts))
    return pieces


def _gpt2_pieces(n_layer: int) -> list[Piece]:
    pieces = [
        Piece("transformer.wte.weight", "backbone.tok_emb.weight"),
        Piece("transformer.wpe.weight", "backbone.pos_emb.weight"),
        Piece("transformer.ln_f.weight", "backbone.norm_f.weight"),
        Piece("transformer.ln_f.bias", "backbone.norm_f.bias"),
        Piece("lm_head.weight", "backbone.lm_head.weight"),
    ]
    for i in range(n_layer):
        hf, ours = f"transformer.h.{i}.", f"backbone.blocks.{i}."
        for name, module in (
            ("attn.c_attn", "attn.qkv"),
            ("attn.c_proj", "attn.proj"),
            ("mlp.c_fc", "mlp.up"),
            ("mlp.c_proj", "mlp.down"),
        ):
            pieces += [
                Piece(f"{hf}{name}.weight", f"{ours}{module}.weight", transpose=True),
                Piece(f"{hf}{name}.bias", f"{ours}{module}.bias"),
            ]
        for name, module in (("ln_1", "norm1"), ("ln_2", "norm2")):
            for kind in ("weight", "bias"):
                pieces.append(Piece(f"{hf}{name}.{kind}", f"{ours}{module}.{kind}"))
    return pieces


@dataclass(frozen=True)
class Family:
    """An HF model family lmpipe's transformer can be: its config keys (HF name ->
    ``TransformerConfig`` field), its activations (HF value of ``activation`` -> our
    ``mlp``; export writes the first), the HF values it must have (written on export,
    required on import), its biases, and its weight names."""

    model_type: str
    model_class: str
    layout: tuple[str, str]
    activation: str
    activations: dict[str, str]
    names: dict[str, str]
    fixed: dict[str, object]
    pieces: Callable[[int], list[Piece]]
    biases: Callable[[TransformerConfig], dict[str, bool]]  # its bias keys, for our config
    bias_from: Callable[[dict], dict[str, bool] | None]  # ours for its config (None: can't)
    export_only: dict[str, object] = field(default_factory=dict)


_LLAMA_NAMES = {
    "vocab_size": "vocab_size",
    "hidden_size": "d_model",
    "intermediate_size": "d_ff",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "max_position_embeddings": "block_size",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
}
FAMILIES = {
    f.model_type: f
    for f in (
        Family(
            model_type="llama",
            model_class="LlamaForCausalLM",
            layout=LLAMA,
            activation="hidden_act",
            activations={"silu": "swiglu"},
            names=_LLAMA_NAMES,
            fixed={},
            pieces=_llama_pieces,
            biases=lambda c: {"attention_bias": c.bias, "mlp_bias": c.bias},
            bias_from=lambda hf: (
                {"bias": hf["attention_bias"], "qkv_bias": False}
                if hf.get("attention_bias", False) == hf.get("mlp_bias", False)
                else None
            ),
        ),
        Family(
            model_type="qwen2",
            model_class="Qwen2ForCausalLM",
            layout=LLAMA,
            activation="hidden_act",
            activations={"silu": "swiglu"},
            names=_LLAMA_NAMES,
            fixed={"use_sliding_window": False},
            pieces=_llama_pieces,
            biases=lambda c: {},  # q/k/v always, nothing else
            bias_from=lambda hf: {"bias": False, "qkv_bias": True},
        ),
        Family(
            model_type="gpt2",
            model_class="GPT2LMHeadModel",
            layout=GPT2,
            activation="activation_function",
            activations={"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"},
            names={
                "vocab_size": "vocab_size",
                "n_embd": "d_model",
                "n_inner": "d_ff",
                "n_layer": "n_layer",
                "n_head": "n_head",
                "n_positions": "block_size",
                "layer_norm_epsilon": "norm_eps",
                "tie_word_embeddings": "tie_embeddings",
            },
            fixed={
                "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False,
                "add_cross_attention": False,
            },
            pieces=_gpt2_pieces,
            biases=lambda c: {},  # everywhere (zeros where lmpipe has none)
            bias_from=lambda hf: {"bias": True, "qkv_bias": False},
            export_only={"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
        ),
    )
}


def _family_of(config: TransformerConfig) -> Family:
    layout = (config.norm, config.pos_emb)
    name = "qwen2" if config.qkv_bias and not config.bias else "llama"
    for family in (FAMILIES[name], FAMILIES["gpt2"]):
        if layout == family.layout and config.mlp in family.activations.values():
            return family
    raise ConfigError(
        f"no HF model has the layout norm={config.norm}, pos_emb={config.pos_emb}, "
        f"mlp={config.mlp} (Llama: rmsnorm/rope/swiglu; GPT-2: layernorm/learned/gelu)"
    )


# --- out ----------------------------------------------------------------------------------
def to_hf(model: LM):
    """A ``transformers`` causal LM (float32, eval mode) computing what ``model`` computes."""
    import transformers

    if model.arch != "ar":
        raise ConfigError(
            f"only autoregressive models export to HF causal LMs (this one is arch={model.arch})"
        )
    config = model.config
    family = _family_of(config)
    values = {
        hf: config.hidden_dim if ours == "d_ff" else getattr(config, ours)
        for hf, ours in family.names.items()
    }
    values[family.activation] = next(
        hf for hf, ours in family.activations.items() if ours == config.mlp
    )
    if family.layout == LLAMA:
        values |= {"num_key_value_heads": config.n_head, "rope_theta": config.rope_theta}
    ids = model.special_ids
    hf_config = transformers.AutoConfig.for_model(
        family.model_type,
        **values,
        **family.fixed,
        **family.biases(config),
        **family.export_only,
        bos_token_id=ids.get("bos"),
        eos_token_id=ids.get("eos"),
        pad_token_id=ids.get("pad"),
    )
    hf = getattr(transformers, family.model_class)(hf_config)
    expected = hf.state_dict()
    ours = model.state_dict()
    weights = {}
    for piece in family.pieces(config.n_layer):
        if piece.hf in expected:  # absent from ours: a bias GPT-2 has and we do not
            weights[piece.hf] = (
                piece.to_hf(ours[piece.ours])
                if piece.ours in ours
                else torch.zeros_like(expected[piece.hf])
            )
        else:
            assert piece.ours not in ours, f"{piece.ours} has no place in {family.model_class}"
    hf.load_state_dict({k: v.detach().float().clone() for k, v in weights.items()}, strict=True)
    if config.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def to_hf_reward_model(model: LM, head: nn.Linear):
    """A ``transformers`` ...ForSequenceClassification with one label (float32, eval mode)
    computing the reward model's score: ``to_hf(model)``'s backbone and ``head`` as its
    ``score``. HF scores each row at its last non-padding token; lmpipe at the last
    response token: the same position for a reply without padding after it."""
    from transformers import AutoModelForSequenceClassification

    causal = to_hf(model)
    config = causal.config
    config.num_labels = 1
    hf = AutoModelForSequenceClassification.from_config(config)
    prefix = causal.base_model_prefix  # "model" (Llama, Qwen2) or "transformer" (GPT-2)
    getattr(hf, prefix).load_state_dict(getattr(causal, prefix).state_dict(), strict=True)
    with torch.no_grad():
        hf.score.weight.copy_(head.weight.detach().float())
    return hf.eval()


def export(
    model: LM, tokenizer: Tokenizer, directory: str | Path, head: nn.Linear | None = None
) -> Path:
    """Save ``to_hf(model)`` and the tokenizer into ``directory`` so that
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load it.
    A chat reply ends at the chat template's turn end, so generation stops at it too. With a
    reward ``head``: ``to_hf_reward_model`` (``AutoModelForSequenceClassification``)."""
    directory = Path(directory)
    if head is not None:
        hf = to_hf_reward_model(model, head)
    else:
        hf = to_hf(model)
        hf.generation_config.eos_token_id = [tokenizer.eos_id, tokenizer.turn_end_id]
        hf.generation_config.pad_token_id = tokenizer.pad_id
    hf.save_pretrained(directory)
    tokenizer.save(directory)
    return directory


# --- in -----------------------------------------------------------------------------------
@dataclass
class HFCheckpoint(Checkpoint):
    """An HF folder opened as a step-0 checkpoint: its weights renamed to lmpipe's, and
    its tokenizer (with lmpipe's special tokens added)."""

    weights: dict[str, Tensor]
    hf_tokenizer: Tokenizer

    def load_weights(self, model: nn.Module) -> None:
        try:
            model.load_state_dict(self.weights, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.path}: weights do not fit the model ({exc})") from None

    def tokenizer(self) -> Tokenizer:
        return self.hf_tokenizer

    @property
    def reference(self) -> str:
        return f"{HF_PREFIX}{self.path}"


def hf_checkpoint(folder: str | Path) -> HFCheckpoint:
    """The causal LM that ``save_pretrained`` wrote into ``folder`` (Llama, Qwen2 or
    GPT-2 layout) as lmpipe's AR transformer, with its tokenizer. Rows for tokens the
    tokenizer gains (lmpipe's special tokens) are the mean of the others, so their logits
    are the mean logit: never the greedy choice before training."""
    from lmpipe.data.tokenizer import Tokenizer

    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise CheckpointError(f"HF model folder not found: {folder}")
    hf_config = _read_config(path)
    family = FAMILIES.get(hf_config.get("model_type"))
    if family is None:
        raise CheckpointError(
            f"{path}: model_type={hf_config.get('model_type')!r} cannot be imported "
            f"(lmpipe imports {', '.join(FAMILIES)})"
        )
    config = _transformer_config(family, hf_config, path)
    state = _our_weights(family, config, _read_weights(path), path)
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size > config.vocab_size:
        config = TransformerConfig.from_dict(
            config.to_dict() | {"vocab_size": tokenizer.vocab_size}
        )
        state = _grow_vocab(state, config)
    with torch.device("meta"):
        model = ARLM(config, special_ids=tokenizer.special_ids)
    meta = {
        "global_step": 0,
        "architecture": model.arch,
        "model_config": model.config_dict(),
        "model_name": path.name,
        "tokenizer_hash": tokenizer.hash,
        "files": {},
    }
    return HFCheckpoint(path=path, meta=meta, weights=state, hf_tokenizer=tokenizer)


def _read_config(path: Path) -> dict:
    """config.json with the defaults of its model type's config class filled in."""
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} has no config.json (not a save_pretrained folder)")
    try:
        raw = json.loads(file.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc})") from None
    if raw.get("model_type") not in FAMILIES:
        return raw
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**raw).to_dict()
    except Exception as exc:  # transformers' checks raise several types
        raise CheckpointError(f"{file}: {one_line(exc)}") from None


def _transformer_config(family: Family, hf: dict, path: Path) -> TransformerConfig:
    def refuse(what: str):
        raise CheckpointError(
            f"{path}: {family.model_type} with {what} cannot be imported "
            "(lmpipe's transformer has no such feature)"
        )

    for key, value in family.fixed.items():
        if hf.get(key, value) != value:
            refuse(f"{key}={hf[key]!r} (lmpipe's is {value!r})")
    biases = family.bias_from(hf)
    if biases is None:
        refuse(f"attention_bias={hf.get('attention_bias')} and mlp_bias={hf.get('mlp_bias')}")
    values = {ours: hf[key] for key, ours in family.names.items() if hf.get(key) is not None}
    if family.layout == LLAMA:
        heads, d_model = hf["num_attention_heads"], hf["hidden_size"]
        if hf.get("num_key_value_heads", heads) != heads:
            refuse(f"grouped-query attention (num_key_value_heads={hf['num_key_value_heads']})")
        if hf.get("head_dim") not in (None, d_model // heads):
            refuse(f"head_dim={hf['head_dim']} (not hidden_size/num_attention_heads)")
        rope = hf.get("rope_parameters") or {}
        if (
            rope.get("rope_type", "default") != "default"
            or rope.get("partial_rotary_factor", 1) != 1
        ):
            refuse(f"rope_scaling {rope}")
        if any(kind != "full_attention" for kind in hf.get("layer_types") or []):
            refuse(f"sliding-window attention (layer_types={sorted(set(hf['layer_types']))})")
        values["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    mlp = family.activations.get(hf.get(family.activation))
    if mlp is None:
        refuse(f"{family.activation}={hf.get(family.activation)!r}")
    norm, pos_emb = family.layout
    return TransformerConfig(norm=norm, pos_emb=pos_emb, mlp=mlp, **values, **biases)


def _read_weights(path: Path) -> dict[str, Tensor]:
    """model.safetensors, or the shards model.safetensors.index.json lists."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(
            f"{path} has no model.safetensors (save the model with save_pretrained)"
        )
    tensors: dict[str, Tensor] = {}
    for name in files:
        tensors |= load_file(str(path / name))
    return tensors


def _our_weights(
    family: Family, config: TransformerConfig, tensors: dict[str, Tensor], path: Path
) -> dict[str, Tensor]:
    """The HF tensors under lmpipe's parameter names (fused ones concatenated)."""
    with torch.device("meta"):
        ours = ARLM(config).state_dict()
    base = family.pieces(1)[0].hf.split(".")[0] + "."  # "model." or "transformer."
    if not any(name.startswith(base) for name in tensors):  # saved from the bare model
        tensors = {base + name: value for name, value in tensors.items()}
    tied = "backbone.lm_head.weight" if config.tie_embeddings else None
    parts: dict[str, list[tuple[int, Tensor]]] = {}
    used = set()
    for piece in family.pieces(config.n_layer):
        if piece.ours not in ours or piece.ours == tied:
            continue
        if piece.hf not in tensors:
            raise CheckpointError(f"{path}: the weights have no {piece.hf}")
        tensor = tensors[piece.hf]
        parts.setdefault(piece.ours, []).append(
            (piece.index, tensor.t() if piece.transpose else tensor)
        )
        used.add(piece.hf)
    if tied:
        used.add("lm_head.weight")
    unused = [n for n in tensors if n not in used and not n.endswith(BUFFERS)]
    if unused:
        raise CheckpointError(
            f"{path}: the weight {unused[0]} has no place in lmpipe's transformer "
            f"({len(unused)} such)"
        )
    state = {
        name: torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])]).float().contiguous()
        for name, pieces in parts.items()
    }
    if tied:
        state[tied] = state["backbone.tok_emb.weight"]
    return state


def _grow_vocab(state: dict[str, Tensor], config: TransformerConfig) -> dict[str, Tensor]:
    """Embedding (and untied LM head) rows up to ``config.vocab_size``: new ones the mean."""
    for name in ("backbone.tok_emb.weight", "backbone.lm_head.weight"):
        old = state[name]
        new = old.mean(dim=0, keepdim=True).expand(config.vocab_size - len(old), -1)
        state[name] = torch.cat([old, new])
    if config.tie_embeddings:
        state["backbone.lm_head.weight"] = state["backbone.tok_emb.weight"]
    return state
