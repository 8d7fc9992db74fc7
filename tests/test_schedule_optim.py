import math

import pytest
import torch
from omegaconf import OmegaConf

from lmpipe import api
from lmpipe.errors import ConfigError
from lmpipe.models import build_lm
from lmpipe.training.optim import build_optimizer as build_adamw
from lmpipe.training.optim import param_groups
from lmpipe.training.schedule import build_schedule as build_from_dict

from conftest import arch_config

# The defaults a run has (conf/train.yaml), which each case changes.
DEFAULTS = api.compose("train")


def build_schedule(changes: dict, lr: float, max_steps: int):
    return build_from_dict({**DEFAULTS.schedule, **changes}, lr, max_steps)


def build_optimizer(model, changes: dict, device):
    return build_adamw(model, {**DEFAULTS.optim, **changes}, device)


def test_cosine_warmup_plan_endpoints():
    s = build_schedule({"name": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1}, 1e-3, 111)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(5e-4)
    assert s(10) == 1e-3
    assert s(60) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert s(110) == pytest.approx(1e-4)
    assert all(s(i) >= s(i + 1) for i in range(10, 110))


def test_midtraining_rewarmup_from_lr_over_10():
    # LR/10 -> LR over 5% of the steps, then cosine LR -> LR/10.
    s = build_schedule(
        {"warmup_ratio": 0.05, "warmup_start_ratio": 0.1, "min_lr_ratio": 0.1}, 2e-4, 1000
    )
    assert s.warmup_steps == 50
    assert s(0) == pytest.approx(2e-5)
    assert s(50) == pytest.approx(2e-4)
    assert s(999) == pytest.approx(2e-5)
    assert "2e-05 -> 0.0002" in s.describe()


def test_wsd_is_flat_then_decays_over_the_tail():
    s = build_schedule(
        {"name": "wsd", "warmup_steps": 10, "decay_ratio": 0.2, "min_lr_ratio": 0.0}, 1.0, 100
    )
    assert s(10) == s(79) == 1.0
    assert 0 < s(90) < 1.0
    assert s(99) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "cfg", [{"warmup_steps": 100}, {"name": "step"}, {"warmup_steps": None, "warmup_ratio": 1.5}]
)
def test_bad_schedules(cfg):
    with pytest.raises(ConfigError):
        build_schedule(cfg, 1e-3, 100)


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = build_lm(
        arch_config("ar"),
        {
            "n_layer": 1,
            "n_head": 2,
            "d_model": 16,
            "block_size": 8,
            "bias": True,
            "pos_emb": "learned",
            "norm": "layernorm",
            "mlp": "gelu",
        },
        11,
    )
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {
        "backbone.blocks.0.attn.qkv.weight",
        "backbone.blocks.0.attn.proj.weight",
        "backbone.blocks.0.mlp.up.weight",
        "backbone.blocks.0.mlp.down.weight",
    }
    total = len(decay["params"]) + len(no_decay["params"])
    assert total == len(list(model.parameters()))  # the tied head is counted once
    optimizer = build_optimizer(model, {"lr": 1e-3, "weight_decay": 0.1}, torch.device("cpu"))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert not math.isnan(optimizer.param_groups[0]["lr"])


def test_bad_optimizer_config():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="optim.name"):
        build_optimizer(model, {"name": "sgd", "lr": 1.0}, torch.device("cpu"))
    with pytest.raises(ConfigError, match="optim.betas"):
        build_optimizer(model, {"lr": 1.0, "betas": [0.9, 1.5]}, torch.device("cpu"))


def test_midtrain_rewarmup_plan_from_the_stage_config():
    """stage=midtrain: LR/10 -> LR over 5% of the steps, then cosine to LR/10 at the end."""
    from omegaconf import OmegaConf

    stage = api.compose("train", ["stage=midtrain"])
    lr = float(stage.optim.lr)
    s = build_from_dict(OmegaConf.to_container(stage.schedule), lr, 200)
    assert lr == 2e-4 and s.warmup_steps == 10
    assert s(0) == pytest.approx(lr / 10, rel=1e-12)
    assert s(10) == pytest.approx(lr, rel=1e-12)
    assert s(199) == pytest.approx(lr / 10, rel=1e-12)
    assert all(s(k) < s(k + 1) for k in range(10)) and all(s(k) >= s(k + 1) for k in range(10, 199))
    assert s.describe() == "warmup 10/200 steps 2e-05 -> 0.0002, then cosine to 2e-05 at step 199"


def _model(n_layer: int = 1, tie_embeddings: bool = True):
    model = {"n_layer": n_layer, "n_head": 2, "d_model": 16, "block_size": 8}
    return build_lm(arch_config("ar"), {**model, "tie_embeddings": tie_embeddings}, 11)


def _muon_run(model):
    cfg = api.compose("train", ["optim=muon"]).optim
    return build_adamw(model, OmegaConf.to_container(cfg), torch.device("cpu"))


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = _model(n_layer=2, tie_embeddings=False)
    muon, adamw = _muon_run(model).optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    on_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert on_muon == {
        f"backbone.blocks.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")
    }
    assert on_muon.isdisjoint(on_adamw) and on_muon | on_adamw == set(names.values())
    assert "backbone.lm_head.weight" in on_adamw  # the head and embeddings stay on AdamW


@pytest.mark.parametrize("stepped", ["muon", "adamw"])
def test_a_step_of_one_part_changes_only_its_parameters(stepped):
    model = _model()
    chain = _muon_run(model)
    muon, adamw = chain.optimizers
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    for part in chain.optimizers:  # the other part's LR is 0: its parameters must not move
        for group in part.param_groups:
            group["lr"] = group["lr"] if part is dict(muon=muon, adamw=adamw)[stepped] else 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    chain.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    part = dict(muon=muon, adamw=adamw)[stepped]
    names = {id(p): n for n, p in model.named_parameters()}
    assert moved == {names[id(p)] for g in part.param_groups for p in g["params"]}


def test_the_schedule_scales_muons_lr_with_adamws():
    model = _model()
    muon, adamw = _muon_run(model).optimizers
    defaults = api.compose("train", ["optim=muon"]).optim
    assert muon.param_groups[0]["lr_scale"] == pytest.approx(defaults.muon.lr / defaults.lr)
    assert "lr_scale" not in adamw.param_groups[0]
