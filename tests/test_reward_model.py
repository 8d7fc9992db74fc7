"""Reward models: the Bradley-Terry loss, scoring at the last response token whatever the
padding, training (stage=rm), evaluation, and a reward model as a reward (reward=rm)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from lmpipe.batch import Batch
from lmpipe.models import build_lm
from lmpipe.objectives.reward_model import (
    HEAD,
    bradley_terry,
    packed_scores,
    response_end,
    response_scores,
    response_sequences,
    scalar_head,
)

from conftest import (
    arch_config,
    assert_one_line_error,
    build_cpu_run,
    data_config,
    read_metrics,
    save_random_checkpoint,
)

PAIRS = ["data=demo_pref", "data.sources.0.num_records=300"]


def test_bradley_terry_matches_hand_computed_values():
    chosen, rejected = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    loss = bradley_terry(chosen, rejected, margin=0.5, center=0.01)
    # -log sigmoid(2 - 0.5 - 0.5) + 0.01 * 2.5^2 ; -log sigmoid(-1 - 1 - 0.5) + 0.01 * 0^2
    expected = [math.log1p(math.exp(-1.0)) + 0.0625, math.log1p(math.exp(2.5))]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)


def test_the_response_ends_at_the_first_run_of_loss_tokens():
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 0, 0, 0.0],  # prompt, reply + end of turn, EOS, padding
            [0, 1, 1, 0, 1, 1, 1, 1],  # diffusion: EOS padding after a gap is trained on
            [0, 0, 0, 1, 1, 1, 1, 1],  # cut off at the row's end
        ]
    )
    assert response_end(mask).tolist() == [4, 2, 7]
    ids = torch.arange(24).view(3, 8)
    batch = Batch(input_ids=ids, loss_mask=mask, left_pad=torch.tensor([0, 1, 0]))
    assert response_sequences(batch, max_tokens=6) == [
        [0, 1, 2, 3, 4],
        [9, 10],  # after its left padding
        [18, 19, 20, 21, 22, 23],  # the last 6 of 8 tokens
    ]


@pytest.mark.parametrize("arch", ["ar", "diffusion"])
def test_a_score_depends_on_the_sequence_only_not_on_padding_or_batch(arch):
    """Pairs right-padded as the episode sampler lays them out (diffusion: with trained EOS
    padding), scored packed, give exactly each sequence's score computed alone without
    packing (the LM's features of the bare sequence at its last token)."""
    torch.manual_seed(0)
    special = {"mask": 1, "eos": 2, "pad": 0}
    shape = {"n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 32}
    model = build_lm(arch_config(arch), shape, 40, special).eval()
    head = scalar_head(32)
    torch.nn.init.normal_(head.weight)
    sequences = [[5, 6, 7, 8, 9, 10], [5, 6, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21]]
    prompt_lengths = [3, 2, 4]
    width = 12
    fill = 2 if arch == "diffusion" else 0
    ids = torch.full((3, width), fill)
    mask = torch.zeros(3, width)
    for row, (seq, prompt) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, prompt : len(seq)] = 1
        if arch == "diffusion":
            mask[row, len(seq) + 1 :] = 1  # EOS, then trained padding
    with torch.no_grad():
        batched = response_scores(model, head, Batch(input_ids=ids, loss_mask=mask), 0, 32)
        alone = [
            head(model.features(Batch(torch.tensor([seq]), torch.zeros(1, len(seq))))[0, -1])
            for seq in sequences
        ]
        reordered = packed_scores(model, head, sequences[::-1], pad_id=0)
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=0)
    torch.testing.assert_close(reordered, batched.flip(0), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def policy_start(tmp_path_factory, cache_dir):
    """A random model with the demo prompts' tokenizer (a policy and its reward model
    start from it, so they share the tokenizer)."""
    root = tmp_path_factory.mktemp("rm-start")
    return save_random_checkpoint(
        root / "start", data_config("demo_prompts", 300), cache_dir, scale=0.3
    )


def rm_args(start, cache_dir, *extra: str) -> list[str]:
    return [
        "stage=rm",
        f"init_from={start}",
        f"cache_dir={cache_dir}",
        *PAIRS,
        "trainer.batch_size=8",
        "trainer.eval_batches=2",
        "model.block_size=64",
        *extra,
    ]


def test_bt_loss_is_ln2_at_a_zero_head(policy_start, cache_dir, tmp_path):
    run = build_cpu_run(tmp_path / "run", *rm_args(policy_start, cache_dir))
    rm = run.trainer.objective
    assert not rm.head.weight.any() and run.trainer.modules == {HEAD: rm.head}
    batch = run.trainer.sampler.batch(0)
    assert batch.rows_per_example == 2 and len(batch) == 16
    loss, metrics = rm.loss(run.trainer.train_model, batch)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-6)
    assert float(metrics["accuracy"]) == 0 and float(metrics["margin"]) == 0
    loss.backward()
    assert rm.head.weight.grad.abs().sum() > 0  # the head learns from the first step


