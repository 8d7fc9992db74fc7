"""How far a model has moved from a reference model: the KL divergence KL(model || ref) on
replies the model samples to held-out prompts.

Each reply y is sampled at ``temperature`` (seeded) and scored by both models through the
LM seam (``output="logps"``, at temperature 1: the models' own distributions):
``log p(y) - log ref(y)`` summed over the reply and its stop token is an unbiased estimate
of the sequence-level KL (k1), reported per reply (``kl/sequence``) and per token
(``kl/token``). For a masked-diffusion model the log-probs are its one-step estimates,
with the same masks for both models.
"""

from __future__ import annotations

import torch

from lmpipe.batch import Batch, left_padded
from lmpipe.data.prompts import Prompt
from lmpipe.data.tokenizer import Tokenizer
from lmpipe.eval.generation import complete
from lmpipe.models import LM
from lmpipe.seeding import derive_seed


@torch.no_grad()
def kl_metrics(
    model: LM,
    reference: LM,
    tokenizer: Tokenizer,
    prompts: list[Prompt],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    temperature: float,
    seed: int,
    progress: bool = True,
) -> dict[str, float]:
    stop_ids = (tokenizer.turn_end_id, tokenizer.eos_id)
    replies = complete(
        model,
        [prompt.ids for prompt in prompts],
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        batch_size=batch_size,
        device=device,
        temperature=temperature,
        seed=seed,
        progress=progress,
    )
    block = model.config.block_size
    total, tokens = 0.0, 0
    for at in range(0, len(prompts), batch_size):
        rows, masks = [], []
        chunk = zip(prompts[at : at + batch_size], replies[at : at + batch_size], strict=True)
        for prompt, reply in chunk:
            ended = reply + [stop_ids[0]] if len(reply) < max_new_tokens else reply
            rows.append((prompt.ids + ended)[-block:])
            masks.append(([0] * len(prompt.ids) + [1] * len(ended))[-block:])
        ids, left_pad = left_padded(rows, tokenizer.pad_id)
        mask, _ = left_padded(masks, 0)
        batch = Batch(
            input_ids=ids,
            loss_mask=mask.float(),
            left_pad=left_pad,
            noise_seeds=torch.tensor(
                [derive_seed(seed, "kl", at + i) % 2**62 for i in range(len(rows))]
            ),
        ).to(device)
        diff = model(batch, output="logps").logps - reference(batch, output="logps").logps
        total += float((diff * batch.loss_mask).sum())
        tokens += int(batch.loss_mask.sum())
    return {"kl/sequence": total / len(prompts), "kl/token": total / max(tokens, 1)}
