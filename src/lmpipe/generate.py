"""``python -m lmpipe.generate checkpoint=<dir> prompt="..."``: sample from a checkpoint.

The architecture, model config and tokenizer come from the checkpoint itself. ``chat=true``
puts the prompt in a user turn of the chat template and prints the assistant's reply,
which ends at the template's end-of-turn token. One sample streams to the terminal as it
is generated (AR uses its KV cache); several are generated as one batch. The prompt comes
from ``prompt``, from a file (``prompt_file``) or from stdin (``prompt=-``): a text with
commas or quotes need not be quoted for Hydra then.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lmpipe.cli import run, user_errors


def read_prompt(cfg: DictConfig) -> str:
    """``prompt``, the text of ``prompt_file``, or stdin for ``prompt=-`` (of a file or stdin
    without its final newline, which an editor or ``echo`` adds)."""
    from lmpipe.errors import ConfigError

    if cfg.prompt_file:
        if cfg.prompt:
            raise ConfigError("give prompt or prompt_file, not both")
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise ConfigError(f"prompt_file not found: {path}")
        return path.read_text(encoding="utf-8").removesuffix("\n")
    if cfg.prompt == "-":
        if sys.stdin.isatty():
            print("reading the prompt from stdin (end it with Ctrl-D)", file=sys.stderr)
        return sys.stdin.read().removesuffix("\n")
    return str(cfg.prompt)


@hydra.main(config_path="conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("lmpipe.generate"):
        _generate(cfg)


def _generate(cfg: DictConfig) -> None:
    from lmpipe.errors import ConfigError
    from lmpipe.eval.generation import complete, encode_prompt, stream_completion
    from lmpipe.training.checkpoint import resolve_checkpoint
    from lmpipe.training.hardware import resolve_device

    if cfg.max_new_tokens < 1 or cfg.num_samples < 1:
        raise ConfigError("max_new_tokens and num_samples must be >= 1")
    text = read_prompt(cfg)
    checkpoint = resolve_checkpoint(cfg.checkpoint, log=lambda m: print(m, file=sys.stderr))
    device = resolve_device(cfg.device)
    model = checkpoint.build_model().to(device)
    tokenizer = checkpoint.tokenizer()
    if cfg.chat:
        system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        ids, stop_ids = encode_prompt(tokenizer, [*system, {"role": "user", "content": text}])
        shown = ""  # a chat shows the reply only
    else:
        ids, stop_ids = encode_prompt(tokenizer, text)
        shown = text
    options = {
        "max_new_tokens": cfg.max_new_tokens,
        "stop_ids": stop_ids,
        "device": device,
        "temperature": cfg.temperature,
        "top_k": cfg.top_k,
        "top_p": cfg.top_p,
        "seed": cfg.seed,
    }

    if cfg.stream and cfg.num_samples == 1:
        print(shown, end="", flush=True)
        for piece in tokenizer.iter_decode(stream_completion(model, ids, **options)):
            print(piece, end="", flush=True)
        print()
        return
    samples = complete(
        model, [ids] * cfg.num_samples, batch_size=cfg.num_samples, progress=False, **options
    )
    for i, sample in enumerate(samples):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(shown + tokenizer.decode(sample))


if __name__ == "__main__":
    run(main, "lmpipe.generate")
