"""Generation speed: new tokens per second at batch 1 and batched, and time to first token.

Greedy, exactly ``max_new_tokens`` new tokens (no stop token), from one held-out prompt;
each figure is the median of ``repeats`` timed runs after a warm-up run. The time to first
token is the prefill and one step for a model that streams (AR); a model that writes the
whole sequence at once (diffusion) shows its first token when all are done.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from lmpipe.eval.generation import prompt_budget
from lmpipe.models import LM


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure_speed(
    model: LM,
    prompt: list[int],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    repeats: int = 3,
) -> dict[str, float]:
    one = torch.tensor([prompt[-prompt_budget(model, max_new_tokens) :]], device=device)
    many = one.expand(batch_size, -1).contiguous()

    def generate(ids: torch.Tensor) -> None:
        model.generate(ids, max_new_tokens, temperature=0.0)

    def first_token() -> None:
        if model.streams:
            next(iter(model.stream(one, max_new_tokens, temperature=0.0)))
        else:
            generate(one)

    single = _median_seconds(lambda: generate(one), device, repeats)
    batched = _median_seconds(lambda: generate(many), device, repeats)
    return {
        "speed/tokens_per_sec_b1": max_new_tokens / single,
        "speed/tokens_per_sec_batched": batch_size * max_new_tokens / batched,
        "speed/ttft_ms": 1e3 * _median_seconds(first_token, device, repeats),
    }
