"""Registered versions are MLflow models that load, serve over HTTP and chat (the README's commands, run here).

The tiny models are registered as `align` registers them (tasks.registry.versions) under the README's names in a
temporary store; `mlflow models serve` runs on free loopback ports and is always stopped.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
from serving_helpers import readme_commands, readme_python, register_tiny

from tasks.serving import pyfunc

QUESTION = [{"role": "user", "content": "What is 2 plus 2?"}]


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_recipe):
    previous = mlflow.get_tracking_uri()
    store = register_tiny(tmp_path_factory.mktemp("serving"), tiny_recipe)
    yield store
    mlflow.set_tracking_uri(previous)


def in_process_answers(folder: Path, conversations: list[list[dict]], **settings) -> list[str]:
    """What the stage folder's own generator answers (tasks.training.generation), no MLflow involved."""
    from schemas.cai_config import GenerationSpec
    from tasks.training.generation import load_generator

    generator = load_generator(str(folder), GenerationSpec(**settings), progress=False)
    return [o.text for o in generator(conversations)]


def in_process_scores(folder: Path, conversations: list[list[dict]]) -> list[float]:
    from tasks.training.reward import RewardScorer

    return RewardScorer.load(folder)(conversations)


def test_registered_versions_are_mlflow_models_with_signature_example_pinned_requirements(registered):
    from mlflow.models import Model

    client = mlflow.MlflowClient()
    for name, kind, inputs in (("tiny-dpo", "policy", {"messages", "prompt"}), ("tiny-reward", "reward", {"prompt"})):
        mv = client.get_model_version_by_alias(name, "champion")
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion"))
        meta = Model.load(str(local))
        assert meta.metadata["align_kind"] == kind and "python_function" in meta.flavors
        assert inputs <= set(meta.signature.inputs.input_names()) and meta.saved_input_example_info
        assert (local / "serving_input_example.json").is_file()
        hf = local / pyfunc.HF_SUBPATH
        stage = registered["models"]["dpo" if kind == "policy" else "reward"]
        assert sorted(p.name for p in hf.iterdir()) == sorted(p.name for p in stage.iterdir())
        assert not any(p.name == "config.json" for p in local.iterdir())  # the HF folder is there once, not twice
        reqs = (local / "requirements.txt").read_text().split()
        assert "mlflow==3.17.2" in reqs and any(r.startswith("torch==") for r in reqs)
        assert all("==" in r for r in reqs), reqs
        assert mv.source == f"runs:/{mv.run_id}/model"


def test_readme_load_snippets_load_the_hf_folder_and_the_pyfuncs(registered):
    from transformers import PreTrainedModel

    namespace: dict = {}
    exec(readme_python("artifacts/hf"), namespace)  # noqa: S102 - the README's own snippet
    assert isinstance(namespace["model"], PreTrainedModel) and namespace["tok"].chat_template
    assert Path(namespace["path"]).name == "hf" and (Path(namespace["path"]) / "config.json").is_file()
    exec(readme_python("mlflow.pyfunc.load_model"), namespace)  # noqa: S102
    answers, scores = namespace["answers"], namespace["scores"]
    assert isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)
    assert answers == in_process_answers(registered["models"]["dpo"], [QUESTION], max_new_tokens=32, temperature=0)
    expected = in_process_scores(
        registered["models"]["reward"],
        [QUESTION + [{"role": "assistant", "content": a}] for a in ("4.", "I cannot help.")],
    )
    assert list(scores) == pytest.approx(expected, abs=1e-6) and scores[0] != scores[1]


def test_pyfunc_policy_params_seeded_sampling_and_bad_rows(registered):
    chat = mlflow.pyfunc.load_model("models:/tiny-dpo/1")
    sampled = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "seed": 3}
    first = chat.predict([{"prompt": "What is 2 plus 2?"}], params=sampled)
    assert first == chat.predict([{"prompt": "What is 2 plus 2?"}], params=sampled) and first[0]
    assert first == in_process_answers(registered["models"]["dpo"], [QUESTION], **sampled)
    assert first != chat.predict([{"prompt": "What is 2 plus 2?"}], params={**sampled, "seed": 4})
    with pytest.raises(mlflow.exceptions.MlflowException, match="messages"):
        chat.predict([{"messages": [{"role": "user"}]}])


def test_versions_registered_as_plain_folders_still_load_chat_and_score(registered, tmp_path):
    """Versions registered before they were MLflow models (the HF folder itself at `model/`) still load."""
    client = mlflow.MlflowClient()
    for stage in ("dpo", "reward"):
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(registered["models"][stage]), artifact_path="model")
        client.create_registered_model(f"legacy-{stage}")
        client.create_model_version(f"legacy-{stage}", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    folder = Path(pyfunc.download_hf_model("models:/legacy-dpo/1", dst_path=str(tmp_path)))
    assert (folder / "config.json").is_file() and pyfunc.hf_folder(folder) == folder
    chat, kind = pyfunc.load_registered("models:/legacy-dpo/1")
    sampled = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "seed": 2}
    assert kind == "policy" and chat.predict([{"messages": QUESTION}], params=sampled) == in_process_answers(
        registered["models"]["dpo"], [QUESTION], **sampled
    )
    judge, kind = pyfunc.load_registered("models:/legacy-reward/1")
    pair = QUESTION + [{"role": "assistant", "content": "4."}]
    assert kind == "reward" and judge.predict([{"prompt": QUESTION, "answer": "4."}]) == pytest.approx(
        in_process_scores(registered["models"]["reward"], [pair]), abs=1e-6
    )


