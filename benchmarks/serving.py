"""Benchmark (not a test): logging a stage folder as an MLflow model, serving it, scoring over HTTP.

    .venv/bin/python -m benchmarks.serving [--folder PATH ...] [--requests 40] [--pairs 16] [--threads 1]
        [--only log|serve]

1. log: per folder (the tiny policy and reward models, plus any ``--folder``, e.g. a 517 MB SmolLM2 folder),
   wall time and peak RSS of today's ``tracking.log_model_folder`` (``log_hf_model``: the small pyfunc part +
   one upload of the folder) against plain ``mlflow.log_artifacts`` of the folder (what was logged before)
   and ``mlflow.pyfunc.log_model(artifacts=...)`` with the same signature and input example (copies the
   folder into a temporary model first, then loads it to validate the example). Each in its own process.
2. serve: ``mlflow models serve --env-manager local`` of the tiny reward model: seconds until /ping answers,
   then ``--requests`` sequential /invocations of ``--pairs`` real hh-rlhf pairs (requests/s, pairs/s),
   against in-process ``RewardScorer`` on the same pairs (the baseline). Both sides use ``--threads`` torch
   threads (OMP_NUM_THREADS for the server): on a 2-core machine shared with other jobs, 2 threads can be 10-20x
   slower than 1 (OpenMP spinning against the other load), which would measure the machine, not the server.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(tempfile.mkdtemp(prefix="align-bench-serving-"))
ENV = {
    "MLFLOW_TRACKING_URI": f"sqlite:///{WORK}/mlflow.db",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "PREFECT_HOME": str(WORK / "prefect"),
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(ENV)
HH = ROOT / "examples" / "data" / "hh-rlhf.jsonl"
METHODS = ("log_artifacts", "log_model_folder", "pyfunc.log_model")


def log_once(folder: Path, method: str) -> dict:
    """One logging of ``folder`` by ``method`` in this process: seconds and peak RSS (MB)."""
    import mlflow

    from tasks.registry.tracking import log_model_folder, use_experiment
    from tasks.serving import pyfunc

    use_experiment("bench-serving")
    with mlflow.start_run():
        started = time.perf_counter()
        if method == "log_artifacts":
            mlflow.log_artifacts(str(folder), artifact_path="model")
        elif method == "log_model_folder":
            log_model_folder(folder)
        else:
            kind = pyfunc.model_kind(folder)
            with tempfile.TemporaryDirectory() as code:
                mlflow.pyfunc.log_model(
                    name="model",
                    python_model=pyfunc.PolicyPyfunc() if kind == pyfunc.POLICY else pyfunc.RewardPyfunc(),
                    artifacts={pyfunc.HF_KEY: str(folder)},
                    code_paths=pyfunc.python_sources(Path(code)),
                    signature=pyfunc.POLICY_SIGNATURE if kind == pyfunc.POLICY else pyfunc.REWARD_SIGNATURE,
                    input_example=pyfunc.POLICY_EXAMPLE if kind == pyfunc.POLICY else pyfunc.REWARD_EXAMPLE,
                    pip_requirements=list(pyfunc.project_requirements()),
                )
        seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def tiny_folders(root: Path) -> dict[str, Path]:
    """A tiny Llama policy and a one-label reward model of it (random weights), tokenizer trained on the demo rows."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from tasks.training.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer([line for line in HH.read_text(encoding="utf-8").splitlines()], vocab_size=512)
    cfg = AutoConfig.for_model(
        "llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, num_labels=1,
    )  # fmt: skip
    out = {}
    for stage, cls in (("dpo", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification)):
        cls.from_config(cfg).save_pretrained(root / stage)
        tok.save_pretrained(root / stage)
        out[stage] = root / stage
    return out


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def bench_logging(folders: dict[str, Path]) -> list[dict]:
    rows = []
    for name, folder in folders.items():
        for method in METHODS:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.serving", "--log-once", str(folder), method],
                capture_output=True,
                text=True,
                cwd=ROOT,
                env={**os.environ, **ENV},
            )
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-3000:])
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"folder": name, "MB": round(folder_mb(folder)), "method": method, **result})
            print(rows[-1], flush=True)
    return rows


def hh_pairs(n: int) -> list[dict]:
    from tasks.serving.scoring import read_input

    data = read_input(HH, "hh-rlhf", limit=n)
    return [{"prompt": p, "answer": a} for p, a in zip(data.prompts[:n], data.answers[:n])]


def bench_serving(reward_dir: Path, requests: int, pairs: int, threads: int) -> dict:
    import mlflow
    import torch

    from tasks.registry.tracking import use_experiment
    from tasks.serving.pyfunc import log_hf_model
    from tasks.training.reward import RewardScorer

    use_experiment("bench-serving")
    with mlflow.start_run() as run:
        log_hf_model(reward_dir)
    rows = hh_pairs(pairs)
    payload = json.dumps({"dataframe_records": rows}).encode()
    torch.set_num_threads(threads)
    scorer = RewardScorer.load(reward_dir)
    conversations = [r["prompt"] + [{"role": "assistant", "content": r["answer"]}] for r in rows]
    started = time.perf_counter()
    for _ in range(requests):
        scorer(conversations)
    in_process = requests / (time.perf_counter() - started)
    port = 5311
    env = {**os.environ, **ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["OMP_NUM_THREADS"] = str(threads)
    command = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"runs:/{run.info.run_id}/model"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    started = time.perf_counter()
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        startup = wait_ping(port, proc, started)
        url = f"http://127.0.0.1:{port}/invocations"
        started = time.perf_counter()
        for _ in range(requests):
            request = urllib.request.Request(url, payload, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as r:
                assert len(json.loads(r.read())["predictions"]) == len(rows)
        served = requests / (time.perf_counter() - started)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    return {
        "serve_startup_s": round(startup, 1),
        "requests": requests,
        "pairs_per_request": len(rows),
        "served_requests_per_s": round(served, 2),
        "served_pairs_per_s": round(served * len(rows), 1),
        "in_process_requests_per_s": round(in_process, 2),
        "ratio_served_vs_in_process": round(served / in_process, 3),
    }


def wait_ping(port: int, proc: subprocess.Popen, started: float, timeout: float = 300) -> float:
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return time.perf_counter() - started
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server not up")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--log-once":
        print(json.dumps(log_once(Path(sys.argv[2]), sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", action="append", default=[], help="another HF folder to log (repeatable)")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in-process and in the server")
    parser.add_argument("--only", choices=["log", "serve"], default=None)
    args = parser.parse_args()
    tiny = tiny_folders(WORK / "models")
    folders = {"tiny-dpo": tiny["dpo"], "tiny-reward": tiny["reward"], **{Path(f).name: Path(f) for f in args.folder}}
    if args.only != "serve":
        rows = bench_logging(folders)
        print(f"\n{'folder':<28}{'MB':>6}  {'method':<18}{'seconds':>9}{'peak RSS MB':>13}")
        for r in rows:
            print(f"{r['folder']:<28}{r['MB']:>6}  {r['method']:<18}{r['seconds']:>9}{r['peak_rss_mb']:>13}")
    if args.only != "log":
        print(json.dumps(bench_serving(tiny["reward"], args.requests, args.pairs, args.threads), indent=1))


if __name__ == "__main__":
    main()