def test_a_trained_reward_model_is_saved_evaluated_and_usable_as_a_reward(
    lmpipe, policy_start, cache_dir, tmp_path
):
    from lmpipe.training.run import start

    rm_dir = tmp_path / "rm"
    rm_run = build_cpu_run(
        rm_dir,
        *rm_args(policy_start, cache_dir),
        "trainer.max_steps=12",
        "trainer.eval_interval=12",
        "trainer.log_interval=4",
        "optim.lr=3e-3",
    )
    start(rm_run)
    head = load_file(rm_dir / "checkpoints" / "step_000012" / "objective.safetensors")
    assert head[f"{HEAD}.weight"].shape == (1, 32) and head[f"{HEAD}.weight"].abs().sum() > 0
    metrics = [m for m in read_metrics(rm_dir) if "val/accuracy" in m]
    assert {"val/loss", "val/margin", "val/chosen", "val/rejected"} <= set(metrics[-1])
    assert metrics[0]["val/loss"] == pytest.approx(math.log(2), abs=1e-4)  # zero head at step 0

    proc = lmpipe(
        "evaluate",
        f"checkpoint={rm_dir}",
        "data=demo_pref",
        "data.sources.0.num_records=300",
        "eval.metrics=[rm]",
        "eval.num_samples=16",
        f"cache_dir={cache_dir}",
        "device=cpu",
    )
    assert "| rm/accuracy |" in proc.stdout and "| rm/margin |" in proc.stdout

    # As a reward: a GRPO step on the policy's prompts, scored by the reward model.
    grpo = build_cpu_run(
        tmp_path / "grpo",
        "stage=grpo",
        f"init_from={policy_start}",
        f"cache_dir={cache_dir}",
        *["data=demo_prompts", "data.sources.0.num_records=300", "model.block_size=64"],
        *["trainer.batch_size=2", "objective.num_generations=2"],
        "objective.max_completion_length=8",
        "reward=rm",
        f"reward.rm.checkpoint={rm_dir}",
    ).trainer
    metrics, _ = grpo.train_step(grpo.sampler.batch(0))
    assert "rewards/rm" in metrics


@pytest.fixture(scope="module")
def bad_reward_models(tmp_path_factory, cache_dir):
    """A 'reward model' with another tokenizer (the pairs' own), and a checkpoint of the
    policy's tokenizer without a reward head."""
    root = tmp_path_factory.mktemp("bad-rm")
    head = {HEAD: scalar_head(32)}
    other = save_random_checkpoint(
        root / "other", data_config("demo_pref", 300), cache_dir, modules=head
    )
    headless = save_random_checkpoint(
        root / "headless", data_config("demo_prompts", 300), cache_dir
    )
    return {"other": other, "headless": headless}


def test_a_reward_model_with_another_tokenizer_is_one_line(
    lmpipe, policy_start, cache_dir, bad_reward_models
):
    proc = lmpipe(
        "train", *ppo_args(policy_start, cache_dir, bad_reward_models["other"]), check=False
    )
    assert_one_line_error(proc, "reward.rm.checkpoint=", "has another tokenizer")


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("headless", "has no reward head (it is a stage=pretrain checkpoint; train a reward"),
        ("missing", "checkpoint not found"),
    ],
)
def test_a_reward_model_that_cannot_score_is_refused(
    policy_start, cache_dir, bad_reward_models, tmp_path, which, message
):
    """The errors the CLI prints as one line (``lmpipe.cli.one_line``), in-process."""
    from lmpipe.cli import one_line
    from lmpipe.errors import CheckpointError

    checkpoint = bad_reward_models.get(which, tmp_path / "nowhere")
    with pytest.raises(CheckpointError) as caught:
        build_cpu_run(tmp_path / "run", *ppo_args(policy_start, cache_dir, checkpoint))
    assert message in one_line(caught.value)


def ppo_args(start, cache_dir, reward_model) -> list[str]:
    return [
        "stage=ppo",
        f"init_from={start}",
        f"cache_dir={cache_dir}",
        *["data=demo_prompts", "data.sources.0.num_records=300", "model.block_size=64"],
        "objective.max_completion_length=8",
        "reward=rm",
        f"reward.rm.checkpoint={reward_model}",
    ]
