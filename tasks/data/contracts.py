"""Data contracts: an expectation suite kept as data (``data_contracts/*.yaml``), run through Great Expectations.

The suite's expectations run on four *views*, small tables derived here from the canonical Arrow tables
(see :func:`build_views`), so that every rule is one stock GX expectation on one flat column:

- ``rows``: train + validation + test, one row per pair, with flat columns derived from the message lists;
- ``splits``: one row of split sizes and the validation and test shares;
- ``sources``: one row per source, the reconciliation counts next to the rows actually present;
- ``quarantine``: the quarantine table as written.

:func:`run_contract` returns a :class:`ContractResult` (JSON summary for manifest.json, Data Docs index);
:meth:`ContractResult.raise_for_critical` fails the caller with each breached expectation, its count and
example row ids. Great Expectations (≈3 s to import) is imported inside the functions that need it.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import ValidationError

from schemas.contract import ExpectationSpec, Suite, gx_expectation_class  # noqa: F401 (re-exported)
from schemas.preference import PREFERENCE_SCHEMA, ROLES, Reason, render_messages
from tasks.data.split import SPLITS, split_keys

VIEWS = ("rows", "splits", "sources", "quarantine")
SIDES = ("chosen", "rejected")
ROW_REF = "row_ref"  # the view column that names a row in breach messages
EDGES = ("leading_ws", "trailing_ws", "chars")  # per-answer columns of `rows`, summed per source
MAX_EXAMPLE_IDS = 10
DOCS_SITE = "align"
BUILTIN_PARAMS = {"reason_codes": [r.value for r in Reason], "roles": list(ROLES)}
_PLACEHOLDER = re.compile(r"^\$\{(.+)\}$")


class SuiteError(ValueError):
    """The suite file is malformed: the message names the file, the expectation and the key."""


class ContractBreach(RuntimeError):
    """A critical expectation failed: the message names each one, its count and example row ids."""


# ---------------------------------------------------------------------------------------------- the suite


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file; any error names the file, the expectation (by id) and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise SuiteError(f"{path}: cannot read suite: {e}") from e
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as e:
        raise SuiteError(f"{path}: " + "; ".join(_where(raw, err) for err in e.errors())) from None
    for spec in suite.expectations:  # placeholders must parse now, not halfway through a run
        try:
            _resolve(spec.kwargs, None)
        except ValueError as e:
            raise SuiteError(f"{path}: expectation {spec.id!r}: {e}") from None
    return suite


def _where(raw: Any, err: dict) -> str:
    """One pydantic error as `expectation 'x' (expectations[3]) key 'kwargz': message`."""
    loc = list(err["loc"])
    prefix = ""
    if len(loc) >= 2 and loc[0] == "expectations" and isinstance(loc[1], int):
        items = raw.get("expectations") if isinstance(raw, dict) else None
        item = items[loc[1]] if isinstance(items, list) and loc[1] < len(items) else None
        name = item.get("id") if isinstance(item, dict) else None
        prefix, loc = f"expectation {name!r} (expectations[{loc[1]}]) ", loc[2:]
    key = ".".join(str(p) for p in loc)
    return f"{prefix}key {key!r}: {err['msg']}" if key else f"{prefix}{err['msg']}"


# ------------------------------------------------------------------------------------------- placeholders

# Arithmetic on names and numbers only: no calls, attributes or subscripts, so eval() below is safe.
_EXPR_NODES = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.USub,
)


def _resolve(value: Any, params: dict | None) -> Any:
    """Fill "${expr}" strings (recursively); with params=None only check that each expression parses."""
    if isinstance(value, dict):
        return {k: _resolve(v, params) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, params) for v in value]
    match = _PLACEHOLDER.match(value) if isinstance(value, str) else None
    if match is None:
        return value
    try:
        tree = ast.parse(match.group(1), mode="eval")
    except SyntaxError:
        tree = None
    if tree is None or not all(isinstance(node, _EXPR_NODES) for node in ast.walk(tree)):
        raise ValueError(f"placeholder {value!r} is not an expression of names, numbers and + - * /")
    if params is None:
        return value
    missing = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - params.keys())
    if missing:
        raise ValueError(f"placeholder {value!r} needs param {missing[0]!r}; known: {sorted(params)}")
    return eval(compile(tree, "<suite placeholder>", "eval"), {"__builtins__": {}}, dict(params))


# ------------------------------------------------------------------------------------------------- views


def build_views(splits: dict[str, pa.Table], quarantine: pa.Table, counts: dict) -> dict[str, pa.Table]:
    """The four tables the suite's expectations run on (vectorised; no Python loop over rows).
    ``splits``: train / validation / test tables (a missing one counts as empty)."""
    tables = {name: splits.get(name, PREFERENCE_SCHEMA.empty_table()) for name in SPLITS}
    rows = _rows_view(tables)
    total = rows.num_rows
    sizes = {f"{name}_rows": [len(t)] for name, t in tables.items()}
    shares = {f"{name}_share": [len(tables[name]) / total if total else float("nan")] for name in SPLITS[1:]}
    splits = pa.table({"total_rows": [total], **sizes, **shares, ROW_REF: ["splits"]})
    return {
        "rows": rows,
        "splits": splits,
        "sources": _sources_view(rows, quarantine, counts),
        "quarantine": _quarantine_view(quarantine),
    }


def _rows_view(tables: dict[str, pa.Table]) -> pa.Table:
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
    both = pa.concat_tables(list(tables.values()), promote_options="permissive")
    n = both.num_rows
    split = np.repeat(np.array(SPLITS), [len(t) for t in tables.values()])
    prompt, chosen, rejected = (_turn_stats(both[c], n) for c in ("prompt", "chosen", "rejected"))
    turn_min = np.minimum.reduce([s["min_chars"] for s in (prompt, chosen, rejected)])
    turn_max = np.maximum.reduce([s["max_chars"] for s in (prompt, chosen, rejected)])
    keys = pa.array(split_keys(both["prompt"]), pa.string())
    return pa.table(
        {
            ROW_REF: pc.coalesce(both["id"], _source_refs(both)),
            "split": split,
            **{c: both[c] for c in ("id", "source", "source_row", "prompt_hash", "score_chosen", "score_rejected")},
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
            "prompt_hash_other_split": _in_other_split(both["prompt_hash"].combine_chunks(), split),
            "split_key_other_split": _in_other_split(keys, split),
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
    """Per row: its value (null never matches) also occurs in a split other than the row's own."""
    splits_holding = np.zeros(len(values), dtype=np.int64)
    for name in SPLITS:
        here = split == name
        if here.any():
            value_set = pc.unique(values.filter(pa.array(here))).drop_null()
            splits_holding += pc.is_in(values, value_set=value_set).fill_null(False).to_numpy(zero_copy_only=False)
    return splits_holding > 1


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


