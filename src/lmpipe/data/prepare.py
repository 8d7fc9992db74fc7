"""Turn a mixture config into a cached, inspectable, tokenized dataset directory.

    sources -> adapt -> normalise -> filter -> split each source -> mix by ratio
            -> mixed_{split}.jsonl -> tokenizer (trained on the mixture, or given)
            -> token shards (+ loss mask) -> manifest.json (counts, drops, ratios, hashes)

The directory name carries a hash of the config and tokenizer, so a second run with the
same inputs is a cache hit. It is built in a temporary sibling and renamed into place, so
an error or a kill never leaves a half-written dataset behind. Records are staged on disk
and read back by byte offset, so memory holds offsets, never the corpus. The manifest
records every file's size and a sampled CRC, checked whenever the entry is opened: a cache
entry damaged later (truncated, overwritten) is rebuilt instead of trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from lmpipe import __version__
from lmpipe.data import formats
from lmpipe.data.adapters import ADAPTERS
from lmpipe.data.builtin import BUILTIN_VERSION
from lmpipe.data.filters import build_filters, first_failing
from lmpipe.data.hub import check_hub
from lmpipe.data.local import with_local_paths
from lmpipe.data.mixer import mixture_ratios, plan_mixture, validate_mixture
from lmpipe.data.shards import ShardWriter, TokenShards, token_dtype
from lmpipe.data.sources import OWN_VAL_KEYS, has_own_val, iter_source, resolve_paths
from lmpipe.data.tokenizer import Tokenizer, build_tokenizer
from lmpipe.errors import ConfigError, DataError
from lmpipe.tracking.progress import progress_bar

FORMAT_VERSION = 3  # bump when the on-disk layout or the encoding of records changes
SPLITS = ("train", "val")
ENCODE_CHUNK = 1024
CRC_BLOCK = 1 << 16  # sampled CRC: this many bytes at 18 places of a file (all of a small one)
CRC_SAMPLES = 18


@dataclass
class PreparedData:
    """A prepared dataset directory: manifest, tokenizer and memory-mapped splits."""

    directory: Path
    manifest: dict
    tokenizer: Tokenizer

    @classmethod
    def open(cls, directory: str | Path) -> PreparedData:
        """Open a prepared dataset after checking its files against the manifest
        (DataError naming the first damaged one)."""
        directory = Path(directory)
        manifest_path = directory / "manifest.json"
        if not manifest_path.is_file():
            raise DataError(f"{directory} is not a prepared dataset (no manifest.json)")
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{manifest_path} is unreadable ({exc})") from None
        for name, expected in files.items():
            damage = _damage(directory / name, expected)
            if damage:
                raise DataError(f"{directory} is damaged: {name} {damage}")
        tokenizer = Tokenizer.load(directory)
        return cls(directory=directory, manifest=manifest, tokenizer=tokenizer)

    def split(self, name: str) -> TokenShards:
        return TokenShards.open(self.directory, name, self.manifest["dtype"])

    @property
    def manifest_hash(self) -> str:
        return hashlib.sha256((self.directory / "manifest.json").read_bytes()).hexdigest()


def local_files(cfg: dict) -> list[list]:
    """Path, size and modification time of every local file the mixture reads."""
    found = []
    for source in cfg.get("sources") or []:
        for key in ("path", OWN_VAL_KEYS["path"]):
            if source.get("path") and source.get(key):
                for path in resolve_paths({**source, "path": source[key]}):
                    stat = path.stat()
                    found.append([str(path), stat.st_size, stat.st_mtime_ns])
    return found


def cache_key(cfg: dict, tokenizer: Tokenizer | None) -> str:
    payload = {
        "format_version": FORMAT_VERSION,
        "data": cfg,
        "tokenizer": tokenizer and tokenizer.hash,
    }
    if any(source.get("builtin") for source in cfg.get("sources") or []):
        payload["builtin_version"] = BUILTIN_VERSION  # generated records change with the code
    files = local_files(cfg)
    if files:  # a local file rewritten in place (e.g. relabelled pairs) is new data
        payload["files"] = files
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def prepare(
    cfg: dict,
    cache_dir: str | Path,
    *,
    tokenizer: Tokenizer | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> PreparedData:
    """Prepare (or reuse) the dataset a data config describes.

    ``tokenizer``: use this one (e.g. the checkpoint's when a stage starts from another
    stage) instead of building the one the config names. A damaged cache entry is rebuilt,
    saying so through ``log``. ``data.path`` (local copies of the sources) applies first,
    so it prepares what the equivalent explicit sources would.
    """
    cfg = with_local_paths(cfg)
    validate_mixture(cfg)
    out = Path(cache_dir) / "data" / f"{cfg['name']}-{cache_key(cfg, tokenizer)[:12]}"
    if (out / "manifest.json").is_file() and not force:
        try:
            return PreparedData.open(out)
        except DataError as exc:
            log(f"rebuilding a damaged cache entry: {exc}")
    check_hub(cfg)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise ConfigError(
            f"cache_dir={str(cache_dir)!r} is not a writable directory ({exc.strerror}: "
            f"{exc.filename})"
        ) from None
    try:
        _build(cfg, tmp, tokenizer, progress)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedData.open(out)


def _publish(tmp: Path, out: Path) -> None:
    """Move a finished build into place; a concurrent identical build may have won."""
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if not (out / "manifest.json").is_file():
            raise
    shutil.rmtree(old, ignore_errors=True)


# --- build steps ---------------------------------------------------------------------
class _Staged:
    """One source's normalised records of one split in a JSONL file, read back by offset."""

    def __init__(self, path: Path):
        self.path = path
        self.offsets: list[int] = []
        self._fh = path.open("wb")

    def append(self, record: dict) -> None:
        self.offsets.append(self._fh.tell())
        self._fh.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")

    def finish(self) -> None:
        self._fh.close()

    def read(self, fh, index: int) -> dict:
        fh.seek(self.offsets[index])
        return json.loads(fh.readline())


