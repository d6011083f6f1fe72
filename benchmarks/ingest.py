"""Ingest benchmark: our whole data path vs the usual `datasets.map` conversion, same rows, same run.

    .venv/bin/python -m benchmarks.ingest [--rows 160000,1600000]

Builds N unique hh-rlhf rows (the real rows in ../shared/data, each made unique by a counter in its first
human turn: real shape, ~1.4 KB per multi-turn row), then times whole processes on them, one after the other:
- baseline: `datasets.load_dataset("json")` + `.map` with TRL's example hh-rlhf conversion
  (examples/datasets/hh-rlhf-helpful-base.py: string common prefix, regex split), `num_proc=2`, the same
  80/10/10 train/validation/test split (`train_test_split`, twice), the three splits to Parquet; it neither
  cleans, deduplicates, validates nor quarantines.
- ours, library: `tasks.data.dataset.build_dataset` (parse, clean, dedupe, decontaminate, split by prompt, Great
  Expectations contract with Data Docs, atomic Parquet write, manifest), no Prefect.
- ours, command: `python -m flows.ingest --recipe ...` against a running local Prefect server (started here,
  in a temporary state folder), as a user runs it.
With ``--repeats N`` the three paths run N times, interleaved (baseline, library, command, baseline, ...), so a
machine that slows down for a while slows every path alike; the table shows each path's median and every round.
Start-up is reported apart: imports (library) and the same command on one tiny source whose version exists
(command: imports, the flow run on the server, hashing a 16 KB file). Wall time includes interpreter start;
peak RSS is each process's own (os.wait4; worker processes report their own, not summed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_ROWS = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.head300.jsonl"


def tile_rows(rows: Path, n: int, path: Path) -> Path:
    """``n`` unique hh-rlhf rows from ``rows`` (row k = row k mod len, its first human turn tagged ``[k]``, so
    dedupe keeps every copy): real shape at any size (this benchmark, benchmarks.real_alignment --tile)."""
    base = [json.loads(line) for line in rows.read_text(encoding="utf-8").splitlines() if line.strip()]
    with path.open("w", encoding="utf-8") as f:
        for k in range(n):
            r = base[k % len(base)]
            tag = f"\n\nHuman: [{k}] "
            f.write(json.dumps({s: r[s].replace("\n\nHuman: ", tag, 1) for s in ("chosen", "rejected")}) + "\n")
    return path


# ---- baseline: the conversion of TRL's example script (re-implemented here, same algorithm) ----
def _common_start(a: str, b: str) -> str:
    i = 0
    for c1, c2 in zip(a, b):
        if c1 != c2:
            break
        i += 1
    return a[:i]


def trl_example_conversion(example: dict) -> dict:
    marker = "\n\nAssistant: "
    prompt_text = _common_start(example["chosen"], example["rejected"])
    if not prompt_text.endswith(marker):
        prompt_text = prompt_text[: prompt_text.rfind(marker)] + marker
    chosen_line = example["chosen"][len(prompt_text) :]
    rejected_line = example["rejected"][len(prompt_text) :]
    prompt_text = prompt_text[: -len(marker)]
    parts = re.split(r"(\n\nAssistant: |\n\nHuman: )", prompt_text)[1:]
    prompt = [
        {"role": "user" if parts[i] == "\n\nHuman: " else "assistant", "content": parts[i + 1]}
        for i in range(0, len(parts), 2)
    ]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen_line}],
        "rejected": [{"role": "assistant", "content": rejected_line}],
    }


def run_baseline(rows: Path, out: Path) -> None:
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(rows), split="train", cache_dir=str(out / "hf-cache"))
    ds = ds.map(trl_example_conversion, num_proc=2)
    held = ds.train_test_split(test_size=0.2, seed=42)
    heldout = held["test"].train_test_split(test_size=0.5, seed=42)
    for name, split in (("train", held["train"]), ("validation", heldout["train"]), ("test", heldout["test"])):
        split.to_parquet(str(out / f"{name}.parquet"))


def bench_recipe(rows: Path, out: Path) -> dict:
    return {
        "name": "bench",
        "sources": [{"name": "hh-rlhf", "format": "hh-rlhf", "path": str(rows)}],
        "data": {"output_dir": str(out / "data")},
    }


def run_ours(rows: Path, out: Path) -> None:
    from schemas.recipe import parse_recipe, resolve_paths
    from tasks.data.dataset import build_dataset

    recipe = parse_recipe(bench_recipe(rows, out))
    ds = build_dataset(resolve_paths(recipe, ROOT / "recipes" / "bench.yaml"))
    c = ds.manifest["counts"]
    print(json.dumps({"train": c["train"], "test": c["test"], "quarantine": c["quarantine"]}))


def run_imports(rows: Path, out: Path) -> None:
    import tasks.data.dataset  # noqa: F401


# ---- harness ----
def timed(args: list[str], command: list[str] | None = None, env: dict | None = None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MB, CPU seconds) of one process: this file with ``args``, or ``command``. CPU is
    user + system of the process and every worker it waited for (wait4's usage includes them); RSS is the
    process's own."""
    start = time.perf_counter()
    env = {**(env or os.environ), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen(command or [sys.executable, __file__, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command or args} failed (exit {os.waitstatus_to_exitcode(status)})")
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def ingest_command(rows: Path, out: Path, env: dict) -> tuple[float, float, float]:
    import yaml

    recipe = out / "bench.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump(bench_recipe(rows, out)))
    return timed([], [sys.executable, "-m", "flows.ingest", "--recipe", str(recipe)], env)


def local_server(state: Path):
    """A Prefect server of our own (scripts/services.py), on a free port: (services, the env pointing at it)."""
    import socket

    from scripts.services import Services, _wait_healthy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    svc = Services(state=state, prefect_port=port)
    _, health, logfile = svc.start_prefect()
    _wait_healthy(health, 180, logfile)
    return svc, {**svc.env(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


PATHS = (
    "baseline: datasets.map TRL example, split",
    "ours: library (build_dataset)",
    "ours: python -m flows.ingest (server)",
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="160000,1600000", help="comma-separated row counts")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of the three paths, interleaved; medians shown")
    ap.add_argument("--run", choices=["baseline", "ours", "imports"])
    ap.add_argument("--input")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.run:
        {"baseline": run_baseline, "ours": run_ours, "imports": run_imports}[a.run](Path(a.input), Path(a.out))
        return
    if a.repeats < 1:
        raise SystemExit("--repeats: expected a whole number >= 1")
    tiny = ROOT / "examples" / "data" / "hh-rlhf.jsonl"
    table = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("ALIGN_BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        svc, env = local_server(tmp / "state")
        try:
            ingest_command(tiny, tmp / "warm", env)  # the server's first flow run (its caches): not timed
            ingest_command(tiny, tmp / "startup", env)
            startup_cmd = ingest_command(tiny, tmp / "startup", env)  # version exists: start-up only
            startup_lib = timed(["--run", "imports", "--input", "-", "--out", "-"])
            for n in [int(x) for x in a.rows.split(",")]:
                rows = tmp / f"hh{n}.jsonl"
                tile_rows(REAL_ROWS, n, rows)
                mb = rows.stat().st_size / 1e6
                rounds: list[list[tuple[float, float, float]]] = [[], [], []]
                for _ in range(a.repeats):
                    for folder in (f"baseline{n}", f"lib{n}", f"cmd{n}"):
                        shutil.rmtree(tmp / folder, ignore_errors=True)
                    rounds[0].append(
                        timed(["--run", "baseline", "--input", str(rows), "--out", str(tmp / f"baseline{n}")])
                    )
                    rounds[1].append(timed(["--run", "ours", "--input", str(rows), "--out", str(tmp / f"lib{n}")]))
                    rounds[2].append(ingest_command(rows, tmp / f"cmd{n}", env))
                table.append((n, mb, rounds))
                for folder in (f"baseline{n}", f"lib{n}", f"cmd{n}"):
                    shutil.rmtree(tmp / folder, ignore_errors=True)
                rows.unlink()
        finally:
            svc.stop("prefect-server")
    print(f"\ningest benchmark: hh-rlhf rows of real shape, {os.cpu_count()} cores, {a.repeats} round(s) interleaved")
    print(
        f"start-up: library imports {startup_lib[0]:.2f} s; command (imports + flow run on the server) "
        f"{startup_cmd[0]:.2f} s"
    )
    print(
        f"{'rows':>10} {'MB':>7}  {'path':<40}{'wall s':>8}{'rows/s':>10}{'MB/s':>8}{'CPU s':>7}{'peak RSS MB':>13}"
        f"{'vs baseline':>13}  rounds (wall s)"
    )
    for n, mb, rounds in table:
        base = statistics.median(r[0] for r in rounds[0])
        for name, runs in zip(PATHS, rounds):
            wall, rss, cpu = (statistics.median(r[k] for r in runs) for k in range(3))  # as timed() returns them
            each = " / ".join(f"{r[0]:.2f}" for r in runs)
            print(
                f"{n:>10,} {mb:>7,.0f}  {name:<40}{wall:>8.2f}{n / wall:>10,.0f}{mb / wall:>8.1f}{cpu:>7.1f}"
                f"{rss:>13,.0f}{base / wall:>12.2f}x  {each}"
            )


if __name__ == "__main__":
    main()
