"""``python -m lmpipe.generate checkpoint=<dir> prompt="..."``: sample from a checkpoint.

The architecture, model config and tokenizer come from the checkpoint itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lmpipe.cli import run, user_errors


def _prompt_text(cfg: DictConfig) -> str:
    from lmpipe.errors import ConfigError

    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise ConfigError(f"prompt_file not found: {path}")
        return path.read_text()
    return str(cfg.prompt)


@hydra.main(config_path="../../conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("lmpipe.generate"):
        _generate(cfg)


def _generate(cfg: DictConfig) -> None:
    import torch

    from lmpipe.errors import ConfigError
    from lmpipe.training.checkpoint import resolve_checkpoint
    from lmpipe.training.hardware import resolve_hardware

    if cfg.max_new_tokens < 1 or cfg.num_samples < 1:
        raise ConfigError("max_new_tokens and num_samples must be >= 1")
    checkpoint = resolve_checkpoint(cfg.checkpoint, log=lambda m: print(m, file=sys.stderr))
    device = resolve_hardware({"device": cfg.device}).device
    model = checkpoint.build_model().to(device)
    tokenizer = checkpoint.tokenizer()
    text = _prompt_text(cfg)
    # Documents follow EOS in training, so EOS + prompt is "a document starting with prompt".
    ids = [tokenizer.eos_id, *tokenizer.encode(text)]
    limit = model.config.block_size
    prompt = torch.tensor([ids[-limit:]] * cfg.num_samples, device=device)
    sampling = {
        "temperature": cfg.temperature,
        "top_k": cfg.top_k,
        "top_p": cfg.top_p,
        "eos_id": tokenizer.eos_id,
        "generator": torch.Generator(device).manual_seed(cfg.seed),
    }

    if cfg.stream and cfg.num_samples == 1 and hasattr(model, "stream"):
        print(text, end="", flush=True)
        tokens = (int(t[0]) for t in model.stream(prompt, cfg.max_new_tokens, **sampling))
        for piece in tokenizer.iter_decode(t for t in tokens if t != tokenizer.eos_id):
            print(piece, end="", flush=True)
        print()
        return
    output = model.generate(prompt, cfg.max_new_tokens, **sampling)
    for i, row in enumerate(output.tolist()):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1}")
        new = [t for t in row[prompt.shape[1] :] if t != tokenizer.eos_id]
        print(text + tokenizer.decode(new))


if __name__ == "__main__":
    run(main, "lmpipe.generate")
