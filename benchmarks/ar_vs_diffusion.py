"""AR vs masked diffusion (MDLM) on the same data, model size and token budget.

Both runs go through lmpipe's real CLI with one recipe; only ``arch`` differs. The table
shows each run's final held-out ``val/loss`` and ``val/perplexity``: exact for AR, exp of
the NELBO per token (an upper bound on the perplexity) for diffusion, so the two compare.
MDLM reports diffusion at about 1.3x AR's perplexity at small scale on OpenWebText.

    python benchmarks/ar_vs_diffusion.py                     # nanoGPT's CPU shakespeare recipe
    python benchmarks/ar_vs_diffusion.py --steps 5000 model=small hardware=gpu   # on a GPU

Extra ``key=value`` arguments go to both ``lmpipe.train`` runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from lmpipe.tracking.jsonl import read_metrics

from _common import print_table


def final_val(run_dir: Path) -> dict:
    return [m for m in read_metrics(run_dir) if "val/loss" in m][-1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra lmpipe.train overrides for both")
    args = parser.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="ar-vs-diffusion-"))
    rows = []
    for arch in ("ar", "diffusion"):
        cmd = [
            sys.executable,
            "-m",
            "lmpipe.train",
            "+experiment=nanogpt_shakespeare_char",
            f"arch={arch}",
            f"trainer.max_steps={args.steps}",
            f"trainer.eval_interval={max(args.steps // 4, 1)}",
            f"trainer.save_interval={args.steps}",
            f"out_dir={out}",
            f"run_name={arch}",
            *args.overrides,
        ]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        val = final_val(out / arch)
        rows.append((arch, val))
    ar_ppl = rows[0][1]["val/perplexity"]
    print(f"runs in {out}")
    print_table(
        ["arch", "val/loss", "val/perplexity", "kind", "vs AR"],
        [
            [
                arch,
                f"{val['val/loss']:.4f}",
                f"{val['val/perplexity']:.3f}",
                "exact" if arch == "ar" else "bound (exp NELBO)",
                f"{val['val/perplexity'] / ar_ppl:.2f}x",
            ]
            for arch, val in rows
        ],
    )


if __name__ == "__main__":
    main()
