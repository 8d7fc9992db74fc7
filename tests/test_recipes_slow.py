"""Long checks (minutes): run with ``make test-slow``."""

from __future__ import annotations

import pytest

from conftest import read_metrics


@pytest.mark.slow
def test_nanogpt_shakespeare_char_recipe_reaches_its_val_loss(lmpipe, tmp_path, shared_data):
    """nanoGPT's CPU recipe (4L/4H/128, block 64, batch 12, lr 1e-3 -> 1e-4, 100 warmup,
    2,000 iterations, beta2 0.99, wd 0.1, dropout 0, 90/10 split by position) on tiny
    shakespeare characters. Measured: val loss 1.888 (seed 1337); nanoGPT reports ~1.88."""
    out = tmp_path / "runs"
    lmpipe(
        "train",
        "+experiment=nanogpt_shakespeare_char",
        f"out_dir={out}",
        "run_name=nano",
        timeout=1200,
    )
    val = [m for m in read_metrics(out / "nano") if "val/loss" in m]
    assert val[-1]["step"] == 2000
    assert val[-1]["val/loss"] <= 1.90
