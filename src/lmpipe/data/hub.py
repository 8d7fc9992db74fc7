"""Fail fast when a mixture needs the HF hub and it cannot be reached.

``datasets`` retries an unreachable hub for about 30 s before it gives up, and its error
says nothing about local files. A mixture with hub sources checks first, in at most
``PROBE_TIMEOUT_S``: the offline switches (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``),
then one request to the endpoint (``HF_ENDPOINT``; proxies from the environment apply).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from lmpipe.data.local import local_path_hint
from lmpipe.errors import DataError

OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PROBE_TIMEOUT_S = 3.0


def hub_sources(cfg: dict) -> list[dict]:
    """The sources streamed from the hub (a ``hub:`` that is a local folder is not)."""
    return [
        source
        for source in cfg.get("sources") or []
        if source.get("hub") and not Path(str(source["hub"])).exists()
    ]


def why_unreachable() -> str | None:
    """Why the hub cannot be used now, or None when it answers."""
    for switch in OFFLINE_SWITCHES:
        if os.environ.get(switch, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{switch} is set"
    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        request = urllib.request.Request(endpoint, method="HEAD")
        urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"{endpoint} does not answer ({getattr(exc, 'reason', exc)})"
    return None


def check_hub(cfg: dict) -> None:
    """Raise a DataError naming the local-copy override when hub sources cannot load."""
    sources = hub_sources(cfg)
    if not sources:
        return
    problem = why_unreachable()
    if problem is None:
        return
    ids = ", ".join(str(s["hub"]) for s in sources)
    hint = local_path_hint(cfg, [s["name"] for s in sources])
    raise DataError(
        f"data '{cfg.get('name')}' streams {ids} from the HF hub, but {problem}; "
        f"to train on a local copy: {hint}"
    )
