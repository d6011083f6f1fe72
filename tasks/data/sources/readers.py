"""Reading raw rows: local files (.jsonl, .jsonl.gz, .json, .parquet) and Hugging Face Hub datasets.

Every reader yields ``(source_row, record, raw_text, error)``:
- ``source_row``: 0-based row index in the source; for JSON Lines the *line* index (blank lines are
  skipped but still counted, so ``source_row + 1`` is the line number an editor shows).
- ``record``: the row as a dict, or ``None`` when it could not be decoded.
- ``raw_text``: the line's text as read, line ending included (JSON Lines); the source text of a bad
  element (JSON array); else ``None`` (columnar sources: serialise ``record`` when it is needed).
- ``error``: ``None``, or ``(Reason, detail)`` naming ``file:line`` and what was wrong. Only decode
  errors are row errors here; an unreadable *file* (missing, unknown type, broken JSON array, truncated or
  corrupt compression, broken Parquet) raises ``SourceError`` naming the file and how far it was read.
  A "\\ud800"-style escape decodes to a lone surrogate that no UTF-8 writer accepts; ``read_source``
  quarantines such rows (INVALID_UTF8) when it hashes them, so clean rows pay nothing for the check.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from schemas.data_config import HubSource
from schemas.hashing import content_hash, file_sha256  # noqa: F401 - file_sha256: its callers import it from here
from schemas.preference import Reason
from tasks.data.sources.base import type_name

RawRow = tuple[int, "dict | None", "str | None", "tuple[Reason, str] | None"]
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


class SourceError(ValueError):
    """A source that cannot be read as a whole; the message names the file (or source) and what is wrong.
    Commands print it as one line (``error: <message>``); nothing of the dataset is written."""


class SourceFileNotFound(SourceError, FileNotFoundError):
    """A source's file is not where the recipe says."""


def resolve_path(path: str | Path, source: str, base_dir: Path | None = None) -> Path:
    """``path`` as given if it exists (absolute, or relative to the working directory), else under ``base_dir``."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    tried = [str(candidate.absolute())]
    if base_dir is not None and not candidate.is_absolute():
        in_base = Path(base_dir) / candidate
        if in_base.is_file():
            return in_base
        tried.append(str(in_base.absolute()))
    raise SourceFileNotFound(f"source {source!r}: file not found: {str(path)!r} (looked at {', '.join(tried)})")


def read_records(path: str | Path) -> Iterator[RawRow]:
    """Rows of a local file, chosen by its suffix (see the module docstring for what is yielded)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".jsonl.gz"):
        yield from _json_lines_gzip(path)
    elif name.endswith(".jsonl"):
        with open(path, "rb") as f:
            yield from _json_lines(f, path.name)
    elif name.endswith(".json"):
        yield from _json_file(path)
    elif name.endswith(".parquet"):
        yield from _parquet(path)
    else:
        raise SourceError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")


def json_lines_range(path: Path, start: int, end: int) -> Iterator[RawRow]:
    """The JSON Lines rows in bytes [start, end) of an uncompressed file (for reading one file in parallel
    parts; see ``line_ranges``). Each part counts the lines before its start itself, so the parent does
    not read the whole file before the parts can begin."""
    with open(path, "rb") as f:
        first_line = _lines_before(f, start)
        yield from _json_lines(_lines_upto(f, end - start), path.name, first_line)


def json_lines_blocks(path: Path, start: int, end: int, size: int = 16 << 20) -> Iterator[tuple[int, bytes, int]]:
    """Bytes [start, end) of a JSON Lines file as blocks of whole lines, about ``size`` bytes each: (the index of
    the block's first line in the file, the block, its line count). For the columnar parse (``core.convert``)."""
    with open(path, "rb") as f:
        line = _lines_before(f, start)
        left, carry = end - start, b""
        while left > 0 or carry:
            data = f.read(min(size, left)) if left > 0 else b""
            left -= len(data)
            data = carry + data
            if not data:
                return
            cut = data.rfind(b"\n") + 1 if left > 0 else len(data)
            if cut == 0:  # one line longer than a block: read on
                carry = data
                continue
            block, carry = data[:cut], data[cut:]
            newlines = block.count(b"\n")
            yield line, block, newlines + (not block.endswith(b"\n"))
            line += newlines


def _lines_before(f: IO[bytes], start: int) -> int:
    """Lines in the first ``start`` bytes of ``f`` (read from its start; ``f`` is left at ``start``)."""
    return sum(block.count(b"\n") for block in _blocks(f, start))


def _lines_upto(f: IO[bytes], size: int) -> Iterator[bytes]:
    """The lines of ``f`` from where it is, up to ``size`` bytes (a range ends on a line boundary).
    Streamed: reading a whole part into memory first cost each worker ~100 MB of page faults."""
    for line in f:
        yield line
        size -= len(line)
        if size <= 0:
            return


def _blocks(f: IO[bytes], size: int, block: int = 8 << 20) -> Iterator[bytes]:
    while size > 0:
        data = f.read(min(block, size))
        if not data:
            return
        size -= len(data)
        yield data


