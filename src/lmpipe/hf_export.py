"""Export an AR model to HF ``transformers``: the same weights in LlamaForCausalLM or
GPT2LMHeadModel, so that its numbers can be checked against (and served by) HF code; a
reward model (its scalar head) in LlamaForSequenceClassification or
GPT2ForSequenceClassification.

The backbone's rmsnorm/rope/swiglu layout is Llama's and its layernorm/learned/gelu layout
is GPT-2's (exact erf GELU, not GPT-2's default tanh approximation). lmpipe fuses the
q/k/v projections into one ``qkv`` and the SwiGLU gate and value into one ``up``; HF keeps
them apart. GPT-2's Conv1D stores weights as (in, out), the transpose of ``nn.Linear``, and
always has biases: a model without them exports zero biases.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from lmpipe.data.tokenizer import Tokenizer
from lmpipe.errors import ConfigError
from lmpipe.models import LM
from lmpipe.models.transformer import TransformerConfig

LLAMA = ("rmsnorm", "rope", "swiglu")
GPT2 = ("layernorm", "learned", "gelu")


def _layout(config: TransformerConfig) -> tuple[str, str, str]:
    return (config.norm, config.pos_emb, config.mlp)


def to_hf(model: LM):
    """A ``transformers`` causal LM (float32, eval mode) computing what ``model`` computes."""
    if model.arch != "ar":
        raise ConfigError(
            f"only autoregressive models export to HF causal LMs (this one is arch={model.arch})"
        )
    config = model.config
    if _layout(config) == LLAMA:
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_config = LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.d_model,
            intermediate_size=config.hidden_dim,
            num_hidden_layers=config.n_layer,
            num_attention_heads=config.n_head,
            num_key_value_heads=config.n_head,
            max_position_embeddings=config.block_size,
            rms_norm_eps=config.norm_eps,
            rope_theta=config.rope_theta,
            attention_bias=config.bias,
            mlp_bias=config.bias,
            tie_word_embeddings=config.tie_embeddings,
            **_special_tokens(model),
        )
        hf, weights = LlamaForCausalLM(hf_config), _llama_weights(model)
    elif _layout(config) == GPT2:
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_config = GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.block_size,
            n_embd=config.d_model,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_inner=config.hidden_dim,
            activation_function="gelu",
            layer_norm_epsilon=config.norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=config.tie_embeddings,
            **_special_tokens(model),
        )
        hf, weights = GPT2LMHeadModel(hf_config), _gpt2_weights(model)
    else:
        raise ConfigError(
            "no HF model has the layout norm={}, pos_emb={}, mlp={} (Llama: {}; GPT-2: {})".format(
                *_layout(config), "/".join(LLAMA), "/".join(GPT2)
            )
        )
    weights["lm_head.weight"] = model.backbone.lm_head.weight
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
    prefix = causal.base_model_prefix  # "model" (Llama) or "transformer" (GPT-2)
    getattr(hf, prefix).load_state_dict(getattr(causal, prefix).state_dict(), strict=True)
    with torch.no_grad():
        hf.score.weight.copy_(head.weight.detach().float())
    return hf.eval()


def _special_tokens(model: LM) -> dict:
    ids = model.special_ids
    return {
        "bos_token_id": ids.get("bos"),
        "eos_token_id": ids.get("eos"),
        "pad_token_id": ids.get("pad"),
    }


def _bias_or_zeros(module, size: int) -> Tensor:
    bias = getattr(module, "bias", None)
    return bias if bias is not None else torch.zeros(size)


def _llama_weights(model: LM) -> dict[str, Tensor]:
    b, c = model.backbone, model.config
    out = {"model.embed_tokens.weight": b.tok_emb.weight, "model.norm.weight": b.norm_f.weight}
    for i, block in enumerate(b.blocks):
        pre = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.chunk(3, dim=0)
        gate, value = block.mlp.up.weight.chunk(2, dim=0)
        out.update(
            {
                pre + "input_layernorm.weight": block.norm1.weight,
                pre + "post_attention_layernorm.weight": block.norm2.weight,
                pre + "self_attn.q_proj.weight": q,
                pre + "self_attn.k_proj.weight": k,
                pre + "self_attn.v_proj.weight": v,
                pre + "self_attn.o_proj.weight": block.attn.proj.weight,
                pre + "mlp.gate_proj.weight": gate,
                pre + "mlp.up_proj.weight": value,
                pre + "mlp.down_proj.weight": block.mlp.down.weight,
            }
        )
        if c.bias:
            q, k, v = block.attn.qkv.bias.chunk(3)
            gate, value = block.mlp.up.bias.chunk(2)
            out.update(
                {
                    pre + "self_attn.q_proj.bias": q,
                    pre + "self_attn.k_proj.bias": k,
                    pre + "self_attn.v_proj.bias": v,
                    pre + "self_attn.o_proj.bias": block.attn.proj.bias,
                    pre + "mlp.gate_proj.bias": gate,
                    pre + "mlp.up_proj.bias": value,
                    pre + "mlp.down_proj.bias": block.mlp.down.bias,
                }
            )
    return out


def _gpt2_weights(model: LM) -> dict[str, Tensor]:
    b, d = model.backbone, model.config.d_model
    out = {
        "transformer.wte.weight": b.tok_emb.weight,
        "transformer.wpe.weight": b.pos_emb.weight,
        "transformer.ln_f.weight": b.norm_f.weight,
        "transformer.ln_f.bias": _bias_or_zeros(b.norm_f, d),
    }
    for i, block in enumerate(b.blocks):
        pre = f"transformer.h.{i}."
        for hf_name, linear in (
            ("attn.c_attn", block.attn.qkv),
            ("attn.c_proj", block.attn.proj),
            ("mlp.c_fc", block.mlp.up),
            ("mlp.c_proj", block.mlp.down),
        ):
            out[pre + hf_name + ".weight"] = linear.weight.t()
            out[pre + hf_name + ".bias"] = _bias_or_zeros(linear, linear.out_features)
        for hf_name, norm in (("ln_1", block.norm1), ("ln_2", block.norm2)):
            out[pre + hf_name + ".weight"] = norm.weight
            out[pre + hf_name + ".bias"] = _bias_or_zeros(norm, d)
    return out


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
