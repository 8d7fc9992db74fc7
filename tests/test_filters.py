import inspect

import pytest

from lmpipe.data import filters, mixer, shards
from lmpipe.data.filters import (
    FILTERS,
    alpha_ratio,
    build_filters,
    calculate_code_ratio,
    first_failing,
    repetition_ratio,
)
from lmpipe.errors import ConfigError

from conftest import SHARED_DATA

PYTHON = """\
import json
from pathlib import Path


def load(path: Path) -> list[dict]:
    records = []
    with path.open() as fh:
        for line in fh:
            if line.strip():
                records.append(json.loads(line))
    return records
"""

C = """\
#include <stdio.h>

int main(void) {
    for (int i = 0; i < 3; i++) {
        printf("%d\\n", i);
    }
    return 0;
}
"""

JAVASCRIPT = """\
function total(items) {
  let sum = 0;
  for (const item of items) {
    sum += item.price * item.count;
  }
  return sum;
}
"""

PROSE = (
    "If you want to bake bread, start early: the dough needs time to rise. Mix the flour "
    "with water and salt; for a softer crumb, add a little oil. Return to it after an hour."
)


def shakespeare_paragraphs() -> list[str]:
    path = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found (set LMPIPE_DATA_DIR)")
    return [p for p in path.read_text().split("\n\n") if p.strip()]


@pytest.mark.parametrize("code", [PYTHON, C, JAVASCRIPT])
def test_code_scores_high(code):
    assert calculate_code_ratio(code) > 0.5


def test_every_function_of_lmpipe_data_scores_as_code():
    functions = [
        f
        for module in (filters, mixer, shards)
        for f in vars(module).values()
        if inspect.isfunction(f) and f.__module__ == module.__name__
    ]
    assert len(functions) > 8
    for f in functions:
        assert calculate_code_ratio(inspect.getsource(f)) > 0.5, f.__name__


def test_prose_scores_low_even_with_keywords_and_colons():
    assert calculate_code_ratio(PROSE) < 0.2
    assert calculate_code_ratio("") == calculate_code_ratio(" \n\t") == 0.0


def test_shakespeare_is_not_code():
    paragraphs = shakespeare_paragraphs()
    speech = next(p for p in paragraphs if p.startswith("First Citizen:\nWe are accounted"))
    assert calculate_code_ratio(speech) < 0.2
    scores = [calculate_code_ratio(p) for p in paragraphs]
    assert max(scores) < 0.5  # a code_quality filter at 0.5 drops every paragraph
    assert sum(s < 0.2 for s in scores) / len(scores) > 0.99


def test_alpha_ratio():
    assert alpha_ratio("abc 123") == 0.5  # whitespace does not count
    assert alpha_ratio("3.14 2.71 42 1,000,000") == 0.0
    assert alpha_ratio("Hello, world") == 10 / 11
    assert alpha_ratio("   ") == 0.0


def test_repetition_ratio():
    assert repetition_ratio(PROSE) == 0.0
    assert repetition_ratio("buy now\n" * 10) > 0.85  # 9 of 10 lines repeat the first
    assert repetition_ratio("click here click here click here for free prizes") > 0.5
    # A bigram seen once is not repetition, whatever the text's length.
    assert repetition_ratio("hello world") == 0.0
    # Duplicate lines: 5 of the 14 characters in lines; no word bigram occurs twice.
    assert repetition_ratio("alpha\nbeta\nalpha\n") == pytest.approx(5 / 14)
    # Top bigram "alpha beta" twice: 18 of the 44 word characters (lines give 16 / 50).
    text = "alpha beta gamma\ndelta epsilon zeta\nalpha beta gamma\n"
    assert repetition_ratio(text) == pytest.approx(18 / 44)
    if SHARED_DATA.is_dir():
        paragraphs = shakespeare_paragraphs()
        assert sum(repetition_ratio(p) < 0.3 for p in paragraphs) / len(paragraphs) > 0.99


