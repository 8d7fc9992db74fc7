"""``python -m lmpipe.chat checkpoint=<dir>``: talk to a checkpoint in the terminal.

Every line read is a user turn; the reply streams back and the conversation is kept (the
whole of it goes through the chat template each turn) until ``/reset``. ``/quit`` or the
end of input (Ctrl-D) ends the session. Lines can be piped in as well as typed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator

import hydra
from omegaconf import DictConfig

from lmpipe.cli import run, user_errors

Reply = Callable[[list[dict], int], Iterable[str]]  # (conversation, turn) -> text pieces


def converse(
    lines: Iterable[str], reply: Reply, system: str | None, write: Callable[[str], None]
) -> None:
    """Run the conversation: a user turn per line, the reply's pieces written as they come."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    turn = 0
    for line in lines:
        command = line.strip()
        if command == "/quit":
            return
        if command == "/reset":
            messages = list(start)
            print("(new conversation)", file=sys.stderr)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        pieces = []
        for piece in reply(messages, turn):
            pieces.append(piece)
            write(piece)
        write("\n")
        messages.append({"role": "assistant", "content": "".join(pieces)})
        turn += 1


def _typed_lines() -> Iterator[str]:
    prompt = "> " if sys.stdin.isatty() else ""
    while True:
        try:
            yield input(prompt)
        except EOFError:
            return


@hydra.main(config_path="conf", config_name="chat", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("lmpipe.chat"):
        _chat(cfg)


def _chat(cfg: DictConfig) -> None:
    from lmpipe.errors import ConfigError
    from lmpipe.eval.generation import encode_prompt, prompt_budget, stream_completion
    from lmpipe.training.checkpoint import resolve_checkpoint
    from lmpipe.training.hardware import resolve_device

    if cfg.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} must be >= 1")
    checkpoint = resolve_checkpoint(cfg.checkpoint, log=lambda m: print(m, file=sys.stderr))
    device = resolve_device(cfg.device)
    model = checkpoint.build_model().to(device)
    tokenizer = checkpoint.tokenizer()
    prompt_budget(model, cfg.max_new_tokens)  # fail now, not at the first turn

    def reply(messages: list[dict], turn: int) -> Iterator[str]:
        ids, stop_ids = encode_prompt(tokenizer, messages)
        tokens = stream_completion(
            model,
            ids,
            max_new_tokens=cfg.max_new_tokens,
            stop_ids=stop_ids,
            device=device,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            seed=cfg.seed + turn,
        )
        return tokenizer.iter_decode(tokens)

    if sys.stdin.isatty():
        print(
            f"chatting with {checkpoint.path} (/reset starts over; /quit or Ctrl-D ends)",
            file=sys.stderr,
        )

    def write(text: str) -> None:
        print(text, end="", flush=True)

    converse(_typed_lines(), reply, cfg.system, write)


if __name__ == "__main__":
    run(main, "lmpipe.chat")
