import json

import pytest
import torch

from lmpipe.batch import Batch
from lmpipe.data.tokenizer import Tokenizer
from lmpipe.errors import CheckpointError
from lmpipe.models import build_lm
from lmpipe.training import checkpoint as ckpt

from conftest import arch_config


def make_model(seed=0):
    torch.manual_seed(seed)
    return build_lm(
        arch_config("ar"),
        {"n_layer": 1, "n_head": 2, "d_model": 16, "block_size": 8},
        19,
    )


def save(run_dir, step, model=None):
    model = model or make_model(step)
    optimizer = torch.optim.AdamW(model.parameters())
    model(Batch(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5))).nll.sum().backward()
    optimizer.step()
    path = ckpt.checkpoint_dir(run_dir, step)
    ckpt.save_checkpoint(
        path,
        weights=model.state_dict(),
        trainer_state={"step": step, "optimizer": optimizer.state_dict()},
        tokenizer=Tokenizer.build_char(["abc"]),
        meta={"global_step": step, "model_config": model.config_dict()},
    )
    return path


def test_round_trip_weights_state_and_tokenizer(tmp_path):
    model = make_model(3)
    path = save(tmp_path, 100, model)
    assert sorted(p.name for p in path.iterdir()) == [
        "meta.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "trainer_state.pt",
    ]
    loaded = ckpt.load_checkpoint(path)
    rebuilt = loaded.build_model()
    for (name, a), (_, b) in zip(
        model.state_dict().items(), rebuilt.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert rebuilt.backbone.lm_head.weight is rebuilt.backbone.tok_emb.weight
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    assert state["step"] == 100 and state["optimizer"]["state"]
    assert loaded.tokenizer().hash == Tokenizer.build_char(["abc"]).hash
    assert list((tmp_path / "checkpoints").iterdir()) == [path]  # no temporary left


def test_truncated_or_altered_files_are_detected(tmp_path):
    path = save(tmp_path, 1)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        ckpt.load_checkpoint(path)
    path = save(tmp_path, 2)
    data = bytearray((path / "trainer_state.pt").read_bytes())
    data[-20] ^= 0xFF
    (path / "trainer_state.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        ckpt.load_checkpoint(path)


def test_latest_checkpoint_falls_back_past_broken_ones(tmp_path):
    save(tmp_path, 10)
    newest = save(tmp_path, 20)
    (newest / "tokenizer.json").unlink()
    messages = []
    found = ckpt.latest_checkpoint(tmp_path, log=messages.append)
    assert found.step == 10
    assert "step_000020" in messages[0] and "tokenizer.json is missing" in messages[0]
    (ckpt.checkpoint_dir(tmp_path, 10) / "meta.json").write_text("{")
    with pytest.raises(CheckpointError, match="none of its 2 checkpoints"):
        ckpt.latest_checkpoint(tmp_path, log=messages.append)


def test_failed_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(OSError):
        save(tmp_path, 2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]


def test_resolve_run_dir_and_reject_non_checkpoints(tmp_path):
    save(tmp_path, 5)
    save(tmp_path, 7)
    assert ckpt.resolve_checkpoint(tmp_path).step == 7
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "nope")


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step)
    ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    assert (
        json.loads((tmp_path / "checkpoints/step_000004/meta.json").read_text())["global_step"] == 4
    )
