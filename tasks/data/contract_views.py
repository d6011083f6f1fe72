"""The four *views* a contract suite's expectations run on, derived from the canonical Arrow tables
(vectorised; no Python loop over rows), so that every rule is one stock GX expectation on one flat column:

- ``rows``: train + validation + test, one row per canonical row, with flat columns derived from the message
  lists (per table: ``_rows_view`` for preference pairs, ``_sft_rows_view``, ``_unpaired_rows_view``);
- ``splits``: one row of split sizes and the validation and test shares (of the rows the hash split drew: a
  source keeping its own split, ``counts["pinned_sources"]``, is not counted in the shares);
- ``sources``: one row per source, the reconciliation counts next to the rows actually present, and for pairs the
  side asymmetries (edge whitespace per side, length ratio), for unpaired rows the share labelled desirable;
- ``quarantine``: the quarantine table as written.

Each view has a ``row_ref`` column that names a row in breach messages. Run by ``tasks/data/contracts.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.preference import ROLES, render_messages
from schemas.sft import without_last_turn
from schemas.tables import get_table
from tasks.data.split import SPLITS, split_keys

VIEWS = ("rows", "splits", "sources", "quarantine")
SIDES = ("chosen", "rejected")
ROW_REF = "row_ref"  # the view column that names a row in breach messages
EDGES = ("leading_ws", "trailing_ws", "chars")  # per-answer columns of `rows`, summed per source


def build_views(
    splits: dict[str, pa.Table] | None,
    quarantine: pa.Table,
    counts: dict,
    table: str = "preference",
    rows: pa.Table | None = None,
) -> dict[str, pa.Table]:
    """The four tables the suite's expectations run on (vectorised; no Python loop over rows).
    ``splits``: train / validation / test tables of canonical table ``table`` (a missing one counts as empty);
    or, for a dataset too large to hold (the streaming ingest), ``rows``: the rows view already built batch by
    batch (:func:`row_columns`, :func:`finish_rows`), with ``splits`` None."""
    if rows is None:
        tables = {name: (splits or {}).get(name, get_table(table).schema.empty_table()) for name in SPLITS}
        both = pa.concat_tables(list(tables.values()), promote_options="permissive")
        split = np.repeat(np.array(SPLITS), [len(t) for t in tables.values()])
        rows = finish_rows(row_columns(table, both, split))
    total = rows.num_rows
    split_column = rows["split"].to_numpy(zero_copy_only=False)
    sizes = {f"{name}_rows": [int((split_column == name).sum())] for name in SPLITS}
    drawn = ~np.isin(np.asarray(rows["source"].to_pylist(), dtype=object), list(counts.get("pinned_sources", [])))
    split, n = rows["split"].to_numpy(zero_copy_only=False), int(drawn.sum())
    shares = {
        f"{name}_share": [int((drawn & (split == name)).sum()) / n if n else float("nan")] for name in SPLITS[1:]
    }
    splits = pa.table({"total_rows": [total], **sizes, **shares, ROW_REF: ["splits"]})
    extra = _side_edges if table == "preference" else _label_shares if table == "unpaired" else None
    return {
        "rows": rows,
        "splits": splits,
        "sources": _sources_view(rows, quarantine, counts, extra),
        "quarantine": _quarantine_view(quarantine),
    }


KEY = "_split_key"  # the rows view's split key column while it is built (finish_rows drops it)
GLOBAL = ("prompt_hash_other_split", "split_key_other_split")  # the only columns that need every row


def row_columns(table: str, both: pa.Table, split: np.ndarray, keys: pa.Array | None = None) -> pa.Table:
    """The rows view of canonical rows ``both`` of ``table`` whose splits are ``split``, but for the columns that
    need every row (``GLOBAL``, False here: :func:`finish_rows` fills them) and with the split keys in ``KEY``
    (``keys`` when the caller has them). Row by row: the streaming ingest builds it one batch at a time."""
    build = {"preference": _rows_view, "sft": _sft_rows_view, "unpaired": _unpaired_rows_view}[table]
    split = np.asarray(split, dtype=object).astype(str) if len(split) else np.array([], dtype=str)
    return build(both, split, keys)


def finish_rows(rows: pa.Table) -> pa.Table:
    """Rows views of batches (:func:`row_columns`) as one view: train, validation, test (row order kept within
    each), with the columns that need every row."""
    split = rows["split"].to_numpy(zero_copy_only=False)
    rank = np.zeros(len(split), dtype=np.int8)
    for k, name in enumerate(SPLITS):
        rank[split == name] = k
    if np.any(np.diff(rank) < 0):  # the streaming ingest builds it in split order already: no copy
        rows = rows.take(pa.array(np.argsort(rank, kind="stable"), pa.int64()))
    split = rows["split"].to_numpy(zero_copy_only=False)
    for name, values in zip(GLOBAL, (rows["prompt_hash"].combine_chunks(), rows[KEY].combine_chunks())):
        rows = rows.set_column(rows.schema.get_field_index(name), name, pa.array(_in_other_split(values, split)))
    return rows.drop_columns([KEY])


def _common_columns(both: pa.Table, split: np.ndarray, key_column: str, keys: pa.Array | None = None) -> dict:
    """The columns every table's rows view has: identity, provenance and split hygiene."""
    if keys is None:
        keys = pa.array(split_keys(both[key_column]), pa.string())
    placeholder = np.zeros(both.num_rows, dtype=bool)
    return {
        ROW_REF: pc.coalesce(both["id"], _source_refs(both)),
        "split": split,
        **{c: both[c] for c in ("id", "source", "source_row", "prompt_hash")},
        GLOBAL[0]: placeholder,
        GLOBAL[1]: placeholder,
        KEY: keys,
    }


