"""lmpipe's AR models against HF transformers on the same weights: logits, held-out
perplexity, greedy generation, and an exported folder that the Auto classes load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmpipe.errors import ConfigError
from lmpipe.eval import evaluate_checkpoint
from lmpipe.hf import export, to_hf
from lmpipe.models import build_lm
from lmpipe.training.checkpoint import load_checkpoint

from conftest import arch_config, data_config, save_random_checkpoint

LLAMA = {"mlp": "swiglu", "norm": "rmsnorm", "pos_emb": "rope"}
GPT2 = {"mlp": "gelu", "norm": "layernorm", "pos_emb": "learned"}
LAYOUTS = {
    "llama": LLAMA,
    "llama-bias-untied": {**LLAMA, "bias": True, "tie_embeddings": False},
    "qwen2": {**LLAMA, "qkv_bias": True},
    "gpt2-bias": {**GPT2, "bias": True},
    "gpt2-no-bias": GPT2,
    "gpt2-tanh-gelu": {**GPT2, "bias": True, "mlp": "gelu_tanh"},
}


def sharp_model(arch="ar", **layout):
    """A model whose weights are large enough that its predictions are far from uniform:
    a wrong mapping of any weight would show."""
    torch.manual_seed(0)
    shape = {"n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 24, **layout}
    model = build_lm(arch_config(arch), shape, 41, {"pad": 0, "eos": 2, "mask": 3})
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_hf_model_computes_the_same_logits(layout):
    model = sharp_model(**layout)
    hf = to_hf(model)
    expected = "GPT2LMHeadModel" if layout["norm"] == "layernorm" else "LlamaForCausalLM"
    if layout.get("qkv_bias"):
        expected = "Qwen2ForCausalLM"
    assert type(hf).__name__ == expected
    ids = torch.randint(0, 41, (3, 24))
    with torch.no_grad():
        ours = model.backbone(ids, causal=True)
        theirs = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert ours.std() > 0.3  # far from uniform, so the comparison is sharp
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_held_out_perplexity_equals_hf_loss(tmp_path, cache_dir, layout):
    data_cfg = data_config("demo", records=300)
    path = save_random_checkpoint(tmp_path / "ckpt", data_cfg, cache_dir, scale=1.0, **layout)
    ours = evaluate_checkpoint(
        path,
        data_cfg=None,
        metrics=["perplexity"],
        num_samples=12,
        cache_dir=cache_dir,
        device="cpu",
        batch_size=5,
        max_new_tokens=8,
        seed=0,
        progress=False,
    )
    # Independently: the first 12 windows of block + 1 tokens, every block tokens, of the
    # validation token stream on disk; the HF model predicts each window's last block
    # tokens from the ones before (GPT-2 has block positions: no room for the labels trick).
    checkpoint = load_checkpoint(path)
    meta = checkpoint.meta
    block = meta["model_config"]["model"]["block_size"]
    tokens = np.fromfile(f"{meta['data_dir']}/tokens_val.bin", dtype=np.uint16)
    windows = torch.tensor(
        np.stack([tokens[i * block : i * block + block + 1] for i in range(12)]).astype(np.int64)
    )
    with torch.no_grad():
        logits = to_hf(checkpoint.build_model())(input_ids=windows[:, :-1]).logits
    hf_loss = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert ours["val/perplexity_is_bound"] == 0.0
    assert ours["val/loss"] == pytest.approx(hf_loss, rel=1e-4)
    assert ours["val/perplexity"] == pytest.approx(math.exp(hf_loss), rel=1e-4)
    assert abs(hf_loss - math.log(meta["model_config"]["model"]["vocab_size"])) > 0.5


def test_lmpipe_greedy_generation_equals_hf_generate():
    model = sharp_model(**LLAMA)
    hf = to_hf(model)
    prompt = torch.randint(0, 41, (2, 6))
    ours = model.generate(prompt, 12, temperature=0, use_cache=True)
    theirs = hf.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(ours, theirs)


def test_exported_folder_loads_with_the_auto_classes(tmp_path, cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data_cfg = data_config("demo_chat", records=200)
    checkpoint = load_checkpoint(
        save_random_checkpoint(tmp_path / "ckpt", data_cfg, cache_dir, scale=0.2)
    )
    model, tokenizer = checkpoint.build_model(), checkpoint.tokenizer()
    folder = export(model, tokenizer, tmp_path / "hf")

    hf = AutoModelForCausalLM.from_pretrained(folder)
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    ids = tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=True))
    hf_ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert list(hf_ids) == ids
    assert set(hf.generation_config.eos_token_id) == {tokenizer.eos_id, tokenizer.turn_end_id}
    batch = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=batch).logits, model.backbone(batch, causal=True), rtol=1e-5, atol=1e-5
        )


def test_what_cannot_be_exported_is_refused():
    with pytest.raises(ConfigError, match="only autoregressive"):
        to_hf(sharp_model(arch="diffusion"))
    with pytest.raises(ConfigError, match="no HF model has the layout norm=rmsnorm"):
        to_hf(sharp_model(**{**LLAMA, "mlp": "gelu"}))


def test_gpt2_export_uses_exact_gelu():
    """GPT-2's default activation is the tanh approximation; lmpipe's is exact (erf)."""
    hf = to_hf(sharp_model(**GPT2))
    assert hf.config.activation_function == "gelu"
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(hf.transformer.h[0].mlp.act(x), F.gelu(x))


@pytest.mark.parametrize("layout", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_a_reward_model_exports_to_a_sequence_classifier_with_the_same_scores(layout):
    """HF pools at each row's last non-pad token, lmpipe at the last response token."""
    from lmpipe.batch import Batch
    from lmpipe.hf import to_hf_reward_model
    from lmpipe.objectives.reward_model import response_scores, scalar_head

    model = sharp_model(**layout)
    head = scalar_head(32)
    torch.nn.init.normal_(head.weight)
    hf = to_hf_reward_model(model, head)
    assert type(hf).__name__.endswith("ForSequenceClassification")
    ids = torch.randint(4, 41, (3, 12))
    mask = torch.zeros(3, 12)
    for row, (prompt, end) in enumerate([(3, 11), (2, 6), (5, 8)]):
        mask[row, prompt : end + 1] = 1
        ids[row, end + 1 :] = 0  # padding
    with torch.no_grad():
        ours = response_scores(model, head, Batch(input_ids=ids, loss_mask=mask), 0, 24)
        theirs = hf(input_ids=ids, attention_mask=(ids != 0).long()).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
