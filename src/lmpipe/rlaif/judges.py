"""Judges: each scores the replies to one prompt, higher is better; the labeller pairs the
best with the worst.

- ``RewardJudge``: the weighted sum of rewards from ``conf/reward`` per reply -- ``rule``
  (answer correctness and format, for prompts with answers) or ``rm`` (a reward model);
- ``LMJudge``: an LM asked which of two replies is better, scored by the probabilities of
  its two verdict tokens ("A", "B"). Every pair is asked in both orders, so that a
  preference for a position cancels out: a reply's score is its mean probability of
  winning over all its comparisons. The LM is an lmpipe checkpoint or a local Hugging Face
  causal LM folder (``config.json``), prompted through its own chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from lmpipe.batch import Batch, left_padded
from lmpipe.data.prompts import Prompt
from lmpipe.errors import ConfigError
from lmpipe.objectives.rewards import Completion, Reward, RewardContext, score


@dataclass(frozen=True)
class Candidates:
    """One prompt and the replies to judge."""

    prompt: Prompt
    replies: list[Completion]


class Judge:
    name: str = "judge"

    def setup(self, ctx: RewardContext) -> None:
        """Load what judging needs (models), on ``ctx.device``."""

    @property
    def identity(self) -> str:
        """What judged, as written into every pair and the manifest."""
        return self.name

    def score(self, groups: Sequence[Candidates]) -> list[list[float]]:
        raise NotImplementedError


class RewardJudge(Judge):
    """Replies scored by rewards (``rule``: answer_match + format; ``rm``: a reward model)."""

    def __init__(self, name: str, rewards: dict[str, Reward] | None):
        if not rewards:
            raise ConfigError(f"judge {name} needs rewards (reward=[...])")
        self.name = name
        self.rewards = dict(rewards)

    def setup(self, ctx: RewardContext) -> None:
        for reward in self.rewards.values():
            reward.setup(ctx)

    @property
    def identity(self) -> str:
        terms = []
        for name, reward in self.rewards.items():
            source = getattr(reward, "checkpoint", None)
            terms.append(f"{reward.weight:g}*{name}" + (f"({source})" if source else ""))
        return f"{self.name}:{'+'.join(terms)}"

    def score(self, groups: Sequence[Candidates]) -> list[list[float]]:
        flat = [reply for group in groups for reply in group.replies]
        totals, _ = score(self.rewards, flat)
        out, at = [], 0
        for group in groups:
            out.append(totals[at : at + len(group.replies)])
            at += len(group.replies)
        return out


class Verdicts(Protocol):
    """An LM's log-probabilities of each verdict as the first token of its answer."""

    def logps(self, questions: list[str], choices: Sequence[str]) -> Tensor:
        """(len(questions), len(choices)) log p(choice | question)."""
        ...


