"""Ingest benchmark: our whole data path vs the usual `datasets.map` conversion, same rows, same run.

    .venv/bin/python -m benchmarks.ingest [--rows 160000]

Builds N unique hh-rlhf rows (the real rows in ../shared/data, each made unique by a counter in its first
human turn), then times two whole processes on them:
- baseline: `datasets.load_dataset("json")` + `.map` with TRL's example hh-rlhf conversion
  (examples/datasets/hh-rlhf-helpful-base.py: string common prefix, regex split), `num_proc=2`, to Parquet;
  it neither validates nor quarantines.
- ours: `tasks.data.dataset.build_dataset` (parse, clean, dedupe, split, Great Expectations contract with Data
  Docs, atomic Parquet write, manifest).
Wall time includes interpreter start and imports; peak RSS is each process's own (os.wait4).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_ROWS = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.head300.jsonl"


def make_rows(n: int, path: Path) -> None:
    base = [json.loads(line) for line in REAL_ROWS.read_text(encoding="utf-8").splitlines()]
    with path.open("w", encoding="utf-8") as f:
        for k in range(n):
            r = base[k % len(base)]
            tag = f"\n\nHuman: [{k}] "
            f.write(
                json.dumps({side: r[side].replace("\n\nHuman: ", tag, 1) for side in ("chosen", "rejected")}) + "\n"
            )


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
    ds.to_parquet(str(out / "train.parquet"))


def run_ours(rows: Path, out: Path) -> None:
    from schemas.recipe import parse_recipe, resolve_paths
    from tasks.data.dataset import build_dataset

    recipe = parse_recipe(
        {
            "name": "bench",
            "sources": [{"name": "hh-rlhf", "format": "hh-rlhf", "path": str(rows)}],
            "data": {"output_dir": str(out / "data")},
        }
    )
    ds = build_dataset(resolve_paths(recipe, ROOT / "recipes" / "bench.yaml"))
    c = ds.manifest["counts"]
    print(json.dumps({"train": c["train"], "test": c["test"], "quarantine": c["quarantine"]}))


# ---- harness ----
def timed(args: list[str]) -> tuple[float, float, str]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out = proc.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{args[1]} run failed (exit {os.waitstatus_to_exitcode(status)})")
    return wall, usage.ru_maxrss / 1024, out.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=160_000)
    ap.add_argument("--run", choices=["baseline", "ours"])
    ap.add_argument("--input")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.run:
        (run_baseline if a.run == "baseline" else run_ours)(Path(a.input), Path(a.out))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = tmp / "hh.jsonl"
        make_rows(a.rows, rows)
        base = timed(["--run", "baseline", "--input", str(rows), "--out", str(tmp / "baseline")])
        ours = timed(["--run", "ours", "--input", str(rows), "--out", str(tmp / "ours")])
    print(f"\ningest benchmark: {a.rows:,} hh-rlhf rows, {os.cpu_count()} cores  (ours: {ours[2]})")
    print(f"{'path':<44}{'wall s':>9}{'rows/s':>11}{'peak RSS MB':>13}")
    for name, (wall, rss, _) in (
        ("baseline: datasets.map TRL example, num_proc=2", base),
        ("ours: parse+clean+GX contract+docs+write", ours),
    ):
        print(f"{name:<44}{wall:>9.2f}{a.rows / wall:>11,.0f}{rss:>13,.0f}")
    print(f"speed-up (baseline wall / ours wall): {base[0] / ours[0]:.2f}x")


if __name__ == "__main__":
    main()
