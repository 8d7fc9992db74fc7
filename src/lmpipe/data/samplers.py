"""Samplers turn token shards into batches.

A sampler's batch for step ``k`` is a pure function of ``(seed, k)``, all ranks' rows
together, each rank taking its slice: the step *is* the sampler position, so a resumed run
continues with exactly the next batch on any number of ranks, and N ranks train on the
rows one rank would. ``position(k)`` describes that position (epoch, batch within it) for the
checkpoint, where resume checks it against the data it finds.

- ``WindowSampler``: fixed-length windows at random offsets of the token stream
  (pretraining, mid-training);
- ``EpisodeSampler``: whole episodes (one conversation, or one chosen/rejected pair),
  epoch by epoch in a seeded order, padded or packed (SFT, DPO);
- ``PromptSampler``: prompts with their references, epoch by epoch, left-padded (RL).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lmpipe.batch import Batch, PromptBatch, left_padded
from lmpipe.data.prompts import Prompt
from lmpipe.data.shards import TokenShards
from lmpipe.errors import ConfigError, DataError
from lmpipe.seeding import derive_seed


def _rows(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([tokens[s : s + length] for s in starts]).astype(np.int64))


def _mask_rows(shards: TokenShards, starts: np.ndarray, length: int) -> torch.Tensor:
    if shards.mask is None:
        return torch.ones(len(starts), length, dtype=torch.float32)
    return _rows(shards.mask, starts, length).float()


class WindowSampler:
    """Fixed-length windows at random offsets of a token stream (pretraining): ``rows``
    windows per step over all ranks, drawn from ``(seed, step)`` alone, each rank taking
    its slice, so the step's batch is the same on any number of ranks."""

    def __init__(
        self,
        shards: TokenShards,
        row_length: int,
        rows: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
    ):
        if len(shards) < row_length:
            raise DataError(
                f"the {split} split has {len(shards)} tokens, fewer than one row of "
                f"{row_length}: lower trainer.block_size, or add data"
            )
        self.shards = shards
        self.row_length = row_length
        self.rows = rows
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def batch(self, step: int) -> Batch:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "windows", step))
        high = len(self.shards) - self.row_length + 1
        starts = torch.randint(high, (self.rows,), generator=generator).numpy()
        per_rank = self.rows // self.world_size
        starts = starts[self.rank * per_rank : (self.rank + 1) * per_rank]
        ids = _rows(self.shards.tokens, starts, self.row_length)
        return Batch(input_ids=ids, loss_mask=_mask_rows(self.shards, starts, self.row_length))

    def position(self, step: int) -> dict:
        return {"kind": "windows", "step": step}


def held_out_share(available: int, count: int, rank: int, world_size: int) -> slice:
    """This rank's share of the first ``count`` of ``available`` held-out examples (all of
    them if fewer, then rounded down to a multiple of the ranks, so that every rank runs
    as many forward passes: a sharded model needs that)."""
    count = min(count, available)
    return slice(rank, count - count % world_size, world_size)


def eval_windows(
    shards: TokenShards,
    row_length: int,
    stride: int,
    rows: int,
    count: int,
    rank: int = 0,
    world_size: int = 1,
    split: str = "val",
) -> list[Batch]:
    """Deterministic evaluation batches: the first ``count`` windows, every ``stride``
    tokens from the start of the split (stride = context length, so each token is scored
    once), divided among ranks, in batches of ``rows``. The same set at every eval,
    however many ranks and rows per batch."""
    if len(shards) < row_length:
        raise DataError(
            f"the {split} split has {len(shards)} tokens, fewer than one row of {row_length}: "
            "raise data.split.val_fraction, lower trainer.block_size, or set "
            "trainer.eval_batches=0"
        )
    available = (len(shards) - row_length) // stride + 1
    starts = np.arange(available)[held_out_share(available, count, rank, world_size)] * stride
    batches = []
    for i in range(0, len(starts), rows):
        chunk = starts[i : i + rows]
        ids = _rows(shards.tokens, chunk, row_length)
        batches.append(Batch(input_ids=ids, loss_mask=_mask_rows(shards, chunk, row_length)))
    return batches


