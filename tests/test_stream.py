"""The streaming ingest (tasks/data/stream.py) gives what the whole-table definitions give: ``clean_rows`` on every
table's rows in recipe order, then ``split_tables`` (with a pinned source), on the tiny recipe's seven sources and on
real hh-rlhf rows read by two worker processes whose parts repeat each other's rows; and the split files do not
depend on how many workers parsed them."""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.recipe import load_recipe, parse_recipe
from tasks.data import dataset
from tasks.data.clean import clean_rows
from tasks.data.decontaminate import evaluation_decontaminator
from tasks.data.sources import core, read_source
from tasks.data.split import SPLITS, split_tables
from tasks.data.stream import ROW_GROUP
from tests.conftest import TINY_RECIPE


def expected(recipe) -> tuple[dict, list]:
    """Per table and split: the ids, in order; and the quarantine as (source, source_row, reason, detail), sorted."""
    results = [read_source(cfg, seed=recipe.data.seed) for cfg in recipe.sources]
    decontaminator = evaluation_decontaminator(recipe)
    cleaned, quarantine = {}, [r.quarantine for r in results]
    for table in dataset.tables_of(recipe):
        rows = [r.accepted for r in results if r.table == table]
        from schemas.tables import get_table

        spec = get_table(table)
        both = pa.concat_tables(rows) if rows else spec.schema.empty_table()
        c = clean_rows(both, recipe.data, decontaminator, None, table)
        cleaned[table] = (c.accepted, spec.split_column)
        quarantine.append(c.quarantine)
    d = recipe.data
    splits = split_tables(cleaned, d.test_fraction, d.validation_fraction, d.seed, dataset.pinned_splits(recipe))
    ids = {t: {s: getattr(sp, s)["id"].to_pylist() for s in SPLITS} for t, sp in splits.items()}
    q = pa.concat_tables(quarantine).to_pylist()
    return ids, sorted((r["source"], r["source_row"], r["reason"], r["detail"]) for r in q)


def built(version) -> tuple[dict, list]:
    ids = {
        t: {s: pq.read_table(version.path / dataset.table_file(t, s))["id"].to_pylist() for s in SPLITS}
        for t in version.manifest["counts"]["tables"]
    }
    q = pq.read_table(version.path / "quarantine.parquet").to_pylist()
    return ids, sorted((r["source"], r["source_row"], r["reason"], r["detail"]) for r in q)


def test_tiny_recipe_streams_to_the_whole_table_result_with_a_pinned_source(tmp_path):
    raw = load_recipe(TINY_RECIPE).model_dump(mode="json")
    for source in raw["sources"]:
        if source["name"] == "demo/ultrafeedback_binarized":
            source["split"] = "test"  # it keeps its own test split: every row with its keys goes there too
    recipe = parse_recipe(raw)
    version = dataset.build_dataset(recipe, tmp_path / "data")
    want_ids, want_q = expected(recipe)
    got_ids, got_q = built(version)
    assert got_ids == want_ids
    assert got_q == want_q
    reasons = {r[2] for r in got_q}
    assert {"duplicate", "contaminated"} <= reasons, reasons  # the decision's rules are exercised
    counts = version.manifest["counts"]
    for name, c in counts["per_source"].items():
        assert c["read"] == c["accepted"] + c["quarantined"], name


@pytest.fixture
def repeated_real_rows(tmp_path, shared_data):
    """300 real hh-rlhf rows, then the same 300 again: two worker parts, the second all duplicates of the first."""
    lines = (shared_data / "hh-rlhf" / "harmless-base-test.head300.jsonl").read_text(encoding="utf-8").splitlines()
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(lines + lines) + "\n", encoding="utf-8")
    return path


def hh_recipe(path, out, **data):
    return parse_recipe(
        {
            "name": "stream",
            "sources": [{"name": "hh", "format": "hh-rlhf", "path": str(path)}],
            "data": {"output_dir": str(out), **data},
        }
    )


