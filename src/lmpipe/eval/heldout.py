"""What evaluation reads from a prepared dataset's validation split.

- ``scoring_batches``: rows to score, laid out as in training (windows of the token stream
  for text data; whole episodes with their loss mask for chat, prompt and preference data,
  a pair being two rows: chosen, rejected; an architecture that learns to stop by
  predicting its padding token, diffusion's EOS or SDD's IGNORE, is scored on that padding
  too, as in its training);
- ``heldout_prompts``: prompts to complete, from the split's records (``mixed_val.jsonl``),
  each with its held-out continuation: the final assistant reply of a chat, the answer of
  a prompt record, the chosen reply of a pair, the rest of a text document.

Both take the first ``num_samples`` in file order, so every checkpoint sees the same set.
"""

from __future__ import annotations

from lmpipe.batch import Batch
from lmpipe.data.prepare import PreparedData
from lmpipe.data.prompts import Prompt, read_prompts
from lmpipe.data.samplers import Episodes, eval_episodes, eval_windows
from lmpipe.errors import DataError
from lmpipe.models import LM


def scoring_batches(
    data: PreparedData, model: LM, num_samples: int, batch_size: int
) -> list[Batch]:
    """Up to ``num_samples`` held-out examples (windows, episodes or pairs) in batches of
    ``batch_size`` examples, for a context of the model's ``block_size``."""
    block = model.config.block_size
    row_length = model.row_length(block)
    shards = data.split("val")
    if data.manifest["format"] == "text":
        return eval_windows(shards, row_length, block, batch_size, num_samples)
    episodes = Episodes(shards, data.manifest["documents_per_record"], row_length)
    if not len(episodes.kept):
        raise DataError(
            f"{data.directory}: no held-out episode fits a row of {row_length} tokens "
            f"(dropped: {dict(episodes.dropped)})"
        )
    target = model.pad_target()
    return eval_episodes(
        episodes,
        batch_size,
        num_samples,
        pad_id=data.tokenizer.pad_id,
        pad_target_id=data.tokenizer.special_id(target) if target else None,
    )


def completion_stops(data: PreparedData) -> tuple[int, ...]:
    """Where a completion of the data's prompts ends: a text document at EOS, a reply at
    the end of its turn (or EOS)."""
    tokenizer = data.tokenizer
    if data.manifest["format"] == "text":
        return (tokenizer.eos_id,)
    return (tokenizer.turn_end_id, tokenizer.eos_id)


def heldout_prompts(data: PreparedData, num_samples: int) -> list[Prompt]:
    """The first ``num_samples`` validation records as prompts (``read_prompts``)."""
    prompts = read_prompts(data, "val", num_samples)
    if not prompts:
        raise DataError(
            f"{data.directory}: the validation split has no records (data.split.val_fraction="
            f"{data.manifest['split']['val_fraction']}): prepare it with a val_fraction > 0"
        )
    return prompts
