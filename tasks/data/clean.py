"""Cleaning: normalise, filter, dedupe and decontaminate canonical rows of any table (preference, sft, unpaired:
``schemas/tables.py``); every dropped row is quarantined, naming its table.

Policy (one place, documented):
- Unicode: message text is put in the recipe's normal form (NFC by default: canonically equivalent
  sequences become identical bytes, nothing visible changes). `unicode_form: none` keeps bytes as read.
- Whitespace: never stripped or collapsed in stored text. Leading spaces of answers stay (orca's rejected
  answers start with one). Whitespace only matters to the *checks*: a turn that is empty after trimming is
  an empty turn, and two answers that differ only in whitespace are identical sides.
- Rules, first failing one wins, in this order: empty turn, identical sides (preference only), too short / too
  long (characters per turn; tokens of prompt + longer answer, or of every turn of an sft / unpaired row, when a
  tokenizer is configured), exact duplicate
  (same content id; the first occurrence in source order is kept), contaminated (any user turn matches
  an evaluation prompt, normalised as in `schemas.preference.normalise_prompt_text`, exactly or, with
  `data.decontaminate_ngram`, by a shared word run: tasks/data/decontaminate.py).
- Quarantine `raw` holds the canonical row as it reached cleaning (JSON); `source_row` traces it to the
  source's own row.

The checks run column-wise on Arrow arrays (pyarrow.compute), not per row in Python: the ingest
benchmark pushes 160k rows through the whole path in a few seconds.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.data_config import DataConfig
from schemas.preference import QUARANTINE_SCHEMA, Reason, collapse_whitespace, prompt_hash, render_messages
from schemas.tables import PREFERENCE, Table, get_table
from tasks.data.decontaminate import Decontaminator, Verdicts, counts_per_source
from tasks.data.decontaminate import read_eval_prompts as read_eval_prompts  # where evaluation code imports it

SIDES = PREFERENCE.messages  # ("prompt", "chosen", "rejected")


@dataclass
class CleanResult:
    accepted: pa.Table  # the table's schema
    quarantine: pa.Table  # QUARANTINE_SCHEMA
    decontamination: dict = field(default_factory=dict)  # per source: rows, contaminated, exact, ngram, ...


def clean_rows(
    table: pa.Table,
    cfg: DataConfig,
    eval_prompts: Iterable[str] | Decontaminator = (),
    tokenizer=None,
    kind: str = "preference",
) -> CleanResult:
    """Apply the cleaning policy above to canonical rows of table ``kind`` (in source order). ``eval_prompts``:
    texts to keep out (matched as ``cfg.decontaminate_ngram`` says), or a ready :class:`Decontaminator`."""
    s = screen_rows(table, cfg, eval_prompts, tokenizer, kind)
    table, reasons, details, verdicts = s.table, s.reasons, s.details, s.verdicts
    _mark_duplicates(table, reasons, details)
    fresh = (verdicts.kind != None) & (reasons == None)  # noqa: E711 (elementwise on object arrays)
    reasons[fresh], details[fresh] = Reason.CONTAMINATED.value, verdicts.detail[fresh]
    decontamination = counts_per_source(table["source"], verdicts, reasons == Reason.CONTAMINATED.value)
    bad = reasons != None  # noqa: E711
    accepted = table.filter(pa.array(~bad))
    return CleanResult(accepted, quarantine_from(table, bad, reasons, details, kind), decontamination)


@dataclass
class Screened:
    """The row-local part of cleaning: every rule but the exact duplicate (which needs every earlier row) and
    the decontamination verdict (applied after it: a duplicate of a contaminated row is a duplicate)."""

    table: pa.Table  # unicode-normalised (ids and prompt hashes recomputed where text changed)
    reasons: np.ndarray  # object: Reason value of the first failing row-local rule, or None
    details: np.ndarray
    verdicts: Verdicts  # decontamination, for every row


def screen_rows(
    table: pa.Table,
    cfg: DataConfig,
    eval_prompts: Iterable[str] | Decontaminator = (),
    tokenizer=None,
    kind: str = "preference",
) -> Screened:
    """The rules of the policy that look at one row alone (empty turn, identical sides, lengths), and the
    decontamination verdicts: what ingest runs on each batch as it streams (tasks/data/stream.py)."""
    spec = get_table(kind)
    table = normalise_unicode(table, cfg.unicode_form, spec)
    n = table.num_rows
    reasons = np.full(n, None, dtype=object)
    details = np.full(n, None, dtype=object)

    def mark(mask: np.ndarray, reason: Reason, detail_fn) -> None:
        fresh = np.flatnonzero(mask & (reasons == None))  # noqa: E711 (elementwise on an object array)
        for i in fresh:
            reasons[i] = reason.value
            details[i] = detail_fn(int(i))

    for side in spec.messages:
        empty, where = _first_blank_turn(table[side], n)
        mark(empty, Reason.EMPTY_TURN, lambda i, s=side, w=where: f"{s} has an empty or whitespace-only turn{w[i]}")

    if spec is PREFERENCE:
        _mark_identical_sides(table, mark)

    lim = cfg.lengths
    for side in spec.messages:
        lengths = _per_row_lengths(table[side], n)
        mark(
            lengths[0] < lim.min_chars,
            Reason.TOO_SHORT,
            lambda i, s=side, m=lengths[0]: f"{s} has a turn of {m[i]} chars < min_chars={lim.min_chars}",
        )
        mark(
            lengths[1] > lim.max_chars,
            Reason.TOO_LONG,
            lambda i, s=side, m=lengths[1]: f"{s} has a turn of {m[i]} chars > max_chars={lim.max_chars}",
        )
    if lim.max_tokens is not None:
        tokens = token_lengths(table, tokenizer, spec)
        what = "prompt + longer answer" if spec is PREFERENCE else "the conversation"
        mark(
            tokens > lim.max_tokens,
            Reason.TOO_LONG,
            lambda i: f"{what} is {tokens[i]} tokens > max_tokens={lim.max_tokens}",
        )

    if not isinstance(eval_prompts, Decontaminator):
        eval_prompts = Decontaminator.from_prompts(eval_prompts, cfg.decontaminate_ngram)
    return Screened(table, reasons, details, eval_prompts.match(spec.prompts(table)))


def _mark_identical_sides(table: pa.Table, mark) -> None:
    """Pairs whose two answers are the same, exactly or up to whitespace (no preference to learn)."""
    chosen_txt, rejected_txt = render_messages(table["chosen"]), render_messages(table["rejected"])
    exact = pc.equal(chosen_txt, rejected_txt).to_numpy(zero_copy_only=False)
    mark(exact, Reason.IDENTICAL_SIDES, lambda i: "chosen and rejected are identical")
    loose = _equal_up_to_whitespace(chosen_txt, rejected_txt)
    mark(loose, Reason.IDENTICAL_SIDES, lambda i: "chosen and rejected differ only in whitespace")


def normalise_unicode(table: pa.Table, form: str, spec: Table = PREFERENCE) -> pa.Table:
    """Put every message's text in the normal form; recompute ids/prompt hashes only where text changed."""
    if form == "none" or table.num_rows == 0:
        return table
    columns = {}
    changed = np.zeros(table.num_rows, dtype=bool)
    for side in spec.messages:
        arr = table[side].combine_chunks()
        flat = arr.flatten()
        content = flat.field("content")
        normal, diff = _normalise_strings(content, form)
        if diff.any():
            parents = pc.list_parent_indices(arr).to_numpy()
            changed[np.unique(parents[diff])] = True
            structs = pa.StructArray.from_arrays([flat.field("role"), normal], names=["role", "content"])
            arr = pa.ListArray.from_arrays(arr.offsets, structs)
        columns[side] = arr
    if not changed.any():
        return table
    for side in spec.messages:
        table = table.set_column(table.schema.get_field_index(side), side, columns[side])
    return _rehash(table, changed, spec)