def _char_range(*stats: dict) -> dict:
    turn_min = np.minimum.reduce([s["min_chars"] for s in stats])
    turn_max = np.maximum.reduce([s["max_chars"] for s in stats])
    return {"min_turn_chars": np.where(turn_min == np.iinfo(np.int64).max, 0, turn_min), "max_turn_chars": turn_max}


def _sft_rows_view(both: pa.Table, split: np.ndarray, keys=None) -> pa.Table:
    """sft rows: messages_turns (null iff messages is null), roles_valid (>=1 turn, every role in ROLES),
    last_role (of the whole conversation: the answer's, "<none>" when empty), prompt_last_role (of the turns
    before the answer), min_turn_chars / max_turn_chars, and the split hygiene columns."""
    n = both.num_rows
    conversation = _turn_stats(both["messages"], n)
    prompt = _turn_stats(pa.chunked_array([without_last_turn(both["messages"].combine_chunks())]), n)
    return pa.table(
        {
            **_common_columns(both, split, "messages", keys),
            "messages_turns": conversation["turns"],
            "roles_valid": conversation["roles_in"](ROLES),
            "last_role": conversation["last_role"],
            "prompt_last_role": prompt["last_role"],
            **_char_range(conversation),
        }
    )


def _unpaired_rows_view(both: pa.Table, split: np.ndarray, keys=None) -> pa.Table:
    """unpaired rows: label, {prompt,completion}_turns, prompt_roles_valid, prompt_last_role,
    completion_roles_valid (>=1 turn, all assistant), min_turn_chars / max_turn_chars, split hygiene."""
    n = both.num_rows
    prompt, completion = _turn_stats(both["prompt"], n), _turn_stats(both["completion"], n)
    return pa.table(
        {
            **_common_columns(both, split, "prompt", keys),
            "label": both["label"],
            "prompt_turns": prompt["turns"],
            "completion_turns": completion["turns"],
            "prompt_roles_valid": prompt["roles_in"](ROLES),
            "prompt_last_role": prompt["last_role"],
            "completion_roles_valid": completion["roles_in"](("assistant",)),
            **_char_range(prompt, completion),
        }
    )


def _rows_view(both: pa.Table, split: np.ndarray, keys=None) -> pa.Table:
    """train + validation + test with the flat columns the row expectations read.

    row_ref: id, or "source:source_row" where id is null. split: train/validation/test.
    {prompt,chosen,rejected}_turns: message count, null iff the list is null.
    prompt_roles_valid: ≥1 turn, every role in ROLES. {chosen,rejected}_roles_valid: ≥1 turn, all assistant.
    prompt_last_role: role of the last prompt turn, "<none>" for an empty prompt.
    min_turn_chars / max_turn_chars: shortest / longest content over all turns (null content counts 0).
    answers_identical: chosen and rejected render to the same role+content text.
    prompt_hash_other_split / split_key_other_split: the row's prompt hash / split key (its normalised opening
    user turn, tasks/data/split.py) occurs in another split too.
    {chosen,rejected}_leading_ws / _trailing_ws: the answer's first turn starts / last turn ends with
    whitespace. {chosen,rejected}_chars: characters over the answer's turns. (Summed per source in `sources`.)
    """
    n = both.num_rows
    prompt, chosen, rejected = (_turn_stats(both[c], n) for c in ("prompt", "chosen", "rejected"))
    turn_min = np.minimum.reduce([s["min_chars"] for s in (prompt, chosen, rejected)])
    turn_max = np.maximum.reduce([s["max_chars"] for s in (prompt, chosen, rejected)])
    common = _common_columns(both, split, "prompt", keys)
    return pa.table(
        {
            **{c: common[c] for c in (ROW_REF, "split", "id", "source", "source_row", "prompt_hash")},
            **{c: both[c] for c in ("score_chosen", "score_rejected")},
            "prompt_turns": prompt["turns"],
            "chosen_turns": chosen["turns"],
            "rejected_turns": rejected["turns"],
            "prompt_roles_valid": prompt["roles_in"](ROLES),
            "chosen_roles_valid": chosen["roles_in"](("assistant",)),
            "rejected_roles_valid": rejected["roles_in"](("assistant",)),
            "prompt_last_role": prompt["last_role"],
            "min_turn_chars": np.where(turn_min == np.iinfo(np.int64).max, 0, turn_min),
            "max_turn_chars": turn_max,
            "answers_identical": _identical(both["chosen"], both["rejected"], chosen, rejected),
            **{c: common[c] for c in (*GLOBAL, KEY)},
            **{f"{side}_{k}": stats[k] for side, stats in (("chosen", chosen), ("rejected", rejected)) for k in EDGES},
        }
    )


