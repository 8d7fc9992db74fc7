"""Activation checkpointing: peak memory and step time of one forward+backward, with and
without ``model.activation_checkpointing``.

    python benchmarks/activation_checkpointing.py                  # model=small, 8 x 512, 32k vocab
    python benchmarks/activation_checkpointing.py --model tiny --block 128 --steps 2

An AR model from ``conf/model/<model>.yaml`` at a ``--vocab`` vocabulary, fp32 on the CPU,
batches of ``--batch`` random rows of ``--block`` tokens; the step is the model's mean
token NLL and its backward pass (no optimizer: its state is the same either way).

Memory: each variant in a fresh process. The baseline is its RSS with the model and its
gradients allocated (zeros); the step peak is the peak RSS (``VmHWM``) of one
forward+backward above it: the activations kept for the backward pass and the buffers of
the backward itself. Time: both variants in one process, on the same weights, alternating
in chunks (``interleaved_times``), after one warm-up step each; the median per variant.
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch

from lmpipe.batch import Batch
from lmpipe.config import group_option
from lmpipe.models import build_lm

from _common import (
    child_result,
    interleaved_times,
    median,
    memory_kib,
    print_table,
    report_result,
    reset_peak_memory,
)


def build(args, checkpointing: bool):
    torch.manual_seed(0)
    shape = group_option("model", args.model)
    shape.update(block_size=args.block, activation_checkpointing=checkpointing)
    model = build_lm(group_option("arch", "ar"), shape, args.vocab)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return model


def batch(args, seed: int) -> Batch:
    ids = torch.randint(
        0, args.vocab, (args.batch, args.block + 1), generator=torch.Generator().manual_seed(seed)
    )
    return Batch(ids, torch.ones_like(ids, dtype=torch.float32))


def step(model, rows: Batch) -> None:
    nll = model.token_nll(rows)
    (nll.sum() / rows.loss_mask[:, 1:].sum()).backward()


def child(args) -> None:
    """One variant's memory: baseline RSS, then the peak of one forward+backward."""
    model = build(args, args.checkpointing)
    rows = batch(args, 0)
    gc.collect()
    baseline = memory_kib("VmRSS")
    reset_peak_memory()
    step(model, rows)
    result = {"baseline_kib": baseline, "peak_kib": memory_kib("VmHWM")}
    report_result(result)


def memory(args, checkpointing: bool) -> dict:
    command = [sys.executable, __file__, "--child"]
    for key in ("model", "batch", "block", "vocab"):
        command += [f"--{key}", str(getattr(args, key))]
    if checkpointing:
        command.append("--checkpointing")
    return child_result(command, f"the child (checkpointing={checkpointing})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    variants = {"off": False, "on": True}
    peaks = {name: memory(args, flag) for name, flag in variants.items()}
    models = {name: build(args, flag) for name, flag in variants.items()}
    rows = batch(args, 0)
    steps = {name: (lambda i, m=model: step(m, rows)) for name, model in models.items()}
    times = interleaved_times(steps, args.steps, chunk=1, warmup=1)

    params = models["off"].backbone.num_params()
    print(
        f"model={args.model} ({params / 1e6:.1f}M parameters at vocab {args.vocab}), "
        f"batch {args.batch} x {args.block} tokens, fp32, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    base_ms = 1000 * median(times["off"])
    table = []
    for name in variants:
        peak = peaks[name]
        step_mib = (peak["peak_kib"] - peak["baseline_kib"]) / 1024
        ms = 1000 * median(times[name])
        table.append(
            [
                name,
                f"{peak['baseline_kib'] / 1024:,.0f}",
                f"{peak['peak_kib'] / 1024:,.0f}",
                f"{step_mib:,.0f}",
                f"{ms:,.0f}",
                f"{ms / base_ms:.2f}x",
            ]
        )
    print_table(
        ["checkpointing", "baseline MiB", "peak RSS MiB", "step peak MiB", "ms/step", "time"],
        table,
    )


if __name__ == "__main__":
    main()
