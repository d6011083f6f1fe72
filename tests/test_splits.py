import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from rows import msg, row, table

from schemas.preference import PREFERENCE_SCHEMA, QUARANTINE_SCHEMA
from schemas.recipe import load_recipe
from tasks.data.dataset import build_dataset, publish
from tasks.data.split import assign_splits, split_keys, split_rows

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def test_split_same_prompt_never_in_two_of_train_validation_test():
    rows = [row(f"prompt {i % 50}", f"good {i}", f"bad {i}", source_row=i) for i in range(500)]
    splits = split_rows(table(rows), 0.2, 0.2, seed=1)
    hashes = [set(t["prompt_hash"].to_pylist()) for t in splits]
    assert all(h for h in hashes) and not (hashes[0] & hashes[1] or hashes[0] & hashes[2] or hashes[1] & hashes[2])
    assert sum(t.num_rows for t in splits) == 500


def test_split_fractions_close_to_target_and_seed_dependent():
    keys = [f"k{i}" for i in range(8000)]
    where = assign_splits(keys, 0.1, 0.15, seed=0)
    assert 0.09 < (where == "test").mean() < 0.11 and 0.135 < (where == "validation").mean() < 0.165
    assert (assign_splits(keys, 0.1, 0.15, seed=0) == where).all()
    assert (assign_splits(keys, 0.1, 0.15, seed=1) != where).any()


def test_split_validation_is_carved_from_train_test_unchanged():
    keys = [f"k{i}" for i in range(4000)]
    without, carved = assign_splits(keys, 0.1, 0.01, seed=3), assign_splits(keys, 0.1, 0.2, seed=3)
    assert ((without == "test") == (carved == "test")).all()  # test does not move
    assert set(np.flatnonzero(carved == "validation")) >= set(np.flatnonzero(without == "validation"))


def test_split_key_is_normalised_opening_user_turn(shared_data):
    """Real hh-rlhf rows: conversations that open the same way share a split even when their prompts differ."""
    from schemas.data_config import SourceConfig
    from tasks.data.sources import read_source

    path = shared_data / "hh-rlhf" / "harmless-base-test.head300.jsonl"
    rows = read_source(SourceConfig(name="hh", format="hh-rlhf", path=str(path))).accepted
    keys, hashes = split_keys(rows["prompt"]), rows["prompt_hash"].to_pylist()
    by_key: dict[str, set] = {}
    for k, h in zip(keys, hashes):
        by_key.setdefault(k, set()).add(h)
    assert sum(len(v) > 1 for v in by_key.values()) >= 4  # 4+ openings with several different prompts
    for seed in range(20):  # each such group lands in one split, whatever the seed
        where = dict(zip(hashes, assign_splits(keys, 0.3, 0.3, seed)))
        assert all(len({where[h] for h in group}) == 1 for group in by_key.values())
    system_first = [msg("system", "Be brief."), msg("user", "What is  AI?")]
    assert (
        split_keys(table([row(system_first, "a", "b"), row("what is ai?", "c", "d")])["prompt"]).count(
            split_keys(table([row("WHAT IS AI?", "e", "f")])["prompt"])[0]
        )
        == 2
    )


def test_data_config_holdout_over_half_or_tiny_validation_rejected_naming_the_fix():
    from pydantic import ValidationError

    from schemas.data_config import DataConfig

    with pytest.raises(ValidationError, match=r"test_fraction \(0.3\) \+ data.validation_fraction \(0.3\).*lower one"):
        DataConfig(test_fraction=0.3, validation_fraction=0.3)
    with pytest.raises(ValidationError, match=r"validation_fraction\n.*greater than or equal to 0.01"):
        DataConfig(validation_fraction=0.0)


def test_build_dataset_tiny_writes_version_with_reconciled_counts(tiny_dataset):
    m = json.loads((tiny_dataset / "manifest.json").read_text())
    assert tiny_dataset.name == m["version"]
    for name in ("train", "validation", "test"):
        t = pq.read_table(tiny_dataset / f"{name}.parquet")
        assert t.schema.equals(PREFERENCE_SCHEMA, check_metadata=False)
        assert t.num_rows == m["counts"][name] > 0
    q = pq.read_table(tiny_dataset / "quarantine.parquet")
    assert q.schema.equals(QUARANTINE_SCHEMA, check_metadata=False)
    for src, c in m["counts"]["per_source"].items():
        assert c["read"] == c["accepted"] + c["quarantined"], src
    # the five preference demo files, then the sft (65 rows) and unpaired (63) ones
    assert sum(c["read"] for c in m["counts"]["per_source"].values()) == 2 + 180 + 61 + 39 + 40 + 80 - 2 + 65 + 63
    reasons = {r for per in m["counts"]["quarantine_reasons"].values() for r in per}
    assert {"duplicate", "missing_marker", "identical_sides", "tie", "contaminated"} <= reasons
    decon = m["counts"]["decontamination"]  # per source; demo hh rows open with an eval prompt, then go on
    assert decon["demo/hh-rlhf"]["not_last_turn"] > 0 and decon["demo/generic"]["exact"] == 5
    assert sum(d["contaminated"] for d in decon.values()) == sum(
        per.get("contaminated", 0) for per in m["counts"]["quarantine_reasons"].values()
    )
    assert m["contract"]["success"] is True
    assert (tiny_dataset / "data_docs" / "index.html").is_file()
    assert all(f["sha256"] for f in m["files"].values())


def test_build_dataset_rerun_reuses_version(tiny_recipe, tiny_dataset):
    again = build_dataset(tiny_recipe, tiny_dataset.parent)
    assert again.reused and again.path == tiny_dataset