class LMJudge(Judge):
    """An LM compares every two replies, in both orders (``template`` has ``{prompt}``,
    ``{a}`` and ``{b}``; ``choices`` are the verdicts naming reply a and reply b)."""

    name = "lm"

    def __init__(self, model: str | None, template: str, choices: Sequence[str], batch_size: int):
        if not model:
            raise ConfigError("judge.model is not set: an lmpipe checkpoint or HF model folder")
        if len(choices) != 2:
            raise ConfigError(f"judge.choices={list(choices)!r} must name two verdicts")
        for field in ("{prompt}", "{a}", "{b}"):
            if field not in template:
                raise ConfigError(f"judge.template has no {field}")
        self.model = str(model)
        self.template = template
        self.choices = tuple(choices)
        self.batch_size = batch_size
        self.verdicts: Verdicts | None = None

    @property
    def identity(self) -> str:
        return f"lm:{self.model}"

    def setup(self, ctx: RewardContext) -> None:
        if self.verdicts is not None:
            return
        if (Path(self.model) / "config.json").is_file():
            self.verdicts = HFVerdicts(self.model, ctx.device, self.batch_size)
        else:
            saved = ctx.open_checkpoint(self.model)
            self.verdicts = LmpipeVerdicts(saved, ctx.device, self.batch_size)

    def question(self, prompt: Prompt, a: str, b: str) -> str:
        context = "\n".join(
            m["content"] if len(prompt.messages) == 1 else f"{m['role']}: {m['content']}"
            for m in prompt.messages
        )
        return self.template.format(prompt=context or prompt.text, a=a, b=b)

    def score(self, groups: Sequence[Candidates]) -> list[list[float]]:
        """Each reply's mean probability of being preferred, over every other reply of its
        group in both orders (a and b swapped)."""
        asked, questions = [], []
        for g, group in enumerate(groups):
            texts = [reply.text for reply in group.replies]
            for i in range(len(texts)):
                for j in range(len(texts)):
                    if i != j:
                        asked.append((g, i, j))
                        questions.append(self.question(group.prompt, texts[i], texts[j]))
        wins = [[0.0] * len(group.replies) for group in groups]
        if questions:
            first = self.verdicts.logps(questions, self.choices).softmax(dim=-1)[:, 0]
            for (g, i, j), p in zip(asked, first.tolist(), strict=True):
                wins[g][i] += p
                wins[g][j] += 1 - p
        return [[w / max(2 * (len(row) - 1), 1) for w in row] for row in wins]


def _first_token(encode, choice: str) -> int:
    ids = encode(choice)
    if not ids:
        raise ConfigError(f"judge.choices: {choice!r} encodes to no token")
    return ids[0]


class LmpipeVerdicts:
    """Verdicts of an lmpipe checkpoint (any architecture, through the LM seam: the log-
    probability of the question followed by each verdict token)."""

    def __init__(self, saved, device: torch.device, batch_size: int):
        from lmpipe.data.tokenizer import Tokenizer

        self.model = saved.build_model().to(device)
        self.tokenizer = Tokenizer.load(saved.path)
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def logps(self, questions: list[str], choices: Sequence[str]) -> Tensor:
        tokenizer = self.tokenizer
        tokens = [_first_token(tokenizer.encode, choice) for choice in choices]
        block = self.model.config.block_size
        out = []
        for at in range(0, len(questions), self.batch_size):
            rows = []
            for question in questions[at : at + self.batch_size]:
                messages = [{"role": "user", "content": question}]
                ids = tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=True))
                rows += [(ids + [token])[-block:] for token in tokens]
            ids, left_pad = left_padded(rows, tokenizer.pad_id)
            mask = torch.zeros(ids.shape)
            mask[:, -1] = 1
            seeds = torch.zeros(len(rows), dtype=torch.long)  # diffusion: the same masks
            batch = Batch(input_ids=ids, loss_mask=mask, left_pad=left_pad, noise_seeds=seeds)
            found = self.model(batch.to(self.device), output="logps").logps[:, -1]
            out.append(found.float().cpu().view(-1, len(tokens)))
        return torch.cat(out)


class HFVerdicts:
    """Verdicts of a local Hugging Face causal LM: the next-token log-probabilities after
    the question (rendered by the model's chat template when it has one)."""

    def __init__(self, path: str, device: torch.device, batch_size: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        self.model.to(device).eval()
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def logps(self, questions: list[str], choices: Sequence[str]) -> Tensor:
        tokenizer = self.tokenizer
        tokens = [
            _first_token(lambda t: tokenizer.encode(t, add_special_tokens=False), choice)
            for choice in choices
        ]
        if tokenizer.chat_template:
            questions = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
                )
                for q in questions
            ]
        out = []
        for at in range(0, len(questions), self.batch_size):
            inputs = tokenizer(
                questions[at : at + self.batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=not tokenizer.chat_template,
            ).to(self.device)
            logits = self.model(**inputs).logits[:, -1].float()
            out.append(logits.log_softmax(dim=-1)[:, tokens].cpu())
        return torch.cat(out)
