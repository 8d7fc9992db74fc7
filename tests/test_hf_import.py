"""HF models in: tiny random Llama, Qwen2 and GPT-2 models saved with ``save_pretrained``
(and a byte-level tokenizer beside them) load as lmpipe's transformer with the same
logits, export back to the same logits, fine-tune and generate as HF does; what lmpipe
cannot represent is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmpipe.errors import CheckpointError, DataError
from lmpipe.hf import to_hf
from lmpipe.training.checkpoint import resolve_checkpoint

from conftest import TINY, assert_one_line_error

VOCAB = 258  # the byte alphabet, <s> and </s>: the tokenizer save_tokenizer writes
SMALL = {"vocab_size": VOCAB, "num_hidden_layers": 2, "num_attention_heads": 4}
LLAMA_SHAPE = {
    **SMALL,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
    "rope_theta": 500.0,
    "rms_norm_eps": 1e-5,
}
CONFIGS = {
    "llama": ("LlamaConfig", LLAMA_SHAPE),
    "llama-bias": ("LlamaConfig", {**LLAMA_SHAPE, "attention_bias": True, "mlp_bias": True}),
    "qwen2": ("Qwen2Config", {**LLAMA_SHAPE, "tie_word_embeddings": True}),
    "gpt2": (
        "GPT2Config",
        {
            "vocab_size": VOCAB,
            "n_layer": 2,
            "n_head": 4,
            "n_embd": 32,
            "n_positions": 128,
            "activation_function": "gelu",
            "bos_token_id": 256,
            "eos_token_id": 257,
        },
    ),
}
CONFIGS["gpt2-tanh"] = ("GPT2Config", {**CONFIGS["gpt2"][1], "activation_function": "gelu_new"})


def save_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer (every text encodes) with HF's own BOS/EOS, not lmpipe's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    hf.save_pretrained(folder)


def save_hf_model(folder: Path, name: str = "llama", **overrides):
    """A tiny HF causal LM with large random weights (a wrong mapping would show), saved
    with its tokenizer; returns the HF model."""
    import transformers

    class_name, values = CONFIGS[name]
    config = getattr(transformers, class_name)(**{**values, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return model.eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_an_hf_model_imports_and_exports_with_the_same_logits(tmp_path, name):
    hf = save_hf_model(tmp_path / name, name)
    checkpoint = resolve_checkpoint(f"hf:{tmp_path / name}")
    model = checkpoint.build_model()
    vocab = hf.config.vocab_size
    tokenizer = checkpoint.tokenizer()
    # lmpipe's special tokens are added after the HF vocabulary
    assert model.config.vocab_size == tokenizer.vocab_size > vocab
    assert tokenizer.special_ids["eos"] >= vocab
    ids = torch.randint(0, vocab, (2, 20))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        ours = model.backbone(ids, causal=True)
        again = to_hf(model)(input_ids=ids).logits
    assert expected.std() > 0.3  # far from uniform, so the comparison is sharp
    torch.testing.assert_close(ours[..., :vocab], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again[..., :vocab], expected, rtol=1e-4, atol=1e-4)
    # a new token's logit is the mean of the others: never the greedy choice
    assert (ours[..., vocab:] < ours[..., :vocab].max(dim=-1, keepdim=True).values).all()
    assert type(to_hf(model)).__name__ == type(hf).__name__


def test_sharded_weights_and_weights_of_the_bare_model_import(tmp_path):
    """An index of several safetensors files; names without the ``transformer.`` prefix
    (as the original GPT-2 checkpoint has them)."""
    from safetensors.torch import load_file, save_file

    hf = save_hf_model(tmp_path / "sharded", "llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    gpt2 = save_hf_model(tmp_path / "bare", "gpt2")
    file = tmp_path / "bare" / "model.safetensors"
    save_file({k.removeprefix("transformer."): v for k, v in load_file(file).items()}, file)
    ids = torch.randint(0, VOCAB, (2, 12))
    for folder, model in (("sharded", hf), ("bare", gpt2)):
        ours = resolve_checkpoint(f"hf:{tmp_path / folder}").build_model()
        with torch.no_grad():
            expected = model(input_ids=ids).logits
            logits = ours.backbone(ids, causal=True)[..., :VOCAB]
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_qwen2_biases_are_on_qkv_only(tmp_path):
    save_hf_model(tmp_path / "qwen2", "qwen2")
    config = resolve_checkpoint(f"hf:{tmp_path / 'qwen2'}").build_model().config
    assert config.qkv_bias and not config.bias and config.tie_embeddings


UNSUPPORTED = {
    "grouped-query": ("llama", {"num_key_value_heads": 2}, "grouped-query attention"),
    "rope-scaling": (
        "llama",
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}},
        "rope_scaling",
    ),
    "head-dim": ("llama", {"head_dim": 16}, "head_dim=16"),
    "attention-bias-alone": ("llama", {"attention_bias": True}, "attention_bias=True"),
    "sliding-window": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
        "use_sliding_window=True",
    ),
    "relu": ("gpt2", {"activation_function": "relu"}, "activation_function='relu'"),
    "gelu-llama": ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
}


@pytest.mark.parametrize("case", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_what_lmpipe_cannot_represent_is_refused_naming_it(tmp_path, case):
    name, overrides, named = case
    save_hf_model(tmp_path / "m", name, **overrides)
    with pytest.raises(CheckpointError, match="cannot be imported") as error:
        resolve_checkpoint(f"hf:{tmp_path / 'm'}")
    assert named in str(error.value)
    assert "\n" not in str(error.value)


def test_a_folder_without_a_tokenizer_is_refused(tmp_path):
    save_hf_model(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="tokenizer file not found"):
        resolve_checkpoint(f"hf:{tmp_path / 'm'}")


def test_a_chat_template_saved_beside_the_tokenizer_is_used(tmp_path):
    """transformers 5 writes the template to chat_template.jinja, not the config."""
    save_hf_model(tmp_path / "m")
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>{% endfor %}"
    (tmp_path / "m" / "chat_template.jinja").write_text(template)
    tokenizer = resolve_checkpoint(f"hf:{tmp_path / 'm'}").tokenizer()
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]) == "[user]hi</s>"
    assert tokenizer.turn_end_id == tokenizer.backend.token_to_id("</s>")


@pytest.mark.slow  # three CLI processes: 53-89 s on the shared 2-core machine
def test_hf_round_trip_sft_export_generate(tmp_path, lmpipe):
    """Import -> 20 SFT steps -> export: HF's greedy generation equals lmpipe's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_hf_model(tmp_path / "base", "llama")
    lmpipe(
        "train",
        *TINY,
        "stage=sft",
        f"init_from=hf:{tmp_path / 'base'}",
        "data=demo_chat",
        "data.sources.0.num_records=200",
        "trainer.max_steps=20",
        "trainer.eval_batches=1",
        "run_name=sft",
        f"out_dir={tmp_path / 'runs'}",
    )
    run = tmp_path / "runs" / "sft"
    lmpipe("export", f"checkpoint={run}", f"out={tmp_path / 'out'}")
    prompt = "What is 2 plus 3?"
    ours = lmpipe(
        "generate",
        f"checkpoint={run}",
        "chat=true",
        f"prompt={prompt}",
        "temperature=0",
        "max_new_tokens=12",
        "stream=false",
    ).stdout
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    out = hf.generate(**ids, max_new_tokens=12, do_sample=False)
    theirs = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert theirs.strip()
    assert ours == theirs + "\n"


