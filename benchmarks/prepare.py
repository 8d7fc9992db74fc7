"""Data preparation: tokenization throughput and peak memory of ``lmpipe.prepare`` against
the plain HF ``datasets`` script users write, with the same byte-level BPE tokenizer.

    python benchmarks/prepare.py                      # ~20 MB corpus, 3 rounds
    python benchmarks/prepare.py --mb 50 --rounds 5

The corpus is tiny shakespeare's paragraphs (lmpipe's built-in stories without the shared
data), repeated to ``--mb`` megabytes, one ``{"text": paragraph}`` JSON line each. A BPE
tokenizer (vocab 2048) is trained once on one copy; then each side, given that tokenizer,
turns the corpus into a flat token file:

- baseline: ``load_dataset("json")`` -> ``.map(tokenizer, batched=True)`` with one EOS
  per record -> ``np.concatenate(ds["ids"])`` -> ``.bin``;
- baseline-arrow: the same, but the ids column flattened in Arrow (no Python lists), the
  fastest way we know to write that script;
- lmpipe: ``prepare(cfg, tokenizer=..., force=True)`` (no shuffle, no val split), which
  also writes mixed_train.jsonl, the document index and the manifest.

Every run is a fresh subprocess (its own peak RSS, HF cache in a fresh temp folder) and
the sides rotate, so machine noise hits all alike. All token files must be identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SIDES = ("baseline", "baseline-arrow", "lmpipe")
VOCAB_SIZE = 2048


def paragraphs(data_dir: Path) -> tuple[list[str], str]:
    path = data_dir / "tinyshakespeare" / "input.txt"
    if path.is_file():
        return [p for p in path.read_text().split("\n\n") if p.strip()], str(path)
    from lmpipe.data.builtin import stories

    return [r["text"] for r in stories(5000, 0)], "lmpipe built-in stories"


def write_corpus(path: Path, lines: list[str], megabytes: float) -> int:
    """Repeat JSON ``lines`` until the file has ``megabytes``; returns the record count."""
    size, records = 0, 0
    with path.open("w", encoding="utf-8") as fh:
        while size < megabytes * 1e6:
            line = lines[records % len(lines)]
            fh.write(line)
            size += len(line.encode())
            records += 1
    return records


def lmpipe_cfg(corpus: Path) -> dict:
    return {
        "name": "bench",
        "format": "text",
        "sources": [{"name": "corpus", "path": str(corpus), "mix_ratio": 1.0}],
        "split": {"by": "record", "val_fraction": 0.0},
        "shuffle": False,
        "tokenizer": {"kind": "bpe", "vocab_size": VOCAB_SIZE},
    }


# --- one side, in a child process: setup, then the timed run -----------------------------
Run = Callable[[], tuple[Path, int]]  # -> (token file, number of tokens)


def lmpipe_side(corpus: Path, tokenizer_dir: Path, work: Path) -> Run:
    from lmpipe.data.prepare import PreparedData, prepare

    tokenizer = PreparedData.open(tokenizer_dir).tokenizer

    def run():
        data = prepare(lmpipe_cfg(corpus), work, tokenizer=tokenizer, force=True, progress=False)
        return data.directory / "tokens_train.bin", data.manifest["splits"]["train"]["tokens"]

    return run


def baseline_side(corpus: Path, tokenizer_dir: Path, work: Path, arrow: bool = False) -> Run:
    """``arrow``: flatten the ids column in Arrow instead of ``np.concatenate(ds["ids"])``,
    which turns every row into a Python list first (most of the plain baseline's time)."""
    import datasets
    import numpy as np
    import pyarrow.compute as pc
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    eos = tokenizer.convert_tokens_to_ids("<|eos|>")  # lmpipe ends every document with it

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [doc + [eos] for doc in ids]}

    def run():
        ds = datasets.load_dataset(
            "json", data_files=str(corpus), split="train", cache_dir=str(work / "hf")
        )
        ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
        if arrow:
            ids = pc.list_flatten(ds.with_format("arrow")["ids"]).to_numpy()
        else:
            ids = np.concatenate(ds["ids"])
        ids.astype(np.uint16).tofile(work / "tokens.bin")
        return work / "tokens.bin", len(ids)

    return run


