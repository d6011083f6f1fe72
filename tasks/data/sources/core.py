"""``read_source``: one recipe source → canonical rows of its format's table + quarantine rows, nothing lost.

The loop is the hot path of ingestion (hh-rlhf at 10^5–10^6 rows), so rows are collected column-wise
into flat Python lists of strings (no per-row pydantic, no per-row Arrow calls) and become Arrow
arrays once per chunk.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import tempfile
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa

from schemas.data_config import SourceConfig
from schemas.preference import MESSAGES, QUARANTINE_SCHEMA, Reason, prompt_hashes
from schemas.tables import Table, get_table
from tasks.data.preload import wait_for_background_imports
from tasks.data.sources.base import RowError
from tasks.data.sources.formats import get_adapter
from tasks.data.sources.parallel import PROGRESS_EVERY, run_jobs
from tasks.data.sources.readers import (
    _json_lines,
    file_sha256,
    hub_fingerprint,
    hub_records,
    json_lines_blocks,
    json_lines_range,
    line_ranges,
    load_hub,
    read_records,
    resolve_path,
)

# Rows per Arrow chunk: bounds the Python lists and keeps string arrays far below 2 GiB. Small enough
# that a chunk's transient memory is reused by the next (65k rows cost each parse worker ~0.5 s of
# page-fault system time), large enough that per-chunk Arrow calls cost nothing per row.
_CHUNK = 16_384


@dataclass
class SourceResult:
    source: str  # cfg.name
    accepted: pa.Table  # the table's schema (schemas/tables.py), rows in source order
    quarantine: pa.Table  # QUARANTINE_SCHEMA, rows in source order
    rows_read: int  # == accepted.num_rows + quarantine.num_rows
    input: dict  # name, format, table, path | hub, sha256 (file bytes; hub: dataset fingerprint), rows
    table: str = "preference"  # the canonical table of the source's format


def read_source(
    cfg: SourceConfig, base_dir: Path | None = None, seed: int = 42, while_parsing: Callable[[], object] | None = None
) -> SourceResult:
    """Read ``cfg`` (a local file or a hub dataset) through its format's adapter, into the adapter's table.

    ``cfg.limit`` reads only the first N rows; ``cfg.weight`` < 1 keeps a seeded fraction of the rows
    (drawn by row id, so a row's fate does not depend on its position) and quarantines the others as
    DOWNSAMPLED. A relative ``cfg.path`` is looked up in the working directory, then under ``base_dir``.
    ``while_parsing`` is called in this process once worker processes parse the file (large JSON Lines
    files only), when this process would otherwise wait idle; background imports it starts
    (``tasks.data.preload``) are finished before this returns.
    """
    info, dataset = source_input(cfg, base_dir)  # an unknown format or a missing file fails here, before reading
    size = 0 if dataset is not None else Path(info["path"]).stat().st_size
    with tempfile.TemporaryDirectory(prefix="align-parse-", dir=_spool_dir(size)) as spool:
        out = _Collector.merge(
            cfg.name, info["table"], read_parts(cfg, info, dataset, seed, spool, None, while_parsing)
        )
    accepted, quarantine = out.tables()
    rows_read = out.rows_read
    assert rows_read == accepted.num_rows + quarantine.num_rows, (cfg.name, rows_read)
    return SourceResult(cfg.name, accepted, quarantine, rows_read, {**info, "rows": rows_read}, info["table"])


def check_sources(sources: list[SourceConfig], base_dir: Path | None = None) -> None:
    """Fail before any work on what no read would survive: an unknown format, a local file that is not there."""
    for cfg in sources:
        get_adapter(cfg.format)
        if cfg.hub is None:
            resolve_path(cfg.path, cfg.name, base_dir)


# Files above this size are parsed by one process per core (each part's rows are independent: adapters
# seed per row, ids are content hashes), like `datasets.map(num_proc=...)` but keeping row order.
PARALLEL_MIN_BYTES = 8 << 20


def _parallel_ranges(cfg: SourceConfig, path: Path) -> list[tuple[int, int]]:
    workers = min(os.cpu_count() or 1, 8)
    if workers < 2 or cfg.limit is not None or path.suffix != ".jsonl" or path.stat().st_size < PARALLEL_MIN_BYTES:
        return []
    return line_ranges(path, workers)


def _spool_dir(input_bytes: int) -> str | None:
    """Where workers hand their Arrow batches over as files, which the parent maps (unpickling ~80 MB per
    worker from a pipe cost it ~0.5 s of CPU): /dev/shm (memory) when it has room for about
    twice the input (Docker's default is 64 MB), else the temporary directory."""
    try:
        shm = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if shm.f_bavail * shm.f_frsize > 2 * input_bytes else None


def parse_range(
    cfg: SourceConfig,
    path: Path,
    byte_range: tuple[int, int],
    seed: int,
    spool: str,
    screen=None,
    *,
    progress: Callable[[str], object],
) -> _Collector:
    """One worker's part of a parallel read: the rows in ``byte_range`` of ``path``, their batches written to
    an Arrow file in ``spool`` as they are made (a worker holds one batch, not its part); ``screen``: see
    :func:`convert`. ``progress`` is called every ``PROGRESS_EVERY`` rows (the stall watch)."""
    progress(f"byte {byte_range[0]:,} (started)")
    if columnar(cfg, path):
        blocks = _reporting_blocks(json_lines_blocks(path, *byte_range), progress)
        out = convert(None, cfg, path.name, seed, spool, screen, blocks)
    else:
        out = convert(_reporting(json_lines_range(path, *byte_range), progress), cfg, path.name, seed, spool, screen)
    progress("all rows parsed")
    return out


def _reporting_blocks(blocks, progress: Callable[[str], object]):
    for first, block, lines in blocks:
        yield first, block, lines
        progress(f"line {first + lines:,}")


def _reporting(rows, progress: Callable[[str], object]):
    for k, row in enumerate(rows, 1):
        yield row
        if k % PROGRESS_EVERY == 0:
            progress(f"line {row[0] + 1:,}")


def convert(
    rows, cfg: SourceConfig, label: str, seed: int, spool: str | None = None, screen=None, blocks=None
) -> _Collector:
    """Run raw rows through the source's adapter, collecting accepted and quarantined rows.

    Ids and prompt hashes are computed column-wise when the collector flushes; a row only needs its id
    here to be drawn by weight, or to find an unpaired surrogate before Arrow would refuse the chunk.
    ``spool``: a directory; each batch goes to an Arrow file there as it is made (``out.spooled``), instead of
    staying in memory. ``screen``: called on each batch (``screen(batch) -> (kept, quarantine)``, the row-local
    cleaning of ``tasks.data.stream``); what it keeps is spooled, what it rejects is kept in ``out.screened``.
    ``blocks``: instead of ``rows``, JSON Lines blocks (``readers.json_lines_blocks``) for an adapter with a
    columnar parse (:func:`columnar`): each block is parsed by Arrow's JSON reader and the adapter's
    ``parse_columns``; a block Arrow cannot take as it is, and each row the columnar parse does not take, go
    row by row as ``rows`` would.
    """
    adapter = get_adapter(cfg.format)
    out = _Collector(cfg.name, adapter.table, screen)
    if spool is not None:
        out.open_spool(spool)
    if blocks is not None:
        for first_line, block, lines in blocks:
            _convert_block(out, adapter, cfg, label, seed, first_line, block, lines)
    else:
        take = _row_taker(out, cfg, label, seed)
        for row in rows:
            take(*row)
    if spool is not None:
        out.close_spool()
    else:
        out._flush()
    out.screen = None  # it goes back to the parent without it (a tokenizer, the evaluation prompts)
    return out


def columnar(cfg: SourceConfig, path: Path | None) -> bool:
    """Whether a source is read by blocks (``convert(blocks=...)``): an uncompressed JSON Lines file of a format
    with a columnar parse, read whole (no ``limit``) and unweighted (a weight draws per row)."""
    adapter = get_adapter(cfg.format)
    return (
        adapter.parse_columns is not None
        and path is not None
        and path.name.lower().endswith(".jsonl")
        and cfg.limit is None
        and cfg.weight >= 1
    )


# A "\ud800"-style escape (a lone surrogate once decoded): such blocks go row by row, where it is quarantined.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SLOW_SHARE = 0.05  # above this share of rows the columnar parse does not take, a block goes row by row


def _convert_block(
    out: _Collector, adapter, cfg: SourceConfig, label: str, seed: int, first: int, block: bytes, lines: int
):
    from pyarrow import json as pa_json

    table = None
    if not (first == 0 and block.startswith(b"\xef\xbb\xbf")) and not _SURROGATE_ESCAPE.search(block):
        schema = pa.schema([(f, pa.string()) for f in adapter.fields])
        try:
            table = pa_json.read_json(
                pa.BufferReader(block),
                read_options=pa_json.ReadOptions(use_threads=False, block_size=len(block) + 1),
                parse_options=pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            table = None  # not every line a JSON object of strings there: the rows say which and why
        if table is not None and table.num_rows != lines:
            table = None  # blank lines (skipped by Arrow): row by row keeps each row's line index
    if table is not None:
        ok, columns = adapter.parse_columns(*(table[f].combine_chunks() for f in adapter.fields))
        slow = np.flatnonzero(~ok)
        if len(slow) <= _SLOW_SHARE * lines:
            # The rows it did not take, row by row into a collector of their own; then one batch in line order.
            aside = _Collector(out.source, out.table_name)
            take = _row_taker(aside, cfg, label, seed)
            texts = block.split(b"\n")
            for k in slow.tolist():
                take(*next(_json_lines([texts[k] + b"\n"], label, first + k)))
            aside._flush()
            out.take_quarantine(aside)
            fast = out.build(columns, first + np.flatnonzero(ok))
            out.accept_batch(pa.Table.from_batches([fast, *aside.batches], schema=out.table.schema), lines - len(slow))
            return
    take = _row_taker(out, cfg, label, seed)
    for row in _json_lines(io.BytesIO(block), label, first):
        take(*row)


def _row_taker(out: _Collector, cfg: SourceConfig, label: str, seed: int):
    """``take(source_row, record, raw, error)``: one raw row through the adapter into ``out``."""
    adapter = get_adapter(cfg.format)
    options = cfg.typed_options()
    table = out.table
    parse, needs_rng, weight = adapter.parse, adapter.needs_rng, cfg.weight
    per_row = weight < 1

    def take(source_row, record, raw, error) -> None:
        if error is not None:
            out.quarantine(source_row, error[0], error[1], raw)
            return
        rng = random.Random(f"{seed}:{source_row}") if needs_rng else None
        try:
            row = parse(record, options, rng)
        except RowError as e:
            out.quarantine(source_row, e.reason, f"{_where(label, source_row, raw)}: {e.detail}", raw, record)
            return
        if per_row or not _encodable(row, table.messages):
            try:
                row_id = table.row_id(row)
            except UnicodeEncodeError as e:  # a lone surrogate from a "\ud800" escape: not writable text
                out.quarantine(
                    source_row,
                    Reason.INVALID_UTF8,
                    f"{_where(label, source_row, raw)}: unpaired surrogate escape in the text ({e.reason})",
                    raw if raw is not None else json.dumps(record, default=str),
                )  # ASCII: writable
                return
            if per_row and _draw(row_id, seed) >= weight:
                out.quarantine(
                    source_row,
                    Reason.DOWNSAMPLED,
                    f"not drawn at weight {weight} (seed {seed}, id {row_id})",
                    raw,
                    record,
                )
                return
        out.accept(source_row, row)

    return take


def _encodable(row: dict, keys: tuple[str, ...]) -> bool:
    """False when a turn holds a lone surrogate, which Arrow (and UTF-8) cannot store. Only non-ASCII
    text can (``str.isascii`` is O(1)), and only that is encoded to find out."""
    for key in keys:
        for m in row[key]:
            if not m["content"].isascii():
                try:
                    m["content"].encode("utf-8")
                except UnicodeEncodeError:
                    return False
    return True


def _where(label: str, source_row: int, raw: str | None) -> str:
    """``file:line`` (1-based, as an editor shows it) for line-based sources, else ``name row N``."""
    return f"{label}:{source_row + 1}" if raw is not None else f"{label} row {source_row}"


def _draw(row_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, row id)."""
    digest = hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class _Collector:
    """Accepted and quarantined rows of one table, column-wise; flushed to Arrow every ``_CHUNK`` rows.
    It travels between processes, so it holds the table's name (``schemas.tables``), not the table."""

    def __init__(self, source: str, table: str = "preference", screen=None):
        self.source = source
        self.table_name = table
        self.screen = screen
        self.screened: list[pa.Table] = []  # quarantine rows of the screen, per batch
        self.spooled: str | None = None
        self._writer = None
        self.rows_read = 0
        self.batches: list[pa.RecordBatch] = []
        self.q_rows: list[int] = []
        self.q_reasons: list[str] = []
        self.q_details: list[str] = []
        self.q_raw: list[str] = []
        self._reset()

    @property
    def table(self) -> Table:
        return get_table(self.table_name)

    def _reset(self) -> None:
        table = self.table
        self.source_rows = []
        self.scalars = {k: [] for k in table.scalars}  # scores (preference), label (unpaired)
        self._scalars = list(self.scalars.items())
        # per message column: end offsets, roles, contents (flat lists of strings: cheap to append,
        # not tracked by the garbage collector, one pa.array call each per chunk)
        self.messages = {k: ([0], [], []) for k in table.messages}
        self._columns = [(k, *self.messages[k]) for k in table.messages]

    def accept(self, source_row: int, row: dict) -> None:
        """Keep a parsed row; its text must encode as UTF-8 (``_convert`` quarantines the others)."""
        self.rows_read += 1
        self.source_rows.append(source_row)
        for key, values in self._scalars:
            values.append(row[key])
        for key, offsets, roles, contents in self._columns:
            for m in row[key]:
                roles.append(m["role"])
                contents.append(m["content"])
            offsets.append(len(roles))
        if len(self.source_rows) >= _CHUNK:
            self._flush()

    def quarantine(
        self, source_row: int, reason: Reason, detail: str, raw: str | None, record: dict | None = None
    ) -> None:
        self.rows_read += 1
        self.q_rows.append(source_row)
        self.q_reasons.append(str(reason))
        self.q_details.append(detail)
        # The original row as JSON text: its own line where the source has lines, else serialised.
        self.q_raw.append(
            raw.rstrip("\r\n") if raw is not None else json.dumps(record, ensure_ascii=False, default=str)
        )

    def _flush(self) -> None:
        if not self.source_rows:
            return
        table = self.table
        lists = {}
        for key, (offsets, roles, contents) in self.messages.items():
            values = pa.StructArray.from_arrays(
                [pa.array(roles, pa.string()), pa.array(contents, pa.string())], fields=list(MESSAGES.value_type)
            )
            lists[key] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, type=MESSAGES)
        lists |= {k: pa.array(v, table.schema.field(k).type) for k, v in self.scalars.items()}
        batch = self.build(lists, self.source_rows)
        self._reset()
        self._emit(batch)

    def build(self, lists: dict, source_rows) -> pa.RecordBatch:
        """A batch of the table from its adapter columns (``lists``: message lists and scalars) and row indices:
        content ids and prompt hashes computed here, column-wise."""
        table = self.table
        return pa.RecordBatch.from_pydict(
            {
                "id": pa.array(table.ids(lists), pa.string()),
                "source": pa.array([self.source] * len(source_rows), pa.string()),
                "source_row": pa.array(source_rows, pa.int64()),
                **lists,
                "prompt_hash": pa.array(prompt_hashes(table.prompts(lists)), pa.string()),
            },
            schema=table.schema,
        )

    def accept_batch(self, rows: pa.Table, read: int) -> None:
        """Keep rows built elsewhere (:meth:`build`), in source order after every row kept so far; ``read``: how
        many of them count as read here (rows merged from another collector count there)."""
        self._flush()
        self.rows_read += read
        rows = rows.sort_by("source_row").combine_chunks()
        for batch in rows.to_batches():
            self._emit(batch)

    def take_quarantine(self, other: _Collector) -> None:
        """The rows ``other`` read (its quarantine here; its accepted rows go to :meth:`accept_batch`)."""
        self.rows_read += other.rows_read
        self.q_rows += other.q_rows
        self.q_reasons += other.q_reasons
        self.q_details += other.q_details
        self.q_raw += other.q_raw

    def _emit(self, batch: pa.RecordBatch) -> None:
        if self.screen is not None:
            batch, rejected = self.screen(batch)
            self.screened.append(rejected)
        if self._writer is not None:
            self._writer.write_batch(batch)
        else:
            self.batches.append(batch)

    def open_spool(self, directory: str) -> None:
        """From now on every batch goes to an Arrow IPC file in ``directory`` as it is made; only the file's
        name travels with ``self``."""
        fd, self.spooled = tempfile.mkstemp(suffix=".arrow", dir=directory)
        schema = self.screen.schema(self.table) if self.screen is not None else self.table.schema
        self._file = os.fdopen(fd, "wb")
        self._writer = pa.ipc.new_file(self._file, schema)

    def close_spool(self) -> None:
        self._flush()
        self._writer.close()
        self._file.close()
        self._writer = self._file = None

    def unspool(self) -> None:
        """Map the spooled batches back (zero-copy); the file goes, its pages stay while they are used."""
        if getattr(self, "spooled", None):
            self.batches = pa.ipc.open_file(pa.memory_map(self.spooled)).read_all().to_batches()
            os.unlink(self.spooled)
            self.spooled = None

    @classmethod
    def merge(cls, source: str, table: str, parts: list[_Collector]) -> _Collector:
        """Parts of one source, in order, as one collector."""
        out = cls(source, table)
        for part in parts:
            part.unspool()
            part._flush()
            out.rows_read += part.rows_read
            out.batches += part.batches
            out.q_rows += part.q_rows
            out.q_reasons += part.q_reasons
            out.q_details += part.q_details
            out.q_raw += part.q_raw
        return out

    def tables(self) -> tuple[pa.Table, pa.Table]:
        self._flush()
        accepted = pa.Table.from_batches(self.batches, schema=self.table.schema)
        return accepted, self.quarantine_table()

    def quarantine_table(self) -> pa.Table:
        """The rows the reading and the adapter kept out (the screen's rejects are in ``screened``)."""
        return pa.Table.from_pydict(
            {
                "source": [self.source] * len(self.q_rows),
                "source_row": self.q_rows,
                "table": [self.table_name] * len(self.q_rows),
                "reason": self.q_reasons,
                "detail": self.q_details,
                "raw": self.q_raw,
            },
            schema=QUARANTINE_SCHEMA,
        )


def source_input(cfg: SourceConfig, base_dir: Path | None = None) -> tuple[dict, object]:
    """A source's identity before any row is read: ``{name, format, table, path | hub, sha256}`` (sha256 of the
    file's bytes, or the hub dataset's fingerprint), and the loaded hub dataset (None for a file), so a dataset
    version can be found reused without parsing anything."""
    table = get_adapter(cfg.format).table
    if cfg.hub is not None:
        dataset = load_hub(cfg.hub)
        location = {"hub": cfg.hub.model_dump(mode="json"), "sha256": hub_fingerprint(dataset, cfg.hub)}
    else:
        path = resolve_path(cfg.path, cfg.name, base_dir)
        dataset, location = None, {"path": str(path), "sha256": file_sha256(path)}
    return {"name": cfg.name, "format": cfg.format, "table": table, **location}, dataset


def read_parts(
    cfg: SourceConfig,
    info: dict,
    dataset,
    seed: int,
    spool: str,
    screen,
    while_parsing: Callable[[], object] | None = None,
) -> list[_Collector]:
    """Stream one source (``info`` and ``dataset`` from :func:`source_input`) through its adapter and ``screen``
    into Arrow files in ``spool``, in bounded batches: a large JSON Lines file in parallel parts (one worker
    process per core, as :func:`read_source`), anything else here. The parts, in source order; each holds its
    rows read, its quarantine rows (``q_*`` and ``screened``) and its spooled file of kept rows."""
    if dataset is not None:
        with closing(hub_records(dataset)) as rows:
            return [convert(islice(rows, cfg.limit), cfg, cfg.hub.path, seed, spool, screen)]
    path = Path(info["path"])
    ranges = _parallel_ranges(cfg, path)
    if len(ranges) > 1:
        jobs = [(cfg, path, r, seed, spool, screen) for r in ranges]
        labels = [f"{path} bytes {start:,}-{end:,} (source {cfg.name!r})" for start, end in ranges]
        # parallel.run_jobs: exec'd workers, never forked from this process and its threads; a worker that stalls
        # or dies fails the read naming its range.
        parts = run_jobs("tasks.data.sources.core:parse_range", jobs, labels, meanwhile=while_parsing)
        # What the hook imports in the background must be done before this thread imports anything (Arrow
        # loads pandas later): two threads importing one package with circular imports (Great Expectations,
        # pandas) can get a partially initialised module.
        wait_for_background_imports()
        return parts
    if columnar(cfg, path):
        return [convert(None, cfg, path.name, seed, spool, screen, json_lines_blocks(path, 0, path.stat().st_size))]
    with closing(read_records(path)) as rows:
        return [convert(islice(rows, cfg.limit), cfg, path.name, seed, spool, screen)]
