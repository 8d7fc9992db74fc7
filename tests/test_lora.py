"""finetune=lora: only the adapters train, the adapted model starts as the base model,
checkpoints hold the merged model (what every later reader loads) and a LoRA run resumes
exactly; DPO and GRPO keep the frozen base as their reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmpipe.cli import one_line
from lmpipe.errors import ConfigError
from lmpipe.hf import to_hf
from lmpipe.training.checkpoint import load_checkpoint
from lmpipe.training.run import start as run_stage

from conftest import build_cpu_run, data_config, save_random_checkpoint

RECORDS = 300


def args(base: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        "stage=sft",
        "data=demo_chat",
        f"data.sources.0.num_records={RECORDS}",
        "finetune=lora",
        "finetune.dropout=0.1",  # the adapters' own randomness must replay on resume
        f"init_from={base}",
        f"cache_dir={cache_dir}",
        "model.block_size=64",  # the base checkpoint's (trainer.block_size follows it)
        "trainer.batch_size=4",
        "trainer.max_steps=4",
        "trainer.save_interval=2",
        "trainer.eval_batches=0",
        "optim.lr=1e-2",
        "schedule.name=constant",  # the same LRs whatever max_steps says
        "schedule.warmup_steps=0",
        *extra,
    ]


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache_dir) -> Path:
    """A random-weight AR model (far from uniform) on the demo chats' tokenizer."""
    root = tmp_path_factory.mktemp("lora-base")
    return save_random_checkpoint(
        root / "base", data_config("demo_chat", RECORDS), cache_dir, scale=0.3
    )


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(
        0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        return model.eval().backbone(ids, causal=True)


def test_at_init_the_adapted_model_is_the_base_model_and_only_adapters_train(
    base, cache_dir, tmp_path
):
    run = build_cpu_run(tmp_path / "run", *args(base, cache_dir))
    model = run.trainer.model
    assert torch.equal(logits(model), logits(load_checkpoint(base).build_model()))

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    n_layer = model.config.n_layer
    assert trainable == {
        f"backbone.blocks.{i}.{part}.{layer}.lora_{ab}"
        for i in range(n_layer)
        for part, layer in (("attn", "qkv"), ("attn", "proj"), ("mlp", "up"), ("mlp", "down"))
        for ab in "AB"
    }
    optimized = {id(p) for group in run.trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}

    counts = [p.numel() for p in model.parameters()]
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (
        f"trains     {adapters:,} of {sum(counts):,} params ({adapters / sum(counts):.2%}): "
        f"LoRA r=8 alpha=16 on {4 * n_layer} layers" in run.plan
    )


def test_a_lora_run_saves_the_merged_model_and_resumes_exactly(base, cache_dir, tmp_path):
    full = build_cpu_run(tmp_path / "full", *args(base, cache_dir))
    run_stage(full)
    model = full.trainer.model
    start = load_checkpoint(base).build_model()
    frozen = {n.replace(".base.", "."): p for n, p in model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(frozen[n], p) for n, p in start.named_parameters())
    assert all(model.get_parameter(f"backbone.blocks.0.{m}.lora_B").any() for m in ("attn.qkv",))

    # model.safetensors holds the merged weights: a plain model computing the adapted one.
    final = tmp_path / "full" / "checkpoints" / "step_000004"
    merged = load_checkpoint(final).build_model()
    adapted = logits(model)
    assert (logits(merged) - adapted).abs().max() < 1e-5
    assert (logits(start) - adapted).abs().max() > 1e-2  # the adapters changed the model
    hf = to_hf(merged)  # what ``python -m lmpipe.export`` writes
    ids = torch.randint(
        0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)

    # A run stopped at step 2 and resumed there ends with the same adapters and weights.
    part = build_cpu_run(tmp_path / "part", *args(base, cache_dir, "trainer.max_steps=2"))
    run_stage(part)
    resumed = build_cpu_run(tmp_path / "part", *args(base, cache_dir, "resume=auto"))
    assert resumed.trainer.step == 2
    run_stage(resumed)
    for name in ("adapters.safetensors", "model.safetensors"):
        ours = load_file(tmp_path / "part" / "checkpoints" / "step_000004" / name)
        theirs = load_file(final / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_later_stage_starts_from_the_merged_lora_model(base, cache_dir, tmp_path):
    lora = build_cpu_run(tmp_path / "lora", *args(base, cache_dir, "trainer.max_steps=2"))
    run_stage(lora)
    full = [a for a in args(tmp_path / "lora", cache_dir) if not a.startswith("finetune")]
    later = build_cpu_run(tmp_path / "later", *full)
    adapted = logits(lora.trainer.model)
    assert (logits(later.trainer.model) - adapted).abs().max() < 1e-5
    assert (logits(load_checkpoint(base).build_model()) - adapted).abs().max() > 1e-3
    assert "params (100.00%): all weights" in later.plan


@pytest.mark.parametrize(
    ("stage", "data", "extra"),
    [
        ("dpo", "demo_pref", []),
        (
            "grpo",
            "demo_prompts",
            [
                "objective.num_generations=4",
                "objective.max_completion_length=8",
                "sampler.max_prompt_tokens=48",
                "objective.beta=0.04",
            ],
        ),
        (
            "ppo",
            "demo_prompts",
            [
                "reward=[length_penalty]",
                "objective.max_completion_length=8",
                "objective.num_minibatches=2",
                "sampler.max_prompt_tokens=48",
            ],
        ),
    ],
)
def test_preference_and_rl_stages_train_the_adapters_against_the_frozen_base(
    stage, data, extra, base, cache_dir, tmp_path
):
    run = build_cpu_run(
        tmp_path / "run",
        *args(base, cache_dir, f"stage={stage}", f"data={data}", "trainer.max_steps=2", *extra),
    )
    model, reference = run.trainer.model, run.trainer.objective.reference
    start = load_checkpoint(base).build_model()
    assert torch.equal(logits(reference), logits(start))
    assert torch.equal(logits(model), logits(reference))  # zero adapters: KL 0 at the start
    run_stage(run)
    frozen = {n.replace(".base.", "."): p for n, p in model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(frozen[n], p) for n, p in start.named_parameters())
    assert all(not p.requires_grad for p in reference.parameters())
    assert torch.equal(logits(reference), logits(start))
    assert (logits(model) - logits(reference)).abs().max() > 1e-3  # the adapters trained


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (
            ["finetune.target_modules=[qkv,attn_out]"],
            ["'attn_out' matches no linear layer", "available: down, proj, qkv, up"],
        ),
        (["finetune.r=0"], ["finetune.r=0 must be an integer >= 1"]),
        (["init_from=null"], ["finetune=lora adapts a trained model: pass init_from="]),
    ],
)
def test_bad_lora_settings_are_one_line(extra, fragments, base, cache_dir, tmp_path):
    with pytest.raises(ConfigError) as caught:
        build_cpu_run(tmp_path / "run", *args(base, cache_dir), *extra)
    message = one_line(caught.value)
    assert all(fragment in message for fragment in fragments), message
    assert not (tmp_path / "run").exists()
