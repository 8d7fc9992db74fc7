"""The Objective seam: what an objective trains besides the model is optimised, clipped,
saved and resumed exactly; objectives import nothing from the training package."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lmpipe.objectives.ce import CrossEntropy

from conftest import build_cpu_run

SRC = Path(__file__).resolve().parents[1] / "src" / "lmpipe"


class HeadedCrossEntropy(CrossEntropy):
    """Cross-entropy plus a small penalty from a head of its own on the model's features
    (as a value or reward head reads them)."""

    name = "headed_cross_entropy"

    def setup(self, ctx) -> None:
        super().setup(ctx)
        torch.manual_seed(0)
        self.head = nn.Linear(ctx.model.config.d_model, 1)

    def modules(self) -> dict[str, nn.Module]:
        return {"head": self.head}

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        context = batch.with_fields(input_ids=batch.input_ids[:, :-1])  # AR rows: block + 1
        scores = self.head(model(context, output="features")).squeeze(-1)
        return loss + 0.1 * (scores - 1.0).pow(2).mean(), metrics


ARGS = [
    "objective._target_=test_objective_seam.HeadedCrossEntropy",
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    "model.block_size=32",
    "trainer.batch_size=4",
    "trainer.max_steps=4",
    "trainer.save_interval=2",
    "trainer.eval_batches=0",
    "data.sources.0.num_records=200",
    "schedule.name=constant",  # the same LRs whatever max_steps says
    "schedule.warmup_steps=0",
]


def test_an_objectives_module_is_trained_saved_and_resumed_exactly(tmp_path, cache_dir):
    full = build_cpu_run(tmp_path / "full", *ARGS, f"cache_dir={cache_dir}")
    head = full.trainer.modules["head"]
    before = head.weight.detach().clone()
    assert any(p is head.weight for p in full.trainer.parameters())
    full.trainer.fit()
    assert not torch.equal(head.weight, before)  # the optimizer stepped it
    saved = load_file(tmp_path / "full" / "checkpoints" / "step_000004" / "objective.safetensors")
    assert torch.equal(saved["head.weight"], head.weight.detach())

    # A run that stopped at step 2 and resumes there ends where the full run did.
    part = build_cpu_run(tmp_path / "part", *ARGS, "trainer.max_steps=2", f"cache_dir={cache_dir}")
    part.trainer.fit()
    resumed = build_cpu_run(tmp_path / "part", *ARGS, "resume=auto", f"cache_dir={cache_dir}")
    assert resumed.trainer.step == 2
    resumed.trainer.fit()
    assert torch.equal(resumed.trainer.modules["head"].weight, head.weight)
    for (name, a), b in zip(
        resumed.trainer.model.state_dict().items(),
        full.trainer.model.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name


def test_objectives_import_nothing_from_training():
    imports = re.compile(r"^\s*(from|import) lmpipe\.training", re.MULTILINE)
    for path in (SRC / "objectives").glob("*.py"):
        assert not imports.search(path.read_text()), path.name
