"""RLAIF labelling: the LM judge asks both orders, pairs and ties, resume after a stop, the
output as preference data, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lmpipe.data.prepare import prepare
from lmpipe.data.prompts import Prompt, read_prompts
from lmpipe.errors import ConfigError
from lmpipe.objectives.rewards import Completion
from lmpipe.rlaif.judges import Candidates, LMJudge, RewardJudge
from lmpipe.rlaif.labeler import PAIRS_FILE, Labeler, LabelSettings

from conftest import ROOT, assert_one_line_error, data_config, save_random_checkpoint

TEMPLATE = "Q: {prompt} | A: {a} | B: {b}"


class RecordingVerdicts:
    """A stub LM judge backend: prefers the reply named first when ``biased``, else the
    reply containing "7" (no preference between two without); records every question."""

    def __init__(self, biased: bool = False):
        self.biased = biased
        self.questions: list[str] = []

    def logps(self, questions, choices):
        self.questions += questions
        out = []
        for q in questions:
            a, b = q.split("| A: ")[1].split(" | B: ")
            if self.biased or ("7" in a) > ("7" in b):
                out.append([0.0, -2.0])
            else:
                out.append([-2.0, 0.0] if ("7" in b) > ("7" in a) else [0.0, 0.0])
        return torch.tensor(out).log_softmax(dim=-1)


def candidates(*texts: str) -> Candidates:
    prompt = Prompt([1, 2], "What is 3 plus 4?", "7", ({"role": "user", "content": "3+4?"},))
    replies = [Completion(t, 3, False, 8, "7") for t in texts]
    return Candidates(prompt, replies)


def lm_judge(verdicts) -> LMJudge:
    judge = LMJudge(model="stub", template=TEMPLATE, choices=["A", "B"], batch_size=4)
    judge.verdicts = verdicts
    return judge


def test_the_lm_judge_asks_every_pair_in_both_orders():
    verdicts = RecordingVerdicts()
    scores = lm_judge(verdicts).score([candidates("It is 7.", "It is 8.", "It is 9.")])[0]
    asked = {
        (q.split("| A: ")[1].split(" | B: ")[0], q.split(" | B: ")[1]) for q in verdicts.questions
    }
    replies = ["It is 7.", "It is 8.", "It is 9."]
    assert asked == {(a, b) for a in replies for b in replies if a != b}  # 6 = 3 x 2 orders
    assert len(verdicts.questions) == 6 and verdicts.questions[0].startswith("Q: 3+4? |")
    p = torch.tensor([0.0, -2.0]).softmax(-1)[0].item()  # the stub's confidence
    # "7" wins its 4 comparisons with p; "8" and "9" lose to it (1 - p, twice) and tie
    # with each other (0.5, twice): each is judged 4 times.
    assert scores[0] == pytest.approx(p)
    assert scores[1] == pytest.approx((2 * (1 - p) + 1) / 4) == scores[2]


def test_a_judge_that_prefers_a_position_ties_and_its_pair_is_dropped(tmp_path):
    scores = lm_judge(RecordingVerdicts(biased=True)).score([candidates("It is 7.", "It is 8.")])
    assert scores[0][0] == pytest.approx(scores[0][1]) == pytest.approx(0.5)


class FlakyJudge(RewardJudge):
    """Scores replies by how many "e" they hold; raises on its ``fail_at``-th call."""

    def __init__(self, fail_at: int | None = None):
        from lmpipe.objectives.rewards import Format

        super().__init__("rule", {"format": Format("e")})
        self.calls, self.fail_at = 0, fail_at

    def score(self, groups):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt  # the run stops here
        return [[float(r.text.count("e")) for r in g.replies] for g in groups]


@pytest.fixture(scope="module")
def policy(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("label")
    path = save_random_checkpoint(
        root / "policy", data_config("demo_prompts", 300), cache_dir, scale=0.3
    )
    from lmpipe.training.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    data = prepare(data_config("demo_prompts", 300), cache_dir, tokenizer=checkpoint.tokenizer())
    return path, checkpoint, data


def labeler(policy, judge, out) -> Labeler:
    _, checkpoint, data = policy
    settings = LabelSettings(
        num_replies=3, max_new_tokens=10, temperature=1.0, batch_size=4, seed=7
    )
    return Labeler(
        model=checkpoint.build_model(),
        tokenizer=data.tokenizer,
        judge=judge,
        settings=settings,
        device=torch.device("cpu"),
        out=out,
        describe={"policy": str(checkpoint.path), "data": "demo_prompts", "split": "train"},
    )


def test_a_stopped_labelling_continues_where_it_stopped(policy, tmp_path):
    prompts = read_prompts(policy[2], "train", 14)  # 4 chunks of 4, 4, 4, 2
    full = labeler(policy, FlakyJudge(), tmp_path / "full").run(prompts, {}, progress=False)
    assert full["pairs"] + full["ties_dropped"] == 14 and full["pairs"] > 0
    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        labeler(policy, FlakyJudge(fail_at=3), stopped).run(prompts, {}, progress=False)
    progress = json.loads((stopped / "progress.json").read_text())
    assert progress["prompts_done"] == 8
    with (stopped / PAIRS_FILE).open("a") as fh:
        fh.write('{"prompt": "half a li')  # a chunk cut off while being written
    resumed = labeler(policy, FlakyJudge(), stopped).run(prompts, {}, progress=False)
    assert (stopped / PAIRS_FILE).read_bytes() == (tmp_path / "full" / PAIRS_FILE).read_bytes()
    assert resumed["pairs"] == full["pairs"]
    records = [json.loads(line) for line in (stopped / PAIRS_FILE).read_text().splitlines()]
    for record in records:
        assert record["chosen_score"] > record["rejected_score"]
        assert record["chosen"].count("e") == record["chosen_score"]
        assert record["prompt"][-1]["role"] == "user" and record["judge"].startswith("rule:")
    # Other settings never continue these labels.
    other = labeler(policy, FlakyJudge(), stopped)
    other.settings = LabelSettings(4, 10, 1.0, 4, 7)
    with pytest.raises(ConfigError, match="holds labels made with other settings"):
        other.run(prompts, {}, progress=False)


def test_labelled_pairs_train_a_reward_model_through_a_data_config(
    lmpipe, policy, cache_dir, tmp_path
):
    """The CLI end to end: label with a rule judge (rewards on the command line), then the
    labelled_pairs data config reads them as preference data."""
    path, checkpoint, _ = policy
    out = tmp_path / "labels"
    proc = lmpipe(
        "label",
        f"policy={path}",
        f"out={out}",
        "data.sources.0.num_records=300",
        "num_prompts=12",
        "num_replies=3",
        "max_new_tokens=10",
        "batch_size=6",
        "reward=[format]",
        "reward.format.pattern=e",
        f"cache_dir={cache_dir}",
        "device=cpu",
        "progress=false",
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pairs"] + manifest["ties_dropped"] == 12 and manifest["pairs"] > 0
    assert f"{manifest['pairs']} pairs" in proc.stdout
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "data" / "labelled_pairs.yaml"))
    cfg["sources"][0]["path"] = str(out / "pairs.jsonl")
    cfg["split"]["val_fraction"] = 0.0
    data = prepare(cfg, cache_dir, tokenizer=checkpoint.tokenizer(), progress=False)
    assert data.manifest["format"] == "preference"
    assert data.manifest["splits"]["train"]["documents"] == 2 * manifest["pairs"]


def test_label_with_a_judge_checkpoint_that_does_not_exist_is_one_line(
    lmpipe, policy, cache_dir, tmp_path
):
    proc = lmpipe(
        "label",
        f"policy={policy[0]}",
        f"out={tmp_path / 'labels'}",
        "data.sources.0.num_records=300",
        "judge=rm",
        "reward.rm.checkpoint=/nowhere/rm",
        f"cache_dir={cache_dir}",
        "device=cpu",
        check=False,
    )
    assert_one_line_error(proc, "checkpoint not found: /nowhere/rm")
    assert not (tmp_path / "labels").exists()


def test_prompts_that_all_leave_no_room_for_a_reply_are_refused(policy, cache_dir, tmp_path):
    """The error the CLI prints as one line, in-process: the model's block is 64 tokens."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmpipe.errors import DataError
    from lmpipe.label import label

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "label",
            overrides=[
                f"policy={policy[0]}",
                f"out={tmp_path / 'labels'}",
                "data.sources.0.num_records=300",
                "max_new_tokens=60",
                f"cache_dir={cache_dir}",
                "device=cpu",
                "progress=false",
            ],
        )
    with pytest.raises(DataError, match="no prompts left to label .*longer_than_block_minus"):
        label(cfg)
    assert not (tmp_path / "labels").exists()
