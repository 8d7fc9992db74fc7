"""Reward-model training: seconds per step, lmpipe vs TRL's RewardTrainer.

    python benchmarks/rm.py                            # tiny preset, GSM8K pairs, block 512
    python benchmarks/rm.py --preset small --steps 8 --chunk 2

Data: ``data=gsm8k_pref_local`` prepared by lmpipe (GSM8K test questions; chosen = the
ground-truth solution, rejected = an incorrect model solution), pairs of rows of at most
``block + 1`` tokens.

- lmpipe: ``Trainer.train_step`` with the ``RewardModel`` objective (a zero-initialised
  scalar head on the features at each reply's last token; Bradley-Terry, center
  coefficient 0.01) on ``EpisodeSampler`` batches of pairs, an ``ARLM`` from
  ``conf/model/<preset>.yaml``.
- TRL: ``trl.RewardTrainer`` training a ``LlamaForSequenceClassification`` that is
  lmpipe's own export of the same weights and head (``to_hf_reward_model``), on the same
  pairs in the same order (``train_sampling_strategy="sequential"``), given as the token
  ids lmpipe scores (each row up to its last response token, so HF's last-non-pad pooling
  reads the same position), ``center_rewards_coefficient=0.01``.

Both: ``--batch`` pairs per step, fused AdamW (weight decay 0, constant LR), grad
clipping 1.0, dropout off, fp32, CPU, no gradient checkpointing, eval, saving or logging.
Both report the pair accuracy and margin of the last timed step's batch (the same pairs,
from the same weights trained on the same batches): they agree up to float noise.

Timing: a ``TrainerCallback`` times TRL's optimizer steps and after every ``--chunk`` of
them runs a chunk of lmpipe steps, so machine noise hits both alike. "vs TRL" = TRL's
median seconds per step / lmpipe's; "range" spans the ratios of ``--rounds`` parts.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmpipe.data.samplers import EpisodeOptions, Episodes, EpisodeSampler
from lmpipe.hf import to_hf_reward_model
from lmpipe.objectives.base import ObjectiveContext
from lmpipe.objectives.reward_model import RewardModel, response_end
from sft import (
    ROOT,
    hf_tokenizer,
    lmpipe_model,
    lmpipe_optim,
    lmpipe_trainer,
    machine_line,
    make_interleaver,
    no_printing,
    prepared,
    quiet_hf,
    trl_training_args,
)

from _common import print_table, speedup

CENTER = 0.01


def lmpipe_rm(args, data, model, sampler, run_dir: Path):
    objective = RewardModel(margin=0.0, center_rewards_coefficient=CENTER)
    objective.setup(
        ObjectiveContext(
            device=torch.device("cpu"),
            autocast=contextlib.nullcontext,
            tokenizer=data.tokenizer,
            model=model,
            examples=sampler,
            val_sets={},
            micro_batch_size=args.batch,
            seed=0,
        )
    )
    return lmpipe_trainer(
        model, objective, sampler, data, args.batch, args.block, lmpipe_optim(args.lr), run_dir
    )


def scored_ids(sampler: EpisodeSampler, episode: int) -> dict:
    """A pair as the token ids lmpipe scores: each row up to its last response token."""
    batch = sampler._collate([(episode,)], packing=False)
    ends = response_end(batch.loss_mask)
    chosen, rejected = (batch.input_ids[r, : int(ends[r]) + 1].tolist() for r in (0, 1))
    return {"chosen_ids": chosen, "rejected_ids": rejected}


def last_step_metrics():
    """A TrainerCallback keeping the metrics of TRL's latest step (``trainer`` set after)."""
    from transformers import TrainerCallback

    class Last(TrainerCallback):
        metrics: dict = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.metrics = {k: v[-1] for k, v in self.trainer._metrics["train"].items() if v}

    return Last()


def trl_rm(args, hf, tokenizer, pairs: list[dict], callbacks: list, out: Path):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    config = RewardConfig(
        **trl_training_args(out, args.batch, args.warmup + args.steps, args.lr),
        center_rewards_coefficient=CENTER,
        max_length=None,
        disable_dropout=True,
    )
    trainer = RewardTrainer(
        model=hf,
        args=config,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    no_printing(trainer)
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="conf/model/<preset>.yaml")
    parser.add_argument("--block", type=int, default=512, help="context; rows are block + 1")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=2, help="steps per turn")
    parser.add_argument("--rounds", type=int, default=3, help="parts for the ratio range")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--data", default="gsm8k_pref_local")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "lmpipe"))
    args = parser.parse_args()
    machine = machine_line(args.threads)
    quiet_hf()
    args.steps = -(-args.steps // args.chunk) * args.chunk  # whole chunks

    data = prepared(args.data, args.cache_dir)
    episodes = Episodes(data.split("train"), 2, args.block + 1)
    options = EpisodeOptions(
        epoch_seed=0, epoch_shuffle=True, epoch_drop_last=True, episode_min_tokens=0, packing=False
    )
    sampler = EpisodeSampler(episodes, args.batch, options, pad_id=data.tokenizer.pad_id)
    total = args.warmup + args.steps
    torch.manual_seed(0)
    base = lmpipe_model(args.preset, args.block, data)
    run_dir = Path(tempfile.mkdtemp(prefix="lmpipe-bench-rm-"))
    lmpipe = lmpipe_rm(args, data, base, sampler, run_dir)
    hf = to_hf_reward_model(base, lmpipe.objective.head)  # the same weights and zero head
    hf.config.use_cache = False
    lmpipe.train_model.train(lmpipe.objective.train_mode)
    batches = [sampler.batch(i) for i in range(total)]
    order = [e for i in range(total) for (e,) in sampler.step_rows(i)]
    pairs = [scored_ids(sampler, e) for e in order]

    last = {}

    def lmpipe_step(i: int) -> None:
        last["lmpipe"] = lmpipe.train_step(batches[i])[0]

    callback = make_interleaver({"lmpipe": lmpipe_step}, args.warmup, args.chunk)
    last_trl = last_step_metrics()
    trl = trl_rm(args, hf, hf_tokenizer(data), pairs, [last_trl, callback], run_dir / "trl")
    last_trl.trainer = trl
    for i in range(args.warmup):
        lmpipe_step(i)
    started = time.perf_counter()
    trl.train()
    wall = time.perf_counter() - started
    times = callback.times

    c = base.config
    params = sum(p.numel() for p in base.parameters())
    tokens = sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs) / len(pairs)
    print(
        f"data={args.data}: {len(episodes.kept):,} train pairs (dropped: "
        f"{dict(episodes.dropped) or 'none'}), {args.batch} pairs per step, "
        f"{tokens * args.batch:,.0f} scored tokens per step on average"
    )
    print(
        f"model: preset={args.preset} {c.n_layer}L/{c.n_head}H/{c.d_model}d, vocab "
        f"{c.vocab_size}, {params / 1e6:.2f}M params + a scalar head on both sides; "
        f"{args.steps} timed steps each after {args.warmup} warmup, turns of {args.chunk}; "
        f"{wall:.0f} s; {machine}"
    )

    table = []
    for name, metrics in (("TRL", last_trl.metrics), ("lmpipe", last["lmpipe"])):
        table.append(
            [
                "TRL RewardTrainer" if name == "TRL" else "lmpipe stage=rm",
                f"{statistics.median(times[name]):.3f}",
                *speedup(times, name, args.rounds),
                f"{metrics['accuracy']:.3f} / {metrics['margin']:.4f}",
            ]
        )
    print_table(["contender", "s/step", "vs TRL", "range", "last step accuracy / margin"], table)


if __name__ == "__main__":
    main()