def _sources_view(rows: pa.Table, quarantine: pa.Table, counts: dict) -> pa.Table:
    """One row per source named in counts or present in the tables; missing counts read as 0."""
    per_source = counts.get("per_source", {})
    in_rows = _value_counts(rows["source"])
    in_quarantine = _value_counts(quarantine["source"])
    names = sorted(set(per_source) | set(in_rows) | set(in_quarantine))
    got = {k: [int(per_source.get(s, {}).get(k, 0)) for s in names] for k in ("read", "accepted", "quarantined")}
    accounted = [a + q for a, q in zip(got["accepted"], got["quarantined"])]
    counts_columns = ("read", "accepted", "quarantined", "accounted", "rows_in_splits", "rows_in_quarantine")
    edges = _side_edges(rows, names, [in_rows.get(s, 0) for s in names])
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


# ---------------------------------------------------------------------------------------------------- run

# SUMMARY (not COMPLETE) plus the row_ref column: GX then returns the first ids of unexpected rows
# (partial_unexpected_index_list) without listing every unexpected value of a 160k-row view.
RESULT_FORMAT = {
    "result_format": "SUMMARY",
    "unexpected_index_column_names": [ROW_REF],
    "partial_unexpected_count": MAX_EXAMPLE_IDS,
}


@dataclass
class ContractResult:
    success: bool  # False iff a critical expectation failed
    summary: dict  # JSON-able, for manifest.json
    critical_failures: list[dict]
    warnings: list[dict]
    docs_index: Path | None = None

    def raise_for_critical(self) -> None:
        if self.success:
            return
        lines = [describe_breach(f) for f in self.critical_failures]
        raise ContractBreach(
            f"data contract {self.summary['suite']!r}: {len(lines)} critical expectation(s) failed\n  "
            + "\n  ".join(lines)
        )


def _reported(view: pa.Table, ids: list, columns: list[str]) -> list[dict]:
    """The `report` columns of the view rows named in a breach, in the order GX named them."""
    picked = view.filter(pc.is_in(view[ROW_REF], value_set=pa.array([str(i) for i in ids], pa.string())))
    by_ref = {r[ROW_REF]: r for r in picked.select([ROW_REF, *columns]).to_pylist()}
    return [_jsonable(by_ref[str(i)]) for i in ids if str(i) in by_ref]


