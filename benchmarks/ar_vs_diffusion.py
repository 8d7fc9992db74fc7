"""AR vs masked diffusion (MDLM) vs sparse distribution diffusion (SDD) on the same data,
model size and token budget.

Every run goes through lmpipe's real CLI with one recipe; only ``arch`` (and SDD's
``arch.k_schedule``) differs: SDD with the k-curriculum 1 -> 2 -> 4 -> 8 (a new k every
quarter of the steps) and with a fixed k = 4. The table shows each run's final held-out
``val/loss`` and ``val/perplexity``: exact for AR, exp of the NELBO per token (an upper
bound on the perplexity) for diffusion and SDD, so they compare. MDLM reports diffusion at
about 1.3x AR's perplexity at small scale on OpenWebText. Then the median training
tokens/s of each run, and the quality of samples: ``lmpipe.eval``'s distinct-1/2 and
self-BLEU of completions of held-out prompts (the real continuations for reference).

    python benchmarks/ar_vs_diffusion.py                     # nanoGPT's CPU shakespeare recipe
    python benchmarks/ar_vs_diffusion.py --steps 5000 model=small hardware=gpu   # on a GPU

Extra ``key=value`` arguments go to every ``lmpipe.train`` run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lmpipe.data.prepare import PreparedData
from lmpipe.eval.diversity import distinct_n, self_bleu
from lmpipe.eval.heldout import Prompt
from lmpipe.eval.runner import generation_metrics
from lmpipe.tracking.jsonl import read_metrics
from lmpipe.training.checkpoint import resolve_checkpoint

from _common import print_table

PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 64, 32, 32


def contenders(steps: int) -> dict[str, list[str]]:
    """Run name -> its ``lmpipe.train`` overrides."""
    q = max(steps // 4, 1)
    return {
        "ar": ["arch=ar"],
        "diffusion": ["arch=diffusion"],
        "sdd-curriculum": ["arch=sdd", f"arch.k_schedule=[[0,1],[{q},2],[{2 * q},4],[{3 * q},8]]"],
        "sdd-k4": ["arch=sdd", "arch.k_schedule=[[0,4]]"],
    }


def heldout_prompts(data: PreparedData) -> list[Prompt]:
    """``PROMPTS`` windows spread over the validation split: the first ``PROMPT_TOKENS``
    tokens are the prompt, the next ``NEW_TOKENS`` the reference continuation."""
    tokens = data.split("val").tokens
    width = PROMPT_TOKENS + NEW_TOKENS
    starts = torch.linspace(0, len(tokens) - width, PROMPTS).long().tolist()
    decode = data.tokenizer.decode
    return [
        Prompt(
            [int(t) for t in tokens[s : s + PROMPT_TOKENS]],
            decode(tokens[s : s + PROMPT_TOKENS]),
            decode(tokens[s + PROMPT_TOKENS : s + width]),
        )
        for s in starts
    ]


def sample_quality(run_dir: Path) -> tuple[dict[str, float], list[Prompt]]:
    """distinct-1/2 and self-BLEU of one completion of every held-out prompt at
    temperature 1 (diffusion and SDD: confidence sampler, one step per token)."""
    checkpoint = resolve_checkpoint(run_dir, log=lambda m: None)
    data = PreparedData.open(checkpoint.meta["data_dir"])
    prompts = heldout_prompts(data)
    metrics = generation_metrics(
        checkpoint.build_model(),
        data.tokenizer,
        prompts,
        stop_ids=(data.tokenizer.eos_id,),
        max_new_tokens=NEW_TOKENS,
        batch_size=PROMPTS,
        device=torch.device("cpu"),
        temperature=1.0,
        seed=0,
        samples_path=run_dir / "samples.jsonl",
        progress=False,
    )
    return metrics, prompts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra lmpipe.train overrides for all")
    args = parser.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="ar-vs-diffusion-"))
    rows = []
    for name, arch in contenders(args.steps).items():
        cmd = [
            sys.executable,
            "-m",
            "lmpipe.train",
            "+experiment=nanogpt_shakespeare_char",
            *arch,
            f"trainer.max_steps={args.steps}",
            f"trainer.eval_interval={max(args.steps // 4, 1)}",
            f"trainer.save_interval={args.steps}",
            f"out_dir={out}",
            f"run_name={name}",
            *args.overrides,
        ]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        metrics = read_metrics(out / name)
        val = [m for m in metrics if "val/loss" in m][-1]
        speed = statistics.median(
            m["train/tokens_per_sec"] for m in metrics if "train/tokens_per_sec" in m
        )
        quality, prompts = sample_quality(out / name)
        rows.append((name, val, speed, quality))
    references = [p.reference for p in prompts]
    ar_ppl, ar_speed = rows[0][1]["val/perplexity"], rows[0][2]
    print(f"runs in {out}")
    print_table(
        [
            "run",
            "val/loss",
            "val/perplexity",
            "kind",
            "vs AR",
            "tokens/s",
            "vs AR",
            "distinct-1",
            "distinct-2",
            "self-BLEU",
        ],
        [
            [
                name,
                f"{val['val/loss']:.4f}",
                f"{val['val/perplexity']:.3f}",
                "exact" if name == "ar" else "bound (exp NELBO)",
                f"{val['val/perplexity'] / ar_ppl:.2f}x",
                f"{speed:,.0f}",
                f"{speed / ar_speed:.2f}x",
                f"{quality['generation/distinct_1']:.3f}",
                f"{quality['generation/distinct_2']:.3f}",
                f"{quality['generation/self_bleu']:.3f}",
            ]
            for name, val, speed, quality in rows
        ]
        + [
            [
                "held-out text",
                *[""] * 6,
                f"{distinct_n(references, 1):.3f}",
                f"{distinct_n(references, 2):.3f}",
                f"{self_bleu(references):.3f}",
            ]
        ],
    )


if __name__ == "__main__":
    main()