@pytest.mark.parametrize(
    ("spec", "text", "keep"),
    [
        ({"min_chars": 5}, "abcde", True),
        ({"min_chars": 5}, "abcd", False),
        ({"max_chars": 5}, "abcde", True),
        ({"max_chars": 5}, "abcdef", False),
        ({"min_words": 3}, "one  two\nthree", True),
        ({"min_words": 3}, "one two", False),
        ({"max_words": 2}, "one two", True),
        ({"max_words": 2}, "one two three", False),
        ({"min_chars": 1, "max_chars": 1000, "min_words": 2}, "word", False),
    ],
)
def test_length_bounds_are_inclusive(spec, text, keep):
    (length,) = build_filters([{"name": "length", **spec}], "s")
    assert length(text) is keep


def test_quality_and_code_quality_thresholds():
    (half,) = build_filters([{"name": "quality", "min_alpha_ratio": 0.5}], "s")
    assert half("ab12") and not half("a123")
    (rep,) = build_filters([{"name": "quality", "max_repetition": 0.3}], "s")
    assert rep(PROSE) and not rep("spam\n" * 5)
    (code,) = build_filters([{"name": "code_quality", "min_code_ratio": 0.5}], "s")
    assert code(PYTHON) and not code(PROSE)


def test_dedup_drops_whitespace_variants_only():
    (dedup,) = build_filters([{"name": "dedup"}], "s")
    assert dedup("the cat sat")
    assert not dedup("  the cat\n\tsat ")
    assert dedup("the cat sat.")
    assert dedup("The cat sat")  # case matters: exact dedup
    (fresh,) = build_filters([{"name": "dedup"}], "s")
    assert fresh("the cat sat")  # without a shared scope, state is per filter


def test_dedup_scope_is_shared_across_sources():
    scope: set[bytes] = set()
    (first,) = build_filters([{"name": "dedup"}], "a", scope)
    (second,) = build_filters([{"name": "dedup"}], "b", scope)
    assert first("same text") and not second("same  text")
    assert second("other text") and not first("other text")
    assert len(scope) == 2 and all(len(digest) == 16 for digest in scope)


def test_first_failing_names_the_first_filter_that_drops():
    chain = build_filters(
        [
            {"name": "length", "min_chars": 10},
            {"name": "quality", "min_alpha_ratio": 0.8},
            {"name": "dedup"},
        ],
        "s",
    )
    assert first_failing(chain, "short") == "length"
    assert first_failing(chain, "1234567890 numbers") == "quality"
    assert first_failing(chain, "a fine sentence") is None
    assert first_failing(chain, "a fine  sentence") == "dedup"
    assert first_failing([], "") is None
    assert [f.name for f in chain] == ["length", "quality", "dedup"]


def test_registry_names_match():
    assert sorted(FILTERS) == ["code_quality", "dedup", "length", "quality"]
    assert all(cls.name == name for name, cls in FILTERS.items())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"name": "lenght", "min_chars": 20},
            "data source 'gsm8k': unknown filter 'lenght' "
            "(known: code_quality, dedup, length, quality)",
        ),
        ({"name": "length", "min_char": 20}, "filter 'length': unknown threshold 'min_char'"),
        ({"name": "dedup", "min_chars": 1}, "filter 'dedup': unknown threshold 'min_chars'"),
        ({"name": "dedup", "seen": []}, "filter 'dedup': unknown threshold 'seen' (known: none)"),
        ({"name": "length", "min_chars": -1}, "min_chars=-1 must be an integer >= 0"),
        ({"name": "length", "min_chars": "20"}, "min_chars='20' must be an integer >= 0"),
        ({"name": "length", "max_words": 2.5}, "max_words=2.5 must be an integer >= 0"),
        ({"name": "length", "min_chars": True}, "min_chars=True must be an integer"),
        ({"name": "length", "min_chars": 9, "max_chars": 3}, "min_chars=9 is greater than"),
        ({"name": "quality", "min_alpha_ratio": 1.5}, "min_alpha_ratio=1.5 must be a number"),
        ({"name": "quality", "max_repetition": "high"}, "max_repetition='high' must be"),
        ({"name": "code_quality"}, "filter 'code_quality': no threshold set"),
        ({"name": "quality", "max_repetition": None}, "filter 'quality': no threshold set"),
        ({"min_chars": 20}, "filters[0] must be a mapping with a name"),
    ],
)
def test_bad_specs_name_the_source_and_key(spec, message):
    with pytest.raises(ConfigError) as info:
        build_filters([spec], "gsm8k")
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("data source 'gsm8k': ")
    assert message in text
