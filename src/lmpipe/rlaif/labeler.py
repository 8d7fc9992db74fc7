"""Label preference pairs: prompts + a policy -> N seeded replies each -> a judge -> pairs.

For every prompt the policy samples ``num_replies`` replies (prompts in chunks of
``batch_size``; chunk k's replies are drawn from a generator seeded by ``(seed, k)``, so
they do not depend on where a run stopped); the judge scores them and the best and the
worst form one pair (one pair per prompt, so a held-out split by record holds out
prompts). A prompt whose replies all score the same is a tie: dropped and counted.

``out/pairs.jsonl`` gets one record per pair, ``{"prompt": [messages], "chosen",
"rejected", "chosen_score", "rejected_score", "judge", "answer"}``: preference data for
``stage=rm`` or ``stage=dpo`` (``data=labelled_pairs data.sources.0.path=<out>/pairs.jsonl``).
``out/progress.json`` records after each chunk how far the file is complete, so a run
that stopped continues where it did (a rerun with other settings is refused);
``out/manifest.json`` is written at the end: counts, settings, the policy and the judge.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmpipe.data.prompts import Prompt
from lmpipe.data.tokenizer import Tokenizer
from lmpipe.errors import ConfigError, DataError
from lmpipe.eval.generation import complete
from lmpipe.models import LM
from lmpipe.objectives.rewards import Completion
from lmpipe.rlaif.judges import Candidates, Judge
from lmpipe.seeding import derive_seed
from lmpipe.tracking.progress import progress_bar

PAIRS_FILE = "pairs.jsonl"
PROGRESS_FILE = "progress.json"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class LabelSettings:
    num_replies: int
    max_new_tokens: int
    temperature: float
    batch_size: int  # prompts per chunk (x num_replies replies per generation call)
    seed: int

    def check(self) -> None:
        for key in ("num_replies", "max_new_tokens", "batch_size"):
            value = getattr(self, key)
            low = 2 if key == "num_replies" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{key}={value!r} must be an integer >= {low}")
        if not isinstance(self.temperature, int | float) or not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature!r} must be a number > 0")


def usable_prompts(prompts: list[Prompt], model: LM, max_new_tokens: int) -> tuple[list, dict]:
    """The prompts a reply of ``max_new_tokens`` fits after (in the model's block), and how
    many were dropped by reason."""
    room = model.config.block_size - max_new_tokens
    kept = [p for p in prompts if len(p.ids) <= room]
    dropped = {"longer_than_block_minus_max_new_tokens": len(prompts) - len(kept)}
    return kept, {k: v for k, v in dropped.items() if v}


def fingerprint(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Labeler:
    def __init__(
        self,
        *,
        model: LM,
        tokenizer: Tokenizer,
        judge: Judge,
        settings: LabelSettings,
        device: torch.device,
        out: Path,
        describe: dict,
    ):
        settings.check()
        self.model = model
        self.tokenizer = tokenizer
        self.judge = judge
        self.settings = settings
        self.device = device
        self.out = Path(out)
        self.describe = describe  # policy, data, split: for the manifest and the fingerprint

    # --- progress -------------------------------------------------------------------
    def _progress(self, key: str) -> dict:
        """Where a previous run stopped (its pairs file cut back to the last whole chunk),
        or a fresh start."""
        path = self.out / PROGRESS_FILE
        fresh = {"fingerprint": key, "prompts_done": 0, "bytes": 0, "pairs": 0, "ties": 0}
        if not path.is_file():
            if (self.out / PAIRS_FILE).exists():
                raise ConfigError(
                    f"out={self.out} already holds {PAIRS_FILE} without {PROGRESS_FILE}: "
                    "choose another out"
                )
            return fresh
        state = json.loads(path.read_text())
        if state["fingerprint"] != key:
            raise ConfigError(
                f"out={self.out} holds labels made with other settings (policy, data, judge or "
                "sampling): choose another out, or delete it to start over"
            )
        with (self.out / PAIRS_FILE).open("r+b") as fh:
            fh.truncate(state["bytes"])
        return state

    def _save_progress(self, state: dict) -> None:
        tmp = self.out / f".{PROGRESS_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.out / PROGRESS_FILE)

    # --- the loop -----------------------------------------------------------------------
    def run(self, prompts: list[Prompt], dropped: dict, progress: bool = True) -> dict:
        if not prompts:
            raise DataError(
                f"no prompts left to label (dropped: {dropped or 'none'}; data="
                f"{self.describe.get('data')}, split={self.describe.get('split')})"
            )
        s = self.settings
        key = fingerprint(
            **self.describe, judge=self.judge.identity, settings=s.__dict__, prompts=len(prompts)
        )
        self.out.mkdir(parents=True, exist_ok=True)
        state = self._progress(key)
        started = time.perf_counter()
        bar = progress_bar(
            total=len(prompts),
            initial=state["prompts_done"],
            desc="label",
            unit="prompt",
            enabled=progress,
        )
        with (self.out / PAIRS_FILE).open("ab") as fh:
            for at in range(state["prompts_done"], len(prompts), s.batch_size):
                chunk = prompts[at : at + s.batch_size]
                lines, ties = self._label_chunk(chunk, at // s.batch_size)
                fh.write("".join(lines).encode())
                fh.flush()
                os.fsync(fh.fileno())
                state.update(
                    prompts_done=at + len(chunk),
                    bytes=fh.tell(),
                    pairs=state["pairs"] + len(lines),
                    ties=state["ties"] + ties,
                )
                self._save_progress(state)
                bar.update(len(chunk))
                bar.set_postfix(pairs=state["pairs"], ties=state["ties"])
        bar.close()
        manifest = {
            **self.describe,
            "judge": self.judge.identity,
            "settings": s.__dict__,
            "prompts": len(prompts),
            "dropped_prompts": dropped,
            "pairs": state["pairs"],
            "ties_dropped": state["ties"],
            "pairs_file": str(self.out / PAIRS_FILE),
            "seconds_this_run": round(time.perf_counter() - started, 1),
        }
        (self.out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest

    def _label_chunk(self, chunk: list[Prompt], index: int) -> tuple[list[str], int]:
        """The pair lines of one chunk of prompts, and its number of ties."""
        s, tokenizer = self.settings, self.tokenizer
        stop = tokenizer.turn_end_id
        replies = complete(
            self.model,
            [p.ids for p in chunk for _ in range(s.num_replies)],
            max_new_tokens=s.max_new_tokens,
            stop_ids=(stop, tokenizer.eos_id),
            batch_size=len(chunk) * s.num_replies,
            device=self.device,
            temperature=s.temperature,
            seed=derive_seed(s.seed, "label", index),
            progress=False,
        )
        groups = []
        for n, prompt in enumerate(chunk):
            own = replies[n * s.num_replies : (n + 1) * s.num_replies]
            groups.append(Candidates(prompt, [self._completion(prompt, r) for r in own]))
        lines, ties = [], 0
        for group, scores in zip(groups, self.judge.score(groups), strict=True):
            best = max(range(len(scores)), key=scores.__getitem__)
            worst = min(range(len(scores)), key=scores.__getitem__)
            chosen, rejected = group.replies[best].text, group.replies[worst].text
            if scores[best] == scores[worst] or chosen.strip() == rejected.strip():
                ties += 1
                continue
            record = {
                "prompt": list(group.prompt.messages),
                "chosen": chosen,
                "rejected": rejected,
                "chosen_score": scores[best],
                "rejected_score": scores[worst],
                "judge": self.judge.identity,
                "answer": group.prompt.reference,
            }
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        return lines, ties

    def _completion(self, prompt: Prompt, reply: list[int]) -> Completion:
        budget = self.settings.max_new_tokens
        stopped = len(reply) < budget
        return Completion(
            text=self.tokenizer.decode(reply),
            tokens=len(reply) + stopped,
            truncated=not stopped,
            max_tokens=budget,
            reference=prompt.reference,
            prompt_ids=tuple(prompt.ids),
            ids=tuple([*reply, self.tokenizer.turn_end_id] if stopped else reply),
        )