def _normalise_strings(content: pa.Array, form: str) -> tuple[pa.Array, np.ndarray]:
    """Normal form of each string, and where it changed. ASCII text is already in every normal form, so
    only non-ASCII strings go through Python. (pyarrow 25's `utf8_normalize` returned its input unchanged
    on this stack, e.g. "e\u0301" stayed decomposed under NFC; re-check before switching to it.)"""
    candidates = np.flatnonzero(~pc.string_is_ascii(content).to_numpy(zero_copy_only=False))
    diff = np.zeros(len(content), dtype=bool)
    if len(candidates) == 0 or _all_normalized(content.take(pa.array(candidates)), form):
        return content, diff
    fixed = []
    for i, text in zip(candidates, content.take(pa.array(candidates)).to_pylist()):
        if text is not None and not unicodedata.is_normalized(form, text):
            diff[i] = True
            fixed.append(unicodedata.normalize(form, text))
    if not fixed:
        return content, diff
    return pc.replace_with_mask(content, pa.array(diff), pa.array(fixed, type=pa.string())), diff


def _all_normalized(texts: pa.Array, form: str) -> bool:
    """Whether every string is in the normal form, in one call on the strings joined by "\\n" (the usual
    answer is yes; one call instead of one per string). Exact: a line feed is a normalization boundary
    in every form (a starter that neither decomposes nor composes), so the joined text is normalized
    iff each part is."""
    texts = texts.drop_null()
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(texts)], pa.int32()), texts), "\n")
    return unicodedata.is_normalized(form, joined[0].as_py())