def line_ranges(path: Path, parts: int) -> list[tuple[int, int]]:
    """Split a file into ``parts`` byte ranges that end on line boundaries: (start, end)."""
    size = path.stat().st_size
    ranges, start = [], 0
    with open(path, "rb") as f:
        for k in range(1, parts + 1):
            if k == parts:
                end = size
            else:
                f.seek(max(start, size * k // parts))
                f.readline()  # move to the next line start
                end = max(start, min(f.tell(), size))
            if end > start:
                ranges.append((start, end))
            start = end
    return ranges


def _json_lines(f: Iterable[bytes], label: str, first_line: int = 0) -> Iterator[RawRow]:
    decoder = json.JSONDecoder()
    # scan_once is what json.loads runs after its argument handling and two whitespace regexes; a
    # clean line ("{...}\n") needs none of those. Anything unusual goes through the full decode.
    scan, decode = decoder.scan_once, decoder.decode
    for i, line in enumerate(f, start=first_line):
        try:
            text = line.decode("utf-8-sig" if i == 0 else "utf-8")  # a byte-order mark is not data
        except UnicodeDecodeError as e:
            yield (
                i,
                None,
                line.decode("utf-8", "backslashreplace"),
                (Reason.INVALID_UTF8, f"{label}:{i + 1}: not valid UTF-8 ({e.reason} at byte {e.start})"),
            )
            continue
        try:
            try:
                record, end = scan(text, 0)
            except StopIteration:
                record, end = decode(text), len(text)
            if end != len(text) and not text[end:].isspace():
                record = decode(text)  # trailing data: raises the standard "Extra data" error
        except json.JSONDecodeError as e:  # rare: only now pay for the checks a clean line never needs
            if text.isspace():
                continue  # a blank line: no row, but it keeps its index so source_row stays the line index
            yield i, None, text, (Reason.INVALID_JSON, f"{label}:{i + 1}: invalid JSON: {e.msg} at column {e.colno}")
            continue
        if type(record) is dict:
            yield i, record, text, None
        else:
            yield (
                i,
                None,
                text,
                (Reason.WRONG_TYPE, f"{label}:{i + 1}: expected a JSON object, found {type_name(record)}"),
            )


def _json_lines_gzip(path: Path) -> Iterator[RawRow]:
    """JSON Lines through gzip; a truncated or corrupt stream (``EOFError``, ``BadGzipFile``, ``zlib.error``
    deep in the decompressor, naming no file) fails the whole source, saying how far it was read."""
    lines = 0
    with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as f:
        try:
            for row in _json_lines(f, path.name):
                lines = row[0] + 1
                yield row
        except (EOFError, OSError, zlib.error) as e:
            size = path.stat().st_size
            raise SourceError(
                f"{path}: truncated or corrupt gzip file ({e}); read {lines:,} lines, {f.tell():,} bytes "
                f"uncompressed from {raw.tell():,} of {size:,} compressed bytes: re-create or re-download it"
            ) from None


def _json_file(path: Path) -> Iterator[RawRow]:
    """A JSON array of objects, one JSON object, or (despite the suffix) JSON Lines."""
    data = path.read_bytes()
    if data.lstrip()[:1] != b"[":
        try:  # a single (possibly pretty-printed) object; anything else is read as JSON Lines
            text = data.decode("utf-8-sig")
            record = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError):
            yield from _json_lines(io.BytesIO(data), path.name)
            return
        if type(record) is dict:
            yield 0, record, None, None
        else:
            yield 0, None, text, (Reason.WRONG_TYPE, f"{path.name}: expected a JSON object, found {type_name(record)}")
        return
    try:
        rows = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not valid UTF-8 at byte {e.start} ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: invalid JSON array at line {e.lineno} column {e.colno}: {e.msg}") from None
    for i, record in enumerate(rows):
        if type(record) is dict:
            yield i, record, None, None
        else:
            yield (
                i,
                None,
                json.dumps(record, ensure_ascii=False),
                (Reason.WRONG_TYPE, f"{path.name}[{i}]: expected a JSON object, found {type_name(record)}"),
            )


def _parquet(path: Path, batch_size: int = 8192) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        with pq.ParquetFile(path) as f:
            for batch in f.iter_batches(batch_size=batch_size):
                for record in batch.to_pylist():
                    yield row, record, None, None
                    row += 1
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{path}: not a readable Parquet file ({e}); read {row:,} rows before that") from None


def load_hub(hub: HubSource):
    """``datasets.load_dataset`` with the recipe's arguments (one split, a pinned revision if given)."""
    import datasets  # imported here: slow to import, and only hub sources need it

    return datasets.load_dataset(
        hub.path,
        name=hub.name,
        data_dir=hub.data_dir,
        data_files=hub.data_files,
        split=hub.split,
        revision=hub.revision,
    )


def hub_records(dataset, batch_size: int = 1000) -> Iterator[RawRow]:
    row = 0
    for batch in dataset.iter(batch_size=batch_size):
        keys = list(batch)
        for values in zip(*batch.values()):
            yield row, dict(zip(keys, values)), None, None
            row += 1


def hub_fingerprint(dataset, hub: HubSource) -> str:
    # `datasets` exposes no public fingerprint; `_fingerprint` is the hash it uses for its own cache
    # (content of the prepared files + transforms). Fall back to the arguments when it is absent.
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint:
        return str(fingerprint)
    return content_hash(hub.model_dump(mode="json"))
