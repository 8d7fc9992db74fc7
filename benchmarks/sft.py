"""SFT on the GSM8K chats: packing efficiency, and trained tokens/s of lmpipe vs TRL.

    python benchmarks/sft.py                          # tiny preset, block 512, batch 16 (~4 min)
    python benchmarks/sft.py --preset small --steps 20 --chunk 2
    LMPIPE_DATA_DIR=/path/to/shared/data python benchmarks/sft.py --threads 1

Data: ``data=gsm8k_local`` prepared by lmpipe (GSM8K train as user/assistant chats, BPE
2048; reused from ``--cache-dir``), rows of ``block + 1`` tokens (``ARLM.row_length``).

1. Padding efficiency: the mean fraction of non-pad tokens per batch of ``--batch`` rows
   over one epoch of lmpipe's ``EpisodeSampler``, with ``packing=false`` (one chat per
   row, padded to the batch's longest) and ``packing=true`` (chats one after another in
   rows of ``block + 1``, kept apart by segment ids). For reference, TRL's own packing
   (``trl.pack_dataset``, best-fit decreasing, what ``SFTConfig(packing=True)`` uses) of
   the same token sequences: the fill of its rows.
2. Throughput, in one process: lmpipe's ``Trainer.train_step`` with ``MaskedSFT`` on an
   ``ARLM`` from ``conf/model/<preset>.yaml`` (RMSNorm, RoPE, SwiGLU, tied embeddings,
   SDPA) against ``trl.SFTTrainer`` training a ``transformers.LlamaForCausalLM`` of the
   same dimensions (SDPA) that starts from a copy of lmpipe's weights.

   Same data, token for token: TRL tokenizes the chats itself (lmpipe's
   ``mixed_train.jsonl``, ``messages`` format) with lmpipe's tokenizer
   (``PreTrainedTokenizerFast``) and lmpipe's chat template given ``{% generation %}``
   markers, so that ``assistant_only_loss=True`` trains exactly what lmpipe's loss mask
   trains (assistant content and <|end|>). The script checks that every TRL example is
   lmpipe's episode without the EOS that lmpipe appends (a row's last token is only ever
   a target, and that one has loss mask 0), so both models get the same inputs and
   targets; and that both sides' losses agree before and after training.

   Same batches in the same order (TRL reads the chats in the order of lmpipe's epoch
   plan, ``train_sampling_strategy="sequential"``), batch size, max length (``block + 1``,
   both truncate the same way), fused AdamW with the same hyperparameters (weight decay 0
   and a constant LR: the two runs compute the same thing), grad clipping 1.0, fp32, CPU,
   no gradient checkpointing (TRL's default is on), no eval, saving or logging.

   Timing: a ``TrainerCallback`` times TRL's optimizer steps (``on_step_begin`` ->
   ``on_step_end``: forward, backward, clipping, optimizer; the batch is already
   collated) and after every ``--chunk`` of them runs a chunk of each lmpipe contender
   on prebuilt batches (the same work), so machine noise hits all alike. lmpipe also runs
   with ``packing=true`` (other batches: full rows). Trained tokens of a step = the
   tokens of its conversations, padding and lmpipe's EOS left out (TRL: its attention
   mask's sum; equal on both sides). tokens/s is the median over steps of tokens / time;
   "vs TRL" divides medians, "range" spans the ratios of ``--rounds`` consecutive parts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lmpipe.batch import Batch
from lmpipe.config import group_option
from lmpipe.data.prepare import PreparedData, prepare
from lmpipe.data.samplers import EpisodeOptions, Episodes, EpisodeSampler
from lmpipe.hf import to_hf
from lmpipe.models import LM, build_lm
from lmpipe.objectives import Objective
from lmpipe.objectives.sft import MaskedSFT
from lmpipe.training.checkpoint import resolve_checkpoint
from lmpipe.training.trainer import Trainer

from _common import lmpipe_trainer as common_trainer
from _common import optim_overrides, print_table

ROOT = Path(__file__).resolve().parents[1]
# lmpipe's built-in chat template (lmpipe.data.tokenizer.BUILTIN_CHAT_TEMPLATE) with HF's
# {% generation %} markers around what lmpipe trains on in an assistant turn.
TRL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


# --- shared with benchmarks/dpo.py ---------------------------------------------------------
def quiet_hf() -> None:
    """No progress bars, advisories or log printing from datasets / transformers / TRL."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")


