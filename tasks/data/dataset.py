"""Split (tasks/data/split.py) and write an immutable, versioned dataset directory.

    <output_dir>/<version>/train.parquet, validation.parquet, test.parquet, quarantine.parquet, manifest.json,
    data_docs/

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
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from schemas.hashing import content_hash
from schemas.preference import PREFERENCE_SCHEMA, QUARANTINE_SCHEMA, SCHEMA_VERSION
from schemas.recipe import Recipe
from tasks.data.clean import clean_rows
from tasks.data.decontaminate import evaluation_decontaminator, evaluation_prompt_files
from tasks.data.preload import import_in_background
from tasks.data.sources.readers import file_sha256
from tasks.data.split import SPLITS, split_rows
from tasks.registry.secrets import redact
from tasks.runtime.faults import fault_point
from tasks.runtime.locks import exclusive
from tasks.runtime.retries import retry_on_transient_io

SPLIT_FILES = (*SPLITS, "quarantine")  # validation: in-training evaluation; test: the evaluate stage only


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
        "data": recipe.data.model_dump(mode="json", exclude={"output_dir", "decontaminate", "contract"}),
        "decontaminate": [file_sha256(Path(p)) for p in evaluation_prompt_files(recipe)],  # incl. evaluate's
        "contract": file_sha256(Path(recipe.data.contract)),
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
    """Per source: rows read, accepted (in any split) and quarantined (by any stage)."""
    acc = counts_by(pa.concat_tables([t.select(["source"]) for t in splits]), "source")
    qua = counts_by(quarantine.select(["source"]), "source")
    return {
        "per_source": {
            r.source: {"read": r.rows_read, "accepted": acc.get(r.source, 0), "quarantined": qua.get(r.source, 0)}
            for r in results
        }
    }


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


def _build_version(recipe: Recipe, output_dir: Path, version: str, results, tokenizer, started: float):
    rows = pa.concat_tables([r.accepted for r in results]) if results else PREFERENCE_SCHEMA.empty_table()
    if tokenizer is None and recipe.data.lengths.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            recipe.data.lengths.tokenizer, trust_remote_code=recipe.model.trust_remote_code
        )
    cleaned = clean_rows(rows, recipe.data, evaluation_decontaminator(recipe), tokenizer)
    splits = split_rows(cleaned.accepted, recipe.data.test_fraction, recipe.data.validation_fraction, recipe.data.seed)
    quarantine = pa.concat_tables([r.quarantine for r in results] + [cleaned.quarantine]).cast(QUARANTINE_SCHEMA)
    quarantine = quarantine.sort_by([("source", "ascending"), ("source_row", "ascending")])
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
        "counts": {
            **{name: t.num_rows for name, t in splits._asdict().items()},
            "quarantine": quarantine.num_rows,
            **reconciliation(results, list(splits), quarantine),
            "per_split_source": {
                name: counts_by(t.select(["source"]), "source") for name, t in splits._asdict().items()
            },
            "quarantine_reasons": counts_by(quarantine.select(["source", "reason"]), "source", "reason"),
            # per source: rows checked, contaminated (exact / n-gram match; matched before the last turn)
            "decontamination": cleaned.decontamination,
        },
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=output_dir))
    try:
        write_version(tmp, recipe, manifest, {**splits._asdict(), "quarantine": quarantine})
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


def write_version(tmp: Path, recipe: Recipe, manifest: dict, tables: dict[str, pa.Table]) -> None:
    """Run the contract (Data Docs into tmp), then write the splits; a critical breach moves the report
    (quarantine, manifest, Data Docs) to <output_dir>/failed/<version>/ and raises ContractBreach."""
    from tasks.data.contracts import run_contract

    contract = run_contract(
        {name: tables[name] for name in SPLITS},
        tables["quarantine"],
        {"per_source": manifest["counts"]["per_source"]},
        recipe.data.contract,
        tmp / "data_docs",
        contract_params(recipe),
    )
    manifest["contract"] = contract.summary
    if not contract.success:
        failed = tmp.parent / "failed" / manifest["version"]
        shutil.rmtree(failed, ignore_errors=True)
        failed.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(tables["quarantine"], tmp / "quarantine.parquet")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        os.rename(tmp, failed)
        contract.raise_for_critical()
    manifest["files"] = {}
    for name in SPLIT_FILES:
        write_parquet(tables[name], tmp / f"{name}.parquet")
        manifest["files"][f"{name}.parquet"] = {
            "sha256": file_sha256(tmp / f"{name}.parquet"),
            "rows": tables[name].num_rows,
        }


def contract_params(recipe: Recipe) -> dict:
    return {
        "test_fraction": recipe.data.test_fraction,
        "validation_fraction": recipe.data.validation_fraction,
        "split_tolerance": recipe.data.split_tolerance,
        "min_chars": recipe.data.lengths.min_chars,
        "max_chars": recipe.data.lengths.max_chars,
        "allowed_sources": [s.name for s in recipe.sources],
    }


def load_split(version_dir: Path, split: str) -> pa.Table:
    return pq.read_table(Path(version_dir) / f"{split}.parquet", schema=PREFERENCE_SCHEMA)


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
    """Prefect artifacts a user reads: counts per source and quarantine reasons, and the contract table."""
    from prefect.artifacts import create_markdown_artifact

    from tasks.data.contracts import publish_summary_artifact

    m = dataset.manifest
    lines = [
        f"# Dataset `{m['version']}`{' (reused)' if dataset.reused else ''}",
        "",
        f"`{dataset.path}` · train {m['counts']['train']} · validation {m['counts'].get('validation', 0)} · "
        f"test {m['counts']['test']} · "
        f"quarantine {m['counts']['quarantine']}",
        "",
        "| source | read | accepted | quarantined | reasons | contaminated (exact / n-gram / before last turn) |",
        "|---|---|---|---|---|---|",
    ]
    for src, c in m["counts"]["per_source"].items():
        reasons = ", ".join(f"{k}: {v}" for k, v in m["counts"]["quarantine_reasons"].get(src, {}).items())
        d = m["counts"].get("decontamination", {}).get(src)
        decon = f"{d['contaminated']} ({d['exact']} / {d['ngram']} / {d['not_last_turn']})" if d else "-"
        lines.append(f"| {src} | {c['read']} | {c['accepted']} | {c['quarantined']} | {reasons or '-'} | {decon} |")
    lines += ["", f"Data Docs: `{dataset.path / 'data_docs' / 'index.html'}`"]
    create_markdown_artifact("\n".join(lines), key="dataset-summary", description="rows per source and quarantine")
    publish_summary_artifact(m["contract"], key="data-quality")