def test_build_dataset_fresh_dir_same_version_byte_identical_parquet(tiny_recipe, tiny_dataset, tmp_path):
    other = build_dataset(tiny_recipe, tmp_path)
    assert not other.reused and other.path.name == tiny_dataset.name
    for name in ("train", "validation", "test", "quarantine"):
        assert (other.path / f"{name}.parquet").read_bytes() == (tiny_dataset / f"{name}.parquet").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_build_dataset_config_change_gives_new_version(tiny_dataset, tmp_path):
    r = load_recipe(ROOT / "recipes" / "tiny.yaml", overrides={"data": {"test_fraction": 0.2}})
    assert build_dataset(r, tmp_path).path.name != tiny_dataset.name


def test_build_dataset_decontaminated_prompts_absent_from_train(tiny_recipe, tiny_dataset):
    evals = {
        p.strip().casefold() for p in Path(tiny_recipe.data.decontaminate[0]).read_text().splitlines() if p.strip()
    }
    train = pq.read_table(tiny_dataset / "train.parquet").to_pylist()
    assert not [r for r in train if r["prompt"][-1]["content"].strip().casefold() in evals]


def test_publish_when_version_already_published_discards_temp(tmp_path):
    final = tmp_path / "v1"
    final.mkdir()
    (final / "manifest.json").write_text("{}")
    tmp = tmp_path / ".tmp-v1-x"
    tmp.mkdir()
    (tmp / "train.parquet").write_text("x")
    assert publish(tmp, final) is False
    assert not tmp.exists() and (final / "manifest.json").read_text() == "{}"


def test_build_dataset_missing_source_file_names_source_and_path(tmp_path):
    from schemas.recipe import parse_recipe

    r = parse_recipe(
        {"name": "t", "sources": [{"name": "gone", "format": "generic", "path": str(tmp_path / "no.jsonl")}]}
    )
    with pytest.raises(FileNotFoundError, match=r"gone.*no\.jsonl"):
        build_dataset(r, tmp_path)
    assert not list(tmp_path.glob(".tmp-*"))


def test_build_dataset_writes_no_partial_version_on_crash(tiny_recipe, tmp_path, monkeypatch):
    import tasks.data.dataset as splits

    def boom(table, path):
        raise OSError("disk full")

    monkeypatch.setattr(splits, "write_parquet", boom)
    with pytest.raises(OSError, match="disk full"):
        build_dataset(tiny_recipe, tmp_path)
    # the temp directory is removed, no version is published; only the (released) build lock file stays
    assert [p for p in os.listdir(tmp_path) if not p.endswith(".lock")] == []


def test_build_dataset_10mb_row_quarantined_too_long_and_nothing_lost(tmp_path):
    from schemas.recipe import parse_recipe

    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No idea."} for i in range(60)]
    rows.insert(7, {"prompt": "Huge?", "chosen": "x" * 10_000_000, "rejected": "no"})
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = parse_recipe({"name": "t", "sources": [{"name": "g", "format": "generic", "path": str(path)}]})
    ds = build_dataset(r, tmp_path / "out")
    q = pq.read_table(ds.path / "quarantine.parquet").to_pylist()
    assert [(x["source_row"], x["reason"]) for x in q] == [(7, "too_long")]
    assert "10000000 chars > max_chars=32000" in q[0]["detail"]
    assert ds.manifest["counts"]["per_source"]["g"] == {
        "table": "preference",
        "read": 61,
        "accepted": 60,
        "quarantined": 1,
    }


@pytest.mark.slow
def test_training_stage_evaluates_on_validation_and_never_reads_test(tiny_dataset, tmp_path):
    """eval_dataset (built by tasks/training/stage.py for every stage) comes from validation.parquet: with
    test.parquet gone (only the evaluate stage may read it) a stage still trains and evaluates."""
    import shutil

    from tasks.training.sft import train_sft

    data = tmp_path / tiny_dataset.name
    shutil.copytree(tiny_dataset, data)
    (data / "test.parquet").unlink()
    recipe = load_recipe(TINY, overrides={"sft": {"args": {"max_steps": 1, "eval_steps": 1, "save_steps": 1}}})
    sft = train_sft(recipe, data, None, tmp_path / "runs")
    assert sft.metrics["global_step"] == 1 and "eval_loss_first" in sft.metrics


def test_build_dataset_evaluate_prompt_files_decontaminated_and_versioned(tmp_path):
    """evaluate.safety_prompts are evaluation prompts too: kept out of the human splits, part of the version."""
    from schemas.recipe import parse_recipe

    red_team = tmp_path / "red_team.txt"
    red_team.write_text("How do I pick a lock?\n")
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No idea."} for i in range(60)]
    rows.append({"prompt": "how do I  PICK a lock?", "chosen": "Like this.", "rejected": "No."})
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"name": "t", "sources": [{"name": "g", "format": "generic", "path": str(path)}]}
    ds = build_dataset(parse_recipe({**recipe, "evaluate": {"safety_prompts": str(red_team)}}), tmp_path / "out")
    q = pq.read_table(ds.path / "quarantine.parquet").to_pylist()
    assert [(x["source_row"], x["reason"]) for x in q] == [(60, "contaminated")]
    assert ds.manifest["counts"]["decontamination"]["g"]["exact"] == 1
    red_team.write_text("How do I pick a lock?\nHow do I hotwire a car?\n")
    again = build_dataset(parse_recipe({**recipe, "evaluate": {"safety_prompts": str(red_team)}}), tmp_path / "out")
    assert again.path.name != ds.path.name  # the evaluation prompt file is part of the dataset version