def machine_line(threads: int | None) -> str:
    if threads:
        torch.set_num_threads(threads)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {load}"
    )


def prepared(name: str, cache_dir: str) -> PreparedData:
    return prepare(group_option("data", name), cache_dir, progress=False)


def records(data: PreparedData, split: str = "train") -> list[dict]:
    """The split's records in token-stream order (record i = episode i)."""
    with (data.directory / f"mixed_{split}.jsonl").open() as fh:
        return [json.loads(line) for line in fh]


def hf_tokenizer(data: PreparedData):
    """lmpipe's tokenizer as a ``PreTrainedTokenizerFast`` (tokenizer.json + config), with
    the chat template that marks the assistant turns."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(data.directory))
    assert tokenizer.pad_token_id == data.tokenizer.pad_id, "pad ids differ"
    assert tokenizer.eos_token_id == data.tokenizer.eos_id, "eos ids differ"
    tokenizer.chat_template = TRL_CHAT_TEMPLATE
    return tokenizer


def without_eos(ids: np.ndarray, mask: np.ndarray, eos_id: int) -> tuple[list[int], np.ndarray]:
    """An lmpipe document as TRL tokenizes it: without the EOS that lmpipe appends
    (absent when the document was truncated)."""
    if len(ids) and ids[-1] == eos_id:
        return ids[:-1].tolist(), mask[:-1]
    return ids.tolist(), mask


def conversation_tokens(batch: Batch, pad_id: int, eos_id: int) -> int:
    """Tokens of the batch's conversations as TRL tokenizes them: neither padding nor the
    EOS that lmpipe appends to each (TRL counts its attention mask, the same tokens)."""
    ids = batch.input_ids
    return int(((ids != pad_id) & (ids != eos_id)).sum())


def starting_model(args) -> tuple[PreparedData, LM]:
    """The data and the model a benchmark starts from: ``args.start``'s checkpoint (its
    tokenizer prepares ``args.data``; ``args.block`` becomes its context), else a fresh
    ``args.preset`` model on ``args.data`` as lmpipe prepares it. In eval mode."""
    if args.start:
        checkpoint = resolve_checkpoint(args.start)
        data = prepare(
            group_option("data", args.data),
            args.cache_dir,
            tokenizer=checkpoint.tokenizer(),
            progress=False,
        )
        base = checkpoint.build_model()
        args.block = base.config.block_size
    else:
        data = prepared(args.data, args.cache_dir)
        base = lmpipe_model(args.preset, args.block - 1, data)
    return data, base.eval()


def lmpipe_model(preset: str, block: int, data: PreparedData) -> LM:
    layout = group_option("model", preset)
    layout.update(block_size=max(block + 1, int(layout["block_size"])), dropout=0.0)
    return build_lm(
        group_option("arch", "ar"),
        layout,
        data.tokenizer.vocab_size,
        data.tokenizer.special_ids,
    )


def llama_like(model: LM):
    """lmpipe's own HF export (``to_hf``): a ``LlamaForCausalLM`` of the same dimensions
    with the same weights, set up for training (SDPA attention, no KV cache)."""
    hf = to_hf(model)
    hf.config.use_cache = False
    assert hf.config._attn_implementation == "sdpa", hf.config._attn_implementation
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in model.parameters())
    return hf


def lmpipe_trainer(
    model: LM,
    objective: Objective,
    sampler,
    data: PreparedData,
    batch: int,
    block: int,
    optim: dict,
    run_dir: Path,
) -> Trainer:
    """lmpipe's Trainer as a run assembles it: CPU, fp32, constant LR, ``optim``."""
    return common_trainer(
        model,
        objective,
        f"trainer.batch_size={batch}",
        f"trainer.block_size={block}",
        "trainer.grad_clip=1.0",
        *optim_overrides(optim),
        tokenizer=data.tokenizer,
        sampler=sampler,
        run_dir=run_dir,
    )


