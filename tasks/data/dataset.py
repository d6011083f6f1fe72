"""Split (tasks/data/split.py) and write an immutable, versioned dataset directory.

    <output_dir>/<version>/train.parquet, validation.parquet, test.parquet (preference pairs), sft/ and unpaired/
    (the same three splits of those tables, when the recipe has sources of them), quarantine.parquet (every
    table's rejected rows, each naming its table), manifest.json, data_docs/ (every table's suite)

version = hash(schema version, recipe `sources` + `data` sections, sha256 of every input). Writes go to
a temporary sibling directory that is renamed into place at the end, so a crash or a concurrent run
never leaves a torn version, and an existing version is reused, never rewritten. A version whose
critical contract breaks is not published: its report goes to `<output_dir>/failed/<version>/`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from schemas.hashing import content_hash
from schemas.preference import QUARANTINE_SCHEMA, SCHEMA_VERSION
from schemas.recipe import Recipe
from schemas.tables import TABLES, get_table
from tasks.data.clean import clean_rows
from tasks.data.decontaminate import evaluation_decontaminator, evaluation_prompt_files
from tasks.data.preload import import_in_background
from tasks.data.sources.formats import get_adapter
from tasks.data.sources.readers import file_sha256
from tasks.data.split import SPLITS, Splits, split_tables
from tasks.registry.secrets import redact
from tasks.runtime.faults import fault_point
from tasks.runtime.locks import exclusive
from tasks.runtime.retries import retry_on_transient_io


@dataclass
class DatasetVersion:
    path: Path
    manifest: dict
    reused: bool


def compute_dataset_version(recipe: Recipe, inputs: list[dict]) -> str:
    payload = {
        "schema_version": SCHEMA_VERSION,
        # Where files live is not part of the version (their sha256 is): same data, same version anywhere.
        "sources": [s.model_dump(mode="json", exclude={"path"}) for s in recipe.sources],
        "data": recipe.data.model_dump(
            mode="json", exclude={"output_dir", "decontaminate", *CONTRACT_FIELDS.values()}
        ),
        "decontaminate": [file_sha256(Path(p)) for p in evaluation_prompt_files(recipe)],  # incl. evaluate's
        "contract": file_sha256(Path(recipe.data.contract)),
        **{
            f"{t}_contract": file_sha256(Path(getattr(recipe.data, f)))
            for t, f in CONTRACT_FIELDS.items()
            if t in tables_of(recipe)[1:]
        },
        "inputs": [i["sha256"] for i in inputs],
    }
    return content_hash(payload)


def write_parquet(table: pa.Table, path: Path) -> None:
    # Fixed writer options, no timestamps: the same rows give byte-identical files.
    pq.write_table(table, path, compression="zstd", use_dictionary=True, write_statistics=True)


def counts_by(table: pa.Table, *keys: str) -> dict:
    if table.num_rows == 0:
        return {}
    grouped = table.group_by(list(keys)).aggregate([([], "count_all")]).to_pylist()
    out: dict = {}
    for g in sorted(grouped, key=lambda r: [str(r[k]) for k in keys]):
        node = out
        for k in keys[:-1]:
            node = node.setdefault(g[k], {})
        node[g[keys[-1]]] = g["count_all"]
    return out


def reconciliation(results, splits: list[pa.Table], quarantine: pa.Table) -> dict:
    """Per source: its table, rows read, accepted (in any split of any table) and quarantined (by any stage)."""
    acc = counts_by(pa.concat_tables([t.select(["source"]) for t in splits]), "source") if splits else {}
    qua = counts_by(quarantine.select(["source"]), "source")
    return {
        "per_source": {
            r.source: {
                "table": getattr(r, "table", "preference"),
                "read": r.rows_read,
                "accepted": acc.get(r.source, 0),
                "quarantined": qua.get(r.source, 0),
            }
            for r in results
        }
    }


# The DataConfig field naming each table's expectation suite.
CONTRACT_FIELDS = {"preference": "contract", "sft": "sft_contract", "unpaired": "unpaired_contract"}


def tables_of(recipe: Recipe) -> list[str]:
    """The canonical tables a recipe's dataset has: preference always (every stage after SFT reads its pairs), and
    sft / unpaired when a source of the recipe is in that format."""
    present = {get_adapter(s.format).table for s in recipe.sources}
    return [t for t in TABLES if t == "preference" or t in present]


def pinned_splits(recipe: Recipe) -> dict[str, str]:
    """Sources that keep their own held-out split (``sources[].split``): name → split."""
    return {s.name: s.split for s in recipe.sources if s.split}


def publish(tmp: Path, final: Path) -> bool:
    """Rename tmp into place; False (and tmp removed) when another run published the same version first."""
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if (final / "manifest.json").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise


def existing_version(output_dir: Path, version: str) -> DatasetVersion | None:
    manifest = output_dir / version / "manifest.json"
    if manifest.exists():
        return DatasetVersion(manifest.parent, json.loads(manifest.read_text()), reused=True)
    return None


def build_dataset(recipe: Recipe, output_dir: Path | None = None, tokenizer=None) -> DatasetVersion:
    """Sources → clean → split → contract → atomic write. Raises ContractBreach on a critical breach."""
    from tasks.data.sources import read_source

    started = time.perf_counter()
    output_dir = Path(output_dir or recipe.data.output_dir)
    # The contract step's Great Expectations import (2-3 s) runs while workers parse the last source:
    # not an earlier one, as reading the next source imports in this thread, which must wait for it.
    last = len(recipe.sources) - 1
    results = [
        read_source(cfg, seed=recipe.data.seed, while_parsing=_import_contract_modules if k == last else None)
        for k, cfg in enumerate(recipe.sources)
    ]
    version = compute_dataset_version(recipe, [r.input for r in results])
    if found := existing_version(output_dir, version):
        return found
    # One build of a version at a time: a concurrent run of the same data waits here, then reuses what it published.
    with exclusive(output_dir / f".{version}.lock", f"ingest: dataset version {version}"):
        if found := existing_version(output_dir, version):
            return found
        remove_partial_builds(output_dir, version)
        return _build_version(recipe, output_dir, version, results, tokenizer, started)


def remove_partial_builds(output_dir: Path, version: str) -> None:
    """Temporary folders of ``version`` left by a run that died before publishing it (called under the version's
    build lock, so no live run owns them): removed, and said."""
    for tmp in sorted(output_dir.glob(f".tmp-{version}-*")):
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"ingest: removed {tmp}, the unpublished build of an interrupted run", flush=True)


def accepted_rows(results, table: str) -> pa.Table:
    """The accepted rows of every source of ``table``, in recipe order."""
    found = [r.accepted for r in results if getattr(r, "table", "preference") == table]
    return pa.concat_tables(found) if found else get_table(table).schema.empty_table()


def clean_and_split(recipe: Recipe, results, tokenizer=None) -> tuple[dict[str, Splits], pa.Table, dict]:
    """Every table of the recipe cleaned (the same policy, one decontamination list) and split by the one shared
    rule (tasks/data/split.py); returns the splits per table, the quarantine of every table, the cleaning results."""
    decontaminator, d = evaluation_decontaminator(recipe), recipe.data
    cleaned = {t: clean_rows(accepted_rows(results, t), d, decontaminator, tokenizer, t) for t in tables_of(recipe)}
    keyed = {t: (c.accepted, get_table(t).split_column) for t, c in cleaned.items()}
    splits = split_tables(keyed, d.test_fraction, d.validation_fraction, d.seed, pinned_splits(recipe))
    quarantine = pa.concat_tables([r.quarantine for r in results] + [c.quarantine for c in cleaned.values()])
    quarantine = quarantine.cast(QUARANTINE_SCHEMA).sort_by([("source", "ascending"), ("source_row", "ascending")])
    return splits, quarantine, cleaned


def dataset_counts(results, splits: dict[str, Splits], quarantine: pa.Table, cleaned: dict) -> dict:
    """The manifest's counts: the pair splits at the top level (as ever), per source (with its table) the
    reconciliation, per table its splits and quarantine, quarantine reasons and decontamination per source."""
    every = [t for table_splits in splits.values() for t in table_splits]
    in_quarantine = counts_by(quarantine.select(["table"]), "table")
    return {
        **{name: t.num_rows for name, t in splits["preference"]._asdict().items()},
        "quarantine": quarantine.num_rows,
        **reconciliation(results, every, quarantine),
        "tables": {
            name: {**{k: t.num_rows for k, t in s._asdict().items()}, "quarantine": in_quarantine.get(name, 0)}
            for name, s in splits.items()
        },
        "per_split_source": {
            split: counts_by(pa.concat_tables([s[k].select(["source"]) for s in splits.values()]), "source")
            for k, split in enumerate(SPLITS)
        },
        "quarantine_reasons": counts_by(quarantine.select(["source", "reason"]), "source", "reason"),
        # per source: rows checked, contaminated (exact / n-gram match; matched before the last turn)
        "decontamination": {k: v for c in cleaned.values() for k, v in c.decontamination.items()},
    }


def _build_version(recipe: Recipe, output_dir: Path, version: str, results, tokenizer, started: float):
    if tokenizer is None and recipe.data.lengths.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            recipe.data.lengths.tokenizer, trust_remote_code=recipe.model.trust_remote_code
        )
    splits, quarantine, cleaned = clean_and_split(recipe, results, tokenizer)
    manifest = {
        "version": version,
        "schema_version": SCHEMA_VERSION,
        "recipe": redact(  # a token in a source URL shows as ***
            {
                "name": recipe.name,
                "sources": [s.model_dump(mode="json") for s in recipe.sources],
                "data": recipe.data.model_dump(mode="json"),
            }
        ),
        "inputs": [r.input for r in results],
        "counts": dataset_counts(results, splits, quarantine, cleaned),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=output_dir))
    try:
        write_version(tmp, recipe, manifest, splits, quarantine)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["build_seconds"] = round(time.perf_counter() - started, 3)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    fault_point("ingest.before_publish")  # crash tests only (tasks/runtime/faults.py)
    final = output_dir / version
    if not publish(tmp, final):
        return existing_version(output_dir, version)
    return DatasetVersion(final, manifest, reused=False)


def _import_contract_modules() -> None:
    import_in_background(
        "great_expectations", "great_expectations.expectations", "great_expectations.data_context.types.base"
    )


def write_version(tmp: Path, recipe: Recipe, manifest: dict, splits: dict[str, Splits], quarantine: pa.Table) -> None:
    """Run every table's contract (one Data Docs site into tmp), then write the splits; a critical breach moves the
    report (quarantine, manifest, Data Docs) to <output_dir>/failed/<version>/ and raises ContractBreach."""
    from tasks.data.contracts import ContractBreach

    contracts = run_contracts(recipe, splits, quarantine, manifest["counts"]["per_source"], tmp / "data_docs")
    manifest["contracts"] = {name: c.summary for name, c in contracts.items()}
    manifest["contract"] = next(iter(manifest["contracts"].values()), {})  # the pairs' (gates read it)
    if failed_contracts := [c for c in contracts.values() if not c.success]:
        failed = tmp.parent / "failed" / manifest["version"]
        shutil.rmtree(failed, ignore_errors=True)
        failed.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(quarantine, tmp / "quarantine.parquet")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        os.rename(tmp, failed)
        messages = []
        for c in failed_contracts:
            try:
                c.raise_for_critical()
            except ContractBreach as e:
                messages.append(str(e))
        raise ContractBreach("\n".join(messages))
    manifest["files"] = {}
    files = {f"{table_file(t, split)}": rows for t, s in splits.items() for split, rows in s._asdict().items()}
    for name, table in {**files, "quarantine.parquet": quarantine}.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        write_parquet(table, tmp / name)
        manifest["files"][name] = {"sha256": file_sha256(tmp / name), "rows": table.num_rows}


def run_contracts(recipe: Recipe, splits: dict[str, Splits], quarantine: pa.Table, per_source: dict, docs: Path):
    """Each table's expectation suite on its splits, its sources' counts and its quarantine rows, in one Great
    Expectations context, so one Data Docs site (with the quarantine page of every table) shows them all. The
    pairs' suite runs when the recipe has a preference source; the others when their table has rows to check."""
    from tasks.data.contracts import build_docs, contract_context, run_contract

    context, results = contract_context(docs), {}
    pinned = sorted(pinned_splits(recipe))
    for name, table_splits in splits.items():
        counts = {"per_source": {s: c for s, c in per_source.items() if c["table"] == name}, "pinned_sources": pinned}
        if not counts["per_source"]:
            continue
        suite = getattr(recipe.data, CONTRACT_FIELDS[name])
        rows = quarantine.filter(pc.equal(quarantine["table"], name))
        params = contract_params(recipe, name)
        results[name] = run_contract(table_splits._asdict(), rows, counts, suite, None, params, name, context)
    build_docs(context, docs, quarantine, {"per_source": per_source})
    return results


