"""Evaluation of any checkpoint with metric names shared by every architecture and stage.

answers     final answers out of text, exact match
heldout     validation batches and prompts of a prepared dataset
likelihood  perplexity, token accuracy, preference accuracy
generation  batched and streamed completion of prompts
diversity   distinct-n, self-BLEU
speed       tokens/s (batch 1, batched), time to first token
tasks       answer accuracy of greedy replies
runner      evaluate_checkpoint, comparison_table (the public API)
"""

__all__ = ["METRICS", "METRIC_NAMES", "comparison_table", "evaluate_checkpoint", "write_results"]


def __getattr__(name: str):
    """The runner's API, imported on first use: ``lmpipe.eval.answers`` and the other
    small modules stay importable without it (objectives use them)."""
    if name in __all__:
        from lmpipe.eval import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