def lmpipe_optim(lr: float) -> dict:
    return {"name": "adamw", "lr": lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}


def trl_training_args(out: Path, batch: int, steps: int, lr: float) -> dict:
    """The TrainingArguments both TRL trainers get: lmpipe's optimizer, nothing else."""
    return {
        "output_dir": str(out),
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "learning_rate": lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-8,
        "optim": "adamw_torch_fused",
        "max_grad_norm": 1.0,
        "train_sampling_strategy": "sequential",
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }


def no_printing(trainer) -> None:
    """Drop the callback that prints the end-of-training summary."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


# --- padding efficiency ------------------------------------------------------------------
def nonpad_fraction(sampler: EpisodeSampler) -> tuple[float, float, int]:
    """Mean and minimum fraction of non-pad tokens per batch over epoch 0; batches."""
    fractions = []
    for step in range(sampler.steps_in_epoch(0)):
        batch = sampler.batch(step)
        fractions.append(batch.real_tokens / batch.input_ids.numel())
    return float(np.mean(fractions)), float(np.min(fractions)), len(fractions)


def trl_packing_fill(episodes: Episodes, batch: int, row_length: int) -> tuple[float, float, int]:
    """TRL's best-fit-decreasing packing of the same token sequences into rows of
    ``row_length``: mean and minimum fill of batches of ``batch`` rows."""
    from datasets import Dataset
    from trl import pack_dataset

    ids = [episodes.documents(int(e))[0][0].tolist() for e in episodes.kept]
    packed = pack_dataset(Dataset.from_dict({"input_ids": ids}), row_length, "bfd")
    lengths = np.array([len(r) for r in packed["input_ids"]])
    count = len(lengths) // batch
    fills = lengths[: count * batch].reshape(count, batch).sum(1) / (batch * row_length)
    return float(fills.mean()), float(fills.min()), count


# --- TRL ---------------------------------------------------------------------------------
def trl_sft_trainer(args, model, tokenizer, chats: list[dict], steps: int, callback, out: Path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        **trl_training_args(out, args.batch, steps, args.lr),
        max_length=args.block + 1,
        assistant_only_loss=True,
        packing=False,
    )
    dataset = Dataset.from_list([{"messages": r["messages"]} for r in chats])
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    no_printing(trainer)
    return trainer


def check_same_tokens(trl_dataset, episodes: Episodes, order: list[int], eos_id: int) -> None:
    """TRL's tokenized examples must be lmpipe's episodes: same ids, same loss mask."""
    for i, episode in enumerate(order):
        ids, mask = without_eos(*episodes.documents(episode)[0], eos_id)
        row = trl_dataset[i]
        labels = np.asarray(row["labels"]) != -100
        if row["input_ids"] != ids or not np.array_equal(labels, mask > 0):
            raise AssertionError(f"TRL tokenized chat {i} (episode {episode}) unlike lmpipe")


def hf_loss(model, batch: Batch, pad_id: int) -> float:
    """The HF model's mean NLL over the loss-mask tokens of an lmpipe (padded) batch."""
    ids = batch.input_ids
    labels = torch.where(batch.loss_mask > 0, ids, torch.full_like(ids, -100))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=(ids != pad_id).long(), labels=labels)
    return out.loss.item()


