"""Token shards on disk: a flat token stream, document start offsets and a loss mask.

``tokens_{split}.bin`` (uint16/uint32 memmap), ``index_{split}.npy`` (int64 document
starts), ``mask_{split}.bin`` (uint8, only for formats with a loss mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmpipe.errors import DataError


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


class ShardWriter:
    """Append documents to one split's files; buffered, streaming, never holds the split."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, with_mask: bool):
        self.dtype = dtype
        self._tokens = open(directory / f"tokens_{split}.bin", "wb")  # noqa: SIM115
        self._mask = open(directory / f"mask_{split}.bin", "wb") if with_mask else None  # noqa: SIM115
        self._index_path = directory / f"index_{split}.npy"
        self._starts: list[int] = []
        self.num_tokens = 0

    def add(self, ids: list[int], mask: list[int] | None = None) -> None:
        self._starts.append(self.num_tokens)
        self._tokens.write(np.asarray(ids, dtype=self.dtype).tobytes())
        if self._mask is not None:
            self._mask.write(np.asarray(mask if mask is not None else [1] * len(ids), np.uint8))
        self.num_tokens += len(ids)

    def close(self) -> None:
        self._tokens.close()
        if self._mask is not None:
            self._mask.close()
        np.save(self._index_path, np.asarray(self._starts, dtype=np.int64))

    @property
    def num_documents(self) -> int:
        return len(self._starts)


@dataclass
class TokenShards:
    """Read side of one split: memory-mapped, so opening is free whatever the size."""

    tokens: np.ndarray
    doc_starts: np.ndarray
    mask: np.ndarray | None

    @classmethod
    def open(cls, directory: Path, split: str, dtype: str) -> TokenShards:
        path = directory / f"tokens_{split}.bin"
        if not path.exists():
            raise DataError(f"{directory}: no {split} split (missing {path.name})")
        tokens = (
            np.memmap(path, dtype=np.dtype(dtype), mode="r")
            if path.stat().st_size
            else np.zeros(0, dtype)
        )
        doc_starts = np.load(directory / f"index_{split}.npy")
        mask_path = directory / f"mask_{split}.bin"
        mask = (
            np.memmap(mask_path, dtype=np.uint8, mode="r")
            if mask_path.exists() and mask_path.stat().st_size
            else None
        )
        return cls(tokens=tokens, doc_starts=doc_starts, mask=mask)

    def __len__(self) -> int:
        return len(self.tokens)