# ---------------------------------------------------------------- the servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, payload.encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def start_server(command: list[str], port: int, uri: str, log: Path) -> subprocess.Popen:
    """The README's serve command on ``port``, with this venv first on PATH (MLflow starts its uvicorn)."""
    words = [c if c != command[command.index("-p") + 1] else str(port) for c in command]
    words[0] = str(Path(sys.executable).parent / "mlflow")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with open(log, "wb") as out:
        return subprocess.Popen(words, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 300) -> float:
    started, deadline = time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - started
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"server on {port} not up after {timeout} s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (the CLI and the uvicorn it started), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def log_file(folder: Path, model_uri: str) -> Path:
    return folder / f"{model_uri.split('/')[1].split('@')[0]}.log"


def readme_requests() -> dict[int, str]:
    """README port → the JSON payload of its curl command."""
    out = {}
    for words in readme_commands("curl"):
        url = next(w for w in words if w.startswith("http://127.0.0.1:"))
        out[int(url.split(":")[2].split("/")[0])] = words[words.index("-d") + 1]
    return out


@pytest.mark.slow
def test_mlflow_models_serve_answers_chat_and_scoring_requests(registered, tmp_path):
    serve = {c[c.index("-m") + 1]: c for c in readme_commands("mlflow models serve")}
    assert set(serve) == {"models:/tiny-dpo@champion", "models:/tiny-reward@champion"}
    payloads, procs, ports = readme_requests(), {}, {}
    try:
        for uri, command in serve.items():
            ports[uri] = free_port()
            procs[uri] = start_server(command, ports[uri], registered["uri"], log_file(tmp_path, uri))
        startup = {uri: round(wait_ready(procs[uri], ports[uri], log_file(tmp_path, uri)), 1) for uri in serve}
        print(f"serve start-up (both started together): {startup}")
        by_model = {uri: int(c[c.index("-p") + 1]) for uri, c in serve.items()}
        policy_url = f"http://127.0.0.1:{ports['models:/tiny-dpo@champion']}/invocations"
        reward_url = f"http://127.0.0.1:{ports['models:/tiny-reward@champion']}/invocations"
        chat_payload = payloads[by_model["models:/tiny-dpo@champion"]]
        status, body = post(policy_url, chat_payload)
        assert status == 200 and isinstance(body["predictions"], list) and len(body["predictions"]) == 1
        assert all(isinstance(a, str) for a in body["predictions"])
        assert post(policy_url, chat_payload)[1] == body  # greedy: the same answer again
        request = json.loads(chat_payload)
        conversations = [r["messages"] for r in request["dataframe_records"]]
        expected = in_process_answers(registered["models"]["dpo"], conversations, **request["params"])
        assert body["predictions"] == expected
        sampled = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "seed": 3}
        status, body = post(policy_url, json.dumps({"dataframe_records": [{"prompt": "Hi"}] * 2, "params": sampled}))
        assert status == 200 and body["predictions"][0] and len(body["predictions"]) == 2
        hi = [[{"role": "user", "content": "Hi"}]] * 2
        assert body["predictions"] == in_process_answers(registered["models"]["dpo"], hi, **sampled)

        score_payload = payloads[by_model["models:/tiny-reward@champion"]]
        status, body = post(reward_url, score_payload)
        rows = json.loads(score_payload)["dataframe_records"]
        assert status == 200 and len(body["predictions"]) == len(rows)
        pairs = [r["prompt"] + [{"role": "assistant", "content": r["answer"]}] for r in rows]
        assert body["predictions"] == pytest.approx(in_process_scores(registered["models"]["reward"], pairs), abs=1e-6)
        status, body = post(reward_url, json.dumps({"dataframe_records": [{"prompt": "x", "answer": "y"}]}))
        assert status == 400 and "prompt" in body["message"]
    finally:
        for proc in procs.values():
            stop_server(proc)
    assert all(proc.poll() is not None for proc in procs.values())


def test_readme_chat_command_keeps_the_conversation_with_piped_stdin(registered):
    from flows.chat import main

    (words,) = readme_commands("printf")  # printf '<turns>' | python -m flows.chat --model ... --temperature 0
    typed, args = words[1].encode().decode("unicode_escape"), words[words.index("flows.chat") + 1 :]
    turns = [t for t in typed.splitlines() if t and not t.startswith("/")]
    out = io.StringIO()
    conversation = main(args, stdin=io.StringIO(typed), stdout=out)
    assert [m["role"] for m in conversation] == ["user", "assistant"] * len(turns) == ["user", "assistant"] * 2
    assert [m["content"] for m in conversation[::2]] == turns and out.getvalue().count("\nyou> ") == len(turns) + 1

    # sampled (non-empty answers from the random tiny model): turn 2 is answered in the context of turn 1
    out = io.StringIO()
    sampled = ["--temperature", "1.0", "--max-new-tokens", "8", "--seed", "5"]
    conversation = main(args + sampled, stdin=io.StringIO(typed), stdout=out)
    answers = [m["content"] for m in conversation[1::2]]
    assert all(answers) and all(f"assistant> {a}" in out.getvalue() for a in answers)
    chat = mlflow.pyfunc.load_model("models:/tiny-dpo@champion")
    params = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 0.95, "seed": 5}
    assert answers[1] == chat.predict([{"messages": conversation[:3]}], params=params)[0]
    assert answers[1] != chat.predict([{"messages": conversation[2:3]}], params=params)[0]
