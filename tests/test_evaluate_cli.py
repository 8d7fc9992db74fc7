"""``python -m lmpipe.evaluate``, ``lmpipe.generate chat=true`` and ``lmpipe.chat`` as a
user runs them (subprocesses), on a run trained by the CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmpipe.eval import METRIC_NAMES
from lmpipe.eval.generation import complete
from lmpipe.training.checkpoint import resolve_checkpoint

from conftest import TINY, assert_one_line_error, cli_env

# The demo mixture, smaller: data preparation takes a moment instead of seconds.
SMALL_DEMO = ["data.sources.0.num_records=2000", "data.sources.1.num_records=500"]
QUICK = ["eval.num_samples=6", "eval.batch_size=4", "eval.max_new_tokens=8", "device=cpu"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir) -> Path:
    """A pretraining run with checkpoints at steps 10 and 20."""
    out = tmp_path_factory.mktemp("runs")
    cmd = [
        sys.executable,
        "-m",
        "lmpipe.train",
        *TINY,
        *SMALL_DEMO,
        f"out_dir={out}",
        f"cache_dir={cache_dir}",
        "run_name=base",
        "trainer.max_steps=20",
        "trainer.save_interval=10",
        "trainer.eval_interval=20",
    ]
    subprocess.run(cmd, cwd=out, env=cli_env(), check=True, capture_output=True, timeout=300)
    return out / "base"


def test_two_checkpoints_give_one_table_with_the_shared_names(lmpipe, run_dir, cache_dir, tmp_path):
    first = run_dir / "checkpoints" / "step_000010"
    proc = lmpipe(
        "evaluate",
        f"checkpoint=[{first},{run_dir}]",
        f"cache_dir={cache_dir}",
        "eval.output=out/results.json",
        *QUICK,
    )
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    names = ["base@10", "base@20"]
    assert list(saved["results"]) == names
    for name in names:
        # Text data, no reward model, no KL reference: no task, reward, rm or kl metric.
        assert set(saved["results"][name]) == {
            n for n in METRIC_NAMES if not n.startswith(("task/", "reward/", "rm/", "kl/"))
        }
        assert saved["checkpoints"][name]["stage"] == "pretrain"
        assert saved["checkpoints"][name]["data"] == "demo"  # the run's own
        samples = tmp_path / "out" / "results_samples" / f"{name}.jsonl"
        assert len(samples.read_text().splitlines()) == 6
    # Training lowered the held-out loss between the two checkpoints.
    assert saved["results"]["base@20"]["val/loss"] < saved["results"]["base@10"]["val/loss"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| metric | base@10 | base@20 |" in table
    assert table.split("\n", 2)[2].strip() in proc.stdout  # the same table on the console


def test_data_names_a_mixture_from_conf(lmpipe, run_dir, cache_dir, tmp_path):
    proc = lmpipe(
        "evaluate",
        f"checkpoint={run_dir}",
        "data=demo_pref",
        "data.sources.0.num_records=300",
        f"cache_dir={cache_dir}",
        "eval.metrics=[task]",
        *QUICK,
    )
    # By default the results go into the run directory (not the working directory), and
    # the command says where.
    assert list(tmp_path.iterdir()) == []
    output = re.search(r"^wrote (\S+results\.json), (\S+results\.md)$", proc.stderr, re.M)
    assert output, proc.stderr
    assert Path(output.group(1)).parent.parent == run_dir.resolve() / "eval"
    saved = json.loads(Path(output.group(1)).read_text())
    assert "| metric | base@20 |" in Path(output.group(2)).read_text()
    (results,) = saved["results"].values()
    assert set(results) == {
        "task/answer_accuracy",
        "task/answers",
        "task/preference_accuracy",
        "task/preference_margin",
        "task/pairs",
    }
    assert saved["checkpoints"]["base@20"]["data"] == "demo_pref"


@pytest.mark.parametrize("problem", ["not_a_checkpoint", "no_tokenizer", "unknown_metric"])
def test_bad_input_is_one_clear_line(lmpipe, run_dir, tmp_path, problem):
    checkpoint = run_dir
    metrics = "[perplexity]"
    if problem == "not_a_checkpoint":
        checkpoint = tmp_path
        expected = f"{tmp_path} is not a checkpoint"
    elif problem == "no_tokenizer":
        checkpoint = tmp_path / "copy"
        shutil.copytree(run_dir / "checkpoints" / "step_000020", checkpoint)
        (checkpoint / "tokenizer.json").unlink()
        expected = "tokenizer.json is missing"
    else:
        metrics = "[perplexity,bleu]"
        expected = "unknown metric 'bleu'"
    proc = lmpipe("evaluate", f"checkpoint={checkpoint}", f"eval.metrics={metrics}", check=False)
    assert_one_line_error(proc, "lmpipe.evaluate: error:", expected)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("prompt", ['prompt="What is 2 plus 3, Bob?"', "prompt=-"])
def test_generate_in_chat_mode_prints_the_greedy_reply(lmpipe, run_dir, prompt):
    """A prompt with a comma: quoted inside the override, or piped in (``prompt=-``)."""
    question = "What is 2 plus 3, Bob?"
    proc = lmpipe(
        "generate",
        f"checkpoint={run_dir}",
        "chat=true",
        prompt,
        "temperature=0",
        "max_new_tokens=12",
        stdin=question + "\n",  # with the newline echo adds
    )
    checkpoint = resolve_checkpoint(run_dir)
    tokenizer = checkpoint.tokenizer()
    prompt = tokenizer.render_chat([{"role": "user", "content": question}], True)
    (reply,) = complete(
        checkpoint.build_model(),
        [tokenizer.encode(prompt)],
        max_new_tokens=12,
        stop_ids=(tokenizer.turn_end_id, tokenizer.eos_id),
        batch_size=1,
        device=torch.device("cpu"),
        progress=False,
    )
    assert proc.stdout == tokenizer.decode(reply) + "\n"


def test_a_prompt_with_a_comma_unquoted_says_how_to_quote_it(lmpipe, run_dir):
    proc = lmpipe("generate", f"checkpoint={run_dir}", "prompt=What is 2 plus 3, Bob?", check=False)
    assert_one_line_error(
        proc,
        "lmpipe.generate: error: prompt=What is 2 plus 3, Bob?: a comma makes a list",
        """quote the value inside the override, e.g. 'prompt="What is 2 plus 3, Bob?"'""",
        "prompt_file=<path>, or prompt=- to read it from stdin",
    )
    assert proc.returncode == 2


def test_generate_help_shows_how_to_quote_a_prompt(lmpipe):
    help_text = lmpipe("generate", "--help").stdout
    assert help_text.startswith("lmpipe.generate: sample from a checkpoint")
    assert """'prompt="What is 2 plus 3, Bob?"'""" in help_text
    assert "prompt_file: null" in help_text and "prompt=-" in help_text
    assert "stage:" not in help_text  # the training config groups are not generate's


def test_chat_reads_turns_from_stdin_until_quit_or_end_of_input(cache_dir, run_dir, tmp_path):
    def chat(stdin: str) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "lmpipe.chat",
            f"checkpoint={run_dir}",
            "temperature=0",
            "max_new_tokens=6",
        ]
        return subprocess.run(
            cmd, input=stdin, cwd=tmp_path, env=cli_env(), capture_output=True, text=True
        )

    # The same question in a fresh conversation gets the same greedy reply.
    proc = chat("What is 2 plus 3?\n/reset\nWhat is 2 plus 3?\n/quit\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    half = len(proc.stdout) // 2
    assert proc.stdout[:half] == proc.stdout[half:] and proc.stdout.endswith("\n")
    assert "(new conversation)" in proc.stderr
    proc = chat("Hello\n")  # ends at the end of input
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ar", "diffusion"])
def test_base_sft_and_dpo_side_by_side(lmpipe, tmp_path, cache_dir, arch):
    """A run from each stage, trained by the CLI, evaluated in one call on one data set."""
    out = tmp_path / "runs"
    common = [*TINY, f"arch={arch}", f"out_dir={out}", "trainer.eval_interval=100"]
    lmpipe("train", *common, "run_name=base", "trainer.max_steps=300")
    lmpipe(
        "train",
        *common,
        "stage=sft",
        "data=demo_chat",
        f"init_from={out / 'base'}",
        "run_name=sft",
        "trainer.max_steps=300",
        "optim.lr=1e-3",
    )
    lmpipe(
        "train",
        *common,
        "stage=dpo",
        "data=demo_pref",
        f"init_from={out / 'sft'}",
        "run_name=dpo",
        "trainer.max_steps=100",
        "optim.lr=1e-4",
    )
    lmpipe(
        "evaluate",
        f"checkpoint=[{out / 'base'},{out / 'sft'},{out / 'dpo'}]",
        "data=demo_pref",
        f"cache_dir={cache_dir}",
        "eval.num_samples=100",
        "eval.max_new_tokens=32",
    )
    (results,) = (out / "eval").glob("*/results.json")  # beside the runs: in out_dir
    saved = json.loads(results.read_text())
    assert [d["stage"] for d in saved["checkpoints"].values()] == ["pretrain", "sft", "dpo"]
    for results in saved["results"].values():
        assert set(results) == set(METRIC_NAMES)
        assert results["val/perplexity_is_bound"] == (arch != "ar")
    base, sft, dpo = saved["results"].values()
    # Fine-tuning fits the chats' replies; DPO then widens the margin of the chosen replies
    # over the rejected ones (measured, AR: 0.98 -> 1.79 nats; diffusion: 1.87 -> 1.99).
    assert sft["val/loss"] < 0.5 * base["val/loss"]
    assert dpo["task/preference_margin"] > sft["task/preference_margin"]
    if arch == "ar":  # the tiny diffusion model does not get answers right this early
        assert sft["task/answer_accuracy"] > base["task/answer_accuracy"]  # 0.27 vs 0
