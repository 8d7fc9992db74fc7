"""Bigger models: activation checkpointing, and the model presets' sizes."""

import re

import pytest
import torch
from omegaconf import OmegaConf

from lmpipe import api
from lmpipe.batch import Batch
from lmpipe.config import CONF_DIR
from lmpipe.models import build_lm
from lmpipe.models.transformer import KVCache

SPECIAL = {"pad": 0, "ignore": 1, "eos": 2, "mask": 3}
ARCHS = {
    "ar": {"_target_": "lmpipe.models.ar.ARLM"},
    "diffusion": {"_target_": "lmpipe.models.diffusion.DiffusionLM"},
    "sdd": {"_target_": "lmpipe.models.sdd.SDDLM", "k_schedule": [[0, 3]]},  # two passes
}
N_LAYER = 3
# The seed plan's sizes at a 32k vocabulary, tied embeddings counted once.
TARGET_PARAMS = {"small": 25e6, "medium": 50e6, "large": 125e6, "xl": 300e6}
VOCAB_32K = 32768


def loss_grads_and_block_calls(arch: str, checkpointing: bool, dropout: float):
    """Loss, gradients and block forward calls of one forward+backward of a tiny model."""
    torch.manual_seed(0)
    shape = {"n_layer": N_LAYER, "n_head": 2, "d_model": 32, "block_size": 24}
    shape |= {"dropout": dropout, "activation_checkpointing": checkpointing}
    model = build_lm(ARCHS[arch], shape, 37, SPECIAL)
    calls = []
    for block in model.backbone.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    ids = torch.randint(4, 37, (4, 17), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the dropout masks
    nll = model.token_nll(Batch(ids, torch.ones(4, 17)), generator=torch.Generator().manual_seed(3))
    nll.sum().backward()
    return nll, {k: p.grad for k, p in model.named_parameters()}, len(calls)


@pytest.mark.parametrize(
    ("arch", "dropout"), [("ar", 0.0), ("diffusion", 0.0), ("sdd", 0.0), ("ar", 0.2)]
)
def test_activation_checkpointing_recomputes_blocks_with_the_same_loss_and_gradients(arch, dropout):
    nll, grads, calls = loss_grads_and_block_calls(arch, False, dropout)
    nll_ckpt, grads_ckpt, calls_ckpt = loss_grads_and_block_calls(arch, True, dropout)
    passes = 2 if arch == "sdd" else 1
    assert calls == passes * N_LAYER
    assert calls_ckpt == 2 * passes * N_LAYER  # every block ran again in the backward pass
    torch.testing.assert_close(nll_ckpt, nll, atol=1e-6, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=0, msg=name)


def test_activation_checkpointing_leaves_evaluation_and_the_kv_cache_alone():
    """Without gradients no block runs twice; with a KV cache (even with gradients on)
    the blocks run as they are and fill the cache."""
    torch.manual_seed(0)
    shape = {"n_layer": N_LAYER, "n_head": 2, "d_model": 32, "block_size": 24}
    model = build_lm(ARCHS["ar"], {**shape, "activation_checkpointing": True}, 37)
    calls = []
    for block in model.backbone.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 37, (2, 9))
    with torch.no_grad():
        model.token_nll(Batch(ids, torch.ones(2, 9))).sum()
    assert len(calls) == N_LAYER
    full = model.backbone(ids, causal=True)[:, -1]
    cache = KVCache(model.config)
    model.backbone(ids[:, :-1], causal=True, cache=cache)
    cached = model.backbone(ids[:, -1:], causal=True, cache=cache)[:, -1]
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def preset_params(model: str) -> tuple[int, int]:
    """Parameters of ``model=<model>`` at a 32k vocabulary (built on the meta device):
    all of them, and those outside the token and position embeddings."""
    cfg = api.compose("train", [f"model={model}"])
    with torch.device("meta"):
        lm = build_lm(
            OmegaConf.to_container(cfg.arch), OmegaConf.to_container(cfg.model), VOCAB_32K
        )
    backbone = lm.backbone
    total = backbone.num_params()
    embeddings = [backbone.tok_emb, *([backbone.pos_emb] if backbone.pos_emb is not None else [])]
    return total, total - sum(e.weight.numel() for e in embeddings)


@pytest.mark.parametrize("model", sorted(TARGET_PARAMS))
def test_model_presets_have_the_seed_plans_sizes(model):
    total, _ = preset_params(model)
    assert abs(total / TARGET_PARAMS[model] - 1) <= 0.15, f"{model}: {total / 1e6:.1f}M"


def test_help_lists_every_model_preset_with_its_size(lmpipe):
    """``--help`` prints ``model=<name>  <total>M (<non-embedding>M)``: each number is the
    meta-device count rounded to the decimals printed."""
    help_text = lmpipe("train", "--help").stdout
    rows = re.findall(r"model=(\S+)\s+([\d.]+)M \(([\d.]+)M\)", help_text)
    listed = {name: (total, inner) for name, total, inner in rows}
    presets = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    assert sorted(listed) == presets
    for name, printed in listed.items():
        for shown, count in zip(printed, preset_params(name), strict=True):
            decimals = len(shown.partition(".")[2])
            assert float(shown) == round(count / 1e6, decimals), (name, shown, count)
