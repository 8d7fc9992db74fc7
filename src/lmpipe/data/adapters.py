"""Adapters: dataset-specific reshaping of raw records before normalisation.

A source names one with ``adapter: <name>``. An adapter returns the record in a shape
``formats.normalize`` understands, or raises ``SkipRecord`` to drop (and count) it.
"""

from __future__ import annotations

from collections.abc import Callable

from lmpipe.data.formats import SkipRecord
from lmpipe.errors import DataError


def gsm8k_model_solutions(record: dict, where: str) -> dict:
    """GSM8K ``example_model_solutions.jsonl`` -> a preference pair: the ground-truth
    solution is chosen, the first incorrect model solution (models in name order) rejected."""
    if "question" not in record or "ground_truth" not in record:
        raise DataError(f"{where}: record needs 'question' and 'ground_truth'")
    wrong = [
        value["solution"]
        for _, value in sorted(record.items())
        if isinstance(value, dict) and value.get("is_correct") is False and value.get("solution")
    ]
    if not wrong:
        raise SkipRecord("no_incorrect_solution")
    return {"prompt": record["question"], "chosen": record["ground_truth"], "rejected": wrong[0]}


def mmlu_text(record: dict, where: str) -> dict:
    """An MMLU question (``question``, ``choices``, ``answer`` index) as a text document."""
    try:
        choices = list(record["choices"])
        letter = "ABCDEFGHIJ"[int(record["answer"])]
        lines = [record["question"], *(f"{'ABCDEFGHIJ'[i]}. {c}" for i, c in enumerate(choices))]
    except (KeyError, IndexError, TypeError, ValueError):
        raise DataError(f"{where}: MMLU record needs 'question', 'choices' and 'answer'") from None
    return {"text": "\n".join([*lines, f"Answer: {letter}"])}


def question_answer_text(record: dict, where: str) -> dict:
    """A ``question`` / ``answer`` record (GSM8K) as one text document, for domain
    pretraining: ``Question: ...`` and ``Answer: ...`` on lines of their own."""
    if not isinstance(record.get("question"), str) or not isinstance(record.get("answer"), str):
        raise DataError(f"{where}: record needs string fields 'question' and 'answer'")
    return {"text": f"Question: {record['question']}\nAnswer: {record['answer']}"}


ADAPTERS: dict[str, Callable[[dict, str], dict]] = {
    "gsm8k_model_solutions": gsm8k_model_solutions,
    "mmlu_text": mmlu_text,
    "question_answer_text": question_answer_text,
}
