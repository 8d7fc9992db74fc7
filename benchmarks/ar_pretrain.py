"""AR pretraining throughput: lmpipe's Trainer step vs HF transformers GPT2LMHeadModel.

Both train the same dimensions on the same batches (tiny shakespeare, characters) with
AdamW and grad clipping; steps alternate in chunks within one process. Prints tokens/s
and the ratio lmpipe / HF.

    python benchmarks/ar_pretrain.py                       # nanoGPT CPU recipe dimensions
    python benchmarks/ar_pretrain.py --no-compile          # skip the compiled row (~30 s)
    python benchmarks/ar_pretrain.py --d-model 384 --n-layer 6 --n-head 6 --block 256
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from lmpipe.batch import Batch
from lmpipe.config import group_option
from lmpipe.data.tokenizer import Tokenizer
from lmpipe.models import build_lm
from lmpipe.objectives.ce import CrossEntropy

from _common import (
    interleaved_times,
    lmpipe_trainer,
    median,
    optim_overrides,
    print_table,
    random_rows,
    shakespeare_char_tokens,
)

OPTIM = {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.1, "eps": 1e-8}


def lmpipe_step(
    args, vocab: int, preset: str, rows: list[torch.Tensor], compile: bool = False, **changes
):
    """A step of lmpipe's Trainer on a model from ``conf/model/<preset>.yaml`` resized to the
    benchmark dimensions (plus ``changes``)."""
    layout = group_option("model", preset)
    layout.update(
        n_layer=args.n_layer,
        n_head=args.n_head,
        d_model=args.d_model,
        block_size=args.block,
        dropout=0.0,
        **changes,
    )
    model = build_lm(group_option("arch", "ar"), layout, vocab)
    trainer = lmpipe_trainer(
        model,
        CrossEntropy(),
        f"trainer.batch_size={args.batch}",
        f"trainer.block_size={args.block}",
        "trainer.grad_clip=1.0",
        *optim_overrides(OPTIM),
        tokenizer=Tokenizer.build_char("a"),
        train_model=torch.compile(model) if compile else model,
    )
    batches = [Batch(r, torch.ones_like(r, dtype=torch.float32)) for r in rows]
    return model, lambda i: trainer.train_step(batches[i % len(batches)])


def hf_step(args, vocab: int, rows: list[torch.Tensor]):
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=args.block,
        n_embd=args.d_model,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(config)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": OPTIM["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=OPTIM["lr"],
        betas=tuple(OPTIM["betas"]),
        fused=True,
    )

    def step(i: int) -> None:
        row = rows[i % len(rows)]
        logits = model(input_ids=row[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), row[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    return model, step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd row")
    args = parser.parse_args()

    torch.manual_seed(0)
    tokens, vocab, source = shakespeare_char_tokens()
    rows = random_rows(tokens, args.batch, args.block + 1, 64)
    baseline = "HF GPT2LMHeadModel"
    contenders = {
        baseline: hf_step(args, vocab, rows),
        # The preset: GPT-2 layout with GPT-2's biases, the same parameters as the HF model.
        "lmpipe nanogpt-shakespeare": lmpipe_step(args, vocab, "nanogpt-shakespeare", rows),
        # nanoGPT's train.py default: the same without biases.
        "lmpipe nanogpt-shakespeare bias=false": lmpipe_step(
            args, vocab, "nanogpt-shakespeare", rows, bias=False
        ),
        # lmpipe's default layout (RMSNorm, RoPE, SwiGLU).
        "lmpipe tiny layout": lmpipe_step(args, vocab, "tiny", rows),
    }
    if not args.no_compile:
        contenders["lmpipe nanogpt-shakespeare hardware.compile=true"] = lmpipe_step(
            args, vocab, "nanogpt-shakespeare", rows, compile=True
        )
    # Rounds of alternating chunks; each round gives a ratio, the table shows their median
    # and range, so one noisy stretch of the machine cannot make the figure.
    per_round: dict[str, list[float]] = {name: [] for name in contenders}
    ratios: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        times = interleaved_times(
            {k: v[1] for k, v in contenders.items()}, args.steps, args.chunk, args.warmup
        )
        for name in contenders:
            per_round[name].append(median(times[name]))
            ratios[name].append(median(times[baseline]) / median(times[name]))
    tokens_per_step = args.batch * args.block
    print(
        f"data: {source}; {args.n_layer}L/{args.n_head}H/{args.d_model}d, block {args.block}, "
        f"batch {args.batch}; {args.rounds} rounds x {args.steps} timed steps each; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    table = []
    for name, (model, _) in contenders.items():
        step_time = median(per_round[name])
        params = sum(p.numel() for p in model.parameters())
        table.append(
            [
                name,
                f"{params / 1e6:.3f}M",
                f"{step_time * 1e3:.1f}",
                f"{tokens_per_step / step_time:,.0f}",
                f"{median(ratios[name]):.2f}x",
                f"{min(ratios[name]):.2f}-{max(ratios[name]):.2f}",
            ]
        )
    print_table(["model", "params", "ms/step", "tokens/s", "vs HF", "range"], table)


if __name__ == "__main__":
    main()
