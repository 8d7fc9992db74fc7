import math

import pytest
import torch
import torch.nn.functional as F

from lmpipe.batch import Batch
from lmpipe.errors import ConfigError
from lmpipe.models import build_from_config_dict, build_lm
from lmpipe.models.sampling import sample_from_logits

AR = {"_target_": "lmpipe.models.ar.ARLM", "name": "ar"}
LAYOUTS = [
    {"mlp": "swiglu", "norm": "rmsnorm", "pos_emb": "rope"},
    {"mlp": "gelu", "norm": "layernorm", "pos_emb": "learned", "bias": True},
]


def tiny_ar(vocab=37, **changes):
    torch.manual_seed(0)
    shape = {"n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 24, **changes}
    return build_lm(AR, shape, vocab)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_token_nll_is_exact_shifted_cross_entropy(layout):
    model = tiny_ar(**layout).eval()
    ids = torch.randint(0, 37, (3, 17))
    mask = torch.ones(3, 17)
    mask[1, 5:] = 0
    scores = model(Batch(ids, mask))
    logits = model.backbone(ids[:, :-1], causal=True)
    reference = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    expected = F.pad(reference * mask[:, 1:], (1, 0))
    torch.testing.assert_close(scores.nll, expected)
    assert scores.nll[:, 0].eq(0).all() and scores.nll[1, 5:].eq(0).all()
    assert scores.target_mask.sum() == mask[:, 1:].sum()
    assert torch.equal(model.token_nll(Batch(ids, mask)), scores.nll)


def test_future_tokens_do_not_change_earlier_predictions():
    model = tiny_ar().eval()
    ids = torch.randint(0, 37, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 37
    a = model.backbone(ids, causal=True)
    b = model.backbone(changed, causal=True)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kv_cache_greedy_equals_uncached_greedy(layout):
    model = tiny_ar(**layout).eval()
    prompt = torch.randint(0, 37, (2, 5))
    cached = model.generate(prompt, 15, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 15, temperature=0, use_cache=False)
    assert cached.shape == (2, 20)
    assert torch.equal(cached, uncached)


def test_generation_stops_rows_at_eos_and_pads_with_it():
    model = tiny_ar().eval()
    prompt = torch.randint(0, 37, (4, 3))
    greedy = model.generate(prompt, 10, temperature=0)
    eos = int(greedy[0, 4])  # the token row 0 emits second: call it EOS
    out = model.generate(prompt, 10, temperature=0, eos_id=eos)
    row = out[0, 3:].tolist()
    assert row[:2] == greedy[0, 3:5].tolist() and set(row[2:]) <= {eos}


def test_generation_past_the_block_keeps_going():
    model = tiny_ar().eval()
    out = model.generate(
        torch.zeros(1, 20, dtype=torch.long),
        30,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape == (1, 50)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_from_logits(logits, temperature=0).item() == 3
    draws = {sample_from_logits(logits, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}
    # top_p=0.5: token 3 alone has p=0.64, so it is the whole nucleus.
    assert {sample_from_logits(logits, top_p=0.5, generator=g).item() for _ in range(50)} == {3}


def test_tied_embeddings_and_rebuild_from_config_dict():
    model = tiny_ar()
    assert model.backbone.lm_head.weight is model.backbone.tok_emb.weight
    rebuilt = build_from_config_dict(model.config_dict())
    rebuilt.load_state_dict(model.state_dict())
    ids = torch.randint(0, 37, (1, 9))
    batch = Batch(ids, torch.ones(1, 9))
    torch.testing.assert_close(rebuilt.eval()(batch).nll, model.eval()(batch).nll)


def test_flops_per_token_follows_6n_plus_attention():
    model = tiny_ar(pos_emb="learned")
    n = sum(p.numel() for p in model.parameters()) - 24 * 32  # minus position embeddings
    assert model.flops_per_token(24) == 6 * n + 12 * 2 * 2 * 16 * 24


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_head": 3}, "divisible"),
        ({"mlp": "relu"}, "model.mlp"),
        ({"dropout": 1.5}, "dropout"),
        ({"n_layers": 2}, "unknown keys"),
    ],
)
def test_bad_model_configs(changes, message):
    with pytest.raises(ConfigError, match=message):
        tiny_ar(**changes)


def test_initial_loss_is_near_uniform():
    model = tiny_ar(vocab=64).eval()
    ids = torch.randint(0, 64, (4, 24))
    scores = model(Batch(ids, torch.ones(4, 24)))
    loss = scores.nll.sum() / scores.target_mask.sum()
    assert abs(loss.item() - math.log(64)) < 0.3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_packed_row_scores_like_its_segments_one_by_one(layout):
    """Packing: no attention across segments and positions restart in each one."""
    model = tiny_ar(**layout).eval()
    lengths = [7, 5, 9]
    episodes = [torch.randint(0, 37, (n,)) for n in lengths]
    masks = [torch.ones(n) for n in lengths]
    pad = 24 - sum(lengths)
    packed = Batch(
        torch.cat([*episodes, torch.zeros(pad, dtype=torch.long)])[None],
        torch.cat([*masks, torch.zeros(pad)])[None],
        segment_ids=torch.cat([torch.full((n,), i) for i, n in enumerate([*lengths, pad])])[None],
    )
    packed_nll = model.token_nll(packed)[0]
    start = 0
    for ids, mask in zip(episodes, masks, strict=True):
        alone = model.token_nll(Batch(ids[None], mask[None]))[0]
        # A segment's first token has no context: never a target, packed or alone.
        torch.testing.assert_close(
            packed_nll[start : start + len(ids)], alone, atol=1e-5, rtol=1e-5
        )
        start += len(ids)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_segments_match_one_by_one_in_values_and_gradients(causal):
    """Segments of lengths around the SDPA grouping width (PackedSegments), two rows: the
    packed pass gives each segment's hidden states, and its backward the summed gradients,
    of the segments run alone (bidirectional attention too, as diffusion uses)."""
    backbone = tiny_ar(block_size=96).backbone.eval()
    rows = [[3, 31, 33, 29], [64, 1, 31]]  # each row: 96 tokens, the last segment padding
    ids = torch.randint(0, 37, (2, 96))
    segment_ids = torch.cat(
        [torch.cat([torch.full((n,), s) for s, n in enumerate(row)])[None] for row in rows]
    )
    weights = torch.randn(2, 96, 32)  # a loss that reads every hidden state

    def loss_and_grads(hidden, w):
        backbone.zero_grad()
        (hidden * w).sum().backward()
        return {k: p.grad.clone() for k, p in backbone.named_parameters()}

    packed = backbone.hidden_states(ids, causal=causal, segment_ids=segment_ids)
    packed_grads = loss_and_grads(packed, weights)
    alone_grads = {k: torch.zeros_like(p) for k, p in backbone.named_parameters()}
    for r, row in enumerate(rows):
        start = 0
        for n in row:
            span = slice(start, start + n)
            alone = backbone.hidden_states(ids[r : r + 1, span], causal=causal)
            torch.testing.assert_close(packed[r, span], alone[0], atol=1e-5, rtol=1e-5)
            for k, g in loss_and_grads(alone, weights[r : r + 1, span]).items():
                alone_grads[k] += g
            start += n
    for k, g in packed_grads.items():
        torch.testing.assert_close(g, alone_grads[k], atol=1e-5, rtol=1e-4, msg=k)


def test_packed_batches_of_new_layouts_do_not_recompile_the_model():
    """PackedSegments runs outside torch.compile: a batch whose segments are grouped
    differently reuses the compiled graphs instead of compiling them again."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    backbone = torch.compile(tiny_ar(block_size=96).backbone, backend=counter)
    ids = torch.randint(0, 37, (2, 96))
    frames = []
    for rows in ([[40, 56], [96]], [[3, 31, 33, 29], [64, 1, 31]], [[10] * 9 + [6], [50, 46]]):
        segment_ids = torch.cat(
            [torch.cat([torch.full((n,), s) for s, n in enumerate(row)])[None] for row in rows]
        )
        backbone(ids, causal=True, segment_ids=segment_ids).sum().backward()
        frames.append(counter.frame_count)
    assert frames[0] > 0 and frames[1] == frames[0] == frames[2]
