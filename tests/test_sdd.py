"""Sparse distribution diffusion: no leak, slot-order invariance, an honest bound, k=1 is
masked diffusion, the k-curriculum, samplers that commit, IGNORE padding."""

import copy
import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lmpipe.batch import Batch
from lmpipe.data.samplers import collate_episodes
from lmpipe.errors import ConfigError
from lmpipe.models import build_from_config_dict, build_lm
from lmpipe.models.ar import ARLM
from lmpipe.models.diffusion import DiffusionLM
from lmpipe.models.sdd import SDDLM, Proposal
from lmpipe.objectives.dpo import DPO
from test_samplers import shards

from conftest import stub_logits

VOCAB = 37
SPECIAL = {"pad": 0, "ignore": 1, "eos": 2, "mask": 3}
MASK, IGNORE, EOS = SPECIAL["mask"], SPECIAL["ignore"], SPECIAL["eos"]
SHAPE = {"n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 24}
CONF = Path(__file__).resolve().parents[1] / "conf" / "arch" / "sdd.yaml"


def sdd(k_schedule=((0, 4),), vocab=VOCAB, seed=0, **options) -> SDDLM:
    torch.manual_seed(seed)
    arch = {"_target_": "lmpipe.models.sdd.SDDLM", "name": "sdd", "k_schedule": k_schedule}
    return build_lm({**arch, **options}, SHAPE, vocab, SPECIAL)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_batch(rows=4, length=16, vocab=VOCAB, seed=0):
    ids = torch.randint(4, vocab, (rows, length), generator=gen(seed))
    return Batch(ids, torch.ones(rows, length))


def forward_logits(model, batch, generator):
    """The logits ``model(batch)`` scores its NELBO with (the second pass)."""
    seen = []
    nelbo = model.nelbo
    model.nelbo = lambda logits, *a: seen.append(logits) or nelbo(logits, *a)
    try:
        model(batch, generator=generator)
    finally:
        del model.nelbo
    return seen[0]


# --- 1. no leak -------------------------------------------------------------------------
def test_candidates_and_logits_see_the_clean_sequence_only_through_the_corrupted_one():
    model = sdd().eval()
    a = random_batch(rows=6)
    noisy, masked, _ = model.noise(a, gen(5))
    assert masked.any() and (~masked).any()
    # Another clean sequence, different exactly where a is masked.
    other = torch.where(masked, 4 + (a.input_ids - 4 + 1) % (VOCAB - 4), a.input_ids)
    b = Batch(other, a.loss_mask)
    assert not torch.equal(a.input_ids, b.input_ids)
    noisy_b, masked_b, _ = model.noise(b, gen(5))
    assert torch.equal(noisy, noisy_b) and torch.equal(masked, masked_b)

    proposals = [model.propose(model.logits(n), k=4) for n in (noisy, noisy_b)]
    assert torch.equal(proposals[0].ids, proposals[1].ids)
    assert torch.equal(proposals[0].probs, proposals[1].probs)
    logits_a, logits_b = forward_logits(model, a, gen(5)), forward_logits(model, b, gen(5))
    assert torch.equal(logits_a, logits_b)
    # The scores differ only because the targets do.
    assert not torch.equal(model(a, generator=gen(5)).nll, model(b, generator=gen(5)).nll)


def test_slot_order_does_not_change_the_logits():
    model = sdd().eval()
    batch = random_batch()
    noisy, _, _ = model.noise(batch, gen(2))
    proposal = model.propose(model.logits(noisy), k=4)
    order = torch.tensor([2, 0, 1])
    shuffled = Proposal(proposal.ids[..., order], proposal.probs[..., order])
    assert not torch.equal(shuffled.ids, proposal.ids)
    torch.testing.assert_close(
        model.logits(noisy, proposal=shuffled), model.logits(noisy, proposal=proposal)
    )


def test_inputs_are_clean_embeddings_or_weighted_candidate_mixtures():
    model = sdd()
    ids = torch.tensor([[5, MASK, 7, MASK]])
    proposal = Proposal(
        ids=torch.tensor([[[9, 10], [11, 12], [13, 14], [15, 16]]]),
        probs=torch.tensor([[[0.5, 0.2], [0.6, 0.3], [0.7, 0.1], [0.2, 0.1]]]),
    )
    table = model.backbone.tok_emb.weight
    expected = torch.stack(
        [
            table[5],
            0.1 * table[MASK] + 0.6 * table[11] + 0.3 * table[12],
            table[7],
            0.7 * table[MASK] + 0.2 * table[15] + 0.1 * table[16],
        ]
    )[None]
    embeds = model.embed(ids, proposal)
    torch.testing.assert_close(embeds, expected)
    assert torch.equal(embeds[0, [0, 2]], table[[5, 7]])  # exactly, not approximately


# --- 2. the bound is honest -------------------------------------------------------------
class LeakySDD(SDDLM):
    """The prototype's flaw, for contrast: the clean token is a candidate."""

    def propose(self, logits, k):
        proposal = super().propose(logits, k)
        proposal.ids[..., 0] = self.clean
        proposal.probs[..., 0] = 0.5
        return proposal

    def forward(self, batch, *, generator=None):
        self.clean = batch.input_ids
        return super().forward(batch, generator=generator)


def heldout_nelbo_after_training_on_uniform_tokens(cls) -> float:
    torch.manual_seed(0)
    arch = {"_target_": f"{cls.__module__}.{cls.__qualname__}", "k_schedule": [[0, 4]]}
    model = build_lm(arch, {**SHAPE, "block_size": 16}, 20, SPECIAL)
    data = torch.Generator().manual_seed(0)

    def batch(rows=32):  # i.i.d. uniform over the 16 ordinary tokens
        return Batch(torch.randint(4, 20, (rows, 16), generator=data), torch.ones(rows, 16))

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        scores = model(batch())
        (scores.nll.sum() / scores.target_mask.sum()).backward()
        opt.step()
    model.eval()
    held_out = batch(rows=256)
    with torch.no_grad():
        draws = [
            model(held_out, generator=gen(d)).nll.sum() / held_out.loss_mask.sum() for d in range(8)
        ]
    return float(torch.stack(draws).mean())


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bound_on_uniform_random_tokens_stays_at_log_v(one_thread):
    """Nothing is learnable, so an honest bound cannot go below the entropy log 16 = 2.77;
    a model that sees the clean token among its candidates goes far below (measured:
    honest 2.84, leaky 0.03)."""
    honest = heldout_nelbo_after_training_on_uniform_tokens(SDDLM)
    assert honest >= math.log(16) - 0.03, honest
    leaky = heldout_nelbo_after_training_on_uniform_tokens(LeakySDD)
    assert leaky < math.log(16) - 0.5, leaky


# --- 3. k=1 is masked diffusion ---------------------------------------------------------
def test_k1_scores_exactly_like_masked_diffusion():
    model = sdd(k_schedule=[[0, 1], [5, 4]])
    torch.manual_seed(1)
    diffusion = build_lm({"_target_": "lmpipe.models.diffusion.DiffusionLM"}, SHAPE, VOCAB, SPECIAL)
    diffusion.backbone.load_state_dict(model.backbone.state_dict())
    batch = random_batch(rows=8)
    for training in (True, False):
        model.train(training), diffusion.train(training)
        ours = model.token_nll(batch, generator=gen(3))
        theirs = diffusion.token_nll(batch, generator=gen(3))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert ours.abs().sum() > 0
    for _ in range(6):  # past step 5 of the curriculum: k=4, no longer plain diffusion
        model.on_train_step()
    assert not torch.allclose(model.train().token_nll(batch, generator=gen(3)), ours)


# --- the k-curriculum -------------------------------------------------------------------
def test_curriculum_follows_the_model_s_own_steps_and_travels_with_its_weights():
    model = sdd(k_schedule=[[0, 1], [2, 2], [4, 8]])
    assert model.eval().current_k() == 1  # nothing trained yet: the first k
    model.train()
    ks = [model.on_train_step()["k"] for _ in range(6)]
    assert ks == [1, 1, 2, 2, 8, 8]
    assert model.eval().current_k() == 8  # evaluation: the k of the last trained step
    rebuilt = build_from_config_dict(model.config_dict())
    assert rebuilt.trained_steps == 0
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.trained_steps == 6 and rebuilt.on_train_step() == {"k": 8}
    fixed = build_from_config_dict(
        {
            **model.config_dict(),
            "arch_options": {**model.config_dict()["arch_options"], "eval_k": 2},
        }
    )
    fixed.load_state_dict(model.state_dict())
    assert fixed.eval().current_k() == 2 and fixed.train().current_k() == 8
    assert model.flops_per_token(16) == 2 * ARLM.flops_per_token(model, 16)


def test_arch_yaml_builds_and_round_trips():
    arch = OmegaConf.to_container(OmegaConf.load(CONF))
    model = build_lm(arch, SHAPE, VOCAB, SPECIAL)
    assert isinstance(model, SDDLM) and not model.exact_likelihood
    assert [k for _, k in model.k_schedule] == [1, 2, 4, 8]
    rebuilt = build_from_config_dict(model.config_dict())
    assert rebuilt.arch_options() == model.arch_options()


@pytest.mark.parametrize(
    ("options", "special", "message"),
    [
        ({"k_schedule": [[0, 0]]}, SPECIAL, "k=0 must be an integer >= 1"),
        ({"k_schedule": [[0, 1], [100, 2], [100, 4]]}, SPECIAL, "the steps must increase"),
        ({"k_schedule": [[0, 2], [50, 1], [20, 4]]}, SPECIAL, "the steps must increase"),
        ({"k_schedule": [[10, 2]]}, SPECIAL, "must start at step 0"),
        ({"k_schedule": [0, 2]}, SPECIAL, "list of [step, k] integer pairs"),
        ({"k_schedule": [[0, 40]]}, SPECIAL, "smaller than the vocabulary (37)"),
        ({"eval_k": 0}, SPECIAL, "arch.eval_k: k=0"),
        ({}, {"pad": 0, "eos": 2}, "needs the tokenizer's 'mask', 'ignore' special token(s)"),
        ({}, {"pad": 0, "eos": 2, "mask": 3}, "needs the tokenizer's 'ignore' special token"),
    ],
)
def test_bad_options_fail_at_build_time_in_one_line(options, special, message):
    arch = {"_target_": "lmpipe.models.sdd.SDDLM", "name": "sdd", **options}
    with pytest.raises(ConfigError) as info:
        build_lm(arch, SHAPE, VOCAB, special)
    assert message in str(info.value) and "\n" not in str(info.value)


# --- DPO: policy and reference compute the same estimate -------------------------------
def test_dpo_policy_and_a_frozen_reference_in_eval_mode_agree_exactly():
    policy = sdd()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    dpo = DPO(
        beta=0.1, loss_type="sigmoid", label_smoothing=0.0, precompute_ref=False, mc_samples=2
    )
    dpo.reference = reference
    ids = torch.randint(4, VOCAB, (6, 12), generator=gen(0))
    mask = torch.zeros(6, 12)
    mask[:, 6:] = 1
    torch.manual_seed(3)
    loss, metrics = dpo.loss(policy.train(), Batch(ids, mask, rows_per_example=2))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert float(metrics["rewards/margin"]) == 0.0
    loss.backward()  # both passes learn
    assert policy.backbone.tok_emb.weight.grad.abs().sum() > 0


def test_the_first_pass_is_trained_without_changing_the_loss_value():
    model = sdd()
    batch = random_batch(rows=8)
    with torch.no_grad():
        value = model(batch, generator=gen(4)).nll
    scores = model(batch, generator=gen(4))
    torch.testing.assert_close(scores.nll, value, rtol=0, atol=0)
    # The gradient is that of both passes' NELBOs.
    scores.nll.sum().backward()
    both = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    noisy, masked, t = model.noise(batch, gen(4))
    first = model.logits(noisy)
    second = model.logits(noisy, proposal=model.propose(first, 4))
    (
        model.nelbo(first, batch, masked, t).nll + model.nelbo(second, batch, masked, t).nll
    ).sum().backward()
    for expected, got in zip((p.grad for p in model.parameters()), both, strict=True):
        torch.testing.assert_close(got, expected)


# --- 4. samplers ------------------------------------------------------------------------
def stub_backbone(favourites, seen=None, ignore_from=None):
    """Logits with equal mass on the ``favourites`` tokens (and, from position
    ``ignore_from`` on, all of it on IGNORE); records every input it is given."""

    def backbone(ids, *, causal, segment_ids=None, left_pad=None, embeds=None):
        assert not causal
        if seen is not None:
            seen.append(ids.clone())
        logits = torch.full((*ids.shape, VOCAB), -30.0)
        logits[..., favourites] = 0.0
        if ignore_from is not None:
            logits[:, ignore_from:, IGNORE] = 30.0
        return logits

    return backbone


@pytest.mark.parametrize("sampler", ["ancestral", "confidence"])
def test_sampling_follows_the_model_and_commits_each_token_once(monkeypatch, sampler):
    model = sdd().eval()
    seen = []
    stub_logits(model, monkeypatch, stub_backbone([5, 6], seen))
    prompt = torch.randint(4, VOCAB, (400, 3), generator=gen(0))
    out = model.generate(prompt, 5, sampler=sampler, steps=5, temperature=1.0, generator=gen(1))
    new = out[:, 3:]
    assert new.numel() == 2000
    share = new.eq(5).float().mean().item()
    assert abs(share - 0.5) < 0.05, share
    assert new.eq(5).logical_or(new.eq(6)).all()
    assert torch.equal(out[:, :3], prompt)
    for before, after in pairwise(seen):  # a committed token never changes
        committed = before != MASK
        assert torch.equal(after[committed], before[committed])
        assert (after != MASK).sum() >= committed.sum()


def test_generation_never_outputs_mask_or_ignore(monkeypatch):
    model = sdd().eval()
    stub_logits(model, monkeypatch, stub_backbone([5, 6], ignore_from=6))
    prompt = torch.randint(4, VOCAB, (8, 3), generator=gen(0))
    for eos_id in (None, 9):
        out = model.generate(prompt, 8, temperature=1.0, generator=gen(2), eos_id=eos_id)
        assert not out.eq(MASK).any() and not out.eq(IGNORE).any()
        assert out[:, 6:].eq(EOS if eos_id is None else eos_id).all()  # IGNORE ended the rows


def test_still_masked_positions_carry_the_last_prediction_as_candidates(monkeypatch):
    model = sdd().eval()
    calls = []
    logits = model.logits

    def spy(ids, segment_ids=None, left_pad=None, proposal=None):
        calls.append(proposal)
        return logits(ids, segment_ids, left_pad, proposal)

    monkeypatch.setattr(model, "logits", spy)
    model.generate(torch.randint(4, VOCAB, (2, 3), generator=gen(0)), 4, steps=4)
    # The first step proposes from the MASKs (one plain pass); every step then reads them.
    assert calls[0] is None and all(p is not None for p in calls[1:]) and len(calls) == 5
    assert calls[1].ids.shape == (2, 7, 3)
    greedy = model.generate(torch.randint(4, VOCAB, (2, 3), generator=gen(0)), 4, k=1)
    assert not greedy.eq(MASK).any()


# --- IGNORE pads SFT rows ---------------------------------------------------------------
def test_sft_rows_pad_with_ignore_as_a_trained_target():
    assert (ARLM.pad_target(), DiffusionLM.pad_target(), SDDLM.pad_target()) == (
        None,
        "eos",
        "ignore",
    )
    from lmpipe.data.samplers import Episodes

    episodes = Episodes(shards([5, 8]), 1, 16)
    batch = collate_episodes(episodes, [(0,), (1,)], packing=False, pad_id=0, pad_target_id=IGNORE)
    assert batch.input_ids[0, 5:].eq(IGNORE).all() and batch.loss_mask[0, 5:].eq(1).all()
    assert np.array_equal(batch.input_ids[1].numpy(), episodes.documents(1)[0][0])


def test_compiled_model_recompiles_when_k_changes_not_every_step():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    model = sdd(k_schedule=[[0, 1], [2, 4]])
    compiled = torch.compile(model, backend=counter)
    batch = random_batch()
    frames = []
    for _ in range(5):
        model.on_train_step()
        compiled(batch).nll.sum().backward()
        frames.append(counter.frame_count)
    assert frames[0] == frames[1] > 0  # k=1
    assert frames[2] > frames[1] and frames[2] == frames[3] == frames[4]  # k=4 from step 3
