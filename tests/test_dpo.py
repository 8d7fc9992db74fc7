"""DPO losses against their closed forms, the reference paths, and noise sharing (VRPO)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lmpipe.batch import Batch
from lmpipe.models import build_lm
from lmpipe.objectives.dpo import DPO, preference_loss, sequence_logps

SPECIALS = {"pad": 0, "eos": 1, "mask": 2}
POLICY_C, POLICY_R, REF_C, REF_R = -4.0, -7.0, -5.0, -6.5
H = (POLICY_C - POLICY_R) - (REF_C - REF_R)  # 1.5


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize(
    ("loss_type", "beta", "eps", "expected"),
    [
        ("sigmoid", 0.1, 0.0, -math.log(sig(0.1 * H))),  # DPO, Rafailov et al. eq. 7
        (
            "sigmoid",
            0.5,
            0.2,
            -0.8 * math.log(sig(0.5 * H)) - 0.2 * math.log(sig(-0.5 * H)),
        ),  # cDPO
        (
            "robust",
            0.5,
            0.2,
            (-0.8 * math.log(sig(0.5 * H)) + 0.2 * math.log(sig(-0.5 * H))) / 0.6,
        ),  # Chowdhury et al. 2024
        ("hinge", 0.5, 0.0, max(0.0, 1 - 0.5 * H)),  # SLiC
        ("ipo", 0.1, 0.0, (H - 1 / (2 * 0.1)) ** 2),  # IPO, Azar et al. eq. 17
    ],
)
def test_losses_match_their_closed_forms(loss_type, beta, eps, expected):
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    got = preference_loss(
        t(POLICY_C),
        t(POLICY_R),
        t(REF_C),
        t(REF_R),
        beta=beta,
        loss_type=loss_type,
        label_smoothing=eps,
    )
    assert got.item() == pytest.approx(expected, rel=1e-12)


def pairs_batch(rows: int = 6, length: int = 12) -> Batch:
    torch.manual_seed(1)
    ids = torch.randint(3, 40, (rows, length))
    mask = torch.zeros(rows, length)
    mask[:, 6:] = 1  # the response
    return Batch(ids, mask, rows_per_example=2)


def model(arch: str = "ar"):
    torch.manual_seed(0)
    target = {"ar": "lmpipe.models.ar.ARLM", "diffusion": "lmpipe.models.diffusion.DiffusionLM"}[
        arch
    ]
    return build_lm(
        {"_target_": target},
        {"n_layer": 1, "n_head": 2, "d_model": 32, "block_size": 16},
        40,
        SPECIALS,
    )


def objective(**changes) -> DPO:
    values = dict(
        beta=0.1, loss_type="sigmoid", label_smoothing=0.0, precompute_ref=False, mc_samples=1
    )
    return DPO(**{**values, **changes})


def test_precomputed_reference_gives_the_live_reference_loss():
    policy, reference = model(), model()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = pairs_batch()
    live = objective()
    live.reference = reference
    loss_live, metrics_live = live.loss(policy, batch)
    pre = objective(precompute_ref=True)
    with torch.no_grad():
        precomputed = batch.with_fields(ref_logps=sequence_logps(reference, batch))
    loss_pre, metrics_pre = pre.loss(policy, precomputed)
    torch.testing.assert_close(loss_pre, loss_live)
    assert metrics_pre["rewards/margin"] == pytest.approx(float(metrics_live["rewards/margin"]))
    policy_logps = sequence_logps(policy, batch).detach()
    ref_logps = sequence_logps(reference, batch).detach()
    chosen = 0.1 * (policy_logps[0::2] - ref_logps[0::2])
    rejected = 0.1 * (policy_logps[1::2] - ref_logps[1::2])
    assert float(metrics_live["rewards/chosen"]) == pytest.approx(chosen.mean().item(), rel=1e-5)
    assert float(metrics_live["rewards/accuracy"]) == (chosen > rejected).float().mean().item()


def test_rpo_adds_the_chosen_replies_mean_nll():
    policy, reference = model(), model()
    batch = pairs_batch()
    plain, rpo = objective(), objective(rpo_alpha=0.5)
    plain.reference = rpo.reference = reference
    loss_plain, _ = plain.loss(policy, batch)
    loss_rpo, metrics = rpo.loss(policy, batch)
    chosen_nll = (policy.token_nll(batch) * batch.loss_mask)[0::2].sum() / batch.loss_mask[
        0::2
    ].sum()
    torch.testing.assert_close(loss_rpo, loss_plain + 0.5 * chosen_nll)
    assert float(metrics["nll/chosen"]) == pytest.approx(chosen_nll.item(), rel=1e-5)


def test_sequence_logp_is_minus_the_masked_nll_sum():
    m, batch = model(), pairs_batch()
    expected = -(m.token_nll(batch) * batch.loss_mask).sum(-1)
    torch.testing.assert_close(sequence_logps(m, batch), expected)


def test_diffusion_policy_and_reference_share_the_noise():
    """With the policy equal to the reference, h = 0 exactly only if both see the same masks
    and timesteps: the loss is then log 2 whatever the noise draw (VRPO)."""
    policy = model("diffusion")
    dpo = objective(mc_samples=2)
    dpo.reference = copy.deepcopy(policy)
    torch.manual_seed(3)
    loss, metrics = dpo.loss(policy, pairs_batch())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert float(metrics["rewards/margin"]) == 0.0
    # Unshared noise would not cancel: two draws of the same model's ELBO differ.
    batch = pairs_batch()
    a = sequence_logps(policy, batch, torch.Generator().manual_seed(1))
    b = sequence_logps(policy, batch, torch.Generator().manual_seed(2))
    assert not torch.allclose(a, b)


def test_training_on_pairs_raises_the_preference_accuracy():
    policy, reference = model(), model()
    reference.requires_grad_(False)
    dpo = objective(beta=0.5)
    dpo.reference = reference
    batch = pairs_batch(rows=8)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss, metrics = dpo.loss(policy, batch)
        first = first if first is not None else metrics
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(metrics["rewards/accuracy"]) == 1.0
    assert float(metrics["rewards/margin"]) > float(first["rewards/margin"]) + 1.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"loss_type": "kto"}, "loss_type"),
        ({"beta": 0.0}, "beta"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"mc_samples": 0}, "mc_samples"),
        ({"rpo_alpha": -1.0}, "rpo_alpha"),
    ],
)
def test_bad_dpo_options(changes, message):
    from lmpipe.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        objective(**changes)


def test_precompute_needs_an_exact_likelihood():
    from lmpipe.errors import ConfigError
    from lmpipe.models.diffusion import DiffusionLM

    with pytest.raises(ConfigError, match="precompute_ref=true needs an exact likelihood"):
        objective(precompute_ref=True).check_arch(DiffusionLM)
