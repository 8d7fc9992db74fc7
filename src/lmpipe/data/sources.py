"""Read raw records from a source: built-in generator, local files (or a glob), HF hub.

Every record comes with ``where`` ("file:line", "file[record 7]", "hub:id[12]") so that a
bad record is reported with its location.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path

from lmpipe.data.builtin import GENERATORS
from lmpipe.errors import ConfigError, DataError

FILE_TYPES = (".txt", ".jsonl", ".json", ".parquet")
# A .txt file's records: the whole file, blank-line separated paragraphs, or lines. "auto":
# a file each for a glob of several files; else paragraphs, or lines without blank lines.
TEXT_UNITS = ("auto", "file", "paragraph", "line")
Located = tuple[dict, str]


def source_kind(spec: dict) -> str:
    """Which loader a source spec names: exactly one of builtin, path, hub."""
    kinds = [k for k in ("builtin", "path", "hub") if spec.get(k)]
    if len(kinds) != 1:
        raise ConfigError(
            f"data source '{spec.get('name', '?')}' must set exactly one of builtin, path, hub "
            f"(got {', '.join(kinds) or 'none'})"
        )
    return kinds[0]


# Where a source's own validation split is, per loader (instead of a fraction of it).
OWN_VAL_KEYS = {"path": "val_path", "hub": "val_split"}


def has_own_val(spec: dict) -> bool:
    return bool(spec.get(OWN_VAL_KEYS.get(source_kind(spec), "")))


def iter_source(spec: dict, split: str = "train") -> Iterator[Located]:
    """All raw records of one source, in order, each with its location. ``split="val"``
    reads the source's own validation split (``val_path`` / ``val_split``)."""
    kind = source_kind(spec)
    if split == "val":
        spec = {**spec, {"path": "path", "hub": "split"}[kind]: spec[OWN_VAL_KEYS[kind]]}
    if kind == "builtin":
        yield from _iter_builtin(spec)
    elif kind == "path":
        files = resolve_paths(spec)
        text_unit = spec.get("text_unit", "auto")
        if text_unit == "auto" and len(files) > 1:
            text_unit = "file"
        for path in files:
            yield from iter_file(path, text_unit=text_unit)
    else:
        yield from _iter_hub(spec)


def resolve_paths(spec: dict) -> list[Path]:
    pattern = str(spec["path"])
    name = spec.get("name", pattern)
    if glob.has_magic(pattern):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        if not files:
            raise DataError(f"data source '{name}': no files match {pattern}")
    else:
        files = [Path(pattern)]
        if not files[0].exists():
            raise DataError(f"data source '{name}': file not found: {pattern}")
    for path in files:
        if path.suffix not in FILE_TYPES:
            raise DataError(
                f"data source '{name}': {path} has unsupported type "
                f"(expected one of {', '.join(FILE_TYPES)})"
            )
    return files


def iter_file(path: Path, text_unit: str = "auto") -> Iterator[Located]:
    if path.suffix == ".txt":
        yield from _iter_txt(path, text_unit)
    elif path.suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif path.suffix == ".json":
        yield from _iter_json(path)
    else:
        yield from _iter_parquet(path)


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from None


def _iter_txt(path: Path, text_unit: str) -> Iterator[Located]:
    if text_unit not in TEXT_UNITS:
        raise ConfigError(f"text_unit={text_unit!r} is not one of {', '.join(TEXT_UNITS)}")
    text = _read_utf8(path)
    if text_unit == "auto":
        text_unit = "paragraph" if "\n\n" in text.strip() else "line"
    if text_unit == "file":
        yield {"text": text}, str(path)
        return
    line_no = 1
    separator = "\n\n" if text_unit == "paragraph" else "\n"
    for chunk in text.split(separator):
        if chunk.strip():
            yield {"text": chunk}, f"{path}:{line_no}"
        line_no += chunk.count("\n") + separator.count("\n")


def _iter_jsonl(path: Path) -> Iterator[Located]:
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not valid UTF-8 ({exc.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{where}: invalid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield record, where


def _iter_json(path: Path) -> Iterator[Located]:
    try:
        data = json.loads(_read_utf8(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{path}[record {i}]: expected a JSON object")
        yield record, f"{path}[record {i}]"


def _iter_parquet(path: Path) -> Iterator[Located]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    row = 0
    for batch in reader.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield record, f"{path}[row {row}]"
            row += 1


def _iter_builtin(spec: dict) -> Iterator[Located]:
    name = spec["builtin"]
    if name not in GENERATORS:
        raise ConfigError(
            f"data source '{spec.get('name', name)}': builtin={name!r} is not one of "
            f"{', '.join(sorted(GENERATORS))}"
        )
    num_records = int(spec.get("num_records", 1000))
    for i, record in enumerate(GENERATORS[name](num_records, int(spec.get("seed", 0)))):
        yield record, f"builtin:{name}[{i}]"


def _iter_hub(spec: dict) -> Iterator[Located]:
    import datasets

    hub_id = spec["hub"]
    try:
        dataset = datasets.load_dataset(
            hub_id,
            spec.get("subset"),
            data_dir=spec.get("data_dir"),
            split=spec.get("split", "train"),
            streaming=True,
        )
        for i, record in enumerate(dataset):
            yield dict(record), f"hub:{hub_id}[{i}]"
    except (FileNotFoundError, ConnectionError, ValueError) as exc:
        raise DataError(
            f"data source '{spec.get('name', hub_id)}': cannot load {hub_id} ({exc}); to "
            "train on a local copy, set data.path (README: Train on your own data)"
        ) from None
