"""Final answers out of free text, and whether two of them agree (exact match).

``extract_answer`` looks, in this order, for GSM8K's ``#### N``, the last "answer is N"
(lmpipe's demo replies end "The answer is N."), the last ``A: N`` line (the format of
GSM8K's model solutions), and else the last number in the text. Numbers are normalised so
that ``$1,234.50``, ``1234.5`` and ``1,234.500`` are the same answer.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number with an optional sign and dollar sign, thousands commas and decimals. It may
# not continue a word or a number: in "16-3" the minus is an operator, not a sign.
_NUMBER = r"(?<![\w.])-?\$?-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_HASHES = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS = re.compile(rf"answer is\s*:?\s*({_NUMBER})", re.IGNORECASE)
_A_COLON = re.compile(rf"(?:^|\n)\s*A:\s*({_NUMBER})")
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_answer(text: str) -> str:
    """``" $1,234.50. "`` -> ``"1234.5"``, ``"72.00"`` -> ``"72"``; text that is not a number
    is stripped of spaces and a final period and lower-cased."""
    cleaned = text.strip().rstrip(".").strip()
    number = cleaned.replace(",", "").replace("$", "").replace(" ", "")
    try:
        value = Decimal(number)
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite():  # "Infinity" and "NaN" parse as decimals
        return cleaned.casefold()
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final answer of a worked solution or reply, normalised; None if there is none."""
    hashes = _HASHES.search(text)
    if hashes:
        after = hashes.group(1).strip()
        number = _ANY_NUMBER.search(after)
        if number:
            return normalize_answer(number.group(0))
        return normalize_answer(after) if after else None
    for pattern in (_ANSWER_IS, _A_COLON, _ANY_NUMBER):
        found = pattern.findall(text)
        if found:
            return normalize_answer(found[-1])
    return None


def answers_match(prediction: str | None, reference: str | None) -> bool:
    """Exact match of two answers after normalisation (numbers compare by value)."""
    if prediction is None or reference is None:
        return False
    return normalize_answer(prediction) == normalize_answer(reference)
