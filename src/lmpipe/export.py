"""``python -m lmpipe.export checkpoint=<dir> out=<folder>``: an AR checkpoint as an HF model.

The folder loads with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` (Llama or GPT-2 by the model's layout; see
``lmpipe.hf``); a reward model (``stage=rm``) with
``AutoModelForSequenceClassification``.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from lmpipe.cli import run, user_errors


@hydra.main(config_path="conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("lmpipe.export"):
        from lmpipe.hf import export
        from lmpipe.objectives.reward_model import reward_head
        from lmpipe.training.checkpoint import resolve_checkpoint

        checkpoint = resolve_checkpoint(cfg.checkpoint, log=lambda m: print(m, file=sys.stderr))
        head = reward_head(checkpoint)
        out = export(checkpoint.build_model(), checkpoint.tokenizer(), cfg.out, head=head)
        print(out)


if __name__ == "__main__":
    run(main, "lmpipe.export")
