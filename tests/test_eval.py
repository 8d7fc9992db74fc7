"""lmpipe.eval: answer extraction, diversity, likelihood, generation and the runner."""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from lmpipe.chat import converse
from lmpipe.data.prepare import prepare
from lmpipe.errors import ConfigError
from lmpipe.eval import METRIC_NAMES, comparison_table, evaluate_checkpoint
from lmpipe.eval.answers import answers_match, extract_answer
from lmpipe.eval.diversity import bleu, distinct_n, self_bleu
from lmpipe.eval.generation import complete
from lmpipe.eval.heldout import Prompt, heldout_prompts, scoring_batches
from lmpipe.eval.likelihood import preference_metrics, score_rows
from lmpipe.eval.runner import default_output
from lmpipe.eval.tasks import answer_metrics, greedy_replies, reward_metrics
from lmpipe.generate import read_prompt
from lmpipe.models import build_lm
from lmpipe.objectives.rewards import AnswerMatch, Format
from lmpipe.training.checkpoint import Checkpoint

from conftest import TINY_SHAPE, arch_config, data_config, save_random_checkpoint

CPU = torch.device("cpu")


# --- answers ----------------------------------------------------------------------------
def test_extract_answer_reads_every_gsm8k_answer(shared_data):
    lines = []
    for split in ("train", "test"):
        lines += (shared_data / "gsm8k" / f"{split}.jsonl").read_text().splitlines()
    assert len(lines) == 7473 + 1319
    for line in lines:
        answer = json.loads(line)["answer"]
        assert extract_answer(answer) == answer.split("####")[-1].strip().replace(",", "")
    first = json.loads(lines[0])["answer"]
    assert first.endswith("#### 72") and extract_answer(first) == "72"


def test_answer_match_agrees_with_the_labels_of_gsm8k_model_solutions(shared_data):
    """Model solutions end "A: N"; each is labelled correct or not against the truth."""
    path = shared_data / "gsm8k" / "example_model_solutions.jsonl"
    checked = 0
    for line in path.read_text().splitlines():
        record = json.loads(line)
        truth = extract_answer(record["ground_truth"])
        for solution in (v for v in record.values() if isinstance(v, dict)):
            predicted = extract_answer(solution["solution"])
            assert answers_match(predicted, truth) == solution["is_correct"], solution
            checked += 1
    assert checked == 4 * 1319


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$1,234.50", "1234.5"),
        ("-3", "-3"),
        ("#### 1,000", "1000"),
        ("#### 72", "72"),
        ("It costs 72.00 dollars", "72"),
        ("Ada has 3 + 4 = 7 apples. The answer is 7.", "7"),
        ("The answer is -$5. Then 9 more.", "-5"),
        ("#### 18\nThe answer is 3.", "18"),  # #### wins over everything
        ("So 2 + 2 = 4\nA: 4\nBye 5", "4"),
        ("16-3-4=9", "9"),  # minus between numbers is an operator
        ("I have 3 apples and 4 pears.", "4"),
        ("The answer is 12 and the answer is 13.", "13"),
        ("-.5", "-0.5"),
        ("#### yes", "yes"),
        ("no digits at all", None),
        ("", None),
    ],
)
def test_extract_answer_edge_cases(text, expected):
    assert extract_answer(text) == expected


def test_answers_match_by_value():
    assert answers_match("72.00", "72")
    assert answers_match("$1,000", "1000")
    assert answers_match("Yes.", "yes")
    assert not answers_match("5", "6")
    assert not answers_match(None, "6")


# --- diversity --------------------------------------------------------------------------
def test_distinct_n():
    assert distinct_n(["a b a b", "a c"], 1) == pytest.approx(3 / 6)
    assert distinct_n(["a b a b", "a c"], 2) == pytest.approx(3 / 4)  # ab ba ab | ac
    assert distinct_n(["", "x"], 2) == 0.0


