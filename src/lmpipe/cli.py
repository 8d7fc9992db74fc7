"""Entrypoint plumbing: user errors print one line and exit 2; bugs keep their traceback.

Two layers, because Hydra reports errors in two places: ``run`` wraps the whole Hydra app
(config composition errors: unknown keys, unknown group options) and ``user_errors``
wraps the body of the task function (errors found while checking values, data,
checkpoints), exiting before Hydra adds its own multi-line report.
Set ``LMPIPE_TRACEBACK=1`` to see the traceback of a user error.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lmpipe.errors import LmpipeError

_NOISE = (
    "full_key:",
    "object_type=",
    "reference_type=",
    "Set the environment variable",
    "To append to your config",
)


def one_line(exc: BaseException) -> str:
    """An exception message, and its causes, as one line."""
    lines: list[str] = []
    node: BaseException | None = exc
    while node is not None:
        text = str(node).split("Config search path:")[0]
        for raw in text.splitlines():
            line = raw.strip()
            if line and not line.startswith(_NOISE) and line not in lines:
                lines.append(line)
        node = node.__cause__
    message = " ".join(lines) or type(exc).__name__
    return _rephrase(message)


def _rephrase(message: str) -> str:
    """Plain words for Hydra's most common complaints."""
    # An lmpipe error raised inside a resolver (e.g. the run directory's): just its message.
    message = re.sub(r"^\w+Error raised while resolving interpolation: ", "", message)
    match = re.search(r"Could not override '([^']+)'\.", message)
    if match and "is not in struct" in message:
        key = match.group(1)
        return f"unknown config key '{key}' (check the spelling; '+{key}=...' adds a new key)"
    match = re.search(r"Could not find '([^']+)' Available options in '([^']+)': (.*)", message)
    if match:
        options = ", ".join(match.group(3).split())
        return f"no config '{match.group(1)}' (available {match.group(2)} options: {options})"
    match = re.search(r"^Ambiguous value for argument '([\w.+~]+)=(.*)' 1\. To use it", message)
    if match:
        key, value = match.groups()
        return (
            f"{key}={value}: a comma makes a list ({key}=[a,b]) or a sweep (--multirun); "
            f"for one text, {_quote_hint(key, value)}"
        )
    match = re.search(
        r"^(?:LexerNoViableAltException: ([\w.+~]+)=(.*) \^|Error parsing override "
        r"'([\w.+~]+)=(.*)' (?:extraneous|mismatched) input)",
        message,
    )
    if match:
        key, value = match.group(1, 2) if match.group(1) else match.group(3, 4)
        return f"cannot parse {key}={value} (a quote or bracket in it?); {_quote_hint(key, value)}"
    return message


def _quote_hint(key: str, value: str) -> str:
    """How to pass a text with commas, quotes or brackets as one string override."""
    if "'" in value or '"' in value:
        hint = "quote the value inside the override and escape its own quotes with \\"
    else:  # single quotes for the shell, double quotes for Hydra
        hint = f"quote the value inside the override, e.g. '{key}=\"{value}\"'"
    if key == "prompt":  # lmpipe.generate reads a prompt from a file or stdin as well
        hint += " (or prompt_file=<path>, or prompt=- to read it from stdin)"
    return hint


def _fail(prog: str, exc: BaseException) -> None:
    if os.environ.get("LMPIPE_TRACEBACK") == "1":
        raise exc
    print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
    raise SystemExit(2) from None


def _is_config_error(exc: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(exc, HydraException | OmegaConfBaseException)


@contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Inside a Hydra task: report user errors as one line and exit 2."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, LmpipeError) or _is_config_error(exc):
            _fail(prog, exc)
        raise


def run(app: Callable[[], object], prog: str) -> None:
    """Call a ``@hydra.main`` app, reporting config-composition errors as one line."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # make Hydra re-raise instead of printing its report
    try:
        app()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:
        if isinstance(exc, LmpipeError) or _is_config_error(exc):
            _fail(prog, exc)
        raise
