"""Put a pipeline's measured report card into README.md, so the README shows what the
code prints and not what it printed some commits ago.

    python docs/readme_report.py runs/lifecycle-ar --command "make demo" --wall "8 min 28 s"

saves the run's report.json as docs/reports/<name>.json (with the command, commit and
date it was measured at) and rewrites README.md between ``<!-- report-card:<name> -->``
and ``<!-- /report-card -->``. ``tests/test_docs.py`` fails while README and the saved
report disagree, or when the pipeline's stages changed since the report was measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
from pathlib import Path

from lmpipe.eval.report import report_card

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REPORTS = ROOT / "docs" / "reports"


def block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- report-card:{name} -->\n)(.*?)(<!-- /report-card -->)", re.S)


def render(saved: dict) -> str:
    measured = saved["measured"]
    return (
        f"Measured with `{measured['command']}` at commit {measured['commit']} on "
        f"{measured['date']} ({measured['wall']}), saved in "
        f"`docs/reports/{saved['name']}.json`:\n\n"
        f"{report_card(saved['stages'], saved['report'])}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="the pipeline's directory (report.json)")
    parser.add_argument("--command", required=True, help="the command that made it")
    parser.add_argument("--wall", required=True, help="its wall time, as measured")
    parser.add_argument("--commit", help="the commit it ran at (default: this checkout's HEAD)")
    args = parser.parse_args()
    saved = json.loads((args.directory / "report.json").read_text())
    for row in saved["stages"]:  # paths of this machine mean nothing to a reader
        row.pop("run_dir", None)
        row.pop("checkpoint", None)
    commit = (
        args.commit
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    )
    saved = {
        "name": args.directory.name,
        "measured": {
            "command": args.command,
            "commit": commit,
            "date": datetime.date.today().isoformat(),
            "wall": args.wall,
        },
        **saved,
    }
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / f"{saved['name']}.json").write_text(json.dumps(saved, indent=2) + "\n")
    text = README.read_text()
    pattern = block(saved["name"])
    if not pattern.search(text):
        raise SystemExit(f"README.md has no '<!-- report-card:{saved['name']} -->' block")
    README.write_text(pattern.sub(lambda m: m[1] + render(saved) + m[3], text))
    print(f"README.md: report card of {saved['name']} from {REPORTS / saved['name']}.json")


if __name__ == "__main__":
    main()