def _build(cfg: dict, out: Path, tokenizer: Tokenizer | None, progress: bool) -> None:
    staging = out / "_staging"
    staging.mkdir()
    fmt = cfg.get("format", "auto")
    split_cfg = cfg.get("split") or {}
    seed = int(cfg.get("seed", 0))
    sources = list(cfg["sources"])
    source_stats = []
    staged: dict[str, list[_Staged]] = {s: [] for s in SPLITS}
    dedup_scope: set[bytes] = set()  # exact dedup runs across the whole mixture
    for i, spec in enumerate(sources):
        fmt, stats, per_split = _stage_source(
            spec, fmt, split_cfg, seed + i, staging / str(i), dedup_scope, progress
        )
        source_stats.append(stats)
        for split in SPLITS:
            staged[split].append(per_split[split])

    ratios = mixture_ratios(sources)
    for split in SPLITS:
        counts = [len(s.offsets) for s in staged[split]]
        total = cfg.get("total_records") if split == "train" else None
        plan = plan_mixture(
            counts,
            ratios,
            seed=seed + 1000 * (split == "val"),
            total=total,
            shuffle=bool(cfg.get("shuffle", True)),
        )
        _write_mixed(out / f"mixed_{split}.jsonl", plan, staged[split], sources)
        realised = np.bincount(plan[:, 0], minlength=len(sources))
        for stats, slots in zip(source_stats, realised, strict=True):
            stats["slots"][split] = int(slots)
            stats["realised_ratio"][split] = round(int(slots) / max(len(plan), 1), 6)
    shutil.rmtree(staging)

    if sum(s["slots"]["train"] for s in source_stats) == 0:
        kept = sum(s["records"] for s in source_stats)
        raise DataError(
            f"data '{cfg['name']}': no training records left after loading and splitting "
            f"({kept} record(s) kept, data.split.val_fraction="
            f"{split_cfg.get('val_fraction', 0.05)}): add text, lower data.split.val_fraction, "
            "or split .txt files into more records (text_unit=paragraph or line)"
        )

    if tokenizer is None:
        tok_cfg = dict(cfg.get("tokenizer") or {})
        train_only = tok_cfg.get("kind", "char") == "bpe"
        tok_splits = ("train",) if train_only else SPLITS
        texts = progress_bar(
            _iter_texts(out, tok_splits), desc="train tokenizer", unit="text", enabled=progress
        )
        tokenizer = build_tokenizer(tok_cfg, texts)
        texts.close()
    tokenizer.save(out)

    dtype = token_dtype(tokenizer.vocab_size)
    splits = {}
    for split in SPLITS:
        splits[split] = _encode_split(out, split, fmt, tokenizer, dtype, source_stats, progress)
    manifest = {
        "name": cfg["name"],
        "lmpipe_version": __version__,
        "format_version": FORMAT_VERSION,
        "format": fmt,
        "documents_per_record": formats.DOCUMENTS_PER_RECORD[fmt],
        "config_hash": cache_key(cfg, None),
        "tokenizer_hash": tokenizer.hash,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "split": {
            "by": split_cfg.get("by", "record"),
            "val_fraction": split_cfg.get("val_fraction", 0.05),
        },
        "splits": splits,
        "sources": source_stats,
        "files": {
            path.name: {"bytes": path.stat().st_size, "crc32": _sampled_crc(path)}
            for path in sorted(out.iterdir())
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _encoding_error(
    exc: Exception, chunk: list[dict], offset: int, split: str, tokenizer: Tokenizer
) -> DataError:
    """Say which characters the tokenizer cannot encode and where the first one is (a
    character tokenizer from a checkpoint meeting data with characters it never saw)."""
    unknown: set[str] = set()
    first = None
    for i, record in enumerate(chunk):
        found = tokenizer.unknown_characters("".join(formats.record_texts(record)))
        if found and first is None:
            first = f"{split} record {offset + i + 1}, source '{record['source']}'"
        unknown |= found
    if not unknown:
        return DataError(f"the tokenizer cannot encode the {split} data ({exc})")
    shown = ", ".join(repr(c) for c in sorted(unknown)[:10])
    more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
    return DataError(
        f"the tokenizer has no token for {len(unknown)} character(s) of the data: {shown}"
        f"{more} (first in {first}); a character tokenizer knows only the characters of "
        "the data it was built on"
    )


def _sampled_crc(path: Path) -> int:
    """CRC32 of ``CRC_SAMPLES`` evenly spaced blocks (the whole file when it is small):
    cheap at any size, and it catches what sizes alone miss (a block overwritten)."""
    size = path.stat().st_size
    crc = 0
    with path.open("rb") as fh:
        if size <= CRC_BLOCK * CRC_SAMPLES:
            return zlib.crc32(fh.read())
        step = (size - CRC_BLOCK) // (CRC_SAMPLES - 1)
        for i in range(CRC_SAMPLES):
            fh.seek(i * step)
            crc = zlib.crc32(fh.read(CRC_BLOCK), crc)
    return crc


def _damage(path: Path, expected: dict) -> str | None:
    """What is wrong with a cached file, measured against its manifest record."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != expected.get("bytes"):
        return f"has {size} bytes, the manifest says {expected.get('bytes')}"
    if _sampled_crc(path) != expected.get("crc32"):
        return "does not match its checksum"
    return None


def _kept_records(
    spec: dict, fmt: str, split: str, dedup_scope: set[bytes], dropped: Counter, progress: bool
) -> Iterator[tuple[dict, str]]:
    """A source's records, normalised, with the ones its adapter, format checks and filters
    reject dropped and counted by reason; stops after ``max_samples`` kept records."""
    name = spec["name"]
    adapter = ADAPTERS[spec["adapter"]] if spec.get("adapter") else None
    filters = build_filters(spec.get("filters") or [], name, dedup_scope)
    records = iter_source(spec, split)
    kept = 0
    bar = progress_bar(records, desc=f"load {name}", unit="rec", enabled=progress)
    for raw, where in bar:
        try:
            if adapter is not None:
                raw = adapter(raw, where)
            record_fmt = formats.detect_format(raw, where) if fmt == "auto" else fmt
            record = formats.normalize(raw, record_fmt, where, spec.get("fields"))
        except formats.SkipRecord as skip:
            dropped[skip.reason] += 1
            continue
        failed = first_failing(filters, "\n".join(formats.record_texts(record)))
        if failed is not None:
            dropped[failed] += 1
            continue
        yield record, record_fmt
        fmt = record_fmt
        kept += 1
        if spec.get("max_samples") and kept >= int(spec["max_samples"]):
            break
    bar.close()


def _stage_source(
    spec: dict,
    fmt: str,
    split_cfg: dict,
    seed: int,
    prefix: Path,
    dedup_scope: set[bytes],
    progress: bool,
):
    """Normalise and filter one source into staging files, split into train and val."""
    name = spec["name"]
    dropped: Counter = Counter()
    everything = _Staged(prefix.with_suffix(".all.jsonl"))
    lengths = []
    for record, record_fmt in _kept_records(spec, fmt, "train", dedup_scope, dropped, progress):
        fmt = record_fmt
        everything.append(record)
        lengths.append(sum(len(t) for t in formats.record_texts(record)))
    everything.finish()
    if not everything.offsets:
        where = spec.get("path") or spec.get("hub") or spec.get("builtin")
        why = (
            f" (dropped: {dict(dropped)}; check its filters, fields and format)"
            if dropped
            else f" ({where} is empty)"
        )
        raise DataError(f"data source '{name}': no records{why}")

    per_split = {s: _Staged(prefix.with_suffix(f".{s}.jsonl")) for s in SPLITS}
    val_fraction = float(split_cfg.get("val_fraction", 0.05))
    with everything.path.open("rb") as fh:
        if has_own_val(spec):
            for i in range(len(everything.offsets)):
                per_split["train"].append(everything.read(fh, i))
            for record, _ in _kept_records(spec, fmt, "val", dedup_scope, dropped, progress):
                per_split["val"].append(record)
        elif split_cfg.get("by", "record") == "position":
            _split_by_position(everything, fh, lengths, val_fraction, per_split, fmt, name)
        else:
            n = len(everything.offsets)
            n_val = min(n - 1, round(val_fraction * n)) if val_fraction > 0 else 0
            val_ids = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
            for i in range(n):
                per_split["val" if i in val_ids else "train"].append(everything.read(fh, i))
    for staged in per_split.values():
        staged.finish()
    everything.path.unlink()
    stats = {
        "name": name,
        "records": len(everything.offsets),
        "dropped": dict(sorted(dropped.items())),
        "mix_ratio": spec.get("mix_ratio"),
        "records_per_split": {s: len(per_split[s].offsets) for s in SPLITS},
        "slots": {},
        "realised_ratio": {},
        "tokens": {},
    }
    return fmt, stats, per_split


def _split_by_position(everything, fh, lengths, val_fraction, per_split, fmt, name) -> None:
    """Cut the source's character stream at ``1 - val_fraction`` (nanoGPT's split)."""
    if fmt != "text":
        raise DataError(f"data source '{name}': split.by=position needs text records, not {fmt}")
    cut = round(sum(lengths) * (1 - val_fraction))
    seen = 0
    for i, length in enumerate(lengths):
        text = everything.read(fh, i)["text"]
        head, tail = text[: max(0, cut - seen)], text[max(0, cut - seen) :]
        if head:
            per_split["train"].append({"text": head})
        if tail:
            per_split["val"].append({"text": tail})
        seen += length


def _write_mixed(path: Path, plan, staged: list[_Staged], sources: list[dict]) -> None:
    handles = [s.path.open("rb") for s in staged]
    try:
        with path.open("w", encoding="utf-8") as out:
            for source, index in plan.tolist():
                record = {
                    "source": sources[source]["name"],
                    **staged[source].read(handles[source], index),
                }
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        for fh in handles:
            fh.close()


def _iter_mixed(out: Path, split: str) -> Iterator[dict]:
    with (out / f"mixed_{split}.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def _iter_texts(out: Path, splits) -> Iterator[str]:
    for split in splits:
        for record in _iter_mixed(out, split):
            yield from formats.record_texts(record)


def _encode_split(out, split, fmt, tokenizer, dtype, source_stats, progress) -> dict:
    """Tokenize a split's mixed records into its shards; each record gives
    ``DOCUMENTS_PER_RECORD[fmt]`` consecutive documents."""
    writer = ShardWriter(out, split, dtype, with_mask=fmt != "text")
    tokens_by_source: dict[str, int] = {}
    total = sum(s["slots"][split] for s in source_stats)
    bar = progress_bar(total=total, desc=f"tokenize {split}", unit="rec", enabled=progress)
    records = _iter_mixed(out, split)
    done = 0
    while chunk := list(islice(records, ENCODE_CHUNK)):
        try:
            encoded = formats.encode_batch(chunk, fmt, tokenizer)
        except DataError:
            raise
        except Exception as exc:  # the tokenizers library raises plain Exceptions
            raise _encoding_error(exc, chunk, done, split, tokenizer) from None
        done += len(chunk)
        for record, documents in zip(chunk, encoded, strict=True):
            for ids, mask in documents:
                writer.add(ids, mask)
                tokens_by_source[record["source"]] = tokens_by_source.get(
                    record["source"], 0
                ) + len(ids)
        bar.set_postfix(tokens=f"{writer.num_tokens:,}", refresh=False)
        bar.update(len(chunk))
    bar.close()
    writer.close()
    for stats in source_stats:
        stats["tokens"][split] = tokens_by_source.get(stats["name"], 0)
    return {"records": total, "documents": writer.num_documents, "tokens": writer.num_tokens}
