import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lmpipe.batch import Batch
from lmpipe.errors import ConfigError
from lmpipe.models import build_from_config_dict, build_lm
from lmpipe.models.ar import ARLM
from lmpipe.models.diffusion import DiffusionLM

from conftest import stub_logits

VOCAB = 37
SPECIAL = {"pad": 0, "eos": 2, "mask": 3}
ARCH = {"_target_": "lmpipe.models.diffusion.DiffusionLM", "name": "diffusion"}
CONF = Path(__file__).resolve().parents[1] / "conf" / "arch" / "diffusion.yaml"


def tiny(vocab=VOCAB, seed=0, arch=ARCH, **changes):
    torch.manual_seed(seed)
    shape = {"n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 24, **changes}
    return build_lm(arch, shape, vocab, SPECIAL)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_batch(rows=4, length=16, vocab=VOCAB):
    ids = torch.randint(4, vocab, (rows, length))  # no special tokens in the data
    return Batch(ids, torch.ones(rows, length))


def perfect_backbone(clean_ids, favourite=None):
    """A stand-in backbone whose logits put a huge margin on the clean token (and, if
    ``favourite`` is given, an even larger one on that token id)."""

    def backbone(ids, *, causal, segment_ids=None, left_pad=None):
        assert not causal
        logits = 50.0 * F.one_hot(clean_ids[:, : ids.shape[1]], VOCAB).float()
        if favourite is not None:
            logits[..., favourite] = 100.0
        return logits

    return backbone


def test_masking_rate_matches_t_at_fixed_t():
    model = tiny()
    batch = random_batch(rows=4, length=5000)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    noisy, masked, t_out = model.noise(batch, gen(0), t=t)
    assert torch.equal(t_out, t)
    rates = masked.float().mean(dim=1)
    torch.testing.assert_close(rates, t, atol=0.03, rtol=0)
    assert noisy[masked].eq(SPECIAL["mask"]).all()
    assert torch.equal(noisy[~masked], batch.input_ids[~masked])


def test_tokens_outside_the_loss_mask_are_never_noised_or_scored():
    model = tiny()
    ids = torch.randint(4, VOCAB, (8, 20))
    loss_mask = torch.zeros(8, 20)
    loss_mask[:, 6:15] = 1  # a prompt before, padding after
    batch = Batch(ids, loss_mask)
    _, masked, _ = model.noise(batch, gen(0), t=torch.ones(8))
    assert torch.equal(masked, loss_mask > 0)  # t=1: every loss token, nothing else
    for seed in range(5):
        _, masked, _ = model.noise(batch, gen(seed))
        assert not masked[loss_mask == 0].any()
    scores = model(batch, generator=gen(0))
    assert torch.equal(scores.target_mask, loss_mask > 0)
    assert scores.nll[loss_mask == 0].eq(0).all()
    assert not scores.scored_mask[loss_mask == 0].any()


def test_loss_is_cross_entropy_at_masked_positions_weighted_by_one_over_t():
    model = tiny().eval()
    batch = random_batch(rows=6)
    noisy, masked, t = model.noise(batch, gen(1))
    assert masked.any() and (~masked).any()
    logits = model.backbone(noisy, causal=False)
    logits[..., SPECIAL["mask"]] = float("-inf")
    ce = F.cross_entropy(logits.transpose(1, 2), batch.input_ids, reduction="none")
    expected = torch.where(masked, ce / t[:, None], torch.zeros_like(ce))
    scores = model(batch, generator=gen(1))
    torch.testing.assert_close(scores.nll, expected)
    assert torch.equal(scores.scored_mask, masked)
    correct = (logits.argmax(-1) == batch.input_ids) & masked
    assert torch.equal(scores.correct, correct)


def test_perfect_denoiser_has_zero_loss(monkeypatch):
    model = tiny()
    batch = random_batch()
    stub_logits(model, monkeypatch, perfect_backbone(batch.input_ids))
    scores = model(batch, generator=gen(0))
    assert scores.scored_mask.any()
    assert scores.nll.max().item() < 1e-6
    assert torch.equal(scores.correct, scores.scored_mask)


def test_mask_token_is_never_predicted(monkeypatch):
    model = tiny()
    batch = random_batch()
    stub_logits(model, monkeypatch, perfect_backbone(batch.input_ids, favourite=SPECIAL["mask"]))
    scores = model(batch, generator=gen(0))
    assert torch.isfinite(scores.nll).all() and scores.nll.max().item() < 1e-6
    assert torch.equal(scores.correct, scores.scored_mask)
    out = model.generate(batch.input_ids[:, :4], 8, sampler="ancestral", generator=gen(0))
    assert torch.equal(out[:, 4:], batch.input_ids[:, 4:12])


def test_antithetic_t_has_one_value_per_stratum():
    model = tiny()
    rows = 16
    batch = random_batch(rows=rows, length=4)
    for seed in range(10):
        t = model.noise(batch, gen(seed))[2]
        assert t.min() >= model.eps and t.max() <= 1
        strata = ((t - model.eps) / (1 - model.eps) * rows).floor().long().sort().values
        assert torch.equal(strata, torch.arange(rows))


def test_noise_is_shared_by_alike_seeded_generators():
    model, other = tiny(seed=0), tiny(seed=1)  # different weights, same noise
    batch = random_batch(rows=8)
    a, b = model(batch, generator=gen(7)), model(batch, generator=gen(7))
    torch.testing.assert_close(a.nll, b.nll, rtol=0, atol=0)
    assert torch.equal(other(batch, generator=gen(7)).scored_mask, a.scored_mask)
    c = model(batch, generator=gen(8))
    assert not torch.equal(c.scored_mask, a.scored_mask)
    assert not torch.allclose(c.nll, a.nll)


@pytest.mark.parametrize("sampler", ["confidence", "ancestral"])
def test_generation_fills_every_mask_and_is_reproducible(sampler):
    model = tiny().eval()
    prompt = torch.randint(4, VOCAB, (3, 5))
    opts = {"sampler": sampler, "steps": 6, "block_length": 4, "temperature": 1.0}
    out = model.generate(prompt, 11, generator=gen(0), **opts)
    assert out.shape == (3, 16)
    assert not out.eq(SPECIAL["mask"]).any()
    assert torch.equal(out[:, :5], prompt)
    assert torch.equal(model.generate(prompt, 11, generator=gen(0), **opts), out)
    assert not torch.equal(model.generate(prompt, 11, generator=gen(1), **opts), out)
    greedy = model.generate(prompt, 11, sampler=sampler, steps=3)
    assert greedy.shape == (3, 16) and not greedy.eq(SPECIAL["mask"]).any()


def test_ancestral_sampler_evaluates_the_model_only_when_tokens_change(monkeypatch):
    model = tiny().eval()
    calls = []
    forward = model.backbone.hidden_states
    monkeypatch.setattr(
        model.backbone, "hidden_states", lambda *a, **k: calls.append(1) or forward(*a, **k)
    )
    out = model.generate(torch.randint(4, VOCAB, (1, 3)), 4, sampler="ancestral", steps=200)
    assert not out.eq(SPECIAL["mask"]).any()
    # Only steps that reveal something evaluate the model: at most one per new token.
    assert len(calls) <= 4


def test_confidence_sampler_fills_blocks_left_to_right(monkeypatch):
    model = tiny().eval()
    seen = []
    forward = model.backbone.hidden_states
    monkeypatch.setattr(
        model.backbone,
        "hidden_states",
        lambda ids, **k: seen.append(ids.clone()) or forward(ids, **k),
    )
    model.generate(torch.randint(4, VOCAB, (2, 3)), 6, block_length=2, steps=6)
    assert len(seen) == 6  # 3 blocks x 2 steps, one token committed per step
    for step, ids in enumerate(seen):
        masked = ids[:, 3:] == SPECIAL["mask"]
        block = step // 2
        assert not masked[:, : 2 * block].any()  # earlier blocks are done
        assert masked[:, 2 * block + 2 :].all()  # later blocks not started
        assert masked[:, 2 * block : 2 * block + 2].sum(dim=1).eq(2 - step % 2).all()


def test_generation_after_eos_is_eos():
    model = tiny().eval()
    prompt = torch.randint(4, VOCAB, (2, 4))
    plain = model.generate(prompt, 10)
    eos = int(plain[0, 6])
    out = model.generate(prompt, 10, eos_id=eos)
    first = (plain[0, 4:] == eos).nonzero()[0].item() + 4
    assert torch.equal(out[0, :first], plain[0, :first])
    assert out[0, first:].eq(eos).all()


def test_generation_must_fit_in_the_block():
    model = tiny().eval()
    with pytest.raises(ValueError, match="block_size 24"):
        model.generate(torch.zeros(1, 20, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="sampler"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), 4, sampler="beam")


def test_rebuild_from_config_dict_and_arch_yaml():
    arch = {**OmegaConf.to_container(OmegaConf.load(CONF)), "eps": 0.01, "antithetic": False}
    model = tiny(arch=arch)
    assert isinstance(model, DiffusionLM)
    rebuilt = build_from_config_dict(model.config_dict())
    assert (rebuilt.eps, rebuilt.antithetic, rebuilt.special_ids) == (0.01, False, SPECIAL)
    rebuilt.load_state_dict(model.state_dict())
    batch = random_batch()
    torch.testing.assert_close(
        rebuilt.eval()(batch, generator=gen(3)).nll, model.eval()(batch, generator=gen(3)).nll
    )
    assert DiffusionLM.pads_with_eos and not ARLM.pads_with_eos
    assert not DiffusionLM.exact_likelihood


def test_a_tokenizer_without_mask_or_a_bad_eps_fails_at_build_time():
    with pytest.raises(ConfigError, match="'mask'"):
        build_lm(ARCH, {"n_layer": 1, "n_head": 2, "d_model": 32}, VOCAB, {"eos": 2})
    with pytest.raises(ConfigError, match="eps"):
        tiny(arch={**ARCH, "eps": 0.0})


def test_training_reduces_the_loss_on_a_learnable_pattern():
    """Rows count up from a random start: one clean token determines the whole row, so
    the NELBO per token can fall far below its initial ~log(V)."""
    vocab, rows, length = 20, 32, 16
    model = tiny(vocab=vocab, block_size=length)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(0)

    def batch():
        start = torch.randint(4, vocab, (rows, 1), generator=data)
        ids = 4 + (start - 4 + torch.arange(length)) % (vocab - 4)
        return Batch(ids, torch.ones(rows, length))

    def loss(b, generator=None):
        scores = model(b, generator=generator)
        return scores.nll.sum() / scores.target_mask.sum()

    held_out = batch()
    with torch.no_grad():
        before = loss(held_out, gen(0)).item()
    for _ in range(150):
        opt.zero_grad()
        loss(batch()).backward()
        opt.step()
    with torch.no_grad():
        after = loss(held_out, gen(0)).item()
    assert before > 0.8 * math.log(vocab)
    assert after < 0.4 * before, (before, after)


def test_an_objective_refuses_an_arch_it_does_not_support():
    from lmpipe.objectives.base import Objective

    class AROnly(Objective):
        name = "ar_only"
        supported_archs = frozenset({"ar"})

    AROnly().check_arch(ARLM)
    with pytest.raises(ConfigError, match="'ar_only' does not support arch=diffusion"):
        AROnly().check_arch(DiffusionLM)
