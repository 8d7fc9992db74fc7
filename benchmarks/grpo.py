"""GRPO: seconds per step (sampling + update) of lmpipe vs TRL's GRPOTrainer.

    python benchmarks/grpo.py                         # tiny preset, 8 prompts x 8, 32 tokens
    python benchmarks/grpo.py --preset small --steps 6 --chunk 1
    python benchmarks/grpo.py --start runs/lifecycle-ar/sft   # start from a trained model

Data: ``data=demo_prompts`` prepared by lmpipe (questions with verifiable answers, its
BPE tokenizer, lmpipe's chat template).

- lmpipe: ``Trainer.train_step`` with the ``GRPO`` objective on the ``PromptSampler``'s
  batches: one rollout of ``--generations`` completions per prompt (left-padded prompts,
  KV-cache sampling), rewards, group advantages, one update.
- TRL: ``trl.GRPOTrainer`` training a ``transformers.LlamaForCausalLM`` that starts from a
  copy of the same weights (lmpipe's own HF export, ``to_hf``), on the same prompts in the
  same order (``shuffle_dataset=False``), rendered by the same chat template, with the
  same rewards (lmpipe's ``answer_match`` + 0.2 ``format``, called on TRL's completions).

Both: ``--prompts`` x ``--generations`` completions per step, at most ``--tokens`` tokens
each, temperature 1 with no top-k/top-p, generation stops at the end-of-turn token (or
EOS), loss_type dapo, beta 0 (no reference), one iteration per rollout, epsilon 0.2,
fused AdamW (weight decay 0, constant LR), grad clipping 1.0, dropout off, fp32, CPU, no
gradient checkpointing, no eval, saving or logging. The completion lengths of each side
are reported: sampling is random on both sides, so the work per step is equal in
expectation, not token for token.

Timing: a ``TrainerCallback`` times TRL's optimizer steps (``on_step_begin`` ->
``on_step_end``: TRL generates inside the step) and after every ``--chunk`` of them runs
a chunk of lmpipe steps, so machine noise hits both alike. "vs TRL" = TRL's median
seconds per step / lmpipe's; "range" spans the ratios of ``--rounds`` consecutive parts.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmpipe.data.prompts import read_prompts
from lmpipe.data.samplers import PromptOptions, PromptSampler
from lmpipe.objectives.base import ObjectiveContext
from lmpipe.objectives.grpo import GRPO
from lmpipe.objectives.rewards import AnswerMatch, Completion, Format
from sft import (
    ROOT,
    hf_tokenizer,
    llama_like,
    lmpipe_optim,
    lmpipe_trainer,
    machine_line,
    no_printing,
    quiet_hf,
    records,
    starting_model,
    trl_training_args,
)

from _common import print_table, speedup

FORMAT = r"(?i)the answer is\s*-?\$?[\d,]*\.?\d+\.?\s*$"


def rewards() -> dict:
    return {"answer_match": AnswerMatch(), "format": Format(FORMAT, weight=0.2)}


def lmpipe_grpo(args, data, model, sampler, run_dir: Path):
    objective = GRPO(
        rewards=rewards(),
        num_generations=args.generations,
        max_completion_length=args.tokens,
        temperature=1.0,
        epsilon=0.2,
        epsilon_high=None,
        beta=0.0,
        num_iterations=1,
        loss_type="dapo",
        scale_rewards="group",
        mask_truncated_completions=False,
    )
    objective.setup(
        ObjectiveContext(
            device=torch.device("cpu"),
            autocast=contextlib.nullcontext,
            tokenizer=data.tokenizer,
            model=model,
            examples=sampler,
            val_sets={},
            micro_batch_size=args.prompts,
            seed=0,
        )
    )
    trainer = lmpipe_trainer(
        model, objective, sampler, data, args.prompts, args.block, lmpipe_optim(args.lr), run_dir
    )
    trainer.train_model.train(objective.train_mode)
    return trainer


def trl_reward_functions(max_tokens: int):
    """lmpipe's rewards as TRL reward functions (one per reward, weights in the config)."""

    def completions_of(completions, answer, lengths):
        return [
            Completion(c[0]["content"], n, n >= max_tokens, max_tokens, a)
            for c, a, n in zip(completions, answer, lengths, strict=True)
        ]

    functions = []
    for name, reward in rewards().items():

        def function(prompts, completions, answer, completion_ids, reward=reward, **_):
            return reward(completions_of(completions, answer, [len(c) for c in completion_ids]))

        function.__name__ = name
        functions.append(function)
    return functions