def describe_breach(failure: dict) -> str:
    reported = failure.get("unexpected_rows")
    if reported:
        ids = ", ".join(
            f"{r[ROW_REF]} ({', '.join(f'{k}={v}' for k, v in r.items() if k != ROW_REF)})" for r in reported
        )
        return f"{failure['name']} [{failure['table']}]: {failure['unexpected_count']} unexpected row(s): {ids}"
    ids = ", ".join(str(i) for i in failure["unexpected_ids"]) or "-"
    count = failure["unexpected_count"]
    what = f"{count} unexpected row(s)" if count is not None else f"observed {failure['observed']!r}"
    return f"{failure['name']} [{failure['table']}]: {what}; example rows: {ids}"


def run_contract(
    splits: dict[str, pa.Table],
    quarantine: pa.Table,
    counts: dict,
    suite_path: str | Path,
    docs_dir: Path | None,
    params: dict,
) -> ContractResult:
    """Run the suite at `suite_path` on the splits; Data Docs go to `docs_dir` (index.html) when given.

    `counts` is {"per_source": {name: {"read", "accepted", "quarantined"}}}; `params` fill the suite's
    placeholders (test_fraction, split_tolerance, min_chars, max_chars, allowed_sources, ...).
    """
    suite = load_suite(suite_path)
    views = build_views(splits, quarantine, counts)
    total_rows = views["rows"].num_rows
    kwargs = _resolved_kwargs(suite, views, {**BUILTIN_PARAMS, **suite.params, **params}, suite_path)
    gx_results, docs_index = _validate(suite, views, kwargs, total_rows, suite_path, docs_dir)
    if docs_index is not None:  # local copies of the CDN assets, links rewritten, the quarantine page
        from tasks.data.docs import finish_docs

        finish_docs(docs_index.parent, quarantine, counts)
    entries = [_entry(spec, gx_results[spec.id], spec.severity_for(total_rows)) for spec in suite.expectations]
    for spec, entry in zip(suite.expectations, entries):
        if spec.report and not entry["success"]:
            entry["unexpected_rows"] = _reported(views[spec.view], entry["unexpected_ids"], spec.report)
    critical = [e for e in entries if not e["success"] and e["severity"] == "critical"]
    warnings = [e for e in entries if not e["success"] and e["severity"] == "warning"]
    summary = {
        "suite": suite.name,
        "suite_version": suite.version,
        "success": not critical,
        "totals": {
            "expectations": len(entries),
            "passed": sum(e["success"] for e in entries),
            "critical_failures": len(critical),
            "warnings": len(warnings),
            "rows": {**{name: len(splits.get(name, ())) for name in SPLITS}, "quarantine": len(quarantine)},
        },
        "splits": _jsonable(views["splits"].drop_columns([ROW_REF]).to_pylist()[0]),
        "expectations": entries,
    }
    return ContractResult(not critical, summary, critical, warnings, docs_index)


def _resolved_kwargs(suite: Suite, views: dict[str, pa.Table], values: dict, suite_path) -> dict[str, dict]:
    """Each expectation's kwargs with placeholders filled; every column it names must exist in its view."""
    out = {}
    for spec in suite.expectations:
        try:
            kwargs = _resolve(spec.kwargs, values)
        except ValueError as e:
            raise SuiteError(f"{suite_path}: expectation {spec.id!r}: {e}") from None
        named = [kwargs.get(k) for k in ("column", "column_A", "column_B")] + list(kwargs.get("column_list") or [])
        named += spec.report
        columns = views[spec.view].column_names
        for column in filter(None, named):
            if column not in columns:
                raise SuiteError(
                    f"{suite_path}: expectation {spec.id!r}: view {spec.view!r} has no column "
                    f"{column!r}; its columns: {[c for c in columns if c != ROW_REF]}"
                )
        out[spec.id] = kwargs
    return out


def _validate(suite: Suite, views: dict, kwargs: dict, total_rows: int, suite_path, docs_dir: Path | None):
    """One GX suite + validation definition per view on an ephemeral context; Data Docs built once at the end.

    A Checkpoint would pass the same batch parameters (one dataframe) to all its validation definitions, and
    each view is a different frame: so each definition runs on its own and the docs are built from the
    context's (in-memory) validation results store afterwards.
    """
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral", project_config=_context_config(docs_dir))
    datasource = context.data_sources.add_or_update_pandas(name=suite.name)
    results: dict[str, Any] = {}
    for view in VIEWS:
        specs = [s for s in suite.expectations if s.view == view]
        if not specs:
            continue
        expectations = [_gx_expectation(s, kwargs[s.id], s.severity_for(total_rows), suite_path) for s in specs]
        gx_suite = context.suites.add_or_update(
            gx.ExpectationSuite(name=f"{suite.name}.{view}", expectations=expectations)
        )
        batch = datasource.add_dataframe_asset(name=view).add_batch_definition_whole_dataframe(name=view)
        definition = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=f"{suite.name}.{view}", data=batch, suite=gx_suite)
        )
        run = definition.run(batch_parameters={"dataframe": views[view].to_pandas()}, result_format=RESULT_FORMAT)
        for r in run.results:
            results[r.expectation_config.meta["contract_id"]] = r
    if docs_dir is None:
        return results, None
    context.build_data_docs(site_names=[DOCS_SITE])
    return results, Path(docs_dir).resolve() / "index.html"


