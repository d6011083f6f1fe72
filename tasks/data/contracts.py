"""Data contracts: an expectation suite kept as data (``data_contracts/*.yaml``), run through Great Expectations.

The suite's expectations run on four *views* (``rows``, ``splits``, ``sources``, ``quarantine``): small tables
derived from the canonical Arrow tables by ``tasks/data/contract_views.py``, so that every rule is one stock GX
expectation on one flat column.

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
from schemas.preference import ROLES, Reason
from tasks.data.contract_views import ROW_REF, VIEWS
from tasks.data.contract_views import build_views as build_views  # re-exported: callers build views here
from tasks.data.split import SPLITS

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
    table: str = "preference",
    context=None,
    rows: pa.Table | None = None,
) -> ContractResult:
    """Run the suite at `suite_path` on the splits of canonical `table`; Data Docs go to `docs_dir` (index.html)
    when given, or, with a shared `context` (:func:`contract_context`: one site for every table's suite), are
    left to :func:`build_docs`. `counts` is {"per_source": {name: {"read", "accepted", "quarantined"}}};
    `params` fill the suite's placeholders (test_fraction, split_tolerance, min_chars, allowed_sources, ...).
    ``rows``: the rows view, built as the dataset streamed (then ``splits`` is None; see ``build_views``)."""
    suite = load_suite(suite_path)
    views = build_views(splits, quarantine, counts, table, rows)
    total_rows = views["rows"].num_rows
    kwargs = _resolved_kwargs(suite, views, {**BUILTIN_PARAMS, **suite.params, **params}, suite_path)
    own, context = context is None, contract_context(docs_dir) if context is None else context
    gx_results = _validate(context, suite, views, kwargs, total_rows, suite_path)
    docs_index = build_docs(context, docs_dir, quarantine, counts) if own and docs_dir is not None else None
    entries = [_entry(spec, gx_results[spec.id], spec.severity_for(total_rows)) for spec in suite.expectations]
    for spec, entry in zip(suite.expectations, entries):
        if spec.report and not entry["success"]:
            entry["unexpected_rows"] = _reported(views[spec.view], entry["unexpected_ids"], spec.report)
    critical = [e for e in entries if not e["success"] and e["severity"] == "critical"]
    warnings = [e for e in entries if not e["success"] and e["severity"] == "warning"]
    summary = {
        "suite": suite.name,
        "table": table,
        "suite_version": suite.version,
        "success": not critical,
        "totals": {
            "expectations": len(entries),
            "passed": sum(e["success"] for e in entries),
            "critical_failures": len(critical),
            "warnings": len(warnings),
            "rows": {
                **{name: views["splits"][f"{name}_rows"][0].as_py() for name in SPLITS},
                "quarantine": len(quarantine),
            },
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


def contract_context(docs_dir: Path | None):
    """An ephemeral GX context whose Data Docs site (when ``docs_dir`` is given) is built by :func:`build_docs`."""
    import great_expectations as gx

    return gx.get_context(mode="ephemeral", project_config=_context_config(docs_dir))


def build_docs(context, docs_dir: Path, quarantine: pa.Table, counts: dict) -> Path:
    """Data Docs of every suite run on ``context``, made to open offline, with the quarantine page; index.html."""
    from tasks.data.docs import finish_docs

    context.build_data_docs(site_names=[DOCS_SITE])
    index = Path(docs_dir).resolve() / "index.html"
    finish_docs(index.parent, quarantine, counts)  # local copies of the CDN assets, links rewritten, quarantine
    return index


def _validate(context, suite: Suite, views: dict, kwargs: dict, total_rows: int, suite_path) -> dict:
    """One GX suite + validation definition per view on ``context`` (Data Docs are built from its in-memory
    results store afterwards). A Checkpoint would pass one dataframe to all its validation definitions, and each
    view is a different frame: so each definition runs on its own."""
    import great_expectations as gx

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
        frame = _frame(views[view])
        run = definition.run(batch_parameters={"dataframe": frame}, result_format=RESULT_FORMAT)
        del frame
        for r in run.results:
            results[r.expectation_config.meta["contract_id"]] = r
    return results


def _frame(view: pa.Table):
    """A view as the pandas frame GX validates: strings as Arrow-backed pandas strings (one buffer per column,
    not a Python object per value: the rows view of 1.6M rows took ~0.5 GB more as objects)."""
    import pandas as pd

    string = pd.StringDtype("pyarrow")
    return view.to_pandas(types_mapper={pa.string(): string, pa.large_string(): string}.get)


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
