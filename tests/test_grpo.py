"""GRPO: advantages, loss aggregations, the first update of a rollout, rewards, prompt data,
exact resume and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lmpipe.batch import PromptBatch
from lmpipe.errors import LmpipeError
from lmpipe.models.base import TokenLogps
from lmpipe.objectives.grpo import GRPO, SCALE_REWARDS, group_advantages, kl_k3
from lmpipe.objectives.rewards import AnswerMatch, Completion, Format, LengthPenalty, score
from lmpipe.objectives.rollouts import Rollout

from conftest import (
    assert_one_line_error,
    build_cpu_run,
    data_config,
    read_metrics,
    save_random_checkpoint,
    train_until_killed,
)

PROMPT_RECORDS = 300
PROMPTS = ["data=demo_prompts", f"data.sources.0.num_records={PROMPT_RECORDS}"]


# --- advantages and the loss -------------------------------------------------------------
@pytest.mark.parametrize("scale", SCALE_REWARDS)
def test_a_group_with_equal_rewards_has_zero_advantages(scale):
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.7, 1.0, 0.0, 0.0, 1.0])
    advantages = group_advantages(rewards, 4, scale)
    assert (advantages[:4] == 0).all()
    assert advantages[4:].sum().abs() < 1e-6 and advantages[4] > 0 > advantages[5]
    if scale == "group":  # centred and divided by the group's std (0.577)
        assert float(advantages[4]) == pytest.approx(0.5 / (0.57735 + 1e-4), rel=1e-4)
    if scale == "none":
        assert advantages[4:].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])


class ShiftedPolicy(torch.nn.Module):
    """Log-probs = the rollout's old log-probs + ``shift`` on completion tokens (ratio
    exp(shift)), with a gradient."""

    def __init__(self, shift: float):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor(shift))

    def forward(self, batch, *, output, temperature):
        assert output == "logps"
        logps = batch.old_logps + self.shift * batch.loss_mask
        return TokenLogps(logps, torch.zeros_like(logps))


def objective(**changes) -> GRPO:
    options = {
        "rewards": {"answer_match": AnswerMatch()},
        "num_generations": 2,
        "max_completion_length": 4,
        "temperature": 1.0,
        "epsilon": 0.2,
        "epsilon_high": None,
        "beta": 0.0,
        "num_iterations": 1,
        "loss_type": "dapo",
        "scale_rewards": "group",
        "mask_truncated_completions": False,
    }
    return GRPO(**{**options, **changes})


def rollout(loss_type: str) -> Rollout:
    """Two completions: advantage +1 with two tokens, -3 with one; budget 4 tokens."""
    from lmpipe.objectives.grpo import token_weights

    mask = torch.tensor([[0.0, 1, 1, 0, 0], [0, 1, 0, 0, 0]])
    return Rollout(
        input_ids=torch.zeros(2, 5, dtype=torch.long),
        loss_mask=mask,
        advantages=torch.tensor([[1.0] * 5, [-3.0] * 5]),
        token_weights=token_weights(mask, loss_type, 4) * 2,  # x rows: the Trainer averages
        old_logps=torch.full((2, 5), -1.0),
    )


@pytest.mark.parametrize(
    ("loss_type", "at_ratio_1", "at_ratio_1_5"),
    [
        # per-token loss -min(r A, clip(r) A): ratio 1 -> -A; ratio 1.5 -> -1.2 (A=1, clipped)
        # and +4.5 (A=-3). grpo: mean of the completions' token means; dr_grpo: sum / (2 x 4);
        # dapo: sum / 3 tokens.
        ("grpo", (-1 + 3) / 2, (-1.2 + 4.5) / 2),
        ("dr_grpo", (-2 + 3) / 8, (-2.4 + 4.5) / 8),
        ("dapo", (-2 + 3) / 3, (-2.4 + 4.5) / 3),
    ],
)
def test_the_three_loss_aggregations_match_hand_computed_values(
    loss_type, at_ratio_1, at_ratio_1_5
):
    grpo = objective(loss_type=loss_type)
    batch = rollout(loss_type)
    loss, metrics = grpo.loss(ShiftedPolicy(0.0), batch)
    loss = loss.detach()
    assert float(loss) == pytest.approx(at_ratio_1, abs=1e-6)
    assert float(metrics["clip_fraction"]) == 0
    loss, metrics = grpo.loss(ShiftedPolicy(math.log(1.5)), batch)
    loss = loss.detach()
    assert float(loss) == pytest.approx(at_ratio_1_5, abs=1e-6)
    assert float(metrics["clip_fraction"]) == pytest.approx(2 / 3)  # the A > 0 tokens
    # Micro-batches (the Trainer weights each by its share of rows) give the same loss.
    halves = [
        grpo.loss(ShiftedPolicy(math.log(1.5)), part)[0].detach() * 0.5 for part in batch.split(1)
    ]
    assert float(sum(halves)) == pytest.approx(at_ratio_1_5, abs=1e-6)


def test_clip_higher_lets_positive_advantages_rise_further():
    batch = rollout("dapo")
    loss, metrics = objective(epsilon_high=0.6).loss(ShiftedPolicy(math.log(1.5)), batch)
    loss = loss.detach()
    assert float(loss) == pytest.approx((-3.0 + 4.5) / 3, abs=1e-6)
    assert float(metrics["clip_fraction"]) == 0


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logps = torch.log(torch.tensor([0.2, 0.5, 0.9]))
    assert kl_k3(logps, logps).abs().max() == 0
    ref = torch.log(torch.tensor([0.4, 0.25, 0.8]))
    delta = ref - logps
    torch.testing.assert_close(kl_k3(logps, ref), delta.exp() - delta - 1)
    assert (kl_k3(logps, ref) > 0).all()


# --- rewards -----------------------------------------------------------------------------
def completion(text: str, reference: str | None = "7", tokens: int = 5, truncated=False):
    return Completion(text, tokens, truncated, max_tokens=10, reference=reference)


def test_rewards_score_crafted_replies():
    replies = [
        completion("3 plus 4 is 7. The answer is 7."),
        completion("3 plus 4 is 8. The answer is 8."),
        completion("Bob has 7 apples and 2 pears, so 5"),  # last number 5: wrong
        completion("so 72 in all.\n#### 72", reference="Half of 144 is 72.\n#### 72"),
        completion("The answer is $1,234.00", reference="1234"),
        completion("The answer is 7 but I am not sure"),  # right answer, wrong form
    ]
    assert AnswerMatch()(replies) == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    from omegaconf import OmegaConf

    pattern = OmegaConf.load("conf/reward/format.yaml").format.pattern
    assert Format(pattern)(replies) == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    lengths = [completion("x", tokens=n, truncated=n == 10) for n in (4, 6, 8, 10)]
    assert LengthPenalty(buffer=4)(lengths) == [0.0, 0.0, -0.5, -1.0]
    totals, each = score({"answer_match": AnswerMatch(), "format": Format(pattern, 0.5)}, replies)
    assert totals == [1.5, 0.5, 0.0, 1.5, 1.5, 1.0] and list(each) == ["answer_match", "format"]


# --- in-process runs from a checkpoint --------------------------------------------------
@pytest.fixture(scope="module")
def starting_checkpoints(tmp_path_factory, cache_dir):
    """A random-weight AR and diffusion model on the demo prompts (their tokenizer)."""
    root = tmp_path_factory.mktemp("grpo-start")
    cfg = data_config("demo_prompts", PROMPT_RECORDS)
    return {
        arch: save_random_checkpoint(root / arch, cfg, cache_dir, arch=arch, scale=0.3)
        for arch in ("ar", "diffusion", "sdd")
    }


def grpo_args(start, cache_dir, *extra: str) -> list[str]:
    return [
        "stage=grpo",
        f"init_from={start}",
        f"cache_dir={cache_dir}",
        *PROMPTS,
        "trainer.batch_size=4",
        "objective.num_generations=4",
        "objective.max_completion_length=12",
        "sampler.max_prompt_tokens=48",
        "trainer.eval_batches=1",
        "model.block_size=64",  # the checkpoints' (trainer.block_size follows it)
        *extra,
    ]


@pytest.mark.parametrize("arch", ["ar", "diffusion", "sdd"])
def test_first_update_of_a_rollout_has_ratio_one_and_zero_kl_to_an_identical_reference(
    arch, starting_checkpoints, cache_dir, tmp_path
):
    """num_iterations=2 makes pi_old a separate forward pass and beta > 0 adds a reference:
    with dropout 0.2 in the model, a policy scored in train mode (or a reference or pi_old
    seeing other masks or another temperature) would not give ratio 1 and KL 0."""
    run = build_cpu_run(
        tmp_path / "run",
        *grpo_args(starting_checkpoints[arch], cache_dir),
        f"arch={arch}",
        "arch.k_schedule=[[0,4]]" if arch == "sdd" else "model.dropout=0.2",
        "model.dropout=0.2",
        "objective.num_iterations=2",
        "objective.beta=0.04",
        "objective.temperature=0.7",
    )
    trainer = run.trainer
    grpo = trainer.objective
    torch.manual_seed(0)
    trainer.train_model.train(grpo.train_mode)  # as Trainer.train_step does
    updates = list(grpo.prepare(trainer.train_model, trainer.sampler.batch(0)))
    assert len(updates) == 2 and updates[0].metrics and updates[1].metrics is None
    first = updates[0]
    mask = first.loss_mask > 0
    assert mask.any() and first.segment_ids is not None  # packed sequences
    micro = trainer.micro_batch_examples  # as the Trainer splits the update

    def logps_of(model) -> torch.Tensor:
        parts = [model(m, output="logps", temperature=0.7).logps for m in first.split(micro)]
        return torch.cat(parts)

    logps = logps_of(trainer.train_model)
    ratio = torch.exp(logps - first.old_logps)[mask]
    assert (ratio - 1).abs().max() < 1e-5
    assert kl_k3(logps, first.ref_token_logps)[mask].abs().max() < 1e-5
    # The same with dropout on is far from 1: the check above can fail.
    trainer.train_model.train(True)
    noisy = logps_of(trainer.train_model)
    assert (torch.exp(noisy - first.old_logps)[mask] - 1).abs().max() > 1e-3
    if arch != "ar":  # new masks at the second iteration
        assert not torch.equal(updates[0].old_logps, updates[1].old_logps)


def test_prompt_batches_carry_their_answers_and_drop_long_prompts(
    starting_checkpoints, cache_dir, tmp_path
):
    run = build_cpu_run(
        tmp_path / "run",
        *grpo_args(starting_checkpoints["ar"], cache_dir),
        "sampler.max_prompt_tokens=24",
    )
    sampler = run.trainer.sampler
    batch = sampler.batch(0)
    assert isinstance(batch, PromptBatch) and len(batch) == 4
    assert all(ref is not None and ref.isdigit() for ref in batch.references)
    records = [
        json.loads(line)
        for line in (run.data.directory / "mixed_train.jsonl").read_text().splitlines()
    ]
    tokenizer = run.data.tokenizer
    for row, example in enumerate(batch.example_ids):
        record = records[example]
        assert batch.references[row] == record["answer"]
        text = tokenizer.render_chat(record["prompt"], add_generation_prompt=True)
        pad = int(batch.left_pad[row])
        assert batch.input_ids[row, pad:].tolist() == tokenizer.encode(text)
    assert sampler.dropped["longer_than_max_prompt_tokens"] > 0
    assert max(len(sampler.prompts[i].ids) for i in sampler.kept) <= 24
    assert "dropped: longer_than_max_prompt_tokens" in run.plan


# --- the CLI -----------------------------------------------------------------------------
def test_grpo_resumed_after_sigkill_ends_with_the_uninterrupted_weights(
    lmpipe, starting_checkpoints, tmp_path, cache_dir
):
    """Rollouts are seeded by the step: a run killed after its step-2 checkpoint and resumed
    ends bitwise equal to one never interrupted. The reward (replies containing "e") varies
    for random weights, so the weights do move."""

    def args(out):
        return [
            *grpo_args(starting_checkpoints["ar"], cache_dir),
            f"out_dir={out}",
            "run_name=r",
            "trainer.max_steps=5",
            "trainer.save_interval=2",
            "trainer.eval_interval=3",
            "trainer.log_interval=1",
            "optim.lr=3e-3",
            "reward=[format]",
            "reward.format.pattern=e",
        ]

    lmpipe("train", *args(tmp_path / "reference"))
    killed = tmp_path / "killed"
    train_until_killed(tmp_path, args(killed), "step      3 |")
    assert [p.name for p in (killed / "r" / "checkpoints").iterdir()] == ["step_000002"]
    proc = lmpipe("train", *args(killed), "resume=auto")
    assert "resuming from" in proc.stdout

    def weights(out):
        return load_file(out / "r" / "checkpoints" / "step_000005" / "model.safetensors")

    start = load_file(starting_checkpoints["ar"] / "model.safetensors")
    final, final_ref = weights(killed), weights(tmp_path / "reference")
    assert any(not torch.equal(final[k], start[k]) for k in final)
    assert all(torch.equal(final[k], final_ref[k]) for k in final)
    metrics = read_metrics(killed / "r")
    for name in ("rewards/mean", "rewards/format", "completions/mean_length", "train/loss"):
        assert any(name in m for m in metrics), name
    assert any("val/greedy/rewards/mean" in m for m in metrics)


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["data=demo"], ["'grpo' trains on prompt data", "data=demo is text data"]),
        (["data=demo_chat"], ["data=demo_chat is chat data"]),
        (["objective.num_generations=1"], ["objective.num_generations=1 must be an integer >= 2"]),
        (["sampler.kind=episodes"], ["reads batches from a prompts sampler"]),
        (["objective.loss_type=ppo"], ["objective.loss_type='ppo' must be one of grpo"]),
    ],
)
def test_grpo_refuses_bad_settings(starting_checkpoints, cache_dir, tmp_path, extra, fragments):
    with pytest.raises(LmpipeError) as error:
        build_cpu_run(tmp_path / "run", *grpo_args(starting_checkpoints["ar"], cache_dir), *extra)
    for fragment in fragments:
        assert fragment in str(error.value)
    assert not (tmp_path / "run").exists()


def test_an_unknown_reward_is_one_line_from_the_command_line(
    lmpipe, starting_checkpoints, cache_dir
):
    proc = lmpipe(
        "train",
        *grpo_args(starting_checkpoints["ar"], cache_dir),
        "reward=[answer_matsh]",
        check=False,
    )
    assert_one_line_error(proc, "reward/answer_matsh")


def test_answer_match_on_prompts_without_answers_says_how_many(
    starting_checkpoints, cache_dir, tmp_path
):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(40)]
    for row in rows[::4]:
        del row["answer"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LmpipeError, match="reward answer_match needs each prompt's answer"):
        build_cpu_run(
            tmp_path / "run",
            *grpo_args(starting_checkpoints["ar"], cache_dir),
            "data.sources.0.builtin=null",
            f"+data.sources.0.path={path}",
            "~data.sources.0.filters",
        )


def test_a_completion_longer_than_the_diffusion_block_is_refused(
    starting_checkpoints, cache_dir, tmp_path
):
    with pytest.raises(LmpipeError, match="objective.max_completion_length=64 does not fit"):
        build_cpu_run(
            tmp_path / "run",
            *grpo_args(starting_checkpoints["diffusion"], cache_dir),
            "arch=diffusion",
            "objective.max_completion_length=64",
        )
