"""`flows.score`: a registered reward model scores a file (real hh-rlhf rows, conversations JSON Lines); scores beside
the rows in Parquet, a histogram and summary in MLflow, pairwise accuracy on preference files."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
from serving_helpers import ROOT, readme_commands, register_tiny

from tasks.evaluation.metrics import preference_accuracy


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_recipe):
    previous = mlflow.get_tracking_uri()
    store = register_tiny(tmp_path_factory.mktemp("score"), tiny_recipe)
    yield store
    mlflow.set_tracking_uri(previous)


def expected_scores(folder: Path, conversations: list[list[dict]]) -> list[float]:
    from tasks.training.reward import RewardScorer

    return RewardScorer.load(folder)(conversations)


def scoring_run(run_id: str):
    client = mlflow.MlflowClient()
    return client.get_run(run_id), {a.path for a in client.list_artifacts(run_id, "score")}


def latest_scoring_run():
    runs = mlflow.search_runs(experiment_names=["align-score"], order_by=["start_time DESC"], output_format="list")
    return runs[0]


def test_score_real_hh_rows_writes_pair_scores_accuracy_histogram(registered, shared_data, tmp_path):
    from flows.score import score

    hh = shared_data / "hh-rlhf" / "harmless-base-test.head300.jsonl"
    out = tmp_path / "hh.parquet"
    # the first 24 real rows: long transcripts (~1.5k tokens each) are slow to score twice on a busy CPU
    result = score.fn(model="models:/tiny-reward@candidate", input_file=str(hh), output=str(out), limit=24)
    summary = result["summary"]
    table = pq.read_table(out)
    assert summary["input_format"] == "hh-rlhf" and summary["rows_read"] == 24
    assert table.num_rows == summary["rows_scored"] == 24 - summary["rows_skipped"] > 20
    rows = table.to_pylist()
    chosen = expected_scores(registered["models"]["reward"], [r["prompt"] + r["chosen"] for r in rows])
    rejected = expected_scores(registered["models"]["reward"], [r["prompt"] + r["rejected"] for r in rows])
    assert [r["reward_chosen"] for r in rows] == pytest.approx(chosen, abs=1e-6)
    assert [r["reward_rejected"] for r in rows] == pytest.approx(rejected, abs=1e-6)
    assert [r["reward_margin"] for r in rows] == pytest.approx([c - r for c, r in zip(chosen, rejected)], abs=1e-6)
    assert summary["pairwise_accuracy"] == pytest.approx(preference_accuracy(chosen, rejected))
    assert result["model"] == {
        "model_uri": "models:/tiny-reward@candidate",
        "model_name": "tiny-reward",
        "model_version": "1",
    }
    run, artifacts = scoring_run(latest_scoring_run().info.run_id)
    assert artifacts == {"score/histogram.png", "score/summary.json"}
    assert run.data.params["model_version"] == "1" and run.data.params["input_format"] == "hh-rlhf"
    assert run.data.metrics["pairwise_accuracy"] == pytest.approx(summary["pairwise_accuracy"])
    assert "pairwise_accuracy" in result["markdown"] and "tiny-reward` v1" in result["markdown"]


def test_score_conversations_jsonl_scores_each_shape_and_counts_bad_rows(registered, tmp_path):
    from flows.score import score

    prompt = [{"role": "user", "content": "What is 2 plus 2?"}]
    rows = [
        {"messages": prompt + [{"role": "assistant", "content": "4."}]},
        {"prompt": "What is 2 plus 2?", "answer": "I cannot help."},
        {"prompt": prompt, "completion": [{"role": "assistant", "content": "Five."}]},
        {"messages": prompt},  # no answer: skipped, counted
    ]
    path = tmp_path / "conversations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    result = score.fn(model="models:/tiny-reward/1", input_file=str(path), output=str(tmp_path / "c.parquet"))
    table = pq.read_table(tmp_path / "c.parquet").to_pylist()
    assert result["summary"]["input_format"] == "conversations" and result["summary"]["rows_skipped"] == 2
    assert [r["source_row"] for r in table] == [0, 1, 2] and [r["answer"] for r in table] == [
        "4.",
        "I cannot help.",
        "Five.",
    ]
    answers = [[{"role": "assistant", "content": r["answer"]}] for r in table]
    expected = expected_scores(registered["models"]["reward"], [prompt + a for a in answers])
    assert [r["score"] for r in table] == pytest.approx(expected, abs=1e-6)
    assert result["summary"]["score_max"] == pytest.approx(max(expected))
    assert {s["source_row"] for s in result["summary"]["skipped_examples"]} == {3, 4}
    with pytest.raises(ValueError, match="not a reward model"):
        score.fn(model="models:/tiny-dpo@champion", input_file=str(path), output=str(tmp_path / "d.parquet"))
    with pytest.raises(ValueError, match="nothing to score"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"messages": prompt}) + "\n")
        score.fn(model="models:/tiny-reward/1", input_file=str(bad), output=str(tmp_path / "b.parquet"))


@pytest.mark.slow
def test_readme_score_commands_run_as_flows_with_a_prefect_artifact(registered, tmp_path, monkeypatch):
    """The README's `python -m flows.score` lines, as a real flow run (Prefect's temporary server)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.score import main

    commands = readme_commands("python -m flows.score")
    assert len(commands) == 2
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the checkout
    monkeypatch.setenv("ALIGN_STATE", str(tmp_path / "state"))  # never a `make up` server of this checkout
    for words in commands:
        argv = [str(tmp_path / Path(w).name) if w.startswith("scores/") else w for w in words[3:]]
        result = main(argv)
        assert Path(result["output"]).is_file() and Path(result["output"]).parent == tmp_path
    assert "pairwise_accuracy" not in result["summary"] and result["summary"]["rows_scored"] == 5

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["scores-tiny-reward"]))
            )

    import asyncio

    found = asyncio.run(artifacts())
    assert len(found) >= 2 and "pairwise_accuracy" in "".join(a.data for a in found)


def test_score_command_missing_model_or_file_fails_in_one_line_before_prefect(registered, tmp_path, capsys):
    from flows.score import main

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "answer": "Hello"}) + "\n")
    for argv, said in (
        (["--model", "models:/tiny-reward@nope", "--input", str(path)], "--model models:/tiny-reward@nope: "),
        (["--model", "models:/tiny-reward/1", "--input", str(tmp_path / "missing.jsonl")], "no such file"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and said in err and "Traceback" not in err and "prefect:" not in err
