"""Where and how to compute: device, precision (autocast + GradScaler), compile, peak FLOPs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lmpipe.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STRATEGIES = ("none", "ddp", "fsdp")

# Dense bf16/fp16 tensor-core peak (TFLOP/s) by GPU name, for MFU when not configured.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 125.0,
    "A10": 125.0,
    "4090": 165.0,
    "3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    compile: bool
    strategy: str
    micro_batch_size: int | None
    peak_tflops: float | None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")


def resolve_device(name: str, local_rank: int = 0, key: str = "device") -> torch.device:
    """``auto`` (CUDA, then MPS, then the CPU), ``cpu``, ``cuda`` or ``mps``, checked (a
    ConfigError names the config ``key``)."""
    if name not in DEVICES:
        raise ConfigError(f"{key}={name!r} is not one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}=cuda but no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}=mps but MPS is not available")
    return torch.device(name, local_rank) if name == "cuda" else torch.device(name)


def resolve_hardware(cfg: dict, local_rank: int = 0) -> Hardware:
    """The ``hardware`` keys of a composed config (``conf/hardware/<name>.yaml``)."""
    device = resolve_device(cfg["device"], local_rank, "hardware.device")
    precision = cfg["precision"]
    if precision not in PRECISIONS:
        raise ConfigError(f"hardware.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"

    strategy = cfg["strategy"]
    if strategy not in STRATEGIES:
        raise ConfigError(f"hardware.strategy={strategy!r} is not one of {', '.join(STRATEGIES)}")
    if strategy == "fsdp" and precision == "fp16":
        raise ConfigError(
            "hardware.strategy=fsdp computes in bf16 or fp32, not fp16 (hardware.precision=fp16)"
        )
    micro = cfg["micro_batch_size"]
    if micro is not None and (not isinstance(micro, int) or micro < 1):
        raise ConfigError(f"hardware.micro_batch_size={micro!r} must be a positive integer or null")
    peak = cfg["peak_tflops"]
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return Hardware(
        device=device,
        precision=precision,
        compile=bool(cfg["compile"]),
        strategy=strategy,
        micro_batch_size=micro,
        peak_tflops=float(peak) if peak else None,
    )
