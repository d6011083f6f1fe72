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
from tasks.data.decontaminate import evaluation_decontaminator, evaluation_prompt_files
from tasks.data.preload import import_in_background
from tasks.data.sources.formats import get_adapter
from tasks.data.sources.readers import file_sha256
from tasks.data.split import SPLITS, drawn_fractions
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


def planned_version(recipe: Recipe, output_dir: str | Path | None = None) -> tuple[Path, str, list]:
    """(output folder, dataset version, each source's (identity, hub dataset)): the version from the inputs'
    hashes, before any row is parsed (what ``build_dataset`` finds reused, and align's receipt is keyed on)."""
    from tasks.data.sources.core import source_input

    inputs = [source_input(cfg) for cfg in recipe.sources]
    return Path(output_dir or recipe.data.output_dir), compute_dataset_version(recipe, [i for i, _ in inputs]), inputs


def build_dataset(recipe: Recipe, output_dir: Path | None = None, tokenizer=None) -> DatasetVersion:
    """Sources → clean → split → contract → atomic write, streaming (tasks/data/stream.py). The version is known
    from the inputs' hashes before any row is parsed, so an unchanged dataset is found and reused at that cost.
    Raises ContractBreach on a critical breach."""
    started = time.perf_counter()
    output_dir, version, inputs = planned_version(recipe, output_dir)
    if found := existing_version(output_dir, version):
        return found
    # One build of a version at a time: a concurrent run of the same data waits here, then reuses what it published.
    with exclusive(output_dir / f".{version}.lock", f"ingest: dataset version {version}"):
        if found := existing_version(output_dir, version):
            return found
        remove_partial_builds(output_dir, version)
        return _build_version(recipe, output_dir, version, inputs, tokenizer, started)


def remove_partial_builds(output_dir: Path, version: str) -> None:
    """Temporary folders of ``version`` left by a run that died before publishing it (called under the version's
    build lock, so no live run owns them): removed, and said."""
    for tmp in sorted(output_dir.glob(f".tmp-{version}-*")):
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"ingest: removed {tmp}, the unpublished build of an interrupted run", flush=True)


def _build_version(recipe: Recipe, output_dir: Path, version: str, inputs, tokenizer, started: float):
    if tokenizer is None and recipe.data.lengths.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            recipe.data.lengths.tokenizer, trust_remote_code=recipe.model.trust_remote_code
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=output_dir))
    try:
        manifest, quarantine, views = stream_version(recipe, version, inputs, tokenizer, tmp)
        publish_checked(tmp, recipe, manifest, quarantine, views)
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


def stream_version(recipe: Recipe, version: str, inputs, tokenizer, tmp: Path) -> tuple[dict, pa.Table, dict]:
    """Read, screen, decide and write every table's splits into ``tmp`` (tasks/data/stream.py); the manifest
    (without files and contracts), the quarantine of every table, and each table's contract rows view."""
    from tasks.data.sources.core import read_parts
    from tasks.data.stream import Screen, assemble, decide, per_source_checked, pin_splits, small_columns

    d, pinned, tables = recipe.data, pinned_splits(recipe), tables_of(recipe)
    draws = drawn_fractions(d.test_fraction, d.validation_fraction, pinned)
    decontaminator = evaluation_decontaminator(recipe)
    screens = {t: Screen(d, decontaminator, t, *draws, tokenizer) for t in tables}
    spool = tmp / ".spool"
    spool.mkdir()
    read, last = [], len(recipe.sources) - 1
    for k, (cfg, (info, dataset)) in enumerate(zip(recipe.sources, inputs)):
        hook = _import_contract_modules if k == last else None  # GX imports while the workers parse
        parts = read_parts(cfg, info, dataset, d.seed, str(spool), screens[info["table"]], hook)
        read.append((cfg.name, {**info, "rows": sum(p.rows_read for p in parts)}, parts))
    spooled = {t: [p.spooled for _, info, parts in read if info["table"] == t for p in parts] for t in tables}
    smalls = {t: small_columns(paths) for t, paths in spooled.items()}
    decisions = {
        t: decide(smalls[t], per_source_checked([(n, ps) for n, info, ps in read if info["table"] == t]))
        for t in tables
    }
    pin_splits(decisions, smalls, pinned)
    del smalls  # memory-mapped columns of the spool: unmapped before the spool is read again
    assembled = assemble(tmp, spooled, decisions, table_file)
    shutil.rmtree(spool)
    quarantine = pa.concat_tables(
        [p.quarantine_table() for _, _, parts in read for p in parts]
        + [q for _, _, parts in read for p in parts for q in p.screened]
        + [assembled.quarantine]
    )
    quarantine = quarantine.cast(QUARANTINE_SCHEMA).sort_by([("source", "ascending"), ("source_row", "ascending")])
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
        "inputs": [info for _, info, _ in read],
        "counts": dataset_counts(read, assembled, quarantine, decisions),
    }
    return manifest, quarantine, assembled.rows_views