def _peak_rss_mb() -> float:
    """This process's peak RSS. Linux's ``ru_maxrss`` survives exec, so a child started by
    a big parent would report the parent's peak; ``VmHWM`` belongs to this process alone."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(side: str, corpus: Path, tokenizer_dir: Path, work: Path) -> None:
    """Run one side and print its measurements as a JSON line."""
    if side == "lmpipe":
        run = lmpipe_side(corpus, tokenizer_dir, work)
    else:
        run = baseline_side(corpus, tokenizer_dir, work, arrow=side == "baseline-arrow")
    start_rss = _peak_rss_mb()
    start = time.perf_counter()
    tokens_file, tokens = run()
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "tokens": tokens,
        "peak_rss_mb": _peak_rss_mb(),
        "start_rss_mb": start_rss,
        "sha256": hashlib.sha256(tokens_file.read_bytes()).hexdigest(),
    }
    print(json.dumps(result))


# --- driver ----------------------------------------------------------------------------
def run_side(side: str, corpus: Path, tokenizer_dir: Path, tmp: Path) -> dict:
    work = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{side}-"))
    cmd = [sys.executable, __file__, "--child", side, "--corpus", str(corpus)]
    cmd += ["--tokenizer-dir", str(tokenizer_dir), "--work", str(work)]
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{proc.stdout}\n{proc.stderr}")
    shutil.rmtree(work)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=20.0, help="corpus size in megabytes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.corpus, args.tokenizer_dir, args.work)
        return

    # Imported here, not at the top: _common imports torch, ~200 MB in each child's RSS.
    from lmpipe.data.prepare import prepare

    from _common import DATA_DIR, print_table

    texts, source = paragraphs(DATA_DIR)
    lines = [json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts]
    with tempfile.TemporaryDirectory(prefix="lmpipe-bench-prepare-") as tmp:
        tmp = Path(tmp)
        one_copy = tmp / "one_copy.jsonl"
        one_copy.write_text("".join(lines), encoding="utf-8")
        trained = prepare(lmpipe_cfg(one_copy), tmp / "tokenizer", progress=False)
        corpus = tmp / "corpus.jsonl"
        records = write_corpus(corpus, lines, args.mb)
        megabytes = corpus.stat().st_size / 1e6

        results: dict[str, list[dict]] = {side: [] for side in SIDES}
        for round_ in range(args.rounds):
            shift = round_ % len(SIDES)
            for side in SIDES[shift:] + SIDES[:shift]:
                results[side].append(run_side(side, corpus, trained.directory, tmp))
        runs = [r for side in SIDES for r in results[side]]
        assert len({r["tokens"] for r in runs}) == 1, f"token counts differ: {results}"
        assert len({r["sha256"] for r in runs}) == 1, "the sides wrote different token streams"

    n_tokens = runs[0]["tokens"]
    print(
        f"corpus: {source}, {records:,} records, {megabytes:.1f} MB JSONL, "
        f"{n_tokens:,} tokens (BPE vocab {VOCAB_SIZE}); {args.rounds} rounds, one fresh "
        "process per run; medians; identical token files"
    )
    rows = []
    for side in SIDES:
        seconds = statistics.median(r["seconds"] for r in results[side])
        rows.append(
            [
                side,
                f"{seconds:.2f}",
                f"{megabytes / seconds:.2f}",
                f"{n_tokens / seconds:,.0f}",
                f"{statistics.median(r['peak_rss_mb'] for r in results[side]):.0f}",
                f"{statistics.median(r['start_rss_mb'] for r in results[side]):.0f}",
            ]
        )
    print_table(["side", "s", "MB/s", "tokens/s", "peak RSS MB", "RSS before run MB"], rows)
    print()
    for baseline in SIDES[:-1]:
        pairs = list(zip(results[baseline], results["lmpipe"], strict=True))
        speed = [base["seconds"] / lm["seconds"] for base, lm in pairs]
        memory = [lm["peak_rss_mb"] / base["peak_rss_mb"] for base, lm in pairs]
        print(
            f"lmpipe / {baseline}: throughput {statistics.median(speed):.2f}x "
            f"(range {min(speed):.2f}-{max(speed):.2f}; target >= 1x), "
            f"peak RSS {statistics.median(memory):.2f}x "
            f"(range {min(memory):.2f}-{max(memory):.2f}; target <= 0.5x)"
        )


if __name__ == "__main__":
    main()