def test_bleu_by_hand():
    # p1 = 5/6; smoothed p2 = (3+1)/(5+1), p3 = (1+1)/(4+1), p4 = (0+1)/(3+1); equal lengths.
    hypothesis = ["the", "cat", "sat", "on", "the", "mat"]
    reference = ["the", "cat", "is", "on", "the", "mat"]
    expected = (5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert bleu(hypothesis, [reference]) == pytest.approx(expected)
    # "the cat sat": p1 = 2/3, p2 = (1+1)/(2+1), p3 = (0+1)/(1+1), no 4-gram: (0+1)/(0+1);
    # 3 tokens against 6: brevity penalty exp(1 - 6/3).
    assert bleu(hypothesis[:3], [reference]) == pytest.approx(
        math.exp(1 - 6 / 3) * (2 / 3 * 2 / 3 * 1 / 2 * 1) ** 0.25
    )


def test_self_bleu_extremes_and_the_shortcut():
    assert self_bleu(["the cat sat on the mat"] * 4) == pytest.approx(1.0)
    assert self_bleu(["a b c d", "e f g h", "i j k l"]) == 0.0
    rng = random.Random(0)
    words = [f"w{i}" for i in range(12)]
    texts = [" ".join(rng.choices(words, k=rng.randint(0, 25))) for _ in range(30)]
    tokens = [t.split() for t in texts]
    brute = [bleu(tokens[i], tokens[:i] + tokens[i + 1 :]) for i in range(len(tokens))]
    assert 0 < self_bleu(texts) < 1
    assert self_bleu(texts) == pytest.approx(sum(brute) / len(brute))


# --- answer accuracy with a model forced to answer ---------------------------------------
class Scripted(torch.nn.Module):
    """Stands in for an LM: replies to each prompt it knows with a scripted token list."""

    arch = "scripted"
    streams = False

    def __init__(self, replies: dict[tuple[int, ...], list[int]]):
        super().__init__()
        self.replies = replies
        self.config = SimpleNamespace(block_size=4096)

    def generate(self, prompt_ids, max_new_tokens, *, eos_id, left_pad, **sampling):
        rows = [
            row + (self.replies[tuple(row[pad:])] + [eos_id] * max_new_tokens)[:max_new_tokens]
            for row, pad in zip(prompt_ids.tolist(), left_pad.tolist(), strict=True)
        ]
        return torch.tensor(rows)


@pytest.fixture(scope="module")
def chat_data(cache_dir):
    return prepare(data_config("demo_chat", records=300), cache_dir, progress=False)


def test_a_model_that_answers_right_scores_one_and_wrong_zero(chat_data):
    tokenizer = chat_data.tokenizer
    prompts = heldout_prompts(chat_data, 12)
    assert len(prompts) == 12 and all(p.reference for p in prompts)

    def scripted(offset: int) -> Scripted:
        replies = {}
        for prompt in prompts:
            answer = int(extract_answer(prompt.reference)) + offset
            # What follows the end of the turn is not part of the reply.
            replies[tuple(prompt.ids)] = [
                *tokenizer.encode(f"Easy. The answer is {answer}."),
                tokenizer.turn_end_id,
                *tokenizer.encode("The answer is 1234."),
            ]
        return Scripted(replies)

    options = {"max_new_tokens": 40, "batch_size": 4, "device": CPU, "progress": False}
    right = greedy_replies(scripted(0), tokenizer, prompts, **options)
    wrong = greedy_replies(scripted(1), tokenizer, prompts, **options)
    assert answer_metrics(tokenizer, prompts, right) == {
        "task/answer_accuracy": 1.0,
        "task/answers": 12,
    }
    assert answer_metrics(tokenizer, prompts, wrong)["task/answer_accuracy"] == 0.0
    unanswerable = [Prompt(prompts[0].ids, "", "no number in it")]
    assert answer_metrics(tokenizer, unanswerable, right[:1]) == {}
    rewards = {"answer_match": AnswerMatch(), "format": Format(r"answer is \d+\.$", 0.5)}
    scored = reward_metrics(rewards, tokenizer, prompts, right, max_new_tokens=40)
    assert scored == {"reward/mean": 1.5, "reward/answer_match": 1.0, "reward/format": 1.0}
    scored = reward_metrics(rewards, tokenizer, prompts, wrong, max_new_tokens=40)
    assert scored == {"reward/mean": 0.5, "reward/answer_match": 0.0, "reward/format": 1.0}


# --- likelihood -------------------------------------------------------------------------
def sharp_model(data, arch="ar"):
    torch.manual_seed(0)
    model = build_lm(
        arch_config(arch),
        TINY_SHAPE,
        data.tokenizer.vocab_size,
        data.tokenizer.special_ids,
    )
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    return model.eval()


def test_preference_accuracy_flips_when_chosen_and_rejected_swap(cache_dir):
    data = prepare(data_config("demo_pref", records=300), cache_dir, progress=False)
    model = sharp_model(data)
    batches = scoring_batches(data, model, num_samples=14, batch_size=4)
    assert sum(b.num_examples for b in batches) == 14
    assert all(b.rows_per_example == 2 for b in batches)

    def metrics(batches):
        scores = score_rows(model, batches, device=CPU, seed=0, noise_draws=1, progress=False)
        return preference_metrics(scores)

    swapped = []
    for batch in batches:
        order = torch.arange(len(batch)).view(-1, 2).flip(1).flatten()
        swapped.append(
            batch.with_fields(input_ids=batch.input_ids[order], loss_mask=batch.loss_mask[order])
        )
    before, after = metrics(batches), metrics(swapped)
    assert after["task/preference_accuracy"] == pytest.approx(
        1 - before["task/preference_accuracy"]
    )
    assert after["task/preference_margin"] == pytest.approx(-before["task/preference_margin"])
    assert before["task/preference_margin"] != 0
    assert before["task/pairs"] == after["task/pairs"] == 14


def test_batched_completion_equals_one_by_one_and_cuts_at_the_stop(chat_data):
    model = sharp_model(chat_data)
    prompts = [torch.randint(10, 200, (n,)).tolist() for n in (3, 5, 3, 7, 5, 3)]
    options = {"max_new_tokens": 10, "device": CPU, "progress": False}
    batched = complete(model, prompts, stop_ids=(-1,), batch_size=2, **options)
    single = [complete(model, [p], stop_ids=(-1,), batch_size=1, **options)[0] for p in prompts]
    assert batched == single and all(len(c) == 10 for c in batched)
    stop = batched[0][4]
    cut = complete(model, prompts[:1], stop_ids=(-1, stop), batch_size=1, **options)[0]
    assert cut == batched[0][: batched[0].index(stop)]


# --- the runner -------------------------------------------------------------------------
COMMON = {
    "val/loss",
    "val/perplexity",
    "val/perplexity_is_bound",
    "val/accuracy",
    "generation/distinct_1",
    "generation/distinct_2",
    "generation/self_bleu",
    "speed/tokens_per_sec_b1",
    "speed/tokens_per_sec_batched",
    "speed/ttft_ms",
}
ANSWERS = {"task/answer_accuracy", "task/answers"}
PAIRS = {"task/preference_accuracy", "task/preference_margin", "task/pairs"}


def run_eval(path, cache_dir, **changes):
    options = {
        "data_cfg": None,
        "metrics": ["perplexity", "accuracy", "generation", "speed", "task"],
        "num_samples": 6,
        "cache_dir": cache_dir,
        "device": "cpu",
        "batch_size": 4,
        "max_new_tokens": 8,
        "seed": 0,
        "progress": False,
        **changes,
    }
    return evaluate_checkpoint(path, **options)


@pytest.mark.parametrize(
    ("data", "stage", "arch", "expected"),
    [
        ("demo", "pretrain", "ar", COMMON),
        ("demo_chat", "sft", "ar", COMMON | ANSWERS),
        ("demo_prompts", "grpo", "ar", COMMON | ANSWERS),
        ("demo_pref", "dpo", "ar", COMMON | ANSWERS | PAIRS),
        ("demo_chat", "sft", "diffusion", COMMON | ANSWERS),
    ],
)
def test_every_stage_and_arch_reports_the_shared_names(
    tmp_path, cache_dir, data, stage, arch, expected
):
    path = save_random_checkpoint(
        tmp_path / "ckpt", data_config(data, records=300), cache_dir, arch=arch, stage=stage
    )
    samples = tmp_path / "samples.jsonl"
    results = run_eval(path, cache_dir, samples_path=samples)
    assert set(results) == expected
    assert list(results) == [name for name in METRIC_NAMES if name in results]
    assert results["val/perplexity"] == pytest.approx(math.exp(results["val/loss"]))
    assert results["val/perplexity_is_bound"] == (arch != "ar")
    for name, value in results.items():
        assert math.isfinite(value) and value >= 0, name
        if "accuracy" in name or "distinct" in name or "bleu" in name:
            assert value <= 1, name
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(lines) == 6 and set(lines[0]) == {"prompt", "completion", "reference"}


def test_a_bound_is_scored_on_the_same_noise_every_time(tmp_path, cache_dir):
    path = save_random_checkpoint(
        tmp_path / "ckpt", data_config("demo_pref", records=300), cache_dir, arch="diffusion"
    )
    metrics = ["perplexity", "accuracy", "task"]
    first = run_eval(path, cache_dir, metrics=metrics)
    assert first == run_eval(path, cache_dir, metrics=metrics)
    other_seed = run_eval(path, cache_dir, metrics=metrics, seed=1)
    assert other_seed["val/loss"] != first["val/loss"]
    table = comparison_table({"diffusion": first})
    assert f"| val/perplexity | {first['val/perplexity']:.4g} (bound) |" in table


def test_the_runs_own_data_is_reused_while_cached_in_cache_dir(tmp_path):
    cache, other = tmp_path / "cache", tmp_path / "other-cache"
    path = save_random_checkpoint(tmp_path / "ckpt", data_config("demo", 200), cache)
    first = run_eval(path, cache, metrics=["perplexity"])
    assert len(list((cache / "data").iterdir())) == 1  # the run's own, reused
    # In another cache_dir the run's data_dir is not opened (a checkpoint's paths stay
    # inside what the user names): its built-in data is prepared again there.
    assert run_eval(path, other, metrics=["perplexity"]) == first
    assert len(list((other / "data").iterdir())) == 1
    shutil.rmtree(cache)
    assert run_eval(path, cache, metrics=["perplexity"]) == first  # prepared again


def test_bad_options_fail_before_anything_is_loaded():
    with pytest.raises(ConfigError, match="unknown metric 'bleu'"):
        run_eval("/no/such/checkpoint", None, metrics=["perplexity", "bleu"])
    with pytest.raises(ConfigError, match="eval.num_samples=0"):
        run_eval("/no/such/checkpoint", None, num_samples=0)


def test_comparison_table_puts_checkpoints_side_by_side():
    table = comparison_table(
        {
            "base": {"arch": "ar", "val/loss": 1.0, "speed/tokens_per_sec_b1": 12345.6},
            "mdlm": {"arch": "diffusion", "val/perplexity": 3.0, "val/perplexity_is_bound": 1.0},
        }
    )
    assert table.splitlines() == [
        "| metric | base | mdlm |",
        "| --- | ---: | ---: |",
        "| arch | ar | diffusion |",
        "| val/loss | 1 | - |",
        "| val/perplexity | - | 3 (bound) |",
        "| speed/tokens_per_sec_b1 | 12,346 | - |",
    ]


def test_results_go_beside_the_checkpoints_in_a_new_folder_each_time(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt: "20260102-030405")

    def where(*paths):
        return default_output([Checkpoint(path=tmp_path / p, meta={}) for p in paths])

    base_10 = "runs/base/checkpoints/step_000010"
    base_20 = "runs/base/checkpoints/step_000020"
    sft_20 = "runs/sft/checkpoints/step_000020"
    assert where(base_20) == tmp_path / "runs/base/eval/20260102-030405/results.json"
    assert where(base_10, base_20).parent.parent == tmp_path / "runs/base/eval"  # one run
    assert where(base_20, sft_20).parent.parent == tmp_path / "runs/eval"  # out_dir
    assert where("exported/ckpt").parent.parent == tmp_path / "exported/eval"  # no run
    where(base_20).parent.mkdir(parents=True)  # an evaluation earlier in the same second
    assert where(base_20).parent.name == "20260102-030405-2"


def test_a_prompt_from_a_file_or_stdin_loses_its_final_newline_only(tmp_path, monkeypatch):
    def prompt(**keys):
        return read_prompt(OmegaConf.create({"prompt": "", "prompt_file": None, **keys}))

    (tmp_path / "p.txt").write_text("What is 2 plus 3, Bob?\n\n")
    assert prompt(prompt_file=str(tmp_path / "p.txt")) == "What is 2 plus 3, Bob?\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO('Say "hi", [Bob]\n'))
    assert prompt(prompt="-") == 'Say "hi", [Bob]'
    assert prompt(prompt="Ada has") == "Ada has"
    with pytest.raises(ConfigError, match="prompt_file not found: .*nope.txt"):
        prompt(prompt_file=str(tmp_path / "nope.txt"))
    with pytest.raises(ConfigError, match="give prompt or prompt_file, not both"):
        prompt(prompt="Ada", prompt_file=str(tmp_path / "p.txt"))


# --- the chat loop ----------------------------------------------------------------------
def test_chat_keeps_the_conversation_until_reset_and_stops_at_quit():
    seen = []

    def reply(messages, turn):
        seen.append([m["content"] for m in messages])
        return [f"reply {turn}"]

    written = []
    lines = ["hello", "  ", "and again", "/reset", "anew", "/quit", "never read"]
    converse(lines, reply, "be brief", written.append)
    assert seen == [
        ["be brief", "hello"],
        ["be brief", "hello", "reply 0", "and again"],
        ["be brief", "anew"],
    ]
    assert "".join(written) == "reply 0\nreply 1\nreply 2\n"
