"""SFT conversations and unpaired feedback through the data plane: `format: sft` and `format: unpaired` sources on
real rows (../shared/data) and our fixtures (tests/fixtures/sft_unpaired, written by make_fixtures.py), the same
cleaning and decontamination, one split across the preference / sft / unpaired tables, reconciliation and the
quarantine `table` column through `python -m flows.ingest`, the SFT stage's rows, and the hub recipes offline."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from schemas.data_config import DataConfig, SourceConfig
from schemas.preference import QUARANTINE_SCHEMA, Reason, prompt_hash
from schemas.recipe import RecipeError, load_recipe, parse_recipe
from schemas.sft import SFT_SCHEMA, SFTRow, sft_id
from schemas.tables import TABLES
from schemas.unpaired import UNPAIRED_SCHEMA, UnpairedRow, unpaired_id
from tasks.data.clean import clean_rows
from tasks.data.sources import SourceResult, read_source
from tasks.data.split import SPLITS, split_keys, split_tables

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sft_unpaired"
SHAREGPT_REAL = ROOT.parent / "shared" / "data" / "sharegpt" / "llamafactory-dpo-en.head100.jsonl"
UFB_REAL = ROOT.parent / "shared" / "data" / "ultrafeedback_binarized" / "train_prefs.row0.jsonl"


def read(fmt: str, path: Path, name: str | None = None) -> SourceResult:
    """Read a source and check what every read keeps: nothing lost, canonical rows with their hashes."""
    result = read_source(SourceConfig(name=name or f"test/{fmt}", format=fmt, path=str(path)))
    schema, model = {"sft": (SFT_SCHEMA, SFTRow), "unpaired": (UNPAIRED_SCHEMA, UnpairedRow)}[fmt]
    assert result.table == fmt and result.input["table"] == fmt
    assert result.rows_read == result.accepted.num_rows + result.quarantine.num_rows == result.input["rows"]
    assert result.accepted.schema.equals(schema, check_metadata=True)
    assert result.quarantine.schema.equals(QUARANTINE_SCHEMA, check_metadata=True)
    assert set(result.quarantine["table"].to_pylist()) <= {fmt}
    for row in result.accepted.to_pylist():
        model.model_validate(row)
        if fmt == "sft":
            assert row["id"] == sft_id(row["messages"]) and row["prompt_hash"] == prompt_hash(row["messages"][:-1])
        else:
            assert row["id"] == unpaired_id(row["prompt"], row["completion"], row["label"])
            assert row["prompt_hash"] == prompt_hash(row["prompt"])
    return result


def outcomes(result: SourceResult) -> dict[int, str]:
    """source_row → "accepted" or its quarantine reason."""
    out = {r: "accepted" for r in result.accepted["source_row"].to_pylist()}
    out |= dict(zip(result.quarantine["source_row"].to_pylist(), result.quarantine["reason"].to_pylist()))
    return dict(sorted(out.items()))


# ---------------------------------------------------------------- format: sft


def test_sft_source_reads_real_sharegpt_conversations_with_their_answer():
    raw = [json.loads(line) for line in SHAREGPT_REAL.read_text(encoding="utf-8").splitlines()]
    rows = read("sft", SHAREGPT_REAL).accepted.to_pylist()
    assert len(rows) == len(raw) == 100  # every row: the conversation, then its chosen answer
    for row, rec in zip(rows, raw):
        turns = [m["value"] for m in rec["conversations"]] + [rec["chosen"]["value"]]
        assert [m["content"] for m in row["messages"]] == turns
        assert row["messages"][-1]["role"] == "assistant" and row["messages"][-2]["role"] == "user"
    assert sum(len(r["messages"]) > 2 for r in rows) == 66  # 29 with a system turn, 37 multi-turn


def test_sft_source_detects_each_shape_and_quarantines_malformed_rows_with_reasons():
    result = read("sft", FIXTURES / "sft_rows.jsonl")
    assert outcomes(result) == {
        **dict.fromkeys([0, 1, 2, 3, 4, 5, 8, 15, 16], "accepted"),
        6: "bad_turn_order",  # ShareGPT conversation ending on the user's turn
        7: "bad_turn_order",  # messages ending on the user's turn
        9: "missing_field",  # alpaca without output
        10: "bad_role",
        11: "missing_field",
        12: "bad_turn_order",  # a user turn as the completion
        13: "wrong_type",
        14: "invalid_json",
    }
    q = {r["source_row"]: r["detail"] for r in result.quarantine.to_pylist()}
    assert q[6] == (
        "sft_rows.jsonl:7: conversations: must end with the assistant's answer, ends with user "
        "(turns [user, assistant, user])"
    )
    assert q[9] == "sft_rows.jsonl:10: missing field 'output' (found keys: ['input', 'instruction'])"
    assert "expected one of: messages (TRL / ultrachat_200k); conversations (ShareGPT)" in q[11]
    rows = {r["source_row"]: r["messages"] for r in result.accepted.to_pylist()}
    assert rows[1][0] == {"role": "system", "content": "You are a tutor."} and len(rows[1]) == 5
    assert rows[2] == [
        {"role": "user", "content": "Translate 'cat' to French."},
        {"role": "assistant", "content": "Chat."},
    ]
    assert rows[4][0]["content"] == "Summarise the text.\n\nWater boils at 100 C at sea level."
    assert rows[5][0]["content"] == "Wie sagt man «danke» auf Englisch?"  # an empty input adds nothing
    assert rows[15][-1] == {"role": "assistant", "content": "Autumn."}


def test_sft_cleaning_quarantines_empty_answers_and_duplicates_naming_the_turn():
    result = read("sft", FIXTURES / "sft_rows.jsonl")
    cleaned = clean_rows(result.accepted, DataConfig(), kind="sft")
    got = {r["source_row"]: (r["reason"], r["detail"], r["table"]) for r in cleaned.quarantine.to_pylist()}
    assert got == {
        8: ("empty_turn", "messages has an empty or whitespace-only turn (turn 2 of 2, assistant)", "sft"),
        16: (
            "duplicate",
            f"same content as test/sft row 2 (id {sft_id(result.accepted.to_pylist()[2]['messages'])})",
            "sft",
        ),
    }
    assert cleaned.accepted.num_rows == result.accepted.num_rows - 2


def test_sft_and_unpaired_rows_are_normalised_rehashed_and_decontaminated():
    decomposed = "Cafe\u0301 prices?"
    sft = pa.Table.from_pylist(
        [
            {
                "id": "x",
                "source": "s",
                "source_row": 0,
                "prompt_hash": "x",
                "messages": [{"role": "user", "content": decomposed}, {"role": "assistant", "content": "Cheap."}],
            },
            {
                "id": "y",
                "source": "s",
                "source_row": 1,
                "prompt_hash": "y",
                "messages": [
                    {"role": "user", "content": "What is the capital of Peru?"},
                    {"role": "assistant", "content": "Lima."},
                ],
            },
        ],
        schema=SFT_SCHEMA,
    )
    out = clean_rows(sft, DataConfig(), eval_prompts=["what is the CAPITAL of peru?"], kind="sft")
    (kept,) = out.accepted.to_pylist()
    nfc = unicodedata.normalize("NFC", decomposed)
    assert kept["messages"][0]["content"] == nfc and kept["id"] == sft_id(kept["messages"])
    assert kept["prompt_hash"] == prompt_hash([{"role": "user", "content": nfc}])
    assert out.quarantine.to_pylist()[0]["reason"] == Reason.CONTAMINATED and out.decontamination["s"]["exact"] == 1
    unpaired = read("unpaired", FIXTURES / "unpaired_rows.jsonl").accepted
    out = clean_rows(unpaired, DataConfig(), eval_prompts=["Capital of Chile?"], kind="unpaired")
    assert {r["source_row"]: r["reason"] for r in out.quarantine.to_pylist()} == {2: "contaminated", 6: "empty_turn"}


# ---------------------------------------------------------------- format: unpaired


def test_unpaired_source_reads_prompt_completion_and_messages_rows_and_quarantines_bad_labels():
    result = read("unpaired", FIXTURES / "unpaired_rows.jsonl")
    assert outcomes(result) == {
        **dict.fromkeys([0, 1, 2, 6, 10], "accepted"),
        3: "missing_field",
        4: "wrong_type",
        5: "wrong_type",
        7: "bad_turn_order",
        8: "missing_field",
        9: "wrong_type",
    }
    q = {r["source_row"]: r["detail"] for r in result.quarantine.to_pylist()}
    assert q[3] == "unpaired_rows.jsonl:4: missing field 'label' (found keys: ['completion', 'prompt'])"
    assert q[4] == "unpaired_rows.jsonl:5: label: expected boolean, found string"
    assert q[5] == "unpaired_rows.jsonl:6: label: expected boolean, found number"
    rows = {r["source_row"]: r for r in result.accepted.to_pylist()}
    assert rows[2]["completion"] == [{"role": "assistant", "content": "Santiago."}] and len(rows[2]["prompt"]) == 2
    assert rows[0]["label"] is True and rows[10]["label"] is False and rows[0]["id"] != rows[10]["id"]
    cleaned = clean_rows(result.accepted, DataConfig(), kind="unpaired")
    (empty,) = cleaned.quarantine.to_pylist()
    assert (empty["source_row"], empty["reason"], empty["table"]) == (6, "empty_turn", "unpaired")
    assert empty["detail"] == "completion has an empty or whitespace-only turn (turn 1 of 1, assistant)"


# ---------------------------------------------------------------- one split across tables


def _random_tables(rng: random.Random, n: int = 300) -> dict[str, tuple[pa.Table, str]]:
    """Three tables whose rows reuse a pool of openings: varied case and spacing, system prompts, later turns."""
    openings = [f"question number {k} about topic {rng.randint(0, 9)}" for k in range(60)]

    def opening() -> list[dict]:
        text = rng.choice(openings)
        text = rng.choice([text, text.upper(), "  " + text.replace(" ", "  ")])
        system = [{"role": "system", "content": "Be kind."}] if rng.random() < 0.3 else []
        later = (
            [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more?"}]
            if rng.random() < 0.3
            else []
        )
        return system + [{"role": "user", "content": text}] + later

    answer = [{"role": "assistant", "content": "an answer"}]
    pairs = [
        {"source": rng.choice(["p1", "p2"]), "prompt": opening(), "chosen": answer, "rejected": answer}
        for _ in range(n)
    ]
    sft = [{"source": "s1", "messages": opening() + answer} for _ in range(n)]
    unpaired = [
        {"source": "u1", "prompt": opening(), "completion": answer, "label": rng.random() < 0.5} for _ in range(n)
    ]
    return {
        name: (
            pa.Table.from_pylist(
                [dict(r, id=str(i), source_row=i, prompt_hash="h") for i, r in enumerate(rows)],
                schema=TABLES[name].schema,
            ),
            TABLES[name].split_column,
        )
        for name, rows in (("preference", pairs), ("sft", sft), ("unpaired", unpaired))
    }


def _splits_per_key(splits: dict) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name, table_splits in splits.items():
        for split, rows in zip(SPLITS, table_splits):
            for key in split_keys(rows[TABLES[name].split_column]):
                found.setdefault(key, set()).add(split)
    return found


@pytest.mark.parametrize("seed", range(5))
def test_one_split_across_tables_never_puts_an_opening_in_two_splits(seed):
    tables = _random_tables(random.Random(seed))
    splits = split_tables(tables, 0.2, 0.2, seed)
    per_key = _splits_per_key(splits)
    assert all(len(s) == 1 for s in per_key.values()), {k: s for k, s in per_key.items() if len(s) > 1}
    assert {s for held in per_key.values() for s in held} == set(SPLITS)  # every split drawn: the check can fail
    assert sum(t.num_rows for s in splits.values() for t in s) == sum(t.num_rows for t, _ in tables.values())


def test_a_source_keeping_its_own_test_split_pulls_its_openings_out_of_every_table():
    tables = _random_tables(random.Random(7))
    splits = split_tables(tables, 0.2, 0.2, 7, pinned={"p2": "test"})
    pinned = tables["preference"][0].filter(pa.compute.equal(tables["preference"][0]["source"], "p2"))
    held = set(split_keys(pinned["prompt"]))
    assert all(len(s) == 1 for s in _splits_per_key(splits).values())
    for name, table_splits in splits.items():
        column = TABLES[name].split_column
        assert not held & set(split_keys(table_splits.train[column])), name
        assert not held & set(split_keys(table_splits.validation[column])), name
        assert set(split_keys(table_splits.test[column])) == held & set(split_keys(tables[name][0][column]))
    assert splits["sft"].validation.num_rows > 0  # validation is still drawn from the rest


# ---------------------------------------------------------------- python -m flows.ingest


def test_ingest_flow_writes_every_table_with_reconciliation_per_table(tmp_path):
    recipe = {
        "name": "mixed",
        "sources": [
            {
                "name": "real/ufb",
                "format": "ultrafeedback_binarized",
                "path": str(UFB_REAL),
                "options": {"keep_ties": True},
            },
            {"name": "demo/generic", "format": "generic", "path": str(ROOT / "examples" / "data" / "generic.jsonl")},
            {"name": "fx/sft", "format": "sft", "path": str(FIXTURES / "sft_rows.jsonl")},
            {"name": "real/sharegpt", "format": "sft", "path": str(SHAREGPT_REAL)},
            {"name": "fx/unpaired", "format": "unpaired", "path": str(FIXTURES / "unpaired_rows.jsonl")},
            {
                "name": "demo/unpaired",
                "format": "unpaired",
                "path": str(ROOT / "examples" / "data" / "unpaired.jsonl"),
            },
        ],
        "data": {"lengths": {"max_chars": 20000}},
    }
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    done = subprocess.run(
        [sys.executable, "-m", "flows.ingest", "--recipe", str(path), "--output", str(tmp_path / "data")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    version = Path(done.stdout.strip().splitlines()[-1])
    manifest = json.loads((version / "manifest.json").read_text())
    per_source, tables = manifest["counts"]["per_source"], manifest["counts"]["tables"]
    quarantine = pq.read_table(version / "quarantine.parquet").to_pylist()
    for name in ("preference", "sft", "unpaired"):
        folder = version / TABLES[name].folder
        written = {s: pq.read_table(folder / f"{s}.parquet").num_rows for s in SPLITS}
        assert written == {s: tables[name][s] for s in SPLITS}
        sources = {s: c for s, c in per_source.items() if c["table"] == name}
        assert sum(c["accepted"] for c in sources.values()) == sum(written.values()) > 0
        for source, c in sources.items():  # read = accepted + quarantined, per source, in every table
            assert c["read"] == c["accepted"] + c["quarantined"]
            assert c["quarantined"] == sum(q["source"] == source for q in quarantine)
            assert {q["table"] for q in quarantine if q["source"] == source} <= {name}
        assert manifest["contracts"][name]["success"], manifest["contracts"][name]
    assert per_source["fx/sft"] == {"table": "sft", "read": 17, "accepted": 7, "quarantined": 10}
    assert per_source["fx/unpaired"] == {"table": "unpaired", "read": 11, "accepted": 4, "quarantined": 7}
    assert per_source["real/sharegpt"]["accepted"] == 100
    docs = version / "data_docs"
    pages = {p.stem for p in (docs / "validations").rglob("*.html")}  # validations/<suite>/<view>/.../<suite>-<view>
    assert {f"{t}-{v}" for t in TABLES for v in ("rows", "splits", "sources", "quarantine")} == pages
    page = (docs / "quarantine.html").read_text(encoding="utf-8")
    assert "fx/unpaired" in page and "<td>unpaired</td>" in page and "label: expected boolean, found string" in page


# ---------------------------------------------------------------- the SFT stage's rows


def test_sft_stage_trains_on_the_sft_table_plus_prompt_and_chosen_of_the_pairs(tiny_dataset, tiny_recipe):
    from tasks.training.sft import sft_examples

    sft_rows = pq.read_table(tiny_dataset / "sft" / "train.parquet").to_pylist()
    pairs = pq.read_table(tiny_dataset / "train.parquet").num_rows
    both = sft_examples(tiny_recipe, tiny_dataset, "train")
    assert len(sft_rows) > 0 and len(both) == pairs + len(sft_rows)
    assert both[-1] == {"prompt": sft_rows[-1]["messages"][:-1], "completion": sft_rows[-1]["messages"][-1:]}
    alone = sft_examples(
        tiny_recipe.model_copy(update={"sft": tiny_recipe.sft.model_copy(update={"from_pairs": False})}),
        tiny_dataset,
        "train",
    )
    assert alone == both[pairs:]
    validation = pq.read_table(tiny_dataset / "sft" / "validation.parquet").num_rows
    assert (
        len(sft_examples(tiny_recipe, tiny_dataset, "validation"))
        == validation + pq.read_table(tiny_dataset / "validation.parquet").num_rows
    )


def test_sft_extra_sources_is_gone_from_recipes():
    base = {"name": "t", "sources": [{"name": "a", "format": "sft", "path": "x.jsonl"}]}
    with pytest.raises(RecipeError, match=r"sft\.extra_sources: unknown key"):
        parse_recipe({**base, "sft": {"extra_sources": [{"path": "x.jsonl"}]}})
    assert parse_recipe(base).sft.from_pairs is True


# ---------------------------------------------------------------- hub recipes, offline


def _trl_fields(method: str) -> set[str]:
    from tasks.training.stage import METHODS, config_fields

    return config_fields(METHODS[method].config)


def test_zephyr_recipe_loads_offline_with_the_handbook_values():
    r = load_recipe(ROOT / "recipes" / "zephyr-7b-dpo-qlora.yaml")
    hub = {s.name: (s.format, s.hub.path, s.hub.split, s.split) for s in r.sources}
    assert hub == {
        "ultrachat_200k/train_sft": ("sft", "HuggingFaceH4/ultrachat_200k", "train_sft", None),
        "ultrachat_200k/test_sft": ("sft", "HuggingFaceH4/ultrachat_200k", "test_sft", "test"),
        "ultrafeedback_binarized/train_prefs": (
            "ultrafeedback_binarized",
            "HuggingFaceH4/ultrafeedback_binarized",
            "train_prefs",
            None,
        ),
        "ultrafeedback_binarized/test_prefs": (
            "ultrafeedback_binarized",
            "HuggingFaceH4/ultrafeedback_binarized",
            "test_prefs",
            "test",
        ),
    }
    dpo = r.dpo.args
    assert (dpo["beta"], dpo["learning_rate"], dpo["lr_scheduler_type"], dpo["warmup_steps"]) == (
        0.01,
        5e-6,
        "cosine",
        0.1,
    )
    assert (dpo["num_train_epochs"], dpo["max_length"]) == (1, 1024)
    assert (r.dpo.lora.r, r.dpo.lora.quantization, r.model.name_or_path) == (128, "4bit", "mistralai/Mistral-7B-v0.1")
    assert set(r.sft.args) <= _trl_fields("sft") and set(dpo) <= _trl_fields("dpo")  # TRL 1.16 spellings


def test_mistral_orca_recipe_loads_offline_and_strips_answer_edges():
    r = load_recipe(ROOT / "recipes" / "mistral-7b-orca-dpo-qlora.yaml")
    (src,) = r.sources
    assert (src.format, src.hub.path, src.typed_options().strip_answer_edges) == (
        "orca_dpo_pairs",
        "Intel/orca_dpo_pairs",
        True,
    )
    assert (r.dpo.lora.quantization, r.dpo.model) == ("4bit", "mistralai/Mistral-7B-Instruct-v0.2")
    assert set(r.dpo.args) <= _trl_fields("dpo")


def test_zephyr_recipe_keeps_the_sources_own_test_splits_on_local_rows_of_their_formats(tmp_path):
    from tasks.data.dataset import build_dataset

    data = load_recipe(ROOT / "recipes" / "zephyr-7b-dpo-qlora.yaml").model_dump(mode="json")
    local = {  # the recipe's sources, hub locations swapped for local rows of the same formats
        "ultrachat_200k/train_sft": FIXTURES / "ultrachat_sft.jsonl",
        "ultrachat_200k/test_sft": FIXTURES / "sft_rows.jsonl",
        "ultrafeedback_binarized/train_prefs": ROOT / "examples" / "data" / "ultrafeedback_binarized.jsonl",
        "ultrafeedback_binarized/test_prefs": UFB_REAL,
    }
    for src in data["sources"]:
        src.update(hub=None, path=str(local[src["name"]]))
        if src["format"] == "ultrafeedback_binarized":
            src["options"] = {"keep_ties": True}  # the real row is a tie
    recipe = parse_recipe(data)
    dataset = build_dataset(recipe, tmp_path)
    test = pq.read_table(dataset.path / "test.parquet").to_pylist()
    assert [r["source"] for r in test] == ["ultrafeedback_binarized/test_prefs"]  # nothing re-split into test
    sft_test = {r["source"] for r in pq.read_table(dataset.path / "sft" / "test.parquet").to_pylist()}
    assert sft_test == {"ultrachat_200k/test_sft"}
    assert manifest_ok(dataset.manifest)


def manifest_ok(manifest: dict) -> bool:
    return (
        all(c["success"] for c in manifest["contracts"].values()) and manifest["counts"]["tables"]["sft"]["train"] > 0
    )
