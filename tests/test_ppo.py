"""PPO: GAE, whitening, value clipping and the missing-EOS penalty on crafted tensors; the
first minibatch of a rollout; the value head's start; exact resume; bad input."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lmpipe.objectives.ppo import penalise_missing_eos, token_rewards
from lmpipe.objectives.reward_model import HEAD, scalar_head
from lmpipe.objectives.rl import clipped_value_loss, gae, masked_whiten

from conftest import (
    assert_one_line_error,
    build_cpu_run,
    data_config,
    read_metrics,
    save_random_checkpoint,
    train_until_killed,
)

PROMPTS = ["data=demo_prompts", "data.sources.0.num_records=300"]


# --- the math, by hand ------------------------------------------------------------------
def test_gae_matches_a_hand_computed_example():
    # Row 0: prompt at column 0, completion at 1..3, fill at 4; row 1: completion at 2..4.
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1.0]])
    rewards = torch.tensor([[9, 0.5, -1.0, 2.0, 9], [9, 9, 1.0, 0.0, 1.0]])  # 9: never read
    values = torch.tensor([[9, 1.0, 2.0, 3.0, 9], [9, 9, 0.5, 0.5, 0.5]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 0 backwards: delta_3 = 2 - 3 = -1; delta_2 = -1 + 0.9*3 - 2 = -0.3, A_2 = -0.3 +
    # 0.72*(-1); delta_1 = 0.5 + 0.9*2 - 1 = 1.3, A_1 = 1.3 + 0.72*(-1.02). Row 1 likewise.
    expected = torch.tensor([[0, 0.5656, -1.02, -1.0, 0], [0, 0, 1.1732, 0.31, 0.5]])
    torch.testing.assert_close(advantages, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(returns, (expected + values) * mask, atol=1e-6, rtol=0)


def test_whitened_advantages_have_zero_mean_and_unit_variance_on_the_mask():
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1.0]])
    values = torch.tensor([[50, 1.0, 2.0, 4.0, 50], [50, 50, -1.0, 3.0, 0.5]])
    whitened = masked_whiten(values, mask)
    picked = whitened[mask > 0]
    assert float(picked.mean()) == pytest.approx(0, abs=1e-6)
    assert float(picked.var()) == pytest.approx(1, abs=1e-5)  # unbiased, as TRL's
    assert (whitened[mask == 0] == 0).all()


def test_value_clipping_takes_the_larger_loss_of_the_clipped_and_unclipped_value():
    values = torch.tensor([1.0, 0.0, 3.0])
    old = torch.zeros(3)
    returns = torch.tensor([2.0, 1.0, 0.0])
    loss, clipped = clipped_value_loss(values, old, returns, clip=0.5)
    # 1: clipped to 0.5, (0.5-2)^2 = 2.25 > (1-2)^2 = 1; 2: unchanged; 3: clipped to 0.5,
    # (0.5-0)^2 = 0.25 < (3-0)^2 = 9, the unclipped loss stays.
    assert loss.tolist() == pytest.approx([0.5 * 2.25, 0.5 * 1.0, 0.5 * 9.0])
    assert clipped.tolist() == [True, False, False]


def test_missing_eos_penalty_and_the_score_at_the_last_token():
    scores = torch.tensor([1.0, 2.0, -0.5])
    truncated = torch.tensor([False, True, True])
    penalised = penalise_missing_eos(scores, truncated, 1.5)
    assert penalised.tolist() == [1.0, 0.5, -2.0]
    assert torch.equal(penalise_missing_eos(scores, truncated, None), scores)
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1.0]])
    kl = torch.full((3, 4), 0.2)
    rewards = token_rewards(penalised, kl * mask, mask, kl_coef=0.5)
    expected = torch.tensor(
        [[0, -0.1, -0.1 + 1.0, 0], [0, -0.1, -0.1, -0.1 + 0.5], [-0.1, -0.1, -0.1, -0.1 - 2.0]]
    )
    torch.testing.assert_close(rewards, expected)


# --- in-process runs from a checkpoint --------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, cache_dir):
    """Random-weight AR and diffusion policies on the demo prompts, and a random 'reward
    model' of the same tokenizer (its head scores replies far from alike)."""
    root = tmp_path_factory.mktemp("ppo-start")
    cfg = data_config("demo_prompts", 300)
    torch.manual_seed(1)
    head = scalar_head(32)
    torch.nn.init.normal_(head.weight)
    found = {
        arch: save_random_checkpoint(root / arch, cfg, cache_dir, arch=arch, scale=0.3)
        for arch in ("ar", "diffusion")
    }
    found["rm"] = save_random_checkpoint(
        root / "rm", cfg, cache_dir, seed=3, scale=0.3, modules={HEAD: head}
    )
    return found


def ppo_args(checkpoints, cache_dir, *extra: str, rm: bool = True) -> list[str]:
    reward = ["reward=rm", f"reward.rm.checkpoint={checkpoints['rm']}"] if rm else []
    return [
        "stage=ppo",
        f"init_from={checkpoints['ar']}",
        f"cache_dir={cache_dir}",
        *PROMPTS,
        "trainer.batch_size=4",
        "objective.max_completion_length=12",
        "objective.ppo_epochs=2",
        "objective.num_minibatches=2",
        "sampler.max_prompt_tokens=48",
        "trainer.eval_batches=1",
        "model.block_size=64",
        *reward,
        *extra,
    ]


