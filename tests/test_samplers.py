"""Sampling: epochs, seeds, drop_last, padding vs packing, pairs; what ranks share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmpipe.data.samplers import (
    EpisodeOptions,
    Episodes,
    EpisodeSampler,
    WindowSampler,
    eval_episodes,
    eval_windows,
    pack_best_fit,
)
from lmpipe.data.shards import TokenShards
from lmpipe.errors import ConfigError

PAD, EOS = 0, 1


def shards(lengths: list[int], prompts: list[int] | None = None) -> TokenShards:
    """Documents of the given lengths: a prompt (2 tokens by default) with mask 0, then 1s."""
    tokens, mask, starts = [], [], []
    for doc, (n, prompt) in enumerate(zip(lengths, prompts or [2] * len(lengths), strict=True)):
        starts.append(len(tokens))
        tokens += [2 + (doc + i) % 50 for i in range(n)]
        mask += [0] * min(prompt, n) + [1] * max(0, n - prompt)
    return TokenShards(
        tokens=np.asarray(tokens, np.uint16),
        doc_starts=np.asarray(starts, np.int64),
        mask=np.asarray(mask, np.uint8),
    )


def options(**changes) -> EpisodeOptions:
    values = dict(
        epoch_seed=0, epoch_shuffle=True, epoch_drop_last=True, episode_min_tokens=0, packing=False
    )
    return EpisodeOptions.from_dict({**values, **changes})


def sampler(lengths, rows=4, row_length=32, docs=1, **changes) -> EpisodeSampler:
    episodes = Episodes(shards(lengths), docs, row_length)
    return EpisodeSampler(episodes, rows, options(**changes), pad_id=PAD)


def visited(s: EpisodeSampler, epoch: int) -> list[int]:
    steps = sum(s.steps_in_epoch(e) for e in range(epoch))
    return [e for k in range(s.steps_in_epoch(epoch)) for e in s.batch(steps + k).episode_ids]


def test_epochs_visit_each_episode_once_in_a_seeded_order():
    s = sampler([5 + i % 7 for i in range(22)], rows=4)
    first, second = visited(s, 0), visited(s, 1)
    assert len(first) == 20 == len(set(first))  # 22 episodes, 5 full batches, 2 dropped
    assert first != second and len(set(second)) == 20
    again = sampler([5 + i % 7 for i in range(22)], rows=4)
    assert visited(again, 0) == first
    other = sampler([5 + i % 7 for i in range(22)], rows=4, epoch_seed=1)
    assert visited(other, 0) != first
    keep_last = sampler([5 + i % 7 for i in range(22)], rows=4, epoch_drop_last=False)
    assert sorted(visited(keep_last, 0)) == list(range(22))
    assert s.position(5) == {"kind": "episodes", "step": 5, "epoch": 1, "batch_in_epoch": 0}


def test_unshuffled_epochs_keep_the_data_order():
    s = sampler([6] * 8, rows=4, epoch_shuffle=False)
    assert visited(s, 0) == list(range(8)) == visited(s, 1)


def test_padding_masks_padding_and_truncation_drops_episodes_without_targets():
    # Episode 2's answer starts after the row ends: nothing to train on, dropped.
    truncated = Episodes(shards([6, 9, 40, 7], prompts=[2, 2, 35, 2]), 1, 32)
    assert truncated.dropped == {"no_target_after_truncation": 1}
    assert truncated.kept.tolist() == [0, 1, 3]
    s = sampler([6, 9, 40, 7], rows=3, row_length=32)
    episodes = s.episodes
    assert len(episodes.kept) == 4
    batch = s.batch(0)
    lengths = [min(int(n), 32) for n in episodes.lengths[batch.episode_ids, 0]]
    assert batch.input_ids.shape == (3, max(lengths))
    for row, n in enumerate(lengths):
        assert batch.input_ids[row, n:].eq(PAD).all() and batch.loss_mask[row, n:].eq(0).all()
        assert batch.loss_mask[row, :2].eq(0).all() and batch.loss_mask[row, 2:n].eq(1).all()
    assert batch.real_tokens == sum(lengths)


def test_min_tokens_filter():
    episodes = Episodes(shards([3, 8, 4, 12]), 1, 32, min_tokens=5)
    assert episodes.kept.tolist() == [1, 3]
    assert episodes.dropped == {"below_min_tokens": 2}


def test_packing_fills_rows_without_splitting_episodes():
    lengths = [5 + (i * 7) % 13 for i in range(60)]
    s = sampler(lengths, rows=4, row_length=48, packing=True)
    batch = s.batch(0)
    assert batch.input_ids.shape == (4, 48) and batch.segment_ids is not None
    for row in range(4):
        segments = batch.segment_ids[row]
        real = int((batch.loss_mask[row] > 0).sum())
        assert real > 0
        # Segments are consecutive runs 0, 1, 2, ... (the last one is the padding).
        changes = (segments[1:] != segments[:-1]).sum()
        assert int(segments.max()) == changes
    assert sorted(visited(s, 0)) == sorted(set(visited(s, 0)))
    epoch = [s.batch(k) for k in range(s.steps_in_epoch(0))]
    fill = sum(b.real_tokens for b in epoch) / sum(b.input_ids.numel() for b in epoch)
    assert fill > 0.95  # best-fit decreasing; filling rows in order gives ~0.8 here


def test_best_fit_packs_every_item_once_within_capacity():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 60, size=500).tolist()
    rows = pack_best_fit(list(range(500)), sizes, 64)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(sizes[i] for i in row) <= 64 for row in rows)
    lower_bound = -(-sum(sizes) // 64)
    assert len(rows) <= lower_bound * 1.06  # next fit in order needs ~1.3x here
    assert pack_best_fit([7, 8, 9], [64, 1, 63], 64) == [(7,), (9, 8)]


def test_pairs_are_two_rows_each_and_stay_together():
    s = sampler([6, 7] * 10, rows=4, docs=2)
    batch = s.batch(0)
    assert batch.input_ids.shape[0] == 8 and batch.rows_per_example == 2
    halves = batch.split(2)
    assert [len(h) for h in halves] == [4, 4]
    with pytest.raises(ConfigError, match="packing"):
        sampler([6, 7] * 10, rows=4, docs=2, packing=True)


def test_bad_options():
    with pytest.raises(ConfigError, match="episode_min_tokens"):
        options(episode_min_tokens=-1)
    with pytest.raises(ConfigError, match="missing packing"):
        EpisodeOptions.from_dict(
            {
                "epoch_seed": 0,
                "epoch_shuffle": True,
                "epoch_drop_last": True,
                "episode_min_tokens": 0,
            }
        )


def test_ranks_split_the_batch_one_rank_would_draw():
    text = shards([400])
    one = WindowSampler(text, 16, 6, seed=3).batch(7).input_ids
    two = [WindowSampler(text, 16, 6, 3, rank, world_size=2).batch(7).input_ids for rank in (0, 1)]
    assert torch.equal(torch.cat(two), one)
    assert not torch.equal(WindowSampler(text, 16, 6, seed=3).batch(8).input_ids, one)


def test_held_out_sets_do_not_depend_on_batch_size_or_ranks():
    text = shards([400])

    def windows(rows, count=10, rank=0, world_size=1) -> list[tuple]:
        batches = eval_windows(text, 16, 16, rows, count, rank, world_size)
        return sorted(tuple(row) for b in batches for row in b.input_ids.tolist())

    assert len(windows(3)) == 10 and windows(3) == windows(4)
    assert sorted(windows(2, rank=0, world_size=2) + windows(2, rank=1, world_size=2)) == windows(4)
    # All 25 windows of the split asked for on 2 ranks: 12 each (as many forward passes).
    assert [len(windows(5, 25, rank, 2)) for rank in (0, 1)] == [12, 12]
    episodes = Episodes(shards([5 + i % 7 for i in range(9)]), 1, 32)
    per_rank = [eval_episodes(episodes, 3, 100, pad_id=PAD, rank=r, world_size=2) for r in (0, 1)]
    assert [sum(len(b) for b in batches) for batches in per_rank] == [4, 4]
