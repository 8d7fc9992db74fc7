"""lmpipe: train language models through their whole lifecycle from one Hydra entrypoint."""

__version__ = "0.1.0"