def _turn_stats(column: pa.ChunkedArray, n: int) -> dict[str, Any]:
    """Per-row statistics of one list<struct<role, content>> column, from its flattened turns."""
    turns = pc.list_value_length(column)  # chunk by chunk throughout: combine_chunks would copy every turn
    lengths = turns.fill_null(0).to_numpy().astype(np.int64)
    ends = np.cumsum(lengths)
    starts, nonempty = ends - lengths, lengths > 0
    flat = pc.list_flatten(column)  # turns of null lists are skipped, as their length counts 0 above
    roles = pc.struct_field(flat, "role")
    chars = pc.utf8_length(pc.struct_field(flat, "content")).fill_null(0).to_numpy().astype(np.int64)
    stats = {
        "turns": turns,
        "lengths": lengths,
        "min_chars": np.full(n, np.iinfo(np.int64).max),
        "max_chars": np.zeros(n, dtype=np.int64),
        "total_chars": np.zeros(n, dtype=np.int64),
    }
    if len(chars):  # an empty list keeps min=int64 max, so it never lowers a row's minimum
        for key, ufunc in (("min_chars", np.minimum), ("max_chars", np.maximum), ("total_chars", np.add)):
            stats[key][nonempty] = ufunc.reduceat(chars, starts[nonempty])
    last = pa.array(np.where(nonempty, ends - 1, 0), mask=~nonempty)
    stats["last_role"] = pc.fill_null(pc.take(roles, last), "<none>")
    contents = pc.struct_field(flat, "content")
    first = pa.array(np.where(nonempty, starts, 0), mask=~nonempty)
    # Whitespace at the answer's edges, one flag per row: a side that always has it (orca's rejected
    # answers start with a space) is a feature a reward model learns instead of the preference.
    stats["leading_ws"] = _fill_false(pc.utf8_is_space(pc.utf8_slice_codeunits(pc.take(contents, first), 0, 1)))
    stats["trailing_ws"] = _fill_false(pc.utf8_is_space(pc.utf8_slice_codeunits(pc.take(contents, last), -1)))
    stats["chars"] = stats["total_chars"]
    parents = np.repeat(np.arange(n), lengths)

    def roles_in(allowed: tuple[str, ...]) -> np.ndarray:
        ok = pc.is_in(roles, value_set=pa.array(allowed)).fill_null(False).to_numpy()
        return nonempty & (np.bincount(parents[~ok], minlength=n) == 0)

    stats["roles_in"] = roles_in
    return stats


def _in_other_split(values: pa.Array, split: np.ndarray) -> np.ndarray:
    """Per row: its value (null never matches) also occurs in a split other than the row's own. One hash
    aggregate (distinct splits per value) and one lookup, whatever the number of splits."""
    if len(values) == 0:
        return np.zeros(0, dtype=bool)
    codes = np.zeros(len(split), dtype=np.int8)
    for k, name in enumerate(SPLITS):
        codes[split == name] = k
    grouped = pa.table({"v": values, "s": codes}).group_by("v").aggregate([("s", "count_distinct")])
    shared = grouped.filter(pc.greater(grouped["s_count_distinct"], 1))["v"].drop_null()
    return pc.is_in(values, value_set=shared, skip_nulls=True).fill_null(False).to_numpy(zero_copy_only=False)


def _fill_false(flags: pa.Array) -> np.ndarray:
    return flags.fill_null(False).to_numpy(zero_copy_only=False)


