"""Training throughput and MFU of a preset on one GPU: tokens/s of lmpipe's Trainer step
with bf16 autocast, ``torch.compile``, fused AdamW and flash attention (SDPA).

    python benchmarks/mfu.py                                      # model=large, 16 x 1024, CUDA
    python benchmarks/mfu.py --activation-checkpointing           # the same, blocks recomputed
    python benchmarks/mfu.py --device cpu --steps 3 --model tiny  # a quick check that it runs

Random token rows at a ``--vocab`` vocabulary (throughput does not depend on the data), an
AR model from ``conf/model/<model>.yaml``, the Trainer as ``lmpipe.train`` assembles it
(``hardware.precision=bf16``, ``hardware.compile=true`` on CUDA; fp32 on the CPU).
On CUDA only the flash kernel may run attention (``sdpa_kernel``): a shape it cannot
take fails instead of falling back. MFU = ``flops_per_token`` (6N plus attention, what
the Trainer logs as ``train/mfu_percent``) x tokens/s over ``hardware.peak_tflops``
(looked up by GPU name; ``--peak-tflops`` on the CPU). The step time is the median over
``--steps`` steps after ``--warmup`` (compilation).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmpipe.batch import Batch
from lmpipe.config import group_option
from lmpipe.data.tokenizer import Tokenizer
from lmpipe.models import build_lm
from lmpipe.objectives.ce import CrossEntropy

from _common import lmpipe_trainer, median


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="large")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=None, help="default: the model's")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: by GPU name")
    args = parser.parse_args()

    cuda = args.device == "cuda"
    shape = group_option("model", args.model)
    block = args.block or shape["block_size"]
    shape.update(block_size=block, activation_checkpointing=args.activation_checkpointing)
    torch.manual_seed(0)
    model = build_lm(group_option("arch", "ar"), shape, args.vocab).to(args.device)
    compile = cuda and not args.no_compile
    overrides = [
        f"hardware.device={args.device}",
        f"hardware.precision={'bf16' if cuda else 'fp32'}",
        f"hardware.compile={compile}",
        f"hardware.peak_tflops={args.peak_tflops or 'null'}",
        f"trainer.batch_size={args.batch}",
        f"trainer.block_size={block}",
    ]
    trainer = lmpipe_trainer(
        model,
        CrossEntropy(),
        *overrides,
        tokenizer=Tokenizer.build_char("a"),
        train_model=torch.compile(model) if compile else model,
    )
    rows = torch.randint(0, args.vocab, (8, args.batch, block + 1), device=args.device)
    batches = [Batch(r, torch.ones_like(r, dtype=torch.float32)) for r in rows]
    attention = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if cuda else contextlib.nullcontext()
    times = []
    with attention:
        for i in range(args.warmup + args.steps):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.train_step(batches[i % len(batches)])  # reads the loss: waits for the GPU
            if i >= args.warmup:
                times.append(time.perf_counter() - start)

    hw = trainer.hardware
    tokens_per_sec = args.batch * block / median(times)
    flops = model.flops_per_token(block) * tokens_per_sec
    mfu = f"{100 * flops / (hw.peak_tflops * 1e12):.1f}%" if hw.peak_tflops else "n/a"
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"model={args.model} ({model.backbone.num_params() / 1e6:.1f}M parameters at vocab "
        f"{args.vocab}), batch {args.batch} x {block}, {hw.precision}, compile={hw.compile}, "
        f"activation_checkpointing={args.activation_checkpointing}; {device}; "
        f"torch {torch.__version__}"
    )
    print(
        f"{1000 * median(times):,.1f} ms/step, {tokens_per_sec:,.0f} tokens/s, "
        f"{flops / 1e12:.3g} TFLOP/s of {hw.peak_tflops or 'unknown'} peak: MFU {mfu}"
    )
    if cuda:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