def test_duplicates_across_worker_parts_keep_the_first_and_name_it(repeated_real_rows, tmp_path, monkeypatch):
    monkeypatch.setattr(core, "PARALLEL_MIN_BYTES", 0)  # two worker processes, one per half
    recipe = hh_recipe(repeated_real_rows, tmp_path / "data")
    assert len(core._parallel_ranges(recipe.sources[0], repeated_real_rows)) == 2
    version = dataset.build_dataset(recipe)
    got_ids, got_q = built(version)
    want_ids, want_q = expected(recipe)
    assert (got_ids, got_q) == (want_ids, want_q)
    first_half = {r[1]: r[2] for r in got_q if r[1] < 300}
    second_half = {r[1] - 300: r for r in got_q if r[1] >= 300}
    assert len(second_half) == 300  # nothing of the second part is accepted
    for row, (_, _, reason, detail) in second_half.items():  # the row-local rules first, as clean_rows orders them
        if first_half.get(row, "contaminated") in ("contaminated", "duplicate"):
            assert reason == "duplicate" and detail.startswith("same content as hh row "), (row, reason)
        else:
            assert reason == first_half[row], (row, reason)
    manifest = json.loads((version.path / "manifest.json").read_text())
    assert manifest["counts"]["per_source"]["hh"]["read"] == 600


def test_split_files_are_the_same_bytes_whatever_the_number_of_workers(repeated_real_rows, tmp_path, monkeypatch):
    monkeypatch.setattr("tasks.data.stream.ROW_GROUP", 64)  # several row groups from 300 rows
    serial = dataset.build_dataset(hh_recipe(repeated_real_rows, tmp_path / "one"))
    monkeypatch.setattr(core, "PARALLEL_MIN_BYTES", 0)
    parallel = dataset.build_dataset(hh_recipe(repeated_real_rows, tmp_path / "two"))
    assert serial.manifest["files"] == parallel.manifest["files"]
    assert pq.ParquetFile(serial.path / "train.parquet").metadata.num_row_groups > 1
    assert ROW_GROUP == 65_536


ODD_ROWS = [  # shapes the columnar parse leaves to the row-by-row adapter (each judged there)
    {
        "chosen": "\n\nHuman: a\n\nAssistant: x\n\nAssistant: b",
        "rejected": "\n\nHuman: a\n\nAssistant: x\n\nAssistant: c",
    },
    {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: c"},
    {"chosen": "Human: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
    {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"},
    {"rejected": "\n\nHuman: a\n\nAssistant: c"},
    {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: more", "rejected": "\n\nHuman: a\n\nAssistant: c"},
]


@pytest.mark.parametrize("bad_line", [None, "{not json", ""])
def test_columnar_parse_equals_the_row_by_row_adapter(tmp_path, shared_data, monkeypatch, bad_line):
    """Real rows with odd ones among them (one block: the columnar parse takes the real rows, the odd ones go row by
    row), and with an invalid or blank line (the whole block goes row by row): the same rows, ids and quarantine."""
    lines = (shared_data / "hh-rlhf" / "harmless-base-test.head300.jsonl").read_text(encoding="utf-8").splitlines()
    for k, odd in enumerate(ODD_ROWS):
        lines.insert(40 * k + 7, json.dumps(odd))
    if bad_line is not None:
        lines.insert(100, bad_line)
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    from schemas.data_config import SourceConfig

    cfg = SourceConfig(name="hh", format="hh-rlhf", path=str(path))
    assert core.columnar(cfg, path)
    from tasks.data.sources import formats, hh_rlhf

    taken = []

    def spy(*columns):
        result = hh_rlhf.parse_columns(*columns)
        taken.append(int(result[0].sum()))
        return result

    adapter = formats.ADAPTERS["hh-rlhf"]
    monkeypatch.setitem(formats.ADAPTERS, "hh-rlhf", dataclasses.replace(adapter, parse_columns=spy))
    by_blocks = read_source(cfg)
    assert taken == ([300] if bad_line is None else [])  # the real rows by columns; a bad line: the block by rows
    monkeypatch.setattr(core, "columnar", lambda cfg, path: False)
    by_rows = read_source(cfg)
    assert by_blocks.accepted.to_pylist() == by_rows.accepted.to_pylist()
    assert by_blocks.quarantine.to_pylist() == by_rows.quarantine.to_pylist()
    assert by_blocks.rows_read == by_rows.rows_read == len(lines) - (bad_line == "")
    assert by_rows.quarantine.num_rows >= len(ODD_ROWS) - 1  # all but the multi-turn one are rejected


def test_in_other_split_flags_a_value_held_by_two_splits_and_never_a_null():
    import numpy as np

    from tasks.data.contract_views import _in_other_split

    values = pa.array(["a", "b", "a", None, "c", "c", None], pa.string())
    split = np.array(["train", "train", "test", "test", "validation", "validation", "train"])
    assert _in_other_split(values, split).tolist() == [True, False, True, False, False, False, False]
    assert _in_other_split(pa.array([], pa.string()), np.array([], dtype=str)).tolist() == []
