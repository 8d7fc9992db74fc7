"""The LM seam's RL pieces: left-padded generation, per-token log-probs, features."""

from __future__ import annotations

import pytest
import torch

from lmpipe.batch import Batch, left_padded
from lmpipe.models import build_lm
from lmpipe.models.base import unwrap

VOCAB = 48
SPECIAL = {"mask": 1, "eos": 2, "pad": 0}
SHAPE = {"n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 48}


def model(arch: str, **options):
    torch.manual_seed(0)
    target = {"ar": "lmpipe.models.ar.ARLM", "diffusion": "lmpipe.models.diffusion.DiffusionLM"}
    lm = build_lm({"_target_": target[arch], **options}, SHAPE, VOCAB, SPECIAL)
    with torch.no_grad():  # sharper predictions than the 0.02 init: numerics show
        for param in lm.parameters():
            param.normal_(0.0, 0.3)
    return lm.eval()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


@pytest.mark.parametrize(
    ("arch", "options"),
    [("ar", {"use_cache": True}), ("ar", {"use_cache": False}), ("diffusion", {})],
)
def test_left_padded_prompts_generate_what_each_prompt_does_alone(arch, options):
    lm = model(arch)
    ids, pad = left_padded(PROMPTS, pad_id=0)
    together = lm.generate(ids, 6, temperature=0.0, left_pad=pad, **options)
    for row, prompt in enumerate(PROMPTS):
        alone = lm.generate(torch.tensor([prompt]), 6, temperature=0.0, **options)
        assert together[row, ids.shape[1] :].tolist() == alone[0, len(prompt) :].tolist()


def test_left_padding_is_invisible_to_the_ar_scores_and_features():
    lm = model("ar")
    ids, pad = left_padded(PROMPTS, pad_id=3)
    index = torch.arange(ids.shape[1])[None]
    mask = (index > pad[:, None]).float()  # a row's first token has no target before it
    batch = Batch(input_ids=ids, loss_mask=mask, left_pad=pad)
    nll, features = lm.token_nll(batch), lm.features(batch)
    for row, prompt in enumerate(PROMPTS):
        alone = Batch(input_ids=torch.tensor([prompt]), loss_mask=torch.ones(1, len(prompt)))
        start = int(pad[row])
        torch.testing.assert_close(nll[row, start:], lm.token_nll(alone)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(features[row, start:], lm.features(alone)[0], atol=1e-5, rtol=0)


def test_ar_log_probs_are_the_negative_nll_at_temperature_one_and_scale_with_it():
    lm = model("ar")
    ids = torch.randint(3, VOCAB, (3, 12))
    mask = torch.zeros(3, 12)
    mask[:, 5:] = 1
    batch = Batch(input_ids=ids, loss_mask=mask)
    out = lm(batch, output="logps")
    torch.testing.assert_close(out.logps, -lm.token_nll(batch), atol=1e-5, rtol=0)
    assert (out.logps[:, :5] == 0).all() and (out.entropy[:, 5:] > 0).all()
    hot = lm(batch, output="logps", temperature=0.5).logps
    logits = lm.backbone(ids[:, :-1], causal=True)[:, 4:] / 0.5
    expected = logits.log_softmax(-1).gather(-1, ids[:, 5:, None]).squeeze(-1)
    torch.testing.assert_close(hot[:, 5:], expected, atol=1e-5, rtol=0)


def test_diffusion_one_step_estimate_of_a_one_token_reply_is_its_exact_log_prob():
    """p_mask_prompt=0 and one response token: the estimate is the exact one-step
    denoising probability p(x | prompt, MASK), with or without left padding."""
    lm = model("diffusion", p_mask_prompt=0.0)
    prompt, token = [5, 9, 11, 4], 17
    ids = torch.tensor([[*prompt, token]])
    batch = Batch(input_ids=ids, loss_mask=torch.tensor([[0.0, 0, 0, 0, 1]]))
    with torch.no_grad():
        estimate = lm(batch, output="logps", temperature=0.8).logps[0, -1]
        logits = lm.logits(torch.tensor([[*prompt, SPECIAL["mask"]]]))[0, -1] / 0.8
    assert float(estimate) == pytest.approx(float(logits.log_softmax(-1)[token]), abs=1e-5)
    padded = Batch(
        input_ids=torch.tensor([[0, 0, *prompt, token]]),
        loss_mask=torch.tensor([[0.0, 0, 0, 0, 0, 0, 1]]),
        left_pad=torch.tensor([2]),
    )
    assert float(
        lm(padded, output="logps", temperature=0.8).logps[0, -1].detach()
    ) == pytest.approx(float(estimate), abs=1e-5)


def test_a_packed_sequence_gets_the_estimate_it_gets_alone():
    lm = model("diffusion", p_mask_prompt=0.0)
    first, second = [5, 9, 11, 4, 20, 21], [7, 8, 30, 31, 32]
    alone = Batch(input_ids=torch.tensor([second]), loss_mask=torch.tensor([[0.0, 0, 1, 1, 0]]))
    packed = Batch(
        input_ids=torch.tensor([[*first, *second, 0, 0]]),
        loss_mask=torch.tensor([[0.0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0]]),
        segment_ids=torch.tensor([[0] * 6 + [1] * 5 + [2, 2]]),
    )
    expected = lm(alone, output="logps").logps[0, 2:4].detach()
    torch.testing.assert_close(
        lm(packed, output="logps").logps[0, 8:10].detach(), expected, atol=1e-5, rtol=0
    )


def test_diffusion_estimate_masks_the_whole_response_and_prompt_tokens_by_row_seed():
    lm = model("diffusion", p_mask_prompt=0.5)
    ids = torch.randint(3, VOCAB, (4, 20))
    mask = torch.zeros(4, 20)
    mask[:, 12:16] = 1  # tokens after the loss mask are response too (masked, not scored)
    seeds = torch.tensor([1, 2, 3, 4])
    batch = Batch(input_ids=ids, loss_mask=mask, noise_seeds=seeds)
    full = lm(batch, output="logps").logps
    # A row's estimate depends on its own seed only, not on the rows beside it ...
    half = lm(batch.split(2)[1], output="logps").logps
    torch.testing.assert_close(full[2:], half, atol=1e-5, rtol=0)
    # ... and changes with it.
    other = lm(batch.with_fields(noise_seeds=seeds + 10), output="logps").logps
    assert not torch.allclose(full[:, 12:16], other[:, 12:16])
    assert (full[:, 16:] == 0).all() and (full[:, :12] == 0).all()


def test_unwrap_finds_the_lm_inside_wrappers():
    lm = model("ar")

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    assert unwrap(Wrapper(Wrapper(lm))) is lm
    with pytest.raises(TypeError):
        unwrap(torch.nn.Linear(2, 2))


def test_rows_that_finished_leave_the_batch_without_changing_the_others():
    """Greedy replies that stop at different steps: the stream drops finished rows from its
    batch and cache (a quarter at a time) and still gives every row what it gives alone."""
    lm = model("ar")
    prompts = torch.randint(3, VOCAB, (8, 5))
    alone = [lm.generate(p[None], 12, temperature=0.0)[0, 5:].tolist() for p in prompts]
    eos = alone[0][2]  # a token row 0 emits early: rows stop wherever they emit it
    together = lm.generate(prompts, 12, temperature=0.0, eos_id=eos)[:, 5:].tolist()
    stopped = 0
    for row, ids in enumerate(alone):
        cut = ids.index(eos) + 1 if eos in ids else len(ids)
        stopped += cut < 12
        assert together[row][:cut] == ids[:cut]
        assert set(together[row][cut:]) <= {eos}
    assert stopped >= 2


@pytest.mark.parametrize("arch", ["ar", "diffusion"])
def test_copies_of_a_prompt_sample_as_repeated_rows_do(arch):
    """``copies``: the rows of a group sample exactly what repeated prompts sample (the
    same draws from the same generator), and AR reads each prompt once."""
    lm = model(arch)
    ids, pad = left_padded(PROMPTS, pad_id=0)
    sampling = {"temperature": 1.0, "left_pad": pad}
    repeated = lm.generate(
        ids.repeat_interleave(3, dim=0),
        6,
        generator=torch.Generator().manual_seed(1),
        **{**sampling, "left_pad": pad.repeat_interleave(3)},
    )
    passes = []
    forward = lm.backbone.hidden_states
    lm.backbone.hidden_states = lambda x, **k: passes.append(len(x)) or forward(x, **k)
    grouped = lm.generate(ids, 6, generator=torch.Generator().manual_seed(1), copies=3, **sampling)
    assert torch.equal(grouped, repeated)
    assert passes[0] == (3 if arch == "ar" else 9)  # AR: one pass per prompt, then 9 rows
    assert set(passes[1:]) == {9}