def dataset_counts(read, assembled, quarantine: pa.Table, decisions: dict) -> dict:
    """The manifest's counts: the pair splits at the top level (as ever), per source (with its table) the
    reconciliation (read = accepted + quarantined), per table its splits and quarantine, quarantine reasons and
    decontamination per source."""
    views = assembled.rows_views
    every = pa.concat_tables([v.select(["source", "split"]) for v in views.values()])
    accepted = counts_by(every.select(["source"]), "source")
    quarantined = counts_by(quarantine.select(["source"]), "source")
    in_quarantine = counts_by(quarantine.select(["table"]), "table")
    in_splits = counts_by(every, "split", "source")
    return {
        **{s: assembled.files[table_file("preference", s)] for s in SPLITS},
        "quarantine": quarantine.num_rows,
        "per_source": {
            name: {
                "table": info["table"],
                "read": info["rows"],
                "accepted": accepted.get(name, 0),
                "quarantined": quarantined.get(name, 0),
            }
            for name, info, _ in read
        },
        "tables": {
            t: {**{s: assembled.files[table_file(t, s)] for s in SPLITS}, "quarantine": in_quarantine.get(t, 0)}
            for t in views
        },
        "per_split_source": {s: in_splits.get(s, {}) for s in SPLITS},
        "quarantine_reasons": counts_by(quarantine.select(["source", "reason"]), "source", "reason"),
        # per source: rows checked, contaminated (exact / n-gram match; matched before the last turn)
        "decontamination": {k: v for d in decisions.values() for k, v in d.decontamination.items()},
    }


def _import_contract_modules() -> None:
    import_in_background(
        "great_expectations", "great_expectations.expectations", "great_expectations.data_context.types.base"
    )


def publish_checked(tmp: Path, recipe: Recipe, manifest: dict, quarantine: pa.Table, views: dict) -> None:
    """Run every table's contract (one Data Docs site into tmp) on the version streamed into tmp; a critical breach
    moves the report (quarantine, manifest, Data Docs: not the splits) to <output_dir>/failed/<version>/ and raises
    ContractBreach; else the quarantine is written and every file's hash goes into the manifest."""
    from tasks.data.contracts import ContractBreach

    contracts = run_contracts(recipe, views, quarantine, manifest["counts"]["per_source"], tmp / "data_docs")
    manifest["contracts"] = {name: c.summary for name, c in contracts.items()}
    manifest["contract"] = next(iter(manifest["contracts"].values()), {})  # the pairs' (gates read it)
    split_files = [table_file(t, s) for t in views for s in SPLITS]
    if failed_contracts := [c for c in contracts.values() if not c.success]:
        failed = tmp.parent / "failed" / manifest["version"]
        shutil.rmtree(failed, ignore_errors=True)
        failed.parent.mkdir(parents=True, exist_ok=True)
        for name in split_files:
            (tmp / name).unlink(missing_ok=True)
        for folder in {(tmp / name).parent for name in split_files} - {tmp}:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
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
    write_parquet(quarantine, tmp / "quarantine.parquet")
    manifest["files"] = {
        name: {"sha256": file_sha256(tmp / name), "rows": pq.ParquetFile(tmp / name).metadata.num_rows}
        for name in [*split_files, "quarantine.parquet"]
    }


def run_contracts(recipe: Recipe, views: dict[str, pa.Table], quarantine: pa.Table, per_source: dict, docs: Path):
    """Each table's expectation suite on its rows view (built as the data streamed), its sources' counts and its
    quarantine rows, in one Great Expectations context, so one Data Docs site (with the quarantine page of every
    table) shows them all. The pairs' suite runs when the recipe has a preference source; the others when their
    table has rows to check."""
    from tasks.data.contracts import build_docs, contract_context, run_contract

    context, results = contract_context(docs), {}
    pinned = sorted(pinned_splits(recipe))
    for name, rows in views.items():
        counts = {"per_source": {s: c for s, c in per_source.items() if c["table"] == name}, "pinned_sources": pinned}
        if not counts["per_source"]:
            continue
        suite = getattr(recipe.data, CONTRACT_FIELDS[name])
        in_table = quarantine.filter(pc.equal(quarantine["table"], name))
        params = contract_params(recipe, name)
        results[name] = run_contract(None, in_table, counts, suite, None, params, name, context, rows=rows)
    build_docs(context, docs, quarantine, {"per_source": per_source})
    return results


def contract_params(recipe: Recipe, table: str = "preference") -> dict:
    """A table's suite placeholders; a split a source keeps as its own is not drawn (its drawn share is 0)."""
    test, validation = drawn_fractions(
        recipe.data.test_fraction, recipe.data.validation_fraction, pinned_splits(recipe)
    )
    return {
        "test_fraction": test,
        "validation_fraction": validation,
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
