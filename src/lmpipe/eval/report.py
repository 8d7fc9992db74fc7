"""The pipeline's report card: one row per stage, held-out metrics, loss curves.

Training figures (steps, tokens, final losses) come from each stage's ``metrics.jsonl``;
held-out figures come from ``evaluate_checkpoint``, the code path of ``lmpipe.evaluate``,
run on every stage's final model with the same data, so the rows compare.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmpipe.config import group_option
from lmpipe.tracking.jsonl import read_metrics
from lmpipe.training.checkpoint import resolve_checkpoint

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
]


# The report's held-out data and what each one measures (preference data also gives an
# answer accuracy, on the pairs' prompts; the report takes answers from answer_data only).
HELD_OUT = {
    "answer_data": ("task/answer_accuracy", "reward/mean"),
    "preference_data": ("task/preference_accuracy", "task/preference_margin"),
}


def _last(metrics: list[dict], key: str) -> float | None:
    values = [m[key] for m in metrics if key in m]
    return values[-1] if values else None


def stage_row(name: str, run_dir: Path, wall_s: float, report_cfg: dict, **evaluation) -> dict:
    from lmpipe.eval.runner import evaluate_checkpoint

    checkpoint = resolve_checkpoint(run_dir, log=lambda _: None)
    metrics = read_metrics(run_dir)
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
    for data_key, names in HELD_OUT.items():
        if report_cfg.get(data_key):
            results = evaluate_checkpoint(
                checkpoint,
                data_cfg=group_option("data", report_cfg[data_key]),
                metrics=["task", "reward"] if data_key == "answer_data" else ["task"],
                num_samples=int(report_cfg["num_samples"]),
                max_new_tokens=int(report_cfg["max_new_tokens"]),
                batch_size=int(report_cfg["batch_size"]),
                seed=int(report_cfg["seed"]),
                **evaluation,
            )
            row.update({name: results.get(name) for name in names})
    return row


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
    stages: list[tuple[str, Path, float]],
    report_cfg: dict,
    **evaluation,
) -> Path:
    """Write report.json, report.md and ``curves_<stage>.png`` into ``directory``."""
    rows = []
    for name, run_dir, wall_s in stages:
        rows.append(stage_row(name, run_dir, wall_s, report_cfg, **evaluation))
        plot_curves(name, run_dir, directory / f"curves_{name}.png")
    (directory / "report.json").write_text(json.dumps({"stages": rows}, indent=2) + "\n")
    held_out = ", ".join(
        f"{what} on data={report_cfg[key]} ({report_cfg['num_samples']} held-out examples)"
        for key, what in (
            ("answer_data", "answer accuracy"),
            ("preference_data", "preference accuracy"),
        )
        if report_cfg.get(key)
    )
    text = [
        f"# {directory.name}: what each stage did",
        "",
        markdown_table(rows),
        "",
        f"Held-out metrics of every stage's final model: {held_out}. The reward is the RL "
        "stage's reward (weighted sum) of the greedy replies to the answer prompts. Preference "
        "accuracy is the share of pairs whose chosen reply the model scores above the rejected "
        "one; the margin is the mean log-probability difference.",
        "",
        *[f"![{name}](curves_{name}.png)" for name, _, _ in stages],
        "",
    ]
    path = directory / "report.md"
    path.write_text("\n".join(text))
    return path
