"""The pipeline's report card: one row per stage (and input model), held-out metrics, loss
curves.

Training figures (steps, tokens, final losses) come from each stage's ``metrics.jsonl``;
held-out figures come from ``evaluate_checkpoint``, the code path of ``lmpipe.evaluate``,
run on every stage's final model with the same data, so the rows compare. A reward model
is reported by its accuracy on its own held-out pairs; a labelling stage by its pairs.
With ``report.reward_model`` every policy's greedy replies are also scored by that reward
model (``rm/score``), and with ``report.kl_reference`` its KL to that model is measured.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmpipe.config import group_option
from lmpipe.objectives.reward_model import LearnedReward, reward_head
from lmpipe.rlaif.labeler import MANIFEST_FILE, PAIRS_FILE
from lmpipe.tracking.jsonl import read_metrics
from lmpipe.training.checkpoint import Checkpoint, resolve_checkpoint

COLUMNS = [  # (key, header, format)
    ("stage", "stage", "{}"),
    ("steps", "steps", "{:,}"),
    ("tokens", "tokens", "{:,.0f}"),
    ("wall_s", "wall time", "{:.0f} s"),
    ("train/loss", "final train loss", "{:.4f}"),
    ("val/loss", "final val loss", "{:.4f}"),
    ("task/answer_accuracy", "answer accuracy", "{:.3f}"),
    ("reward/mean", "reward", "{:.3f}"),
    ("task/preference_accuracy", "preference accuracy", "{:.3f}"),
    ("task/preference_margin", "preference margin", "{:+.3f}"),
    ("val/rewards/accuracy", "DPO val reward accuracy", "{:.3f}"),
    ("val/greedy/rewards/mean", "RL val reward (greedy)", "{:.3f}"),
    ("pairs", "pairs labelled", "{:,}"),
    ("ties", "ties dropped", "{:,}"),
    ("rm/accuracy", "RM held-out accuracy", "{:.3f}"),
    ("rm/score", "RM score (greedy)", "{:+.3f}"),
    ("kl/sequence", "KL to reference", "{:.3f}"),
]


# The report's held-out data and what each one measures (preference data also gives an
# answer accuracy, on the pairs' prompts; the report takes answers from answer_data only).
HELD_OUT = {
    "answer_data": ("task/answer_accuracy", "reward/mean", "task/answers"),
    "preference_data": ("task/preference_accuracy", "task/preference_margin", "task/pairs"),
}


def _last(metrics: list[dict], key: str) -> float | None:
    values = [m[key] for m in metrics if key in m]
    return values[-1] if values else None


def stage_row(
    name: str, run_dir: Path, wall_s: float | None, report_cfg: dict, **evaluation
) -> dict:
    if (run_dir / PAIRS_FILE).is_file():  # a labelling stage
        manifest = json.loads((run_dir / MANIFEST_FILE).read_text())
        return {
            "stage": name,
            "run_dir": str(run_dir),
            "wall_s": wall_s,
            "pairs": manifest["pairs"],
            "ties": manifest["ties_dropped"],
        }
    checkpoint = resolve_checkpoint(run_dir, log=lambda _: None)
    metrics = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    row = {
        "stage": name,
        "run_dir": str(run_dir),
        "checkpoint": str(checkpoint.path),
        "steps": checkpoint.step,
        "tokens": _last(metrics, "train/tokens"),
        "wall_s": wall_s,
    }
    for key in (
        "train/loss",
        "val/loss",
        "val/rewards/accuracy",
        "val/rewards/margin",
        "val/greedy/rewards/mean",
    ):
        row[key] = _last(metrics, key)
    if reward_head(checkpoint) is not None:  # a reward model: its held-out pairs
        row.update(_evaluate(checkpoint, None, ["rm"], report_cfg, **evaluation))
        return row
    for data_key, names in HELD_OUT.items():
        if report_cfg.get(data_key):
            metrics = ["task", "reward"] if data_key == "answer_data" else ["task"]
            results = _evaluate(checkpoint, report_cfg[data_key], metrics, report_cfg, **evaluation)
            row.update({name: results.get(name) for name in names})
    answers = report_cfg.get("answer_data")
    if answers and report_cfg.get("reward_model"):
        scorer = {"rm": LearnedReward(checkpoint=report_cfg["reward_model"])}
        results = _evaluate(
            checkpoint, answers, ["reward"], report_cfg, **{**evaluation, "rewards": scorer}
        )
        row["rm/score"] = results.get("reward/rm")
    if answers and report_cfg.get("kl_reference"):
        results = _evaluate(
            checkpoint,
            answers,
            ["kl"],
            report_cfg,
            **{**evaluation, "reference": report_cfg["kl_reference"]},
        )
        row["kl/sequence"] = results.get("kl/sequence")
    return row


def _count(rows: list[dict], key: str) -> str:
    """How many held-out examples the stages were measured on (the same data for every
    stage; fewer than ``num_samples`` when the data has fewer)."""
    counts = {row[key] for row in rows if row.get(key) is not None}
    return "/".join(f"{n:,}" for n in sorted(counts)) or "no"


def _evaluate(
    checkpoint: Checkpoint, data: str | None, metrics: list[str], report_cfg: dict, **evaluation
) -> dict:
    from lmpipe.eval.runner import evaluate_checkpoint

    return evaluate_checkpoint(
        checkpoint,
        data_cfg=group_option("data", data) if data else None,
        metrics=metrics,
        num_samples=int(report_cfg["num_samples"]),
        max_new_tokens=int(report_cfg["max_new_tokens"]),
        batch_size=int(report_cfg["batch_size"]),
        seed=int(report_cfg["seed"]),
        **evaluation,
    )


def plot_curves(name: str, run_dir: Path, path: Path) -> None:
    """Train and held-out loss against steps (and the earlier stage's held-out loss, when
    the stage tracked forgetting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(run_dir)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, style in (("train/loss", "-"), ("val/loss", "o-"), ("pretrain_val/loss", "s--")):
        points = [(m["step"], m[key]) for m in metrics if key in m]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=key, markersize=3)
    ax.set_title(f"{name}: loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(rows: list[dict]) -> str:
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lines = [
        "| " + " | ".join(header for _, header, _ in columns) + " |",
        "|" + "|".join(" --- " for _ in columns) + "|",
    ]
    for row in rows:
        cells = ["" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    directory: Path,
    stages: list[tuple[str, Path, float | None]],
    report_cfg: dict,
    **evaluation,
) -> Path:
    """Write report.json, report.md and ``curves_<stage>.png`` (stages that trained) into
    ``directory``. ``stages``: (name, directory, wall seconds or None for an input)."""
    rows = []
    for name, run_dir, wall_s in stages:
        rows.append(stage_row(name, run_dir, wall_s, report_cfg, **evaluation))
        if (run_dir / "metrics.jsonl").is_file():
            plot_curves(name, run_dir, directory / f"curves_{name}.png")
    report = {"stages": rows, "report": report_cfg}
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plotted = [name for name, _, _ in stages if (directory / f"curves_{name}.png").is_file()]
    text = [
        f"# {directory.name}: what each stage did",
        "",
        report_card(rows, report_cfg),
        "",
        *[f"![{name}](curves_{name}.png)" for name in plotted],
        "",
    ]
    path = directory / "report.md"
    path.write_text("\n".join(text))
    return path


def report_card(rows: list[dict], report_cfg: dict) -> str:
    """The report's table and what its held-out columns measure (report.md's body; the
    README shows the demo's, rendered from its saved report.json)."""
    held_out = ", ".join(
        f"{what} on data={report_cfg[key]} ({_count(rows, count)} held-out {unit})"
        for key, what, count, unit in (
            ("answer_data", "answer accuracy", "task/answers", "questions"),
            ("preference_data", "preference accuracy", "task/pairs", "pairs"),
        )
        if report_cfg.get(key)
    )
    notes = [
        f"Held-out metrics of every stage's final model: {held_out}.",
        "The reward is the RL stage's reward (weighted sum) of the greedy replies to the answer "
        "prompts. Preference accuracy is the share of pairs whose chosen reply the model scores "
        "above the rejected one; the margin is the mean log-probability difference.",
    ]
    if report_cfg.get("reward_model"):
        notes.append(
            f"The RM score is the mean score that the reward model {report_cfg['reward_model']} "
            "gives the greedy replies to the answer prompts; a reward model's own row shows its "
            "accuracy on its held-out pairs."
        )
    if report_cfg.get("kl_reference"):
        notes.append(
            f"KL to reference is KL(model || {report_cfg['kl_reference']}) in nats per reply, "
            "estimated on replies sampled at temperature 1 to the answer prompts."
        )
    return markdown_table(rows) + "\n\n" + " ".join(notes)