@dataclass(frozen=True)
class EpochOptions:
    """The order of examples over epochs (``sampler`` config group keys)."""

    epoch_seed: int
    epoch_shuffle: bool
    epoch_drop_last: bool

    @classmethod
    def from_dict(cls, values: dict):
        missing = [k for k in cls.__dataclass_fields__ if k not in values]
        if missing:
            raise ConfigError(f"sampler config is missing {', '.join(missing)}")
        options = cls(**{k: values[k] for k in cls.__dataclass_fields__})
        options.check()
        return options

    def check(self) -> None:
        pass


@dataclass(frozen=True)
class EpisodeOptions(EpochOptions):
    """How episodes become rows."""

    episode_min_tokens: int
    packing: bool

    def check(self) -> None:
        if not isinstance(self.episode_min_tokens, int) or self.episode_min_tokens < 0:
            raise ConfigError(
                f"sampler.episode_min_tokens={self.episode_min_tokens!r} must be an integer >= 0"
            )


@dataclass(frozen=True)
class PromptOptions(EpochOptions):
    """How prompts become batches."""

    max_prompt_tokens: int

    def check(self) -> None:
        if not isinstance(self.max_prompt_tokens, int) or self.max_prompt_tokens < 1:
            raise ConfigError(
                f"sampler.max_prompt_tokens={self.max_prompt_tokens!r} must be an integer >= 1"
            )