def trl_grpo(args, hf, tokenizer, prompts: list[dict], callback, out: Path, stop_ids):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(
        **trl_training_args(
            out, args.prompts * args.generations, args.warmup + args.steps, args.lr
        ),
        num_generations=args.generations,
        max_completion_length=args.tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        epsilon=0.2,
        num_iterations=1,
        shuffle_dataset=False,
        disable_dropout=True,
        reward_weights=[r.weight for r in rewards().values()],
        generation_kwargs={"eos_token_id": list(stop_ids)},
    )
    trainer = GRPOTrainer(
        model=hf,
        reward_funcs=trl_reward_functions(args.tokens),
        args=config,
        train_dataset=Dataset.from_list(prompts),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    no_printing(trainer)
    return trainer


def make_interleaver(lmpipe_step, warmup: int, chunk: int):
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        def __init__(self):
            self.times = {"TRL": [], "lmpipe": []}
            self.lengths = {"TRL": [], "lmpipe": []}
            self.next_lmpipe = warmup
            self.started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            elapsed = time.perf_counter() - self.started
            if state.global_step - 1 < warmup:
                return
            self.times["TRL"].append(elapsed)
            self.lengths["TRL"].append(
                self.trainer._metrics["train"]["completions/mean_length"][-1]
            )
            if (state.global_step - warmup) % chunk == 0:
                for i in range(self.next_lmpipe, self.next_lmpipe + chunk):
                    t0 = time.perf_counter()
                    metrics, _ = lmpipe_step(i)
                    self.times["lmpipe"].append(time.perf_counter() - t0)
                    self.lengths["lmpipe"].append(metrics["completions/mean_length"])
                self.next_lmpipe += chunk

    return Interleave()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="conf/model/<preset>.yaml")
    parser.add_argument("--start", default=None, help="start from this lmpipe checkpoint")
    parser.add_argument("--block", type=int, default=127, help="the model's context")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--tokens", type=int, default=32, help="max completion tokens")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=2, help="steps per turn")
    parser.add_argument("--rounds", type=int, default=3, help="parts for the ratio range")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--data", default="demo_prompts")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "lmpipe"))
    args = parser.parse_args()
    machine = machine_line(args.threads)
    quiet_hf()
    torch.manual_seed(0)
    args.steps = -(-args.steps // args.chunk) * args.chunk  # whole chunks

    data, base = starting_model(args)
    tokenizer = hf_tokenizer(data)
    stop_ids = (data.tokenizer.turn_end_id, data.tokenizer.eos_id)
    # A chat model's EOS is its end-of-turn token (as ChatML's <|im_end|>): where TRL stops
    # sampling and ends the completion mask, as lmpipe does.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(stop_ids[0])
    options = PromptOptions(
        epoch_seed=0,
        epoch_shuffle=True,
        epoch_drop_last=True,
        max_prompt_tokens=args.block - args.tokens,
    )
    sampler = PromptSampler(read_prompts(data, "train"), args.prompts, options, pad_id=0)
    total = args.warmup + args.steps
    run_dir = Path(tempfile.mkdtemp(prefix="lmpipe-bench-grpo-"))
    hf = llama_like(base)
    hf.config.use_cache = True  # TRL samples with HF generate: give it its KV cache
    lmpipe = lmpipe_grpo(args, data, base, sampler, run_dir)
    batches = [sampler.batch(i) for i in range(total)]

    # TRL reads the prompts in the order of lmpipe's batches: step i has the same prompts.
    chats = records(data)
    order = [e for i in range(total) for row in sampler.step_rows(i) for e in row]
    prompts = [{"prompt": chats[e]["prompt"], "answer": chats[e]["answer"]} for e in order]
    for e in order[: args.prompts]:  # TRL renders them to lmpipe's tokens
        rendered = tokenizer.apply_chat_template(
            chats[e]["prompt"], add_generation_prompt=True, tokenize=False
        )
        assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == sampler.prompts[e].ids

    callback = make_interleaver(lambda i: lmpipe.train_step(batches[i]), args.warmup, args.chunk)
    trl = trl_grpo(args, hf, tokenizer, prompts, callback, run_dir / "trl", stop_ids)
    callback.trainer = trl
    for i in range(args.warmup):
        lmpipe.train_step(batches[i])
    started = time.perf_counter()
    trl.train()
    wall = time.perf_counter() - started
    times = callback.times

    c = base.config
    params = sum(p.numel() for p in base.parameters())
    print(
        f"model: {'checkpoint ' + args.start if args.start else 'preset=' + args.preset} "
        f"{c.n_layer}L/{c.n_head}H/{c.d_model}d, vocab {c.vocab_size}, {params / 1e6:.2f}M "
        f"params on both sides; {args.prompts} prompts x {args.generations} completions of "
        f"<= {args.tokens} tokens per step; {args.steps} timed steps each after {args.warmup} "
        f"warmup, turns of {args.chunk}; {wall:.0f} s; {machine}"
    )

    table = []
    for name, lengths in callback.lengths.items():
        table.append(
            [
                "TRL GRPOTrainer" if name == "TRL" else "lmpipe GRPO",
                f"{statistics.median(times[name]):.2f}",
                f"{statistics.mean(lengths):.1f}",
                *speedup(times, name, args.rounds),
            ]
        )
    print_table(["contender", "s/step", "mean completion tokens", "vs TRL", "range"], table)


if __name__ == "__main__":
    main()
