"""``python -m lmpipe.ui``: serve the web UI for ``out_dir`` (``conf/ui.yaml``)."""

from __future__ import annotations

import ipaddress
import sys

import hydra
from omegaconf import DictConfig

from lmpipe.cli import run, user_errors


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@hydra.main(config_path="../conf", config_name="ui", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("lmpipe.ui"):
        serve(cfg)


def serve(cfg: DictConfig) -> None:
    import uvicorn

    from lmpipe.errors import ConfigError
    from lmpipe.ui.app import create_app

    if isinstance(cfg.port, bool) or not isinstance(cfg.port, int) or not 0 < cfg.port < 65536:
        raise ConfigError(f"port={cfg.port!r} must be an integer from 1 to 65535")
    if cfg.token is not None and not str(cfg.token):
        raise ConfigError("token='' is empty: give a token, or token=null for none")
    if not _loopback(str(cfg.host)) and not cfg.token:
        print(
            f"lmpipe.ui: warning: serving on {cfg.host} without a token: anyone who can reach "
            "this port can read the runs and chat (set token=...)",
            file=sys.stderr,
        )
    app = create_app(cfg)
    print(f"lmpipe.ui: {cfg.out_dir} at http://{cfg.host}:{cfg.port}/", flush=True)
    uvicorn.run(app, host=str(cfg.host), port=cfg.port, log_level="warning")


if __name__ == "__main__":
    run(main, "lmpipe.ui")