def _gx_expectation(spec: ExpectationSpec, kwargs: dict, severity: str, suite_path):
    try:
        return gx_expectation_class(spec.type)(
            **kwargs, severity=severity, notes=spec.description, meta={"contract_id": spec.id}
        )
    except Exception as e:  # GX's pydantic message names the bad kwarg; we add which expectation and file
        raise SuiteError(f"{suite_path}: expectation {spec.id!r} ({spec.type}): {e}") from None


def _context_config(docs_dir: Path | None):
    """In-memory stores, our Data Docs site only, no progress bars. GX's own ephemeral default adds a
    temporary docs site (and logs its path at INFO) and draws a tqdm bar per view on stderr."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        sites[DOCS_SITE] = {
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(Path(docs_dir).resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    return DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites=sites,
        progress_bars=ProgressBarsConfig(globally=False),
    )


def _entry(spec: ExpectationSpec, r, severity: str) -> dict:
    """One expectation's outcome, JSON-able."""
    result = dict(r.result or {})
    ids = [row.get(ROW_REF) for row in result.get("partial_unexpected_index_list") or [] if isinstance(row, dict)]
    observed = result.get("observed_value", result.get("partial_unexpected_list") or None)
    if error := _gx_error(r.exception_info):
        observed = f"error: {error}"
    return {
        "name": spec.id,
        "table": spec.view,
        "type": spec.type,
        "severity": severity,
        "success": bool(r.success),
        "unexpected_count": result.get("unexpected_count"),
        "unexpected_ids": _jsonable(ids[:MAX_EXAMPLE_IDS]),
        "observed": _jsonable(observed),
        "description": spec.description,
    }


def _gx_error(info: dict | None) -> str | None:
    """The exception message(s) of a result: GX 1.x keys them by metric id, older results held one flat dict."""
    if not info:
        return None
    found = [info] if "exception_message" in info else [v for v in info.values() if isinstance(v, dict)]
    return "; ".join(str(f["exception_message"]) for f in found if f.get("raised_exception")) or None


def _jsonable(value: Any) -> Any:
    """numpy scalars → Python, NaN → None, long strings cut, lists cut to the example count."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in list(value)[:MAX_EXAMPLE_IDS]]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + "…"
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


# ------------------------------------------------------------------------------------------------ prefect

_ARTIFACT_KEY = re.compile(r"^[a-z0-9-]+$")


def publish_contract_artifact(result: ContractResult, key: str) -> None:
    """One Prefect table artifact: a row per expectation; the description says pass/fail and the breaches."""
    publish_summary_artifact(result.summary, key, result.docs_index)


def publish_summary_artifact(summary: dict, key: str, docs_index: Path | None = None) -> None:
    """The same artifact from a stored summary (manifest.json's `contract`), e.g. for a reused version."""
    if not _ARTIFACT_KEY.match(key):
        raise ValueError(
            f"artifact key {key!r}: use lowercase letters, numbers and dashes only, e.g. "
            f"{re.sub(r'[^a-z0-9-]+', '-', key.lower()).strip('-')!r}"
        )
    from prefect.artifacts import create_table_artifact

    entries = summary["expectations"]
    table = [
        {
            "expectation": e["name"],
            "view": e["table"],
            "severity": e["severity"],
            "success": e["success"],
            "unexpected": e["unexpected_count"],
            "example_rows": ", ".join(str(i) for i in e["unexpected_ids"]),
            "observed": "" if e["observed"] is None else str(e["observed"])[:200],
        }
        for e in entries
    ]
    totals = summary["totals"]
    lines = [
        f"**Data contract `{summary['suite']}` v{summary['suite_version']}: "
        f"{'passed' if summary['success'] else 'FAILED'}**",
        f"{totals['passed']}/{totals['expectations']} expectations met; rows: {totals['rows']}",
    ]
    lines += [f"- {e['severity']}: {describe_breach(e)}" for e in entries if not e["success"]]
    if docs_index is not None:
        lines.append(f"Data Docs: `{docs_index}`")
    create_table_artifact(table=table, key=key, description="\n\n".join(lines))