BAD_FOLDERS = {
    "missing": (lambda d: None, "HF model folder not found"),
    "no-weights": (
        lambda d: save_hf_model(d) and (d / "model.safetensors").unlink(),
        "no model.safetensors",
    ),
    "bert": (lambda d: _save_config(d, "bert"), "model_type='bert' cannot be imported"),
    "mistral": (
        lambda d: _save_config(d, "mistral", sliding_window=8),
        "model_type='mistral' cannot be imported",
    ),
}


@pytest.mark.parametrize("case", BAD_FOLDERS.values(), ids=BAD_FOLDERS.keys())
def test_bad_hf_folders_are_refused(tmp_path, case):
    make, message = case
    make(tmp_path / "m")
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(f"hf:{tmp_path / 'm'}")


def test_a_bad_hf_folder_is_a_one_line_error_of_the_cli(tmp_path, lmpipe):
    _save_config(tmp_path / "m", "bert")
    proc = lmpipe(
        "train",
        *TINY,
        "stage=sft",
        f"init_from=hf:{tmp_path / 'm'}",
        "data=demo_chat",
        "trainer.max_steps=1",
        check=False,
    )
    assert proc.returncode == 2
    assert_one_line_error(proc, "model_type='bert' cannot be imported")


def _save_config(folder: Path, model_type: str, **values) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, **values}))
    save_tokenizer(folder)


def test_a_run_started_from_an_hf_folder_resumes(tmp_path, cache_dir):
    """Its checkpoints record hf:<folder> as their start, and resuming reopens it."""
    from lmpipe import api

    save_hf_model(tmp_path / "base")
    args = [
        *TINY,
        "stage=sft",
        f"init_from=hf:{tmp_path / 'base'}",
        "data=demo_chat",
        "data.sources.0.num_records=100",
        "trainer.eval_batches=1",
        "trainer.save_interval=2",
        "run_name=sft",
        f"out_dir={tmp_path / 'runs'}",
        f"cache_dir={cache_dir}",
    ]
    run = api.train([*args, "trainer.max_steps=2"])
    assert resolve_checkpoint(run).meta["init_checkpoint"] == f"hf:{tmp_path / 'base'}"
    api.train([*args, "trainer.max_steps=4", "resume=auto"])
    assert resolve_checkpoint(run).step == 4


def test_dpo_starts_from_an_hf_folder_with_it_as_the_reference(tmp_path, cache_dir):
    from conftest import build_cpu_run

    save_hf_model(tmp_path / "base", "qwen2")
    run = build_cpu_run(
        tmp_path / "run",
        *TINY,
        "stage=dpo",
        f"init_from=hf:{tmp_path / 'base'}",
        "data=demo_pref",
        "data.sources.0.num_records=60",
        f"cache_dir={cache_dir}",
    )
    policy = run.trainer.model
    reference = resolve_checkpoint(f"hf:{tmp_path / 'base'}").build_model()
    assert policy.config == reference.config
    for name, value in reference.state_dict().items():
        assert torch.equal(policy.state_dict()[name], value), name
    assert run.trainer.objective.reference_table or run.trainer.objective.reference is not None
