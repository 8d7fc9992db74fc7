"""PPO: seconds per step (rollout + updates) of lmpipe vs TRL's PPOTrainer.

    pip install --no-deps --target .cache/bench/trl-1.12.0 trl==1.12.0   # once, see below
    python benchmarks/ppo.py                          # tiny preset, 16 prompts, 32 tokens
    python benchmarks/ppo.py --start runs/lifecycle-ar/sft --reward-model runs/rlhf-ar/rm

TRL removed its PPOTrainer in 1.13 (``trl.experimental.ppo`` was its last home); the TRL
side runs the last release that has it, 1.12.0, installed beside the venv's TRL
(``--trl-path``, first on ``sys.path``; lmpipe imports no TRL).

Data: ``data=demo_prompts`` prepared by lmpipe (questions with verifiable answers, its
BPE tokenizer, lmpipe's chat template).

- lmpipe: ``Trainer.train_step`` with the ``PPO`` objective on the ``PromptSampler``'s
  batches: one completion per prompt (left-padded prompts, KV-cache sampling), the reward
  model's score, per-token k1 KL to the frozen reference (kl_coef 0.05), a value head on
  the policy's features initialised from the reward model's head, GAE (gamma 1, lambda
  0.95), whitened advantages, ``--ppo-epochs`` x ``--minibatches`` clipped updates.
- TRL: ``PPOTrainer`` with the same policy and reference (lmpipe's own HF export,
  ``to_hf``), the same reward model as a ``LlamaForSequenceClassification``
  (``to_hf_reward_model``) and, as TRL requires, a separate value model initialised from
  it (so TRL runs a second backbone for the values, where lmpipe's value head shares the
  policy's), on the same prompts (its DataLoader shuffles them itself), stopping at the
  same end-of-turn token, with the same response length, temperature 0.7, KL, GAE,
  clipping and minibatching settings.

Both: ``--prompts`` completions per step of at most ``--tokens`` tokens, fused AdamW
(weight decay 0, constant LR), grad clipping 1.0, dropout off, fp32, CPU. The completion
lengths of each side are reported: sampling is random on both sides, so the work per step
is equal in expectation, not token for token.

Timing: a ``TrainerCallback`` times TRL's steps (``on_step_end`` to ``on_step_end``; TRL
calls no ``on_step_begin``) and after every ``--chunk`` of them runs a chunk of lmpipe
steps (not counted in TRL's), so machine noise hits both alike. "vs TRL" = TRL's median
seconds per step / lmpipe's; "range" spans the ratios of ``--rounds`` parts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmpipe.data.prompts import read_prompts
from lmpipe.data.samplers import PromptOptions, PromptSampler
from lmpipe.hf import to_hf_reward_model
from lmpipe.objectives.base import ObjectiveContext
from lmpipe.objectives.ppo import PPO
from lmpipe.objectives.reward_model import HEAD, LearnedReward, scalar_head
from lmpipe.training.checkpoint import resolve_checkpoint
from sft import (
    ROOT,
    hf_tokenizer,
    llama_like,
    lmpipe_optim,
    lmpipe_trainer,
    machine_line,
    no_printing,
    quiet_hf,
    starting_model,
    trl_training_args,
)

from _common import print_table, speedup

KL_COEF, TEMPERATURE = 0.05, 0.7


class FixedRewardModel(LearnedReward):
    """``reward=rm`` with the reward model given as objects rather than a checkpoint."""

    def __init__(self, model, head):
        super().__init__(checkpoint="(in memory)")
        self.model, self.head = model, head

    def setup(self, ctx) -> None:
        self.ctx = ctx


def reward_model(args, data, base):
    """The reward model: a checkpoint's, or (without one) a copy of the policy with a
    random head, so that scores differ between completions."""
    if args.reward_model:
        checkpoint = resolve_checkpoint(args.reward_model)
        states = checkpoint.module_states()
        model = checkpoint.build_model()
        head = scalar_head(model.config.d_model)
        head.load_state_dict(states[HEAD])
    else:
        model, head = copy.deepcopy(base), scalar_head(base.config.d_model)
        torch.nn.init.normal_(head.weight, std=base.config.d_model**-0.5)
    return model.eval().requires_grad_(False), head.requires_grad_(False)


def lmpipe_ppo(args, data, model, sampler, rm, run_dir: Path):
    objective = PPO(
        rewards={"rm": FixedRewardModel(*rm)},
        max_completion_length=args.tokens,
        temperature=TEMPERATURE,
        kl_coef=KL_COEF,
        kl_estimator="k1",
        missing_eos_penalty=None,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        ppo_epochs=args.ppo_epochs,
        num_minibatches=args.minibatches,
    )
    objective.setup(
        ObjectiveContext(
            device=torch.device("cpu"),
            autocast=contextlib.nullcontext,
            tokenizer=data.tokenizer,
            model=model,
            examples=sampler,
            val_sets={},
            micro_batch_size=args.prompts // args.minibatches,
            seed=0,
            starting_model=lambda: copy.deepcopy(model).requires_grad_(False).eval(),
        )
    )
    trainer = lmpipe_trainer(
        model, objective, sampler, data, args.prompts, args.block, lmpipe_optim(args.lr), run_dir
    )
    trainer.train_model.train(objective.train_mode)
    return trainer


def trl_ppo(args, policy, rm_hf, tokenizer, prompts: list[list[int]], callback, out: Path, stop):
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    training = trl_training_args(out, args.prompts // args.minibatches, 1, args.lr)
    for key in ("max_steps", "train_sampling_strategy"):  # PPO counts episodes itself
        training.pop(key)
    config = PPOConfig(
        **training,
        total_episodes=len(prompts),
        num_mini_batches=args.minibatches,
        num_ppo_epochs=args.ppo_epochs,
        response_length=args.tokens,
        temperature=TEMPERATURE,
        kl_coef=KL_COEF,
        kl_estimator="k1",
        gamma=1.0,
        lam=0.95,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        stop_token_id=stop,
        num_sample_generations=0,
        local_rollout_forward_batch_size=args.prompts,
    )
    config.gradient_accumulation_steps = args.minibatches  # a rollout = minibatches x micro
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=copy.deepcopy(policy).requires_grad_(False),
        reward_model=rm_hf,
        value_model=copy.deepcopy(rm_hf),
        train_dataset=Dataset.from_list([{"input_ids": ids} for ids in prompts]),
        callbacks=[callback],
    )
    no_printing(trainer)
    return trainer


def record_lengths(policy, stop: int, lengths: list[float]) -> None:
    """Wrap ``policy.generate`` to record TRL's mean completion length per call (tokens
    up to and including the first stop token)."""
    generate = policy.generate

    def recording(*args, **kwargs):
        out = generate(*args, **kwargs)
        new = out.sequences[:, kwargs["input_ids"].shape[1] :]
        stops = new == stop
        first = torch.where(stops.any(1), stops.int().argmax(1) + 1, new.shape[1])
        lengths.append(float(first.float().mean()))
        return out

    policy.generate = recording


def make_interleaver(lmpipe_step, warmup: int, chunk: int):
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        def __init__(self):
            self.times = {"TRL": [], "lmpipe": []}
            self.lengths: list[float] = []
            self.next_lmpipe = warmup
            self.mark = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            elapsed = time.perf_counter() - self.mark
            if state.global_step > warmup:
                self.times["TRL"].append(elapsed)
                if (state.global_step - warmup) % chunk == 0:
                    for i in range(self.next_lmpipe, self.next_lmpipe + chunk):
                        t0 = time.perf_counter()
                        metrics, _ = lmpipe_step(i)
                        self.times["lmpipe"].append(time.perf_counter() - t0)
                        self.lengths.append(metrics["completions/mean_length"])
                    self.next_lmpipe += chunk
            self.mark = time.perf_counter()

    return Interleave()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="conf/model/<preset>.yaml")
    parser.add_argument("--start", default=None, help="start from this lmpipe checkpoint")
    parser.add_argument("--reward-model", default=None, help="an lmpipe stage=rm checkpoint")
    parser.add_argument("--block", type=int, default=127, help="the model's context")
    parser.add_argument("--prompts", type=int, default=16, help="prompts (completions) per step")
    parser.add_argument("--tokens", type=int, default=32, help="max completion tokens")
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=1, help="minibatches per epoch")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=2, help="steps per turn")
    parser.add_argument("--rounds", type=int, default=3, help="parts for the ratio range")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--data", default="demo_prompts")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "lmpipe"))
    parser.add_argument("--trl-path", default=str(ROOT / ".cache" / "bench" / "trl-1.12.0"))
    args = parser.parse_args()
    if not (Path(args.trl_path) / "trl" / "experimental" / "ppo").is_dir():
        raise SystemExit(
            f"no TRL with PPOTrainer at {args.trl_path}: pip install --no-deps --target "
            f"{args.trl_path} trl==1.12.0"
        )
    sys.path.insert(0, args.trl_path)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    machine = machine_line(args.threads)
    quiet_hf()
    torch.manual_seed(0)
    args.steps = -(-args.steps // args.chunk) * args.chunk  # whole chunks

    data, base = starting_model(args)
    rm = reward_model(args, data, base)
    tokenizer = hf_tokenizer(data)
    tokenizer.padding_side = "left"  # TRL's collator pads the prompts; generation needs left
    options = PromptOptions(
        epoch_seed=0,
        epoch_shuffle=True,
        epoch_drop_last=True,
        max_prompt_tokens=args.block - args.tokens,
    )
    sampler = PromptSampler(read_prompts(data, "train"), args.prompts, options, pad_id=0)
    total = args.warmup + args.steps
    policy = llama_like(base)
    policy.config.use_cache = True  # TRL samples with HF generate: give it its KV cache
    rm_hf = to_hf_reward_model(*rm)
    run_dir = Path(tempfile.mkdtemp(prefix="lmpipe-bench-ppo-"))
    lmpipe = lmpipe_ppo(args, data, base, sampler, rm, run_dir)
    batches = [sampler.batch(i) for i in range(total)]
    prompts = [sampler.prompts[e].ids for i in range(total) for (e,) in sampler.step_rows(i)]

    callback = make_interleaver(lambda i: lmpipe.train_step(batches[i]), args.warmup, args.chunk)
    trl_lengths: list[float] = []
    record_lengths(policy, data.tokenizer.turn_end_id, trl_lengths)
    trl = trl_ppo(
        args,
        policy,
        rm_hf,
        tokenizer,
        prompts,
        callback,
        run_dir / "trl",
        data.tokenizer.turn_end_id,
    )
    for i in range(args.warmup):
        lmpipe.train_step(batches[i])
    started = time.perf_counter()
    trl.train()
    wall = time.perf_counter() - started
    times = callback.times
    trl_lengths = trl_lengths[args.warmup :]

    c = base.config
    params = sum(p.numel() for p in base.parameters())
    print(
        f"model: {'checkpoint ' + args.start if args.start else 'preset=' + args.preset} "
        f"{c.n_layer}L/{c.n_head}H/{c.d_model}d, vocab {c.vocab_size}, {params / 1e6:.2f}M "
        f"params; reward model: {args.reward_model or 'the policy with a random head'}; "
        f"{args.prompts} prompts x 1 completion of <= {args.tokens} tokens per step, "
        f"{args.ppo_epochs} epochs x {args.minibatches} minibatches; {args.steps} timed steps "
        f"each after {args.warmup} warmup, turns of {args.chunk}; {wall:.0f} s; {machine}"
    )

    table = []
    for name in ("TRL", "lmpipe"):
        lengths = callback.lengths if name == "lmpipe" else trl_lengths
        table.append(
            [
                "TRL 1.12 PPOTrainer" if name == "TRL" else "lmpipe stage=ppo",
                f"{statistics.median(times[name]):.2f}",
                f"{statistics.mean(lengths):.1f}" if lengths else "-",
                *speedup(times, name, args.rounds),
            ]
        )
    print_table(["contender", "s/step", "mean completion tokens", "vs TRL", "range"], table)


if __name__ == "__main__":
    main()