class Episodes:
    """The episodes of one split: an episode is ``docs_per_episode`` consecutive documents
    (1 for chat, 2 for a preference pair: chosen then rejected), truncated to the row.

    Episodes whose documents keep no loss token after truncation, or that are shorter
    than ``min_tokens``, are dropped; ``dropped`` counts them by reason.
    """

    def __init__(
        self, shards: TokenShards, docs_per_episode: int, row_length: int, min_tokens: int = 0
    ):
        self.shards = shards
        self.row_length = row_length
        starts = np.asarray(shards.doc_starts, dtype=np.int64)
        ends = np.append(starts[1:], len(shards)).astype(np.int64)
        if len(starts) % docs_per_episode:
            raise DataError(
                f"{len(starts)} documents do not form episodes of {docs_per_episode} documents"
            )
        self.starts = starts.reshape(-1, docs_per_episode)
        self.full_lengths = (ends - starts).reshape(-1, docs_per_episode)
        self.lengths = np.minimum(self.full_lengths, row_length)
        self.dropped: Counter = Counter()
        self.truncated: list[int] = []  # the episodes dropped as no_target_after_truncation
        kept = []
        for episode in range(len(self.starts)):
            if self.lengths[episode].sum() < min_tokens:
                self.dropped["below_min_tokens"] += 1
            elif not all(self._has_target(s, n) for s, n in self._docs(episode)):
                self.dropped["no_target_after_truncation"] += 1
                self.truncated.append(episode)
            else:
                kept.append(episode)
        self.kept = np.asarray(kept, dtype=np.int64)

    def _docs(self, episode: int):
        return zip(self.starts[episode].tolist(), self.lengths[episode].tolist(), strict=True)

    def _has_target(self, start: int, length: int) -> bool:
        if self.shards.mask is None:
            return length > 1
        # A document's first token is never a target (nothing precedes it).
        return bool(self.shards.mask[start + 1 : start + length].any())

    def row_length_keeping(self, fraction: float) -> int | None:
        """The shortest row length at which at most ``1 - fraction`` of all episodes are
        dropped as no_target_after_truncation; None when this row length already keeps
        that many, or when no row length can (episodes without any target)."""
        allowed = len(self.starts) - math.ceil(fraction * len(self.starts))
        if len(self.truncated) <= allowed:
            return None
        needed = sorted(self._length_to_first_target(e) for e in self.truncated)
        length = needed[len(needed) - allowed - 1]
        return None if math.isinf(length) else int(length)

    def _length_to_first_target(self, episode: int) -> float:
        """The row length at which every document of the episode keeps a target token
        (inf: some document has none at any length)."""
        longest = 0
        for start, length in zip(
            self.starts[episode].tolist(), self.full_lengths[episode].tolist(), strict=True
        ):
            if self.shards.mask is None:
                targets = np.arange(length - 1)
            else:
                targets = np.flatnonzero(self.shards.mask[start + 1 : start + length])
            if not len(targets):
                return math.inf
            longest = max(longest, int(targets[0]) + 2)  # the first token is no target
        return longest

    def tokens(self, episode: int) -> int:
        return int(self.lengths[episode].sum())

    def documents(self, episode: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(token ids, loss mask) of each document of the episode, truncated."""
        out = []
        for start, length in self._docs(episode):
            ids = np.asarray(self.shards.tokens[start : start + length], dtype=np.int64)
            if self.shards.mask is None:
                mask = np.ones(length, dtype=np.float32)
            else:
                mask = np.asarray(self.shards.mask[start : start + length], dtype=np.float32)
            out.append((ids, mask))
        return out


def pack_best_fit(items: list[int], sizes: list[int], capacity: int) -> list[tuple[int, ...]]:
    """Best-fit decreasing bin packing: items from largest to smallest (ties in the given
    order), each into the fullest row it still fits, else a new row. Rows come out about
    98% full on chat data, against ~80% for filling rows in order (next fit)."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, row index), sorted
    for index in sorted(range(len(items)), key=lambda i: -sizes[i]):
        at = bisect.bisect_left(free, (sizes[index], -1))
        if at == len(free):
            rows.append([])
            space, row = capacity, len(rows) - 1
        else:
            space, row = free.pop(at)
        rows[row].append(items[index])
        if space - sizes[index] > 0:
            bisect.insort(free, (space - sizes[index], row))
    return [tuple(row) for row in rows]


class EpochSampler:
    """Examples epoch by epoch: each epoch visits every kept example exactly once.

    The epoch order is a permutation seeded by ``(epoch_seed, epoch)`` (or the data order
    without shuffling); ``rows`` rows per step over all ranks, each rank taking its slice.
    An incomplete last batch of an epoch is dropped (``epoch_drop_last``) or kept as a
    smaller batch. Subclasses say what a row holds (``_rows_of``) and make the batch.
    """

    def __init__(
        self, kept: np.ndarray, rows: int, options: EpisodeOptions, rank: int, world_size: int
    ):
        self.kept = kept
        self.rows = rows
        self.options = options
        self.rank = rank
        self.world_size = world_size
        self._plans: dict[int, list[tuple[int, ...]]] = {}
        if not options.epoch_drop_last and world_size > 1:
            raise ConfigError("sampler.epoch_drop_last=false needs a single rank (equal batches)")

    def _rows_of(self, order: np.ndarray, rng: np.random.Generator | None) -> list[tuple[int, ...]]:
        """An epoch's examples in visiting order -> its rows (tuples of example ids)."""
        return [(int(e),) for e in order]

    def _epoch_rows(self, epoch: int) -> list[tuple[int, ...]]:
        if epoch not in self._plans:
            if len(self._plans) > 4:  # a resumed or long run only ever needs the recent ones
                self._plans.clear()
            rng = None
            order = self.kept
            if self.options.epoch_shuffle:
                rng = np.random.default_rng(derive_seed(self.options.epoch_seed, "epoch", epoch))
                order = order[rng.permutation(len(order))]
            self._plans[epoch] = self._rows_of(order, rng)
        return self._plans[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        rows = len(self._epoch_rows(epoch))
        if self.options.epoch_drop_last:
            return rows // self.rows
        return -(-rows // self.rows)

    def position(self, step: int) -> dict:
        """Epoch and batch within the epoch of optimizer step ``step``."""
        epoch, index = 0, step
        while index >= (count := self.steps_in_epoch(epoch)):
            index -= count
            epoch += 1
        return {"kind": "episodes", "step": step, "epoch": epoch, "batch_in_epoch": index}

    def step_rows(self, step: int) -> list[tuple[int, ...]]:
        """The rows (example ids) of the whole step, all ranks; the last batch of an epoch
        is smaller when ``epoch_drop_last`` is off."""
        where = self.position(step)
        first = where["batch_in_epoch"] * self.rows
        return self._epoch_rows(where["epoch"])[first : first + self.rows]

    def _my_rows(self, rows: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        per_rank = self.rows // self.world_size
        return rows[self.rank * per_rank : (self.rank + 1) * per_rank]


class EpisodeSampler(EpochSampler):
    """Episode-indexed batches (SFT, DPO): padding puts one episode document per row,
    padded to the batch's longest; packing fills rows of ``row_length`` with the epoch's
    episodes by best-fit decreasing (``pack_best_fit``), then shuffles the rows; segment
    ids keep the episodes of a row apart. With ``pad_id`` padding has loss 0; an
    architecture that learns to stop by predicting a token in the padding
    (``LM.pad_target``: diffusion's EOS, SDD's IGNORE) pads with that token,
    ``pad_target_id``, trained.
    """

    def __init__(
        self,
        episodes: Episodes,
        rows: int,
        options: EpisodeOptions,
        *,
        pad_id: int,
        pad_target_id: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(episodes.kept, rows, options, rank, world_size)
        self.episodes = episodes
        self.pad_id = pad_id
        self.pad_target_id = pad_target_id  # set: pad with it and train on it
        if options.packing and episodes.starts.shape[1] != 1:
            raise ConfigError(
                "sampler.packing=true is for single-document episodes (SFT), not pairs"
            )
        if self.steps_in_epoch(0) == 0:
            raise DataError(
                f"{len(episodes.kept)} usable episodes cannot fill one batch of {rows} "
                f"(dropped: {dict(episodes.dropped) or 'none'}): lower trainer.batch_size, "
                "or raise trainer.block_size if episodes are dropped as "
                "no_target_after_truncation"
            )

    def _rows_of(self, order, rng) -> list[tuple[int, ...]]:
        if not self.options.packing:
            return super()._rows_of(order, rng)
        rows = pack_best_fit(
            order.tolist(), [self.episodes.tokens(int(e)) for e in order], self.episodes.row_length
        )
        if rng is not None:  # BFD fills long episodes first: mix the rows again
            rows = [rows[i] for i in rng.permutation(len(rows))]
        return rows

    def batch(self, step: int) -> Batch:
        rows = self.step_rows(step)
        mine = self._my_rows(rows)
        batch = self._collate(mine, packing=self.options.packing)
        batch.episode_ids = [e for row in rows for e in row]
        return batch

    def every_example(self, examples_per_batch: int) -> Iterator[Batch]:
        """Every kept episode once, in data order, unpacked (e.g. to precompute values)."""
        kept = self.episodes.kept.tolist()
        for i in range(0, len(kept), examples_per_batch):
            yield self._collate([(e,) for e in kept[i : i + examples_per_batch]], packing=False)

    def _collate(self, rows: list[tuple[int, ...]], packing: bool) -> Batch:
        batch = collate_episodes(
            self.episodes,
            rows,
            packing=packing,
            pad_id=self.pad_id,
            pad_target_id=self.pad_target_id,
        )
        batch.example_ids = [e for row in rows for e in row]
        return batch


class PromptSampler(EpochSampler):
    """Prompts epoch by epoch (RL stages), ``rows`` prompts per step over all ranks, as
    left-padded ``PromptBatch``es with their references. Prompts longer than
    ``options.max_prompt_tokens`` are dropped (``dropped`` counts them)."""

    def __init__(
        self,
        prompts: list[Prompt],
        rows: int,
        options: PromptOptions,
        *,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        kept = [i for i, p in enumerate(prompts) if len(p.ids) <= options.max_prompt_tokens]
        super().__init__(np.asarray(kept, dtype=np.int64), rows, options, rank, world_size)
        self.prompts = prompts
        self.pad_id = pad_id
        self.dropped = Counter()
        if len(kept) < len(prompts):
            self.dropped["longer_than_max_prompt_tokens"] = len(prompts) - len(kept)
        if self.steps_in_epoch(0) == 0:
            raise DataError(
                f"{len(kept)} usable prompts cannot fill one batch of {rows} "
                f"(dropped: {dict(self.dropped) or 'none'}; sampler.max_prompt_tokens="
                f"{options.max_prompt_tokens}): lower trainer.batch_size or raise "
                "sampler.max_prompt_tokens"
            )

    def batch(self, step: int) -> PromptBatch:
        rows = self.step_rows(step)
        batch = collate_prompts(
            self.prompts, [e for row in self._my_rows(rows) for e in row], self.pad_id
        )
        batch.episode_ids = [e for row in rows for e in row]
        return batch

    def every_example(self, examples_per_batch: int) -> Iterator[PromptBatch]:
        kept = self.kept.tolist()
        for i in range(0, len(kept), examples_per_batch):
            yield collate_prompts(self.prompts, kept[i : i + examples_per_batch], self.pad_id)


def collate_prompts(prompts: list[Prompt], ids: list[int], pad_id: int) -> PromptBatch:
    """The prompts ``ids`` (indices into ``prompts``) as one left-padded batch."""
    chosen = [prompts[i] for i in ids]
    input_ids, left_pad = left_padded([p.ids for p in chosen], pad_id)
    return PromptBatch(
        input_ids=input_ids,
        loss_mask=torch.zeros(input_ids.shape),
        left_pad=left_pad,
        real_tokens=sum(len(p.ids) for p in chosen),
        example_ids=list(ids),
        references=[p.reference for p in chosen],
    )


def collate_episodes(
    episodes: Episodes,
    rows: list[tuple[int, ...]],
    *,
    packing: bool,
    pad_id: int,
    pad_target_id: int | None = None,
) -> Batch:
    """Rows of episode ids -> a Batch. Without packing every document is its own row (a
    pair gives two: chosen, rejected), padded to the longest; with packing a row holds its
    episodes one after another, with segment ids, padded to ``row_length``.
    ``pad_target_id``: pad with this token and train on it (``LM.pad_target``; to the
    longest of the batch, as LLaDA, so that the short replies are not drowned in padding
    targets)."""
    docs = [[d for e in row for d in episodes.documents(e)] for row in rows]
    if not packing:
        docs = [[d] for row in docs for d in row]
    lengths = [sum(len(ids) for ids, _ in row) for row in docs]
    width = episodes.row_length if packing else max(lengths)
    fill = pad_id if pad_target_id is None else pad_target_id
    ids = np.full((len(docs), width), fill, dtype=np.int64)
    mask = np.zeros((len(docs), width), dtype=np.float32)
    segments = np.zeros((len(docs), width), dtype=np.int64)
    for r, row in enumerate(docs):
        at = 0
        for s, (doc_ids, doc_mask) in enumerate(row):
            ids[r, at : at + len(doc_ids)] = doc_ids
            mask[r, at : at + len(doc_ids)] = doc_mask
            segments[r, at : at + len(doc_ids)] = s
            at += len(doc_ids)
        segments[r, at:] = len(row)  # padding is a segment of its own
        if pad_target_id is not None:
            mask[r, at:] = 1.0
    return Batch(
        input_ids=torch.from_numpy(ids),
        loss_mask=torch.from_numpy(mask),
        segment_ids=torch.from_numpy(segments) if packing else None,
        rows_per_example=episodes.starts.shape[1],
        real_tokens=sum(lengths),
    )


def eval_episodes(
    episodes: Episodes,
    rows: int,
    count: int,
    *,
    pad_id: int,
    pad_target_id: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> list[Batch]:
    """Held-out batches: the split's first ``count`` episodes in order, unpacked, this
    rank's share, in batches of ``rows`` examples. The same set at every eval."""
    kept = episodes.kept
    mine = kept[held_out_share(len(kept), count, rank, world_size)].tolist()
    return [
        collate_episodes(
            episodes,
            [(e,) for e in mine[i : i + rows]],
            packing=False,
            pad_id=pad_id,
            pad_target_id=pad_target_id,
        )
        for i in range(0, len(mine), rows)
    ]