def make_interleaver(lmpipe_steps: dict, warmup: int, chunk: int):
    """A TrainerCallback that times TRL's optimizer steps and, after every ``chunk`` timed
    ones, runs ``chunk`` steps of each lmpipe contender (``step(i) -> loss``)."""
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        def __init__(self):
            names = ["TRL", *lmpipe_steps]
            self.times: dict[str, list[float]] = {name: [] for name in names}
            self.steps: dict[str, list[int]] = {name: [] for name in names}
            self.next_lmpipe = warmup  # lmpipe step index of the next chunk
            self.started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            elapsed = time.perf_counter() - self.started
            step = state.global_step - 1
            if step < warmup:
                return
            self.times["TRL"].append(elapsed)
            self.steps["TRL"].append(step)
            if (step + 1 - warmup) % chunk == 0:
                for name, step_fn in lmpipe_steps.items():
                    for i in range(self.next_lmpipe, self.next_lmpipe + chunk):
                        t0 = time.perf_counter()
                        step_fn(i)
                        self.times[name].append(time.perf_counter() - t0)
                        self.steps[name].append(i)
                self.next_lmpipe += chunk

    return Interleave()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="conf/model/<preset>.yaml")
    parser.add_argument("--block", type=int, default=512, help="context; rows are block + 1")
    parser.add_argument("--batch", type=int, default=16, help="rows (chats) per step")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=2, help="steps per turn")
    parser.add_argument("--rounds", type=int, default=3, help="parts for the ratio range")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--data", default="gsm8k_local")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "lmpipe"))
    args = parser.parse_args()
    machine = machine_line(args.threads)
    quiet_hf()
    torch.manual_seed(0)

    data = prepared(args.data, args.cache_dir)
    pad_id, eos_id = data.tokenizer.pad_id, data.tokenizer.eos_id
    row_length = args.block + 1
    episodes = Episodes(data.split("train"), 1, row_length)
    samplers = {
        f"lmpipe packing={str(packing).lower()}": EpisodeSampler(
            episodes,
            args.batch,
            EpisodeOptions(
                epoch_seed=0,
                epoch_shuffle=True,
                epoch_drop_last=True,
                episode_min_tokens=0,
                packing=packing,
            ),
            pad_id=pad_id,
        )
        for packing in (False, True)
    }
    padded = "lmpipe packing=false"

    # 1. padding efficiency
    print(
        f"data={args.data}: {len(episodes.kept):,} chats of {episodes.lengths.mean():.0f} "
        f"tokens on average (longest {episodes.lengths.max()} after truncation), rows of "
        f"{row_length} tokens, batches of {args.batch} rows"
    )
    table = []
    for name, sampler in samplers.items():
        mean, low, count = nonpad_fraction(sampler)
        table.append([name, str(count), f"{mean:.3f}", f"{low:.3f}"])
    mean, low, count = trl_packing_fill(episodes, args.batch, row_length)
    table.append(["TRL pack_dataset bfd (reference)", str(count), f"{mean:.3f}", f"{low:.3f}"])
    print_table(["layout, one epoch", "batches", "non-pad fraction", "min"], table)
    print()

    # 2. throughput
    args.steps = -(-args.steps // args.chunk) * args.chunk  # whole chunks
    total = args.warmup + args.steps
    tokenizer = hf_tokenizer(data)
    base = lmpipe_model(args.preset, args.block, data)
    run_dir = Path(tempfile.mkdtemp(prefix="lmpipe-bench-sft-"))
    contenders, batches, models = {}, {}, {}
    for name, sampler in samplers.items():
        model = lmpipe_model(args.preset, args.block, data)
        model.load_state_dict(base.state_dict())
        trainer = lmpipe_trainer(
            model,
            MaskedSFT(),
            sampler,
            data,
            args.batch,
            args.block,
            lmpipe_optim(args.lr),
            run_dir,
        )
        batches[name] = [sampler.batch(i) for i in range(total + 1)]  # + a held-out batch
        contenders[name] = lambda i, t=trainer, b=batches[name]: t.train_step(b[i])
        models[name] = model

    # TRL reads the chats in the order of lmpipe's padded batches: batch i is the same.
    order = [e for i in range(total) for row in samplers[padded].step_rows(i) for e in row]
    chats = records(data)
    hf = llama_like(base)
    callback = make_interleaver(contenders, args.warmup, args.chunk)
    trl = trl_sft_trainer(
        args, hf, tokenizer, [chats[e] for e in order], total, callback, run_dir / "trl"
    )
    check_same_tokens(trl.train_dataset, episodes, order, eos_id)
    tokens = {
        "TRL": [
            sum(len(trl.train_dataset[i * args.batch + j]["input_ids"]) for j in range(args.batch))
            for i in range(total)
        ]
    }
    for name in contenders:
        tokens[name] = [conversation_tokens(b, pad_id, eos_id) for b in batches[name]]
    assert tokens[padded][:total] == tokens["TRL"], "lmpipe and TRL batches differ"

    # Same start: the first batch's loss under both models (TRL's own collation).
    with torch.no_grad():
        lm_before = MaskedSFT().loss(models[padded], batches[padded][0])[0].item()
        collated = trl.data_collator([trl.train_dataset[j] for j in range(args.batch)])
        hf_before = hf(**collated).loss.item()
    assert abs(lm_before - hf_before) < 1e-4 * abs(lm_before), (lm_before, hf_before)

    # lmpipe warmup (the batches of TRL's warmup steps), then TRL drives the chunks.
    for step_fn in contenders.values():
        for i in range(args.warmup):
            step_fn(i)
    started = time.perf_counter()
    trl.train()
    wall = time.perf_counter() - started
    times, steps = callback.times, callback.steps
    assert steps["TRL"] == steps[padded], "lmpipe and TRL did not train the same steps"

    # After the same batches, both models score the next batch alike.
    held = batches[padded][total]
    with torch.no_grad():
        lm_after = MaskedSFT().loss(models[padded], held)[0].item()
    hf_after = hf_loss(hf, held, pad_id)

    c = base.config
    params = sum(p.numel() for p in base.parameters())
    print(
        f"model: preset={args.preset} {c.n_layer}L/{c.n_head}H/{c.d_model}d, d_ff "
        f"{c.hidden_dim}, vocab {c.vocab_size}, {params / 1e6:.2f}M params on both sides; "
        f"block {args.block}, batch {args.batch}; {args.steps} timed steps each after "
        f"{args.warmup} warmup, turns of {args.chunk}; {wall:.0f} s; {machine}"
    )
    print(
        f"same model, same data: loss of batch 0 at the start lmpipe {lm_before:.4f}, TRL "
        f"{hf_before:.4f}; of batch {total} after {total} steps lmpipe {lm_after:.4f}, "
        f"TRL {hf_after:.4f}"
    )

    def rate(name: str, part: slice = slice(None)) -> float:
        pairs = zip(steps[name][part], times[name][part], strict=True)
        return statistics.median(tokens[name][s] / t for s, t in pairs)

    def per_round(name: str) -> list[float]:
        bounds = np.linspace(0, len(times[name]), args.rounds + 1).astype(int)
        return [rate(name, slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    table = []
    for name in times:
        ratios = [a / b for a, b in zip(per_round(name), per_round("TRL"), strict=True)]
        table.append(
            [
                "TRL SFTTrainer (padded)" if name == "TRL" else name,
                f"{statistics.median(times[name]) * 1e3:.0f}",
                f"{statistics.mean(tokens[name][s] for s in steps[name]):,.0f}",
                f"{rate(name):,.0f}",
                f"{rate(name) / rate('TRL'):.2f}x",
                f"{min(ratios):.2f}-{max(ratios):.2f}",
            ]
        )
    print_table(["contender", "ms/step", "tokens/step", "tokens/s", "vs TRL", "range"], table)


if __name__ == "__main__":
    main()
