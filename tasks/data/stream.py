"""The ingest's one pass over the data, in bounded batches: nothing holds a whole source, so 10^6-row sources run
in a fixed amount of memory, and the row-local work runs where the rows are parsed (one worker process per core).

1. Read (``tasks.data.sources.core.read_parts``): each source through its adapter, 16k rows at a time; each batch
   is *screened* where it was parsed (:class:`Screen`: the row-local cleaning rules of ``tasks/data/clean.py``,
   the decontamination verdict, the split key and its drawn split) and spooled to an Arrow file.
2. Decide (:func:`decide`, on a few small columns of every spooled row): exact duplicates across every source of
   a table (the first in recipe order is kept, as ``clean_rows``), then contaminated rows, then the final split
   (a source that keeps its own split pulls every row with its keys there: ``tasks/data/split.py``).
3. Write (:func:`assemble`): the spooled batches once more, each row to its split's Parquet file (fixed-size row
   groups, so the same rows give the same bytes whatever the number of workers) or to the quarantine, while the
   contract's rows view (``tasks/data/contract_views.py``) is built batch by batch.

The result is the one ``clean_rows`` + ``split_tables`` give on the whole table (tests compare them); those pure
functions stay the definitions, this module only runs them batch-wise.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.data_config import DataConfig
from schemas.preference import QUARANTINE_SCHEMA, Reason
from schemas.tables import Table, get_table
from tasks.data.clean import quarantine_from, screen_rows
from tasks.data.contract_views import finish_rows, row_columns
from tasks.data.decontaminate import KINDS, Decontaminator
from tasks.data.split import SPLITS, assign_splits, hold, split_keys

# Columns a screened batch carries beside the table's own (dropped before anything is written).
EXTRA = pa.schema(
    [
        ("_key", pa.string()),  # split key: hash of the normalised first user turn
        ("_draw", pa.string()),  # the split the hash draws (a pinned source's keys may move it)
        ("_kind", pa.string()),  # decontamination match ("exact", "ngram") or null
        ("_detail", pa.string()),  # ... and what matched
        ("_not_last", pa.bool_()),  # ... before the prompt's last turn
    ]
)
SMALL = ["id", "source", "source_row", "_key", "_draw", "_kind", "_detail", "_not_last"]  # what the decision reads
ROW_GROUP = 65_536  # rows per Parquet row group of a split file


@dataclass
class Screen:
    """The row-local part of cleaning and splitting, applied to each batch as it is parsed (in a worker process
    for a large file: it travels there pickled, so it holds settings, not open resources)."""

    data: DataConfig
    decontaminator: Decontaminator
    table: str
    test_draw: float
    validation_draw: float
    tokenizer: object = None  # for data.lengths.max_tokens: an object, or loaded by name where the batch is
    tokenizer_name: str | None = None
    trust_remote_code: bool = False

    def schema(self, spec: Table) -> pa.Schema:
        return pa.schema(list(spec.schema) + list(EXTRA))

    def _tokenizer(self):
        if self.tokenizer is None and self.tokenizer_name and self.data.lengths.max_tokens is not None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(
                self.tokenizer_name, trust_remote_code=self.trust_remote_code
            )
        return self.tokenizer

    def __call__(self, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, pa.Table]:
        """(the rows that pass every row-local rule, with the ``EXTRA`` columns; the quarantine rows of the others)"""
        spec = get_table(self.table)
        s = screen_rows(pa.Table.from_batches([batch]), self.data, self.decontaminator, self._tokenizer(), self.table)
        bad = s.reasons != None  # noqa: E711 (elementwise on an object array)
        keep = ~bad
        kept = s.table.filter(pa.array(keep))
        keys = split_keys(kept[spec.split_column])
        draw = assign_splits(keys, self.test_draw, self.validation_draw, self.data.seed)
        v = s.verdicts
        columns = [kept[name].combine_chunks() for name in spec.schema.names] + [
            pa.array(keys, pa.string()),
            pa.array(draw.tolist(), pa.string()),
            pa.array(v.kind[keep].tolist(), pa.string()),
            pa.array(v.detail[keep].tolist(), pa.string()),
            pa.array(v.not_last_turn[keep].tolist() if len(v.not_last_turn) else [False] * len(keys), pa.bool_()),
        ]
        return pa.RecordBatch.from_arrays(columns, schema=self.schema(spec)), quarantine_from(
            s.table, bad, s.reasons, s.details, self.table
        )


@dataclass
class Decision:
    """Per spooled row of one table (recipe order): its fate and, when accepted, its split."""

    accepted: np.ndarray  # bool
    reason: np.ndarray  # object: None, DUPLICATE or CONTAMINATED
    detail: np.ndarray  # object
    split: np.ndarray  # int8: the final split of accepted rows, as an index of SPLITS
    decontamination: dict = field(default_factory=dict)


def small_columns(spooled: list[str]) -> pa.Table:
    """The columns the decision reads, of every row in the spooled files (memory-mapped: only these columns'
    pages are read)."""
    tables = [pa.ipc.open_file(pa.memory_map(path)).read_all().select(SMALL) for path in spooled]
    if tables:
        return pa.concat_tables(tables)
    every = pa.schema(list(get_table("preference").schema) + list(EXTRA))
    return pa.schema([every.field(c) for c in SMALL]).empty_table()


def decide(small: pa.Table, checked: dict[str, int]) -> Decision:
    """Duplicates and contamination of one table's rows (``small``: :func:`small_columns`, recipe order), the
    rules and their order as ``tasks.data.clean.clean_rows``: the first of identical rows is kept (a duplicate of
    a contaminated row is a duplicate), then the contaminated are kept out. ``checked``: rows cleaned per source
    (the screen's rejects included), for the decontamination counts. Column-wise: Python objects only for the
    rows kept out."""
    n = small.num_rows
    ids = small["id"].combine_chunks()
    order = pa.array(np.arange(n, dtype=np.int64))
    first = pa.table({"id": ids, "i": order}).group_by("id").aggregate([("i", "min")])
    first_of = first["i_min"].to_numpy()[pc.index_in(ids, value_set=first["id"]).to_numpy()] if n else order
    duplicate = np.asarray(first_of) != np.arange(n)
    matched = pc.is_valid(small["_kind"]).to_numpy(zero_copy_only=False) if n else np.zeros(0, bool)
    contaminated = ~duplicate & matched
    reason = np.full(n, None, dtype=object)
    detail = np.full(n, None, dtype=object)
    dup = np.flatnonzero(duplicate)
    if len(dup):
        firsts = first_of[dup]
        sources = small["source"].take(pa.array(firsts)).to_pylist()
        rows = small["source_row"].take(pa.array(firsts)).to_pylist()
        for i, source, row, row_id in zip(dup.tolist(), sources, rows, ids.take(pa.array(dup)).to_pylist()):
            reason[i] = Reason.DUPLICATE.value
            detail[i] = f"same content as {source} row {row} (id {row_id})"
    hit = np.flatnonzero(contaminated)
    if len(hit):
        reason[hit] = Reason.CONTAMINATED.value
        detail[hit] = np.asarray(small["_detail"].take(pa.array(hit)).to_pylist(), dtype=object)
    split = pc.index_in(small["_draw"], value_set=pa.array(SPLITS)).to_numpy(zero_copy_only=False).astype(np.int8)
    counts = _decontamination(small, contaminated, checked)
    return Decision(~duplicate & ~contaminated, reason, detail, split, counts)


def _decontamination(small: pa.Table, contaminated: np.ndarray, checked: dict[str, int]) -> dict:
    """{source: {rows, contaminated, exact, ngram, not_last_turn}} as ``decontaminate.counts_per_source``."""
    hit = pa.array(contaminated)
    rows = small.filter(hit) if len(contaminated) else small
    out = {}
    for name in sorted(s for s, k in checked.items() if k):
        mine = rows.filter(pc.equal(rows["source"], name))
        kinds = mine["_kind"].to_pylist()
        out[name] = {
            "rows": int(checked[name]),
            "contaminated": mine.num_rows,
            **{k: kinds.count(k) for k in KINDS},
            "not_last_turn": int(pc.sum(mine["_not_last"]).as_py() or 0),
        }
    return out


def pin_splits(decisions: dict[str, Decision], smalls: dict[str, pa.Table], pinned: dict[str, str]) -> None:
    """A source that keeps its own split (``pinned``: source → split) takes every accepted row, of any table, whose
    key one of its rows has (test wins over validation), as ``tasks.data.split.split_tables``."""
    if not pinned:
        return
    held: dict[str, str] = {}
    for name, d in decisions.items():
        small = smalls[name]
        mine = pc.is_in(small["source"], value_set=pa.array(list(pinned))).to_numpy(zero_copy_only=False)
        rows = pa.array(np.flatnonzero(d.accepted & mine), pa.int64())
        hold(held, small["_key"].take(rows).to_pylist(), small["source"].take(rows).to_pylist(), pinned)
    if not held:
        return
    for name, d in decisions.items():
        keys = smalls[name]["_key"]
        moved = pc.is_in(keys, value_set=pa.array(list(held), pa.string())).to_numpy(zero_copy_only=False)
        moved = np.flatnonzero(moved)
        for i, key in zip(moved.tolist(), keys.take(pa.array(moved, pa.int64())).to_pylist()):
            d.split[i] = SPLITS.index(held[key])


class SplitWriter:
    """One split file, written in row groups of exactly ``ROW_GROUP`` rows (the last one shorter). With an
    ``executor`` (one thread), the row groups are compressed and written there while the caller reads and sorts
    the next batches: Arrow's Parquet writer releases the GIL, and the parent's other core is idle otherwise."""

    def __init__(self, path: Path, schema: pa.Schema, executor=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.schema, self.rows = path, schema, 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._executor, self._writes = executor, []
        # The fixed options of tasks.data.dataset.write_parquet: no timestamps, the same rows give the same bytes.
        self._writer = pq.ParquetWriter(path, schema, compression="zstd", use_dictionary=True, write_statistics=True)

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        while self._pending_rows >= ROW_GROUP:
            self._emit(ROW_GROUP)

    def _emit(self, size: int) -> None:
        pending = pa.concat_tables(self._pending)
        group = pending.slice(0, size)
        if self._executor is None:
            self._writer.write_table(group, row_group_size=size)
        else:
            while len(self._writes) >= 2:  # at most two row groups in flight: memory stays bounded
                self._writes.pop(0).result()
            self._writes.append(self._executor.submit(self._writer.write_table, group, row_group_size=size))
        rest = pending.slice(size)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        try:
            if self._pending_rows:
                self._emit(self._pending_rows)
            for write in self._writes:
                write.result()  # a failed write raises here
        finally:
            self._writes = []
            self._writer.close()


@dataclass
class Assembled:
    rows_views: dict[str, pa.Table]  # per table: the contract's rows view (finish_rows applied)
    quarantine: pa.Table  # the decision's rejects (duplicate, contaminated), every table
    files: dict[str, int]  # file name in the version folder → rows


def batches(spooled: list[str]):
    """The batches of spooled files in order, one at a time (read, not mapped: pages do not accumulate)."""
    for path in spooled:
        with pa.OSFile(path) as f:
            reader = pa.ipc.open_file(f)
            for k in range(reader.num_record_batches):
                yield reader.get_batch(k)


def assemble(out_dir: Path, spooled: dict[str, list[str]], decisions: dict[str, Decision], file_of) -> Assembled:
    """Every table's spooled rows to their split files under ``out_dir`` (``file_of(table, split)``) or to the
    quarantine, and the contract's rows view built on the way."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet") as executor:
        return _assemble(out_dir, spooled, decisions, file_of, executor)


def _assemble(out_dir: Path, spooled: dict[str, list[str]], decisions: dict[str, Decision], file_of, executor):
    views, quarantined, files = {}, [], {}
    for name, paths in spooled.items():
        spec, d = get_table(name), decisions[name]
        writers = {split: SplitWriter(out_dir / file_of(name, split), spec.schema, executor) for split in SPLITS}
        parts: dict[str, list] = {s: [] for s in SPLITS}  # the rows view, already in split order
        at = 0
        try:
            for batch in batches(paths):
                n = batch.num_rows
                rows = pa.Table.from_batches([batch])
                accepted, split = d.accepted[at : at + n], d.split[at : at + n]
                canonical = rows.select(spec.schema.names)
                for k, s in enumerate(SPLITS):
                    here = pa.array(accepted & (split == k))
                    kept = canonical.filter(here)
                    writers[s].write(kept)
                    keys = rows["_key"].filter(here).combine_chunks()
                    parts[s].append(row_columns(name, kept, np.full(kept.num_rows, s), keys))
                rejected = ~accepted
                if rejected.any():
                    reasons, details = d.reason[at : at + n], d.detail[at : at + n]
                    quarantined.append(quarantine_from(canonical, rejected, reasons, details, name))
                at += n
        finally:
            for w in writers.values():
                w.close()
        files.update({file_of(name, s): w.rows for s, w in writers.items()})
        empty = row_columns(name, spec.schema.empty_table(), np.array([], dtype=str))
        views[name] = finish_rows(pa.concat_tables([empty, *(v for s in SPLITS for v in parts[s])]))
    quarantine = pa.concat_tables(quarantined) if quarantined else QUARANTINE_SCHEMA.empty_table()
    return Assembled(views, quarantine, files)


def per_source_checked(parts_by_source: list[tuple[str, list]]) -> dict[str, int]:
    """Rows that reached cleaning per source: read and mapped by the adapter (the screen's rejects included)."""
    out: dict[str, int] = defaultdict(int)
    for source, parts in parts_by_source:
        out[source] += sum(p.rows_read - len(p.q_rows) for p in parts)
    return dict(out)