def contract_params(recipe: Recipe, table: str = "preference") -> dict:
    """A table's suite placeholders; a split a source keeps as its own is not drawn (its drawn share is 0)."""
    pinned = set(pinned_splits(recipe).values())
    return {
        "test_fraction": 0.0 if "test" in pinned else recipe.data.test_fraction,
        "validation_fraction": 0.0 if "validation" in pinned else recipe.data.validation_fraction,
        "split_tolerance": recipe.data.split_tolerance,
        "min_chars": recipe.data.lengths.min_chars,
        "max_chars": recipe.data.lengths.max_chars,
        "allowed_sources": [s.name for s in recipe.sources if get_adapter(s.format).table == table],
    }


def table_file(table: str, split: str) -> str:
    """Where a split of a table lives in a version folder: ``train.parquet`` (pairs), ``sft/train.parquet``, ..."""
    folder = get_table(table).folder
    return f"{folder}/{split}.parquet" if folder else f"{split}.parquet"


def load_split(version_dir: Path, split: str, table: str = "preference") -> pa.Table:
    """One split of one table of a dataset version (an empty table when the version has none of that table)."""
    path = Path(version_dir) / table_file(table, split)
    schema = get_table(table).schema
    return pq.read_table(path, schema=schema) if path.is_file() else schema.empty_table()