def _rehash(table: pa.Table, rows: np.ndarray, spec: Table) -> pa.Table:
    ids, hashes = table["id"].to_pylist(), table["prompt_hash"].to_pylist()
    idx = np.flatnonzero(rows)
    sub = table.take(pa.array(idx)).select([*spec.messages, *spec.scalars]).to_pylist()
    for i, r in zip(idx, sub):
        ids[i] = spec.row_id(r)
        hashes[i] = prompt_hash(spec.row_prompt(r))
    table = table.set_column(table.schema.get_field_index("id"), spec.schema.field("id"), pa.array(ids))
    return table.set_column(
        table.schema.get_field_index("prompt_hash"), spec.schema.field("prompt_hash"), pa.array(hashes)
    )


def _messages(col: pa.ChunkedArray) -> tuple[pa.ListArray, np.ndarray]:
    arr = col.combine_chunks()
    return arr, pc.list_parent_indices(arr).to_numpy()


def _first_blank_turn(col: pa.ChunkedArray, n: int) -> tuple[np.ndarray, dict[int, str]]:
    """Rows with an empty or whitespace-only turn, and for each " (turn k of m, role)" of its first such turn."""
    arr, parents = _messages(col)
    flat = arr.flatten()
    hits = np.flatnonzero(_blank(flat.field("content")).to_numpy(zero_copy_only=False))
    out, where = np.zeros(n, dtype=bool), {}
    if len(hits):
        offsets = pc.subtract(arr.offsets, arr.offsets[0]).to_numpy()
        roles = flat.field("role").take(pa.array(hits, pa.int64())).to_pylist()
        for j, role in zip(hits.tolist(), roles):
            row = int(parents[j])
            if not out[row]:
                out[row] = True
                where[row] = f" (turn {j - offsets[row] + 1} of {offsets[row + 1] - offsets[row]}, {role})"
    return out, where