@pytest.mark.parametrize("arch", ["ar", "diffusion"])
def test_first_minibatch_has_ratio_one_and_zero_approx_kl_with_dropout_in_the_model(
    arch, checkpoints, cache_dir, tmp_path
):
    run = build_cpu_run(
        tmp_path / "run",
        *ppo_args(checkpoints, cache_dir),
        f"init_from={checkpoints[arch]}",
        f"arch={arch}",
        "model.dropout=0.2",
        "objective.temperature=0.7",
        "objective.kl_estimator=k3",
    )
    trainer = run.trainer
    ppo = trainer.objective
    torch.manual_seed(0)
    trainer.train_model.train(ppo.train_mode)  # as Trainer.train_step does
    updates = list(ppo.prepare(trainer.train_model, trainer.sampler.batch(0)))
    assert len(updates) == 4 and updates[0].metrics and updates[1].metrics is None
    assert sorted(torch.cat([u.input_ids for u in updates[:2]]).tolist()) == sorted(
        torch.cat([u.input_ids for u in updates[2:]]).tolist()
    )  # two epochs over the same rollout
    metrics = updates[0].metrics
    assert metrics["kl"] == pytest.approx(0, abs=1e-5)  # the reference is the start
    first = updates[0]
    loss, found = ppo.loss(trainer.train_model, first)
    assert float(found["ratio"]) == pytest.approx(1, abs=1e-6)
    assert float(found["approx_kl"]) < 1e-10 and float(found["clip_fraction"]) == 0
    out = trainer.train_model(first, output="logps", temperature=0.7)
    ratio = torch.exp(out.logps - first.old_logps)[first.loss_mask > 0]
    assert (ratio - 1).abs().max() < 1e-5
    loss.backward()
    assert ppo.value_head.weight.grad.abs().sum() > 0
    # Dropout on (a policy scored in train mode) is far from ratio 1: the check can fail.
    trainer.train_model.train(True)
    noisy = trainer.train_model(first, output="logps", temperature=0.7).logps
    assert (torch.exp(noisy - first.old_logps)[first.loss_mask > 0] - 1).abs().max() > 1e-3


def test_the_value_head_starts_from_the_reward_models_head_else_at_zero(
    checkpoints, cache_dir, tmp_path
):
    learned = build_cpu_run(tmp_path / "a", *ppo_args(checkpoints, cache_dir)).trainer
    rm_head = load_file(checkpoints["rm"] / "objective.safetensors")[f"{HEAD}.weight"]
    assert torch.equal(learned.modules["value_head"].weight.detach(), rm_head)
    rule = build_cpu_run(
        tmp_path / "b", *ppo_args(checkpoints, cache_dir, "reward=[format]", rm=False)
    ).trainer
    assert not rule.modules["value_head"].weight.any()


# --- the CLI -----------------------------------------------------------------------------
def test_ppo_resumed_after_sigkill_ends_with_the_uninterrupted_weights_and_value_head(
    lmpipe, checkpoints, tmp_path, cache_dir
):
    def args(out):
        return [
            *ppo_args(checkpoints, cache_dir),
            f"out_dir={out}",
            "run_name=r",
            "trainer.max_steps=5",
            "trainer.save_interval=2",
            "trainer.eval_interval=3",
            "trainer.log_interval=1",
            "optim.lr=3e-3",
        ]

    lmpipe("train", *args(tmp_path / "reference"))
    killed = tmp_path / "killed"
    train_until_killed(tmp_path, args(killed), "step      3 |")
    assert [p.name for p in (killed / "r" / "checkpoints").iterdir()] == ["step_000002"]
    proc = lmpipe("train", *args(killed), "resume=auto")
    assert "resuming from" in proc.stdout

    def final(out, name):
        return load_file(out / "r" / "checkpoints" / "step_000005" / name)

    for name, start in (
        ("model.safetensors", load_file(checkpoints["ar"] / "model.safetensors")),
        (
            "objective.safetensors",
            {
                "value_head.weight": load_file(checkpoints["rm"] / "objective.safetensors")[
                    f"{HEAD}.weight"
                ]
            },
        ),
    ):
        resumed, reference = final(killed, name), final(tmp_path / "reference", name)
        assert resumed.keys() == reference.keys() == start.keys()
        assert any(not torch.equal(resumed[k], start[k]) for k in resumed), name  # it trained
        assert all(torch.equal(resumed[k], reference[k]) for k in resumed), name
    metrics = read_metrics(killed / "r")
    for name in (
        "rewards/score",
        "rewards/rm",
        "train/kl",
        "train/entropy",
        "train/clip_fraction",
        "train/value_loss",
        "train/explained_variance",
        "train/approx_kl",
    ):
        assert any(name in m for m in metrics), name
    assert any("val/greedy/rewards/rm" in m and "val/kl" in m for m in metrics)


def test_ppo_without_a_reward_is_one_line(lmpipe, checkpoints, cache_dir):
    proc = lmpipe("train", *ppo_args(checkpoints, cache_dir, rm=False), check=False)
    assert_one_line_error(proc, "stage ppo needs a reward", "reward=rm reward.rm.checkpoint=")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["reward=rm"], "reward.rm.checkpoint is not set"),
        (["reward=[format]", "objective.num_minibatches=3"], "num_minibatches=3 does not divide"),
        (["reward=[format]", "objective.kl_estimator=k2"], "kl_estimator='k2' must be k1 or k3"),
        (["reward=[format]", "objective.vf_coef=-1"], "objective.vf_coef=-1 must be a number >= 0"),
        (["reward=[format]", "data=demo_pref"], "'ppo' trains on prompt data, but data=demo_pref"),
    ],
)
def test_ppo_bad_config_is_refused_before_training(
    checkpoints, cache_dir, tmp_path, extra, message
):
    """The same errors the CLI prints as one line (``lmpipe.cli.one_line``), in-process."""
    from lmpipe.cli import one_line

    with pytest.raises(Exception) as caught:
        build_cpu_run(tmp_path / "run", *ppo_args(checkpoints, cache_dir, *extra, rm=False))
    assert message in one_line(caught.value)
