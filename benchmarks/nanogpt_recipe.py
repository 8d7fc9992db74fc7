"""Learning parity on nanoGPT's CPU shakespeare_char recipe: lmpipe vs a reference loop.

lmpipe runs ``+experiment=nanogpt_shakespeare_char`` through its real CLI. The reference
is HF ``GPT2LMHeadModel`` (exact GELU, no dropout) trained by a plain loop with nanoGPT's
settings: decay on every matrix and embedding, warmup lr*(it+1)/(warmup+1), cosine to
1e-4 at 2,000 iterations, AdamW betas (0.9, 0.99), clip 1.0, batch 12, block 64, 65
characters, 90/10 split by position. Both are scored the same way: mean next-character
loss over the whole validation split in windows of 64. Prints val loss per seed.

    python benchmarks/nanogpt_recipe.py --seeds 1337 1
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from _common import DATA_DIR, print_table

ROOT = Path(__file__).resolve().parents[1]
BLOCK, BATCH, STEPS, WARMUP, LR, MIN_LR = 64, 12, 2000, 100, 1e-3, 1e-4


def reference_val_loss(text: str, seed: int) -> float:
    chars = sorted(set(text))
    ids = np.array(
        [chars.index(c) for c in text]
        if len(text) < 1000
        else np.searchsorted(np.array([ord(c) for c in chars]), np.array([ord(c) for c in text])),
        dtype=np.int64,
    )
    cut = int(len(ids) * 0.9)
    train, val = torch.from_numpy(ids[:cut]), torch.from_numpy(ids[cut:])
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(chars),
            n_positions=BLOCK,
            n_embd=128,
            n_layer=4,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            activation_function="gelu",
            attn_implementation="sdpa",
        )
    )
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.99),
    )
    for it in range(STEPS):
        if it < WARMUP:
            lr = LR * (it + 1) / (WARMUP + 1)
        else:
            lr = MIN_LR + 0.5 * (1 + math.cos(math.pi * (it - WARMUP) / (STEPS - WARMUP))) * (
                LR - MIN_LR
            )
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(len(train) - BLOCK, (BATCH,))
        x = torch.stack([train[s : s + BLOCK] for s in starts])
        y = torch.stack([train[s + 1 : s + 1 + BLOCK] for s in starts])
        loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        windows = [val[s : s + BLOCK + 1] for s in range(0, len(val) - BLOCK, BLOCK)]
        for i in range(0, len(windows), 64):
            rows = torch.stack(windows[i : i + 64])
            logits = model(input_ids=rows[:, :-1]).logits
            total += F.cross_entropy(
                logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum"
            ).item()
            count += rows[:, 1:].numel()
    return total / count


def lmpipe_val_loss(seed: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lmpipe.train",
                "+experiment=nanogpt_shakespeare_char",
                f"seed={seed}",
                f"out_dir={out}",
                "run_name=r",
                "trainer.eval_interval=2000",
                f"data.sources.0.path={DATA_DIR / 'tinyshakespeare' / 'input.txt'}",
            ],
            check=True,
            cwd=ROOT,
            capture_output=True,
        )
        metrics = [json.loads(line) for line in (Path(out) / "r" / "metrics.jsonl").open()]
    return [m for m in metrics if "val/loss" in m][-1]["val/loss"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
    args = parser.parse_args()
    text = (DATA_DIR / "tinyshakespeare" / "input.txt").read_text()
    rows = []
    for seed in args.seeds:
        ours, ref = lmpipe_val_loss(seed), reference_val_loss(text, seed)
        rows.append([str(seed), f"{ours:.4f}", f"{ref:.4f}", f"{ours - ref:+.4f}"])
        print_table(["seed", "lmpipe val loss", "reference val loss", "difference"], rows)


if __name__ == "__main__":
    main()