def _per_row_lengths(col: pa.ChunkedArray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(shortest, longest) turn length in characters per row; rows with no turns get (0, 0)."""
    arr = col.combine_chunks()
    lengths = pc.utf8_length(arr.flatten().field("content")).to_numpy(zero_copy_only=False)
    turns = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    starts, nonempty = np.cumsum(turns) - turns, turns > 0
    shortest, longest = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    if len(lengths):  # reduceat over each row's turns (np.minimum.at, unbuffered, was ~10x slower)
        shortest[nonempty] = np.minimum.reduceat(lengths, starts[nonempty])
        longest[nonempty] = np.maximum.reduceat(lengths, starts[nonempty])
    return shortest, longest


def _equal_up_to_whitespace(a: pa.Array, b: pa.Array) -> np.ndarray:
    """_squash_ws(a) == _squash_ws(b) per row. Squashing keeps every other character, so rows whose
    counts of "e" differ cannot be equal: only the others (a few percent) are squashed and compared."""
    out = np.zeros(len(a), dtype=bool)
    same_e = pc.equal(pc.count_substring(a, "e"), pc.count_substring(b, "e"))
    idx = pa.array(np.flatnonzero(same_e.fill_null(True).to_numpy(zero_copy_only=False)), pa.int64())
    if len(idx):
        equal = pc.equal(_squash_ws(a.take(idx)), _squash_ws(b.take(idx))).fill_null(False)
        out[idx.to_numpy()] = equal.to_numpy(zero_copy_only=False)
    return out


def _squash_ws(text: pa.Array) -> pa.Array:
    """Whitespace runs → one space, ends trimmed (a regex that leaves single spaces alone: ~3x faster
    than utf8_split_whitespace + join, same result)."""
    return collapse_whitespace(text)


def _blank(content: pa.Array) -> pa.Array:
    """Empty or whitespace only. utf8_is_space stops at the first other character; trimming every turn
    to measure it copied all the text."""
    return pc.or_(pc.equal(pc.binary_length(content), 0), pc.utf8_is_space(content))


def _mark_duplicates(table: pa.Table, reasons: np.ndarray, details: np.ndarray) -> None:
    first: dict[str, int] = {}
    sources, rows = table["source"].to_pylist(), table["source_row"].to_pylist()
    for i, row_id in enumerate(table["id"].to_pylist()):
        if reasons[i] is not None:
            continue
        j = first.setdefault(row_id, i)
        if j != i:
            reasons[i] = Reason.DUPLICATE.value
            details[i] = f"same content as {sources[j]} row {rows[j]} (id {row_id})"


def token_lengths(table: pa.Table, tokenizer, spec: Table = PREFERENCE) -> np.ndarray:
    """Tokens of prompt + the longer answer (preference), or of every turn (sft, unpaired): message texts
    concatenated; template tokens not counted."""
    if tokenizer is None:
        raise ValueError("data.lengths.max_tokens is set but no tokenizer was loaded")
    out = []
    for side_texts in zip(*(_side_texts(table[s]) for s in spec.messages)):
        lengths = [len(x) for x in tokenizer(list(side_texts), add_special_tokens=False)["input_ids"]]
        out.append(lengths[0] + max(lengths[1:]) if spec is PREFERENCE else sum(lengths))
    return np.array(out, dtype=np.int64)


def _side_texts(col: pa.ChunkedArray) -> list[str]:
    arr = col.combine_chunks()
    return pc.binary_join(pa.ListArray.from_arrays(arr.offsets, arr.flatten().field("content")), "\n").to_pylist()


def quarantine_from(
    table: pa.Table, bad: np.ndarray, reasons: np.ndarray, details: np.ndarray, kind: str = "preference"
) -> pa.Table:
    idx = np.flatnonzero(bad)
    rows = table.take(pa.array(idx, type=pa.int64())).to_pylist()
    return pa.Table.from_pydict(
        {
            "source": [r["source"] for r in rows],
            "source_row": [r["source_row"] for r in rows],
            "table": [kind] * len(rows),
            "reason": [reasons[i] for i in idx],
            "detail": [details[i] for i in idx],
            "raw": [json.dumps(r, ensure_ascii=False) for r in rows],
        },
        schema=QUARANTINE_SCHEMA,
    )