def _identical(chosen: pa.ChunkedArray, rejected: pa.ChunkedArray, c: dict, r: dict) -> np.ndarray:
    """chosen == rejected per row. Only rows with equal turn counts and total characters can be equal,
    so only those (usually a handful) are rendered and compared: rendering all 160k rows costs 0.3 s."""
    identical = np.zeros(len(c["lengths"]), dtype=bool)
    idx = np.flatnonzero((c["lengths"] == r["lengths"]) & (c["total_chars"] == r["total_chars"]))
    if len(idx):
        same = pc.equal(render_messages(pc.take(chosen, idx)), render_messages(pc.take(rejected, idx)))
        identical[idx] = same.fill_null(False).to_numpy(zero_copy_only=False)
    return identical


def _sources_view(rows: pa.Table, quarantine: pa.Table, counts: dict, extra=None) -> pa.Table:
    """One row per source named in counts or present in the tables; missing counts read as 0. ``extra(rows,
    names, rows per source)`` adds per-source columns (the pairs' side asymmetries, the unpaired label share)."""
    per_source = counts.get("per_source", {})
    in_rows = _value_counts(rows["source"])
    in_quarantine = _value_counts(quarantine["source"])
    names = sorted(set(per_source) | set(in_rows) | set(in_quarantine))
    got = {k: [int(per_source.get(s, {}).get(k, 0)) for s in names] for k in ("read", "accepted", "quarantined")}
    accounted = [a + q for a, q in zip(got["accepted"], got["quarantined"])]
    counts_columns = ("read", "accepted", "quarantined", "accounted", "rows_in_splits", "rows_in_quarantine")
    edges = extra(rows, names, [in_rows.get(s, 0) for s in names]) if extra else {}
    return pa.table(
        {
            ROW_REF: names,
            "source": names,
            **got,
            "accounted": accounted,
            "rows_in_splits": [in_rows.get(s, 0) for s in names],
            "rows_in_quarantine": [in_quarantine.get(s, 0) for s in names],
            "quarantine_share": [q / r if r else 0.0 for q, r in zip(got["quarantined"], got["read"])],
            **edges,
        },
        schema=pa.schema(
            [(ROW_REF, pa.string()), ("source", pa.string())]
            + [(c, pa.int64()) for c in counts_columns]
            + [("quarantine_share", pa.float64())]
            + [(c, pa.int64() if c.endswith("_ws") else pa.float64()) for c in edges]
        ),
    )


def _label_shares(rows: pa.Table, names: list[str], present: list[int]) -> dict[str, list]:
    """Per source: the share of its unpaired rows labelled desirable (null without rows)."""
    desirable = _value_counts(rows.filter(pc.fill_null(rows["label"], False))["source"])
    return {"desirable_share": [desirable.get(s, 0) / k if k else None for s, k in zip(names, present)]}


def _side_edges(rows: pa.Table, names: list[str], pairs: list[int]) -> dict[str, list]:
    """Per source: answers with leading / trailing whitespace on each side (counts), the gap between the
    sides' shares, and the length ratio (mean chosen chars / mean rejected chars). Null without rows."""
    summed = rows.group_by("source").aggregate([(f"{side}_{k}", "sum") for side in SIDES for k in EDGES])
    found = {r["source"]: r for r in summed.to_pylist()}
    out: dict[str, list] = {f"{side}_{k}": [] for k in ("leading_ws", "trailing_ws") for side in SIDES}
    out |= {"leading_ws_gap": [], "trailing_ws_gap": [], "length_ratio": []}
    for name, n in zip(names, pairs):
        r = found.get(name)
        for k in ("leading_ws", "trailing_ws"):
            c, j = (int(r[f"{side}_{k}_sum"]) if r else 0 for side in SIDES)
            out[f"chosen_{k}"].append(c)
            out[f"rejected_{k}"].append(j)
            out[f"{k}_gap"].append(abs(c - j) / n if n else None)
        chars = [r[f"{side}_chars_sum"] for side in SIDES] if r else [0, 0]
        out["length_ratio"].append(chars[0] / chars[1] if n and chars[1] else None)
    return out


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    vc = pc.value_counts(column.fill_null("?"))
    return dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()))


def _quarantine_view(quarantine: pa.Table) -> pa.Table:
    """The quarantine table minus `raw` (large, unchecked), named "source:source_row"."""
    kept = quarantine.drop_columns([c for c in ("raw",) if c in quarantine.column_names])
    return kept.append_column(ROW_REF, _source_refs(quarantine))


def _source_refs(table: pa.Table) -> pa.ChunkedArray:
    """ "source:source_row" per row: how a row without an id is named (it can be found in its source file)."""
    source_row = pc.cast(table["source_row"], pa.string())
    return pc.binary_join_element_wise(pc.fill_null(table["source"], "?"), pc.fill_null(source_row, "?"), ":")
