"""tasks/data/contracts.py: the shipped suite loads, a clean split passes, each critical rule breached alone fails
naming the rule, the count and a row, warnings report without failing, Data Docs and the Prefect artifact exist."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from schemas.preference import PREFERENCE_SCHEMA, QUARANTINE_SCHEMA, content_id, prompt_hash
from tasks.data.contracts import (
    ContractBreach,
    ContractResult,
    SuiteError,
    build_views,
    describe_breach,
    load_suite,
    publish_contract_artifact,
    publish_summary_artifact,
    run_contract,
)

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "data_contracts" / "preference.yaml"
SOURCES = ["demo/a", "demo/b"]
PARAMS = {
    "test_fraction": 0.1,
    "validation_fraction": 0.1,
    "split_tolerance": 0.05,
    "min_chars": 1,
    "max_chars": 200,
    "allowed_sources": SOURCES,
}


def make_row(i: int, source: str = "demo/a", prompt=None, chosen=None, rejected=None, **fields) -> dict:
    """A valid canonical row; ids and hashes from schemas.preference unless overridden."""
    prompt = prompt or [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {i}?"}]
    chosen = chosen or [{"role": "assistant", "content": f"A helpful answer to {i}."}]
    rejected = rejected or [{"role": "assistant", "content": f"An unhelpful answer to {i}."}]
    row = {
        "id": content_id(prompt, chosen, rejected),
        "source": source,
        "source_row": i,
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "score_chosen": 8.0 if i % 2 else None,
        "score_rejected": 3.0 if i % 2 else None,
        "prompt_hash": prompt_hash(prompt),
    }
    return {**row, **fields}


def make_tables(
    train_rows: list[dict],
    test_rows: list[dict],
    quarantine_rows: list[dict] | None = None,
    validation_rows: list[dict] | None = None,
) -> tuple[dict[str, pa.Table], pa.Table]:
    """({train, validation, test}, quarantine); validation defaults to the last two train rows."""
    if validation_rows is None:
        train_rows, validation_rows = train_rows[:-2], train_rows[-2:]
    splits = {
        name: pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA)
        for name, rows in (("train", train_rows), ("validation", validation_rows), ("test", test_rows))
    }
    return splits, pa.Table.from_pylist(quarantine_rows or [], schema=QUARANTINE_SCHEMA)


def counts_for(splits: dict[str, pa.Table], quarantine: pa.Table) -> dict:
    """Reconciliation counts that agree with the tables (read = accepted + quarantined)."""
    per: dict[str, dict[str, int]] = {}
    tables = [(t, "accepted") for t in splits.values()] + [(quarantine, "quarantined")]
    for table, key in tables:
        for source in table["source"].to_pylist():
            entry = per.setdefault(source, {"read": 0, "accepted": 0, "quarantined": 0})
            entry[key] += 1
            entry["read"] += 1
    return {"per_source": per}


def clean_rows(n: int = 20) -> tuple[list[dict], list[dict], list[dict]]:
    """n accepted rows over two sources (test = every 10th) and one quarantined row."""
    rows = [make_row(i, source=SOURCES[i % 2]) for i in range(n)]
    quarantine = [
        {"source": "demo/a", "source_row": n, "reason": "too_long", "detail": "turn 2: 9001 chars", "raw": "{}"}
    ]
    return [r for i, r in enumerate(rows) if i % 10], [r for i, r in enumerate(rows) if not i % 10], quarantine


def run(
    train_rows,
    test_rows,
    quarantine_rows=None,
    counts=None,
    docs_dir=None,
    params=PARAMS,
    suite=SUITE,
    validation_rows=None,
) -> ContractResult:
    """The contract on train/test rows; validation = the last two train rows unless given."""
    splits, quarantine = make_tables(train_rows, test_rows, quarantine_rows, validation_rows)
    counts = counts if counts is not None else counts_for(splits, quarantine)
    return run_contract(splits, quarantine, counts, suite, docs_dir, params)


# ------------------------------------------------------------------------------------------------ suite


def test_load_suite_shipped_preference_yaml_loads_with_all_views():
    suite = load_suite(SUITE)
    assert {e.view for e in suite.expectations} == {"rows", "splits", "sources", "quarantine"}
    assert {e.severity for e in suite.expectations} == {"critical", "warning"}


def test_load_suite_unknown_key_names_file_expectation_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SUITE.read_text().replace("    kwargs: {column: id}\n", "    kwargz: {column: id}\n", 1))
    with pytest.raises(SuiteError, match=r"bad\.yaml: expectation 'id_not_null' \(expectations\[0\]\) key 'kwargz'"):
        load_suite(bad)


def test_load_suite_unknown_expectation_type_names_id_and_type(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SUITE.read_text().replace("expect_column_values_to_be_unique\n", "expect_column_to_be_lovely\n"))
    with pytest.raises(SuiteError, match=r"expectation 'id_unique'.*'expect_column_to_be_lovely'"):
        load_suite(bad)


def test_load_suite_malformed_placeholder_names_expectation(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SUITE.read_text().replace('"${max_chars}"', '"${max_chars +}"'))
    with pytest.raises(SuiteError, match=r"expectation 'turn_max_chars'.*max_chars \+"):
        load_suite(bad)


def test_run_contract_unknown_column_names_expectation_and_view_columns(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SUITE.read_text().replace("{column: prompt_last_role,", "{column: prompt_lst_role,"))
    with pytest.raises(
        SuiteError,
        match=r"'prompt_ends_with_user': view 'rows' has no column 'prompt_lst_role'.*"
        r"'prompt_last_role'",
    ):
        run(*clean_rows(), suite=bad)


def test_run_contract_expectation_gx_cannot_evaluate_fails_with_its_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SUITE.read_text().replace("{column: source_row, min_value: 0}", "{column: source, min_value: 0}"))
    result = run(*clean_rows(), suite=bad)
    assert [f["name"] for f in result.critical_failures] == ["source_row_non_negative"]
    with pytest.raises(ContractBreach, match=r"source_row_non_negative \[rows\]: observed 'error: .*same type"):
        result.raise_for_critical()


def test_run_contract_missing_param_names_expectation_and_param():
    train, test, quarantine = clean_rows()
    params = {k: v for k, v in PARAMS.items() if k != "allowed_sources"}
    with pytest.raises(SuiteError, match=r"expectation 'source_allowed'.*param 'allowed_sources'"):
        run(train, test, quarantine, params=params)


# ------------------------------------------------------------------------------------------------ views


def test_build_views_rows_derive_flat_columns_from_messages():
    row = make_row(
        0,
        prompt=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ],
    )
    splits, quarantine = make_tables([row], [make_row(1)], validation_rows=[make_row(2)])
    rows = build_views(splits, quarantine, {"per_source": {}})["rows"].to_pylist()
    assert rows[0]["prompt_last_role"] == "user" and rows[0]["prompt_turns"] == 3
    assert (rows[0]["min_turn_chars"], rows[0]["max_turn_chars"]) == (2, 25)
    assert [r["split"] for r in rows] == ["train", "validation", "test"]
    assert not rows[0]["answers_identical"] and not rows[0]["prompt_hash_other_split"]
    assert not any(r["split_key_other_split"] for r in rows)


# ----------------------------------------------------------------------------------------------- outcomes


def test_run_contract_clean_splits_succeeds_without_warnings():
    result = run(*clean_rows())
    assert result.success, result.critical_failures
    assert result.warnings == []
    result.raise_for_critical()
    totals = result.summary["totals"]
    assert totals["passed"] == totals["expectations"] == len(load_suite(SUITE).expectations)
    assert totals["rows"] == {"train": 16, "validation": 2, "test": 2, "quarantine": 1}


def _breach(case: str):
    """(train, test, quarantine, counts) for one critical rule broken alone; the bad row is train[0]."""
    train, test, quarantine = clean_rows()
    counts = None
    assistant = [{"role": "assistant", "content": "Same answer."}]
    if case == "id_not_null":
        train[0] = {**train[0], "id": None}
    elif case == "chosen_all_assistant":
        train[0] = make_row(1, source="demo/b", chosen=[{"role": "user", "content": "I answer as the user."}])
    elif case == "prompt_ends_with_user":
        train[0] = make_row(
            1, source="demo/b", prompt=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        )
    elif case == "answers_differ":
        train[0] = make_row(1, source="demo/b", chosen=assistant, rejected=assistant)
    elif case == "turn_max_chars":
        train[0] = make_row(1, source="demo/b", chosen=[{"role": "assistant", "content": "x" * 201}])
    elif case == "id_unique":
        train[1] = {**train[1], "id": train[0]["id"]}
    elif case == "source_allowed":
        train[0] = {**train[0], "source": "mystery/source"}
    elif case == "prompt_hash_one_split":
        train[0] = make_row(1, source="demo/b", prompt=test[0]["prompt"])
    elif case == "opening_turn_one_split":  # a multi-turn train row opening with a test prompt
        opening = [m for m in test[0]["prompt"] if m["role"] == "user"][:1]
        more = [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": "And then?"}]
        train[0] = make_row(1, source="demo/b", prompt=opening + more)
    elif case == "sources_reconciled":
        splits, q = make_tables(train, test, quarantine)
        counts = counts_for(splits, q)
        counts["per_source"]["demo/b"]["read"] += 1
    return train, test, quarantine, counts


@pytest.mark.parametrize(
    "case",
    [
        "id_not_null",
        "chosen_all_assistant",
        "prompt_ends_with_user",
        "answers_differ",
        "turn_max_chars",
        "id_unique",
        "source_allowed",
        "prompt_hash_one_split",
        "opening_turn_one_split",
        "sources_reconciled",
    ],
)
def test_run_contract_critical_rule_breached_raises_naming_rule_count_and_row(case):
    train, test, quarantine, counts = _breach(case)
    result = run(train, test, quarantine, counts=counts)
    assert not result.success
    also = ["opening_turn_one_split"] if case == "prompt_hash_one_split" else []  # one prompt, one opening
    assert [f["name"] for f in result.critical_failures] == [case, *also]
    failure = result.critical_failures[0]
    expected_count = 2 if case in ("id_unique", "prompt_hash_one_split", "opening_turn_one_split") else 1  # both
    example = {"id_not_null": "demo/b:1", "sources_reconciled": "demo/b"}.get(case, train[0]["id"])
    assert failure["unexpected_count"] == expected_count and example in failure["unexpected_ids"]
    with pytest.raises(ContractBreach) as breach:
        result.raise_for_critical()
    message = str(breach.value)
    assert f"{case} [" in message and f"{expected_count} unexpected row(s)" in message and example in message


def test_run_contract_warning_only_breach_reports_and_succeeds():
    train, test, quarantine = clean_rows()
    quarantine[0] = {**quarantine[0], "reason": "felt_wrong"}
    result = run(train, test, quarantine)
    assert result.success
    assert [w["name"] for w in result.warnings] == ["quarantine_reason_known"]
    assert result.warnings[0]["unexpected_ids"] == ["demo/a:20"]
    result.raise_for_critical()  # warnings never raise


ORCA_REAL = REPO.parent / "shared" / "data" / "orca_dpo_pairs" / "train.head50.jsonl"


@pytest.mark.parametrize("strip", [False, True])
def test_run_contract_orca_real_rows_side_asymmetry_warned_with_counts_unless_stripped(strip):
    from schemas.data_config import SourceConfig
    from tasks.data.sources import read_source

    options = {"strip_answer_edges": True} if strip else {}
    cfg = SourceConfig(name="orca", format="orca_dpo_pairs", path=str(ORCA_REAL), options=options)
    source = read_source(cfg)
    rows = source.accepted.to_pylist()
    result = run(rows[5:], rows[:5], params={**PARAMS, "max_chars": 10_000, "allowed_sources": ["orca"]})
    assert result.success, result.critical_failures
    warned = {w["name"]: w for w in result.warnings}
    # Length: upstream's rejected answers are longer on average (ratio 0.60), stripped or not.
    assert warned["length_ratio_balanced"]["unexpected_rows"][0]["length_ratio"] == pytest.approx(0.601, abs=1e-3)
    if strip:
        assert "leading_whitespace_balanced" not in warned and "trailing_whitespace_balanced" not in warned
        return
    counts = {"row_ref": "orca", "rows_in_splits": 50, "chosen_leading_ws": 0, "rejected_leading_ws": 50}
    assert warned["leading_whitespace_balanced"]["unexpected_rows"] == [counts]
    assert "trailing_whitespace_balanced" not in warned
    message = [describe_breach(w) for w in result.warnings if w["name"] == "leading_whitespace_balanced"]
    assert message and "orca (rows_in_splits=50, chosen_leading_ws=0, rejected_leading_ws=50)" in message[0]


def test_run_contract_holdout_share_off_is_warning_on_small_data_and_critical_on_large():
    small_train, small_test, quarantine = clean_rows(20)
    params = {**PARAMS, "split_tolerance": 0.04}
    small = run(small_train + small_test[1:], small_test[:1], quarantine, params=params)  # 1 of 20: 5% ∉ 10% ± 4%
    assert small.success and [w["name"] for w in small.warnings] == ["test_share_within_tolerance"]
    rows = [make_row(i, source=SOURCES[i % 2]) for i in range(1000)]
    large = run(rows[120:], rows[:20], params=params, validation_rows=rows[20:120])  # 2% test share
    assert [f["name"] for f in large.critical_failures] == ["test_share_within_tolerance"]
    assert large.critical_failures[0]["observed"] == [0.02]
    off = run(rows[120:], rows[:100], params=params, validation_rows=rows[100:120])  # 2% validation share
    assert [f["name"] for f in off.critical_failures] == ["validation_share_within_tolerance"]


def test_run_contract_docs_dir_writes_data_docs_index(tmp_path):
    result = run(*clean_rows(), docs_dir=tmp_path / "data_docs")
    assert result.docs_index == tmp_path / "data_docs" / "index.html"
    assert result.docs_index.is_file() and "preference" in result.docs_index.read_text()


# ----------------------------------------------------------------------------------------------- prefect


def test_publish_contract_artifact_bad_key_names_the_fix():
    with pytest.raises(ValueError, match=r"'data-contract-v1'"):
        publish_contract_artifact(ContractResult(True, {}, [], []), "Data_Contract v1!")


@pytest.fixture(scope="module")
def prefect_api():
    """A temporary Prefect API on a temporary SQLite database (PREFECT_HOME is set by conftest)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


# Prefect 3.8 warns (FutureWarning) that artifacts outside a flow/task run are deprecated; they still work.
@pytest.mark.filterwarnings("ignore:Artifact creation outside of a flow or task run:FutureWarning")
def test_publish_contract_artifact_inside_and_outside_flow_creates_table(prefect_api):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    train, test, quarantine = clean_rows()
    quarantine[0] = {**quarantine[0], "reason": "felt_wrong"}
    result = run(train, test, quarantine)

    @flow
    def ingest_stub():
        publish_contract_artifact(result, "data-contract")

    ingest_stub()
    publish_summary_artifact(json.loads(json.dumps(result.summary)), "data-contract-outside")  # as in manifest
    with get_client(sync_client=True) as client:
        keys = ["data-contract", "data-contract-outside"]
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    assert sorted(a.key for a in found) == keys
    assert all("quarantine_reason_known" in str(a.data) and "warning" in a.description for a in found)
