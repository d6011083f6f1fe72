"""Score a file with a registered reward model: conversations or preference pairs in, scores beside the rows out.

Inputs (``input_format``):
- ``conversations``: JSON Lines (or .json / .parquet) rows of ``{"messages": [...]}`` ending with the assistant
  answer, or ``{"prompt": str | messages, "answer" | "completion" | "response": str | messages}``. A row of
  another shape is skipped and counted (its line and why in the summary).
- any preference source format of the data plane (``hh-rlhf``, ``orca_dpo_pairs``, ``ultrafeedback``,
  ``ultrafeedback_binarized``, ``generic``): read by ``tasks.data.sources.read_source`` into canonical rows
  (quarantined rows counted); both answers of each pair are scored and pairwise accuracy is reported.
- ``auto`` (default): a first row with ``chosen``/``rejected`` holding an hh transcript is ``hh-rlhf``, one with
  any preference keys is ``generic``, anything else ``conversations``.

The model is any pyfunc URI MLflow resolves (``models:/<name>@<alias>``, ``models:/<name>/<version>``,
``runs:/<run>/model``); an alias is resolved to its version once, so the scores name the exact version.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.preference import MESSAGES

CONVERSATIONS = "conversations"
ANSWER_KEYS = ("answer", "completion", "response")
PAIR_KEYS = {"chosen", "rejected", "conversations", "preferred_output", "response_j", "response_k"}
CHUNK = 512  # rows per predict call: bounded memory on large files


@dataclass
class ScoreInput:
    """What a file holds, ready to score: ``pairs`` (canonical preference rows) or ``conversations``."""

    input_format: str
    table: pa.Table  # the rows written out with their scores
    prompts: list[list[dict]]
    answers: list[str]  # conversations: one per row; pairs: chosen answers then rejected answers
    rows_read: int
    skipped: list[dict] = field(default_factory=list)  # {source_row, reason}

    @property
    def pairs(self) -> bool:
        return self.input_format != CONVERSATIONS


def detect_format(path: Path) -> str:
    from tasks.data.sources import read_records
    from tasks.data.sources.hh_rlhf import is_transcript

    for _, record, _, _ in read_records(path):
        if record is None:
            continue
        keys = set(record)
        strings = {"chosen", "rejected"} <= keys and all(isinstance(record[k], str) for k in ("chosen", "rejected"))
        if strings and "prompt" not in keys and is_transcript(record["chosen"]):
            return "hh-rlhf"
        return "generic" if keys & PAIR_KEYS else CONVERSATIONS
    raise ValueError(f"{path}: no readable rows")


def _turns(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a string or a non-empty message list")
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: expected {{role, content}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def conversation_pair(record: dict) -> tuple[list[dict], str]:
    """(prompt messages, answer text) of one conversation row (shapes: module docstring)."""
    if "messages" in record:
        messages = _turns(record["messages"], "messages")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise ValueError("messages: must end with the assistant answer after at least one prompt turn")
        return messages[:-1], messages[-1]["content"]
    key = next((k for k in ANSWER_KEYS if k in record), None)
    if "prompt" not in record or key is None:
        raise ValueError(f"expected `messages`, or `prompt` with one of {', '.join(ANSWER_KEYS)}")
    answer = record[key]
    if isinstance(answer, list):
        turns = _turns(answer, key)
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise ValueError(f"{key}: expected one assistant message")
        answer = turns[0]["content"]
    if not isinstance(answer, str):
        raise ValueError(f"{key}: expected a string")
    return _turns(record["prompt"], "prompt"), answer


def read_conversations(path: Path, limit: int | None = None) -> ScoreInput:
    from itertools import islice

    from tasks.data.sources import read_records

    rows, prompts, answers, skipped, read = [], [], [], [], 0
    for source_row, record, _, error in islice(read_records(path), limit):
        read += 1
        try:
            if error is not None:
                raise ValueError(error[1])
            prompt, answer = conversation_pair(record)
        except ValueError as e:
            skipped.append({"source_row": source_row, "reason": str(e)[:300]})
            continue
        rows.append({"source_row": source_row, "prompt": prompt, "answer": answer})
        prompts.append(prompt)
        answers.append(answer)
    schema = pa.schema([("source_row", pa.int64()), ("prompt", MESSAGES), ("answer", pa.string())])
    return ScoreInput(CONVERSATIONS, pa.Table.from_pylist(rows, schema=schema), prompts, answers, read, skipped)


def read_pairs(path: Path, input_format: str, limit: int | None = None) -> ScoreInput:
    from schemas.data_config import SourceConfig
    from tasks.data.sources import read_source

    cfg = SourceConfig(name=f"score/{path.name}", format=input_format, path=str(path), limit=limit)
    result = read_source(cfg)
    table = result.accepted
    prompt, chosen, rejected = (table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected"))
    answers = [_single_answer(a) for a in chosen] + [_single_answer(a) for a in rejected]
    skipped = [
        {"source_row": r["source_row"], "reason": f"{r['reason']}: {r['detail']}"[:300]}
        for r in result.quarantine.select(["source_row", "reason", "detail"]).to_pylist()
    ]
    return ScoreInput(input_format, table, prompt + prompt, answers, result.rows_read, skipped)


def _single_answer(answer: list[dict]) -> str:
    """A canonical answer is one assistant turn (the adapters check it)."""
    return answer[-1]["content"]


def read_input(path: Path, input_format: str = "auto", limit: int | None = None) -> ScoreInput:
    """The rows of ``path`` (the first ``limit`` only, when given) in ``input_format`` (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    fmt = detect_format(path) if input_format == "auto" else input_format
    return read_conversations(path, limit) if fmt == CONVERSATIONS else read_pairs(path, fmt, limit)


# ---------------------------------------------------------------- the model


def resolve_model(model_uri: str) -> tuple[str, dict]:
    """A fixed URI for ``model_uri`` (an alias pinned to its version) and what it names."""
    if not model_uri.startswith("models:/"):
        return model_uri, {"model_uri": model_uri}
    from mlflow.store.artifact.utils.models import get_model_name_and_version
    from mlflow.tracking import MlflowClient

    name, version = get_model_name_and_version(MlflowClient(), model_uri)
    return f"models:/{name}/{version}", {"model_uri": model_uri, "model_name": name, "model_version": str(version)}


def score_pairs(model, prompts: list[list[dict]], answers: list[str], batch_size: int = 16) -> list[float]:
    """Scores of (prompt, answer) pairs from a loaded reward pyfunc, ``CHUNK`` rows per call."""
    import pandas as pd

    out: list[float] = []
    for i in range(0, len(answers), CHUNK):
        frame = pd.DataFrame({"prompt": prompts[i : i + CHUNK], "answer": answers[i : i + CHUNK]})
        out.extend(float(s) for s in np.asarray(model.predict(frame, params={"batch_size": batch_size})).ravel())
    return out


# ---------------------------------------------------------------- results


def with_scores(data: ScoreInput, scores: list[float]) -> pa.Table:
    if not data.pairs:
        return data.table.append_column("score", pa.array(scores, pa.float64()))
    n = data.table.num_rows
    chosen, rejected = np.asarray(scores[:n]), np.asarray(scores[n:])
    table = data.table.append_column("reward_chosen", pa.array(chosen, pa.float64()))
    table = table.append_column("reward_rejected", pa.array(rejected, pa.float64()))
    return table.append_column("reward_margin", pa.array(chosen - rejected, pa.float64()))


def _stats(prefix: str, values) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    q = np.quantile(v, [0.05, 0.5, 0.95])
    return {
        f"{prefix}mean": float(v.mean()),
        f"{prefix}std": float(v.std()),
        f"{prefix}min": float(v.min()),
        f"{prefix}p05": float(q[0]),
        f"{prefix}median": float(q[1]),
        f"{prefix}p95": float(q[2]),
        f"{prefix}max": float(v.max()),
    }


def summarise(data: ScoreInput, scored: pa.Table, seconds: float) -> dict:
    from tasks.evaluation.metrics import preference_accuracy

    out = {
        "input_format": data.input_format,
        "rows_read": data.rows_read,
        "rows_scored": scored.num_rows,
        "rows_skipped": len(data.skipped),
        "conversations_scored": len(data.answers),
        "seconds": round(seconds, 3),
        "conversations_per_s": round(len(data.answers) / max(seconds, 1e-9), 2),
    }
    if not data.pairs:
        return out | _stats("score_", scored.column("score").to_numpy())
    chosen, rejected = scored.column("reward_chosen").to_numpy(), scored.column("reward_rejected").to_numpy()
    return (
        out
        | {"pairwise_accuracy": preference_accuracy(list(chosen), list(rejected))}
        | _stats("margin_", chosen - rejected)
        | _stats("chosen_", chosen)
        | _stats("rejected_", rejected)
    )


def histogram(scored: pa.Table, pairs: bool, title: str):
    """A matplotlib figure: the score distribution (pairs: chosen vs rejected, and the margins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.evaluation.metrics import preference_accuracy

    if not pairs:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(scored.column("score").to_numpy(), bins=30, color="tab:blue")
        ax.set_xlabel("score")
        ax.set_ylabel("conversations")
        ax.set_title(title)
        fig.tight_layout()
        return fig
    chosen, rejected = scored.column("reward_chosen").to_numpy(), scored.column("reward_rejected").to_numpy()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    bins = np.histogram_bin_edges(np.concatenate([chosen, rejected]), bins=30)
    left.hist(chosen, bins=bins, alpha=0.6, label="chosen", color="tab:green")
    left.hist(rejected, bins=bins, alpha=0.6, label="rejected", color="tab:red")
    left.set_xlabel("score")
    left.set_ylabel("pairs")
    left.legend()
    left.set_title(title)
    right.hist(chosen - rejected, bins=30, color="tab:blue")
    right.axvline(0.0, color="black", linewidth=1)
    right.set_xlabel("margin (chosen - rejected)")
    right.set_title(f"pairwise accuracy {preference_accuracy(list(chosen), list(rejected)):.3f}")
    fig.tight_layout()
    return fig


def default_output(input_path: Path) -> Path:
    """``<stem>.scores.parquet`` in the working directory (``x.jsonl.gz`` → ``x.scores.parquet``)."""
    name = Path(input_path).name
    for suffix in (".jsonl.gz", ".jsonl", ".json", ".parquet"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return Path.cwd() / f"{name}.scores.parquet"


def markdown(summary: dict, model: dict, output: Path) -> str:
    who = f"`{model['model_name']}` v{model['model_version']}" if "model_name" in model else f"`{model['model_uri']}`"
    lines = [f"# Scores by {who}", "", f"Written to `{output}`.", "", "| metric | value |", "|---|---|"]
    shown = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in shown.items()]
    skipped = summary.get("skipped_examples") or []
    if skipped:
        lines += [
            "",
            "Skipped rows (first ones): " + "; ".join(f"row {s['source_row']}: {s['reason']}" for s in skipped),
        ]
    return "\n".join(lines)


def score_file(
    model_uri: str,
    input_path: Path,
    output: Path | None = None,
    input_format: str = "auto",
    batch_size: int = 16,
    limit: int | None = None,
) -> dict:
    """Score ``input_path`` with the reward model at ``model_uri``, write Parquet, log to MLflow; the summary."""
    from tasks.serving.pyfunc import REWARD, load_registered

    data = read_input(Path(input_path), input_format, limit)
    if not data.answers:
        raise ValueError(f"{input_path}: nothing to score ({data.rows_read} rows read, {len(data.skipped)} skipped)")
    uri, model = resolve_model(model_uri)
    loaded, kind = load_registered(uri)
    if kind != REWARD:
        raise ValueError(f"{model_uri}: a {kind} model, not a reward model (give a `-reward` version)")
    started = time.perf_counter()
    scores = score_pairs(loaded, data.prompts, data.answers, batch_size)
    seconds = time.perf_counter() - started
    scored = with_scores(data, scores)
    output = Path(output) if output else default_output(Path(input_path))
    output.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(scored, output)
    summary = summarise(data, scored, seconds)
    log_scoring(summary, model, Path(input_path), output, histogram(scored, data.pairs, Path(input_path).name))
    summary["skipped_examples"] = data.skipped[:5]
    return {"summary": summary, "model": model, "output": str(output), "markdown": markdown(summary, model, output)}


def log_scoring(summary: dict, model: dict, input_path: Path, output: Path, figure) -> str:
    """One MLflow run in the active experiment: params (model, input), metrics, histogram PNG, summary JSON."""
    import matplotlib.pyplot as plt
    import mlflow

    from tasks.data.sources.readers import file_sha256
    from tasks.registry.tracking import log_summary

    name = model.get("model_name", "model")
    run_name = f"score-{name}-v{model['model_version']}" if "model_version" in model else f"score-{name}"
    tags = {"align.scored_model": model["model_uri"], **{f"align.{k}": v for k, v in model.items()}}
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        mlflow.log_params(
            {
                **model,
                "input": str(input_path.resolve()),
                "input_sha256": file_sha256(input_path),
                "input_format": summary["input_format"],
                "output": str(output.resolve()),
            }
        )
        log_summary(summary)
        mlflow.log_figure(figure, "score/histogram.png")
        mlflow.log_dict(summary, "score/summary.json")
        plt.close(figure)
    return run.info.run_id
