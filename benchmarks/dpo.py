"""DPO on real GSM8K preference pairs: step time and peak memory, lmpipe vs TRL's DPOTrainer.

    python benchmarks/dpo.py                          # tiny preset, block 512, 8 pairs (~5 min)
    python benchmarks/dpo.py --preset small --steps 10 --rounds 2
    python benchmarks/dpo.py --no-precompute          # live reference rows only

Data: ``data=gsm8k_pref_local`` prepared by lmpipe (GSM8K test questions; chosen = the
ground-truth solution, rejected = an incorrect model solution), rows of ``block + 1``.

- lmpipe: ``Trainer.train_step`` with the ``DPO`` objective (beta 0.1, sigmoid) whose
  ``reference`` is a frozen copy of the policy, on batches of ``EpisodeSampler`` over
  ``Episodes(shards, 2, block + 1)`` (a pair = two consecutive rows, padded to the batch's
  longest), an ``ARLM`` from ``conf/model/<preset>.yaml``.
- TRL: ``trl.DPOTrainer`` training a ``LlamaForCausalLM`` of the same dimensions (SDPA)
  that starts from a copy of lmpipe's weights, with its own reference copy (``ref_model``),
  on the same pairs in the same order (``train_sampling_strategy="sequential"``) and the
  same number of pairs per step, in the conversational format (prompt messages, chosen /
  rejected assistant messages) that TRL tokenizes itself with lmpipe's tokenizer and chat
  template. The script checks that TRL's prompt + completion ids and completion mask are
  lmpipe's rows and loss masks (without the EOS that lmpipe appends, a row's last token,
  which is only ever a target and has loss mask 0), so both sides read the same tokens
  and score the same response tokens; and that both report the same policy log-probs at
  the last step. Max length ``block + 1`` on both, fused AdamW with the same
  hyperparameters (weight decay 0, constant LR), grad clipping 1.0, fp32, CPU, no
  gradient checkpointing (TRL's default is on), no eval, saving or logging.
- ``precompute_ref`` rows: lmpipe's ``DPO(precompute_ref=True)`` with the reference's
  log-probs computed once in ``DPO.setup`` (every training pair, through the sampler's
  ``every_example``) against TRL's ``precompute_ref_log_probs=True``;
  the policy is the only model in memory and precomputing is not in the step time.

Each side runs in a child process of its own, ``--rounds`` times, the sides taking turns,
so every figure is a median over rounds and machine noise hits all alike. Step time: the
median over the timed steps (``--steps`` after ``--warmup``) of one optimizer step
(lmpipe: ``train_step`` on a collated batch; TRL: ``on_step_begin`` -> ``on_step_end`` of
a ``TrainerCallback``, after its batch is collated). "speedup" = TRL's median step time /
lmpipe's, same reference mode. Memory, from ``/proc/self/status`` of each child: "peak
RSS" = ``VmHWM`` at the end minus ``VmRSS`` before the models exist (models, optimizer,
TRL's tokenized dataset, activations); "step peak" = the high-water mark of the timed
steps above the RSS when they start (what a step allocates and frees again).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmpipe.data.samplers import EpisodeOptions, Episodes, EpisodeSampler
from lmpipe.objectives.base import ObjectiveContext
from lmpipe.objectives.dpo import DPO
from sft import (
    ROOT,
    hf_tokenizer,
    llama_like,
    lmpipe_model,
    lmpipe_optim,
    lmpipe_trainer,
    machine_line,
    no_printing,
    prepared,
    quiet_hf,
    records,
    trl_training_args,
    without_eos,
)

from _common import child_result, memory_kib, print_table, report_result, reset_peak_memory

SIDES = {
    "lmpipe": ("lmpipe", False),
    "TRL": ("trl", False),
    "lmpipe precompute_ref": ("lmpipe", True),
    "TRL precompute_ref_log_probs": ("trl", True),
}
BETA = 0.1


# --- one side, in a child process ---------------------------------------------------------
def sampler_for(episodes: Episodes, pairs: int, pad_id: int) -> EpisodeSampler:
    options = EpisodeOptions(
        epoch_seed=0, epoch_shuffle=True, epoch_drop_last=True, episode_min_tokens=0, packing=False
    )
    return EpisodeSampler(episodes, pairs, options, pad_id=pad_id)


def run_lmpipe(args, data, episodes, sampler, base, precompute: bool, total: int) -> dict:
    objective = DPO(
        beta=BETA, loss_type="sigmoid", label_smoothing=0.0, precompute_ref=precompute, mc_samples=1
    )
    run_dir = Path(tempfile.mkdtemp(prefix="lmpipe-bench-dpo-"))
    # The reference is a frozen copy of the starting policy; precomputed, it scores every
    # pair once and is dropped, leaving one model in memory.
    objective.setup(
        ObjectiveContext(
            device=torch.device("cpu"),
            autocast=contextlib.nullcontext,
            tokenizer=data.tokenizer,
            model=base,
            examples=sampler,
            val_sets={},
            micro_batch_size=args.batch,
            seed=0,
            starting_model=lambda: copy.deepcopy(base).requires_grad_(False).eval(),
        )
    )
    trainer = lmpipe_trainer(
        base, objective, sampler, data, args.batch, args.block, lmpipe_optim(args.lr), run_dir
    )
    batches = [sampler.batch(i) for i in range(total)]
    times, metrics = [], {}
    for i in range(total):
        if i == args.warmup:
            ready = memory_kib("VmRSS")
            reset_peak_memory()
        t0 = time.perf_counter()
        metrics, _ = trainer.train_step(batches[i])
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {
        "times": times,
        "ready_kib": ready,
        "loss": metrics["loss"],
        "logps_chosen": metrics["logps/chosen"],
        "margin": metrics["rewards/margin"],
    }


def trl_pairs(data, episodes, order: list[int], eos_id: int) -> list[dict]:
    """The pairs as TRL conversational records, with the tokens lmpipe trains on."""
    pairs = []
    chats = records(data)
    for e in order:
        r = chats[e]
        pairs.append(
            {
                "prompt": r["prompt"],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
        )
    return pairs


def check_same_pairs(dataset, episodes: Episodes, order: list[int], eos_id: int) -> None:
    """TRL's prompt + completion ids and completion masks must be lmpipe's rows."""
    for i, e in enumerate(order):
        row = dataset[i]
        for doc, side in zip(episodes.documents(e), ("chosen", "rejected"), strict=True):
            ids, mask = without_eos(*doc, eos_id)
            completion = row[f"{side}_ids"]
            if row["prompt_ids"] + completion != ids or not np.array_equal(
                mask, [0] * len(row["prompt_ids"]) + [1] * len(completion)
            ):
                raise AssertionError(f"TRL tokenized pair {i} (episode {e}, {side}) unlike lmpipe")


def run_trl(args, data, episodes, sampler, base, precompute: bool, total: int) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    eos_id = data.tokenizer.eos_id
    tokenizer = hf_tokenizer(data)
    policy = llama_like(base)
    reference = None if precompute else copy.deepcopy(policy).requires_grad_(False).eval()
    order = [e for i in range(total) for (e,) in sampler.step_rows(i)]
    dataset = Dataset.from_list(trl_pairs(data, episodes, order, eos_id))

    class Timer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.ready = 0

        def on_step_begin(self, args_, state, control, **kwargs):
            if state.global_step == args.warmup:
                self.ready = memory_kib("VmRSS")
                reset_peak_memory()
            self.started = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step > args.warmup:
                self.times.append(time.perf_counter() - self.started)
            self.metrics = {k: v[-1] for k, v in self.trainer._metrics["train"].items() if v}

    timer = Timer()
    config = DPOConfig(
        **trl_training_args(
            Path(tempfile.mkdtemp(prefix="trl-bench-dpo-")), args.batch, total, args.lr
        ),
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=args.block + 1,
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=args.batch,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    no_printing(trainer)
    timer.trainer = trainer
    check_same_pairs(trainer.train_dataset, episodes, order, eos_id)
    trainer.train()
    return {
        "times": timer.times,
        "ready_kib": timer.ready,
        "logps_chosen": timer.metrics["logps/chosen"],
        "margin": timer.metrics["rewards/margins"],
    }


def child(args) -> None:
    machine = machine_line(args.threads)
    quiet_hf()
    side, precompute = SIDES[args.side]
    data = prepared(args.data, args.cache_dir)
    episodes = Episodes(data.split("train"), 2, args.block + 1)
    sampler = sampler_for(episodes, args.batch, data.tokenizer.pad_id)
    total = args.warmup + args.steps
    if side == "trl":  # the libraries are loaded before the baseline on both sides
        import trl  # noqa: F401
    gc.collect()
    baseline = memory_kib("VmRSS")
    torch.manual_seed(0)  # the same initial weights on every side
    base = lmpipe_model(args.preset, args.block, data)
    run = run_trl if side == "trl" else run_lmpipe
    result = run(args, data, episodes, sampler, base, precompute, total)
    result.update(
        peak_kib=memory_kib("VmHWM"),
        baseline_kib=baseline,
        machine=machine,
        params=sum(p.numel() for p in base.parameters()),
        config=base.config.to_dict(),
        pairs=len(episodes.kept),
        dropped=dict(episodes.dropped),
        tokens=sum(int(sampler.batch(i).real_tokens) for i in range(args.warmup, total)),
    )
    report_result(result)


# --- the parent: rounds of child processes ------------------------------------------------
def run_child(args, side: str) -> dict:
    command = [sys.executable, __file__, "--side", side]
    for key in ("preset", "block", "batch", "steps", "warmup", "lr", "data", "cache_dir"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.threads:
        command += ["--threads", str(args.threads)]
    return child_result(command, f"the {side} side")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="conf/model/<preset>.yaml")
    parser.add_argument("--block", type=int, default=512, help="context; rows are block + 1")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per child")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="children per side")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--no-precompute", action="store_true", help="live reference only")
    parser.add_argument("--data", default="gsm8k_pref_local")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "lmpipe"))
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args)
        return

    prepared(args.data, args.cache_dir)  # once, before the children read the cache
    sides = [s for s in SIDES if not (args.no_precompute and "precompute" in s)]
    results: dict[str, list[dict]] = {side: [] for side in sides}
    started = time.perf_counter()
    for r in range(args.rounds):
        for side in sides[r % len(sides) :] + sides[: r % len(sides)]:  # rotate the order
            results[side].append(run_child(args, side))
    wall = time.perf_counter() - started

    first = results["lmpipe"][0]
    c = first["config"]
    print(
        f"data={args.data}: {first['pairs']:,} train pairs (dropped: {first['dropped'] or 'none'}),"
        f" {args.batch} pairs ({2 * args.batch} rows) per step, rows of {args.block + 1} tokens, "
        f"{first['tokens'] / args.steps:,.0f} non-pad tokens per step"
    )
    print(
        f"model: preset={args.preset} {c['n_layer']}L/{c['n_head']}H/{c['d_model']}d, vocab "
        f"{c['vocab_size']}, {first['params'] / 1e6:.2f}M params, policy + reference on both "
        f"sides; beta {BETA}, sigmoid; {args.rounds} rounds x {args.steps} timed steps after "
        f"{args.warmup} warmup, each side in a child process; {wall:.0f} s; {first['machine']}"
    )

    def step_time(side: str) -> float:
        return statistics.median(t for run in results[side] for t in run["times"])

    def round_times(side: str) -> list[float]:
        return [statistics.median(run["times"]) for run in results[side]]

    def mib(side: str, key: str, base: str) -> float:
        return statistics.median((run[key] - run[base]) / 1024 for run in results[side])

    table = []
    for side in sides:
        peer = "TRL precompute_ref_log_probs" if "precompute" in side else "TRL"
        if side.startswith("TRL"):
            speed, spread = "1.00x", "-"
        else:
            ratios = [a / b for a, b in zip(round_times(peer), round_times(side), strict=True)]
            speed = f"{step_time(peer) / step_time(side):.2f}x"
            spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        last = results[side][0]
        table.append(
            [
                side,
                f"{step_time(side) * 1e3:.0f}",
                speed,
                spread,
                f"{mib(side, 'peak_kib', 'baseline_kib'):.0f}",
                f"{mib(side, 'peak_kib', 'ready_kib'):.0f}",
                f"{last['logps_chosen']:.3f} / {last['margin']:.4f}",
            ]
        )
    print_table(
        [
            "side",
            "ms/step",
            "speedup",
            "range",
            "peak RSS MiB",
            "step peak MiB",
            "last step logps/chosen / margin",
        ],
        table,
    )


if __name__ == "__main__":
    main()