@task(
    name="build-dataset",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_on_transient_io,  # hub hiccups only, never bad data or bad config
    cache_policy=NO_CACHE,
)  # the content-addressed version directory is the cache (reused when it exists)
def build_dataset_task(recipe: Recipe, output_dir: str | Path | None = None) -> DatasetVersion:
    return build_dataset(recipe, Path(output_dir) if output_dir else None)


@task(name="dataset-report", cache_policy=NO_CACHE)
def publish_dataset_report(dataset: DatasetVersion) -> None:
    """Prefect artifacts a user reads: rows per table, counts per source (with its table) and quarantine reasons,
    and each table's contract table (``data-quality``: the pairs; ``data-quality-sft``, ``data-quality-unpaired``)."""
    from prefect.artifacts import create_markdown_artifact

    from tasks.data.contracts import publish_summary_artifact

    m = dataset.manifest
    lines = [f"# Dataset `{m['version']}`{' (reused)' if dataset.reused else ''}", "", f"`{dataset.path}`", ""]
    lines += ["| table | train | validation | test | quarantine |", "|---|---|---|---|---|"]
    for name, c in m["counts"].get("tables", {"preference": {**m["counts"]}}).items():
        lines.append(f"| {name} | {c['train']} | {c.get('validation', 0)} | {c['test']} | {c['quarantine']} |")
    lines += [
        "",
        "| source | table | read | accepted | quarantined | reasons "
        "| contaminated (exact / n-gram / before last turn) |",
        "|---|---|---|---|---|---|---|",
    ]
    for src, c in m["counts"]["per_source"].items():
        reasons = ", ".join(f"{k}: {v}" for k, v in m["counts"]["quarantine_reasons"].get(src, {}).items())
        d = m["counts"].get("decontamination", {}).get(src)
        decon = f"{d['contaminated']} ({d['exact']} / {d['ngram']} / {d['not_last_turn']})" if d else "-"
        table = c.get("table", "preference")
        lines.append(
            f"| {src} | {table} | {c['read']} | {c['accepted']} | {c['quarantined']} | {reasons or '-'} | {decon} |"
        )
    lines += ["", f"Data Docs: `{dataset.path / 'data_docs' / 'index.html'}`"]
    create_markdown_artifact(
        "\n".join(lines), key="dataset-summary", description="rows per table, source and quarantine"
    )
    for name, summary in m.get("contracts", {"preference": m["contract"]}).items():  # one artifact per table's suite
        publish_summary_artifact(summary, key="data-quality" if name == "preference" else f"data-quality-{name}")
