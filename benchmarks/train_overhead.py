"""Benchmark (not a test): our SFT and DPO stages vs a bare TRL script, same tiny model, data and steps;
and logging the model folder to MLflow as plain artifacts vs ``mlflow.transformers.log_model``.

    .venv/bin/python -m benchmarks.train_overhead [--repeats 3] [--threads 1]

Training time is measured by one callback on both sides, from on_train_begin to on_train_end (the
trainer.train() loop: our callbacks such as per-step MLflow logging count against us), as wall time and as
process CPU time; on a shared machine (other jobs on the same 2 cores) the CPU time is the steadier figure.
Start-up = stage wall time minus training wall time (imports excluded on both sides: paid once per process):
model/tokenizer load, dataset conversion and tokenisation, MLflow runs, lineage, plots, held-out metrics,
model save + artifact upload (and our buffered per-step MLflow metrics, written after trainer.train()).
Repeats alternate the order; medians are reported. An untimed 2-step run of each method first pays the
process's one-time costs (first evaluation ~10x slower, lazy imports), which otherwise fall on whichever
side runs first.

Torch runs on ``--threads`` threads (default 1) on both sides: with 2 OpenMP threads on 2 cores shared
with other jobs, a thread waiting at a barrier for its descheduled twin spins, and that spin counts as CPU
time; identical SFT runs then measured 11.4 to 20.5 CPU s. ``--threads 0`` keeps torch's default.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(tempfile.mkdtemp(prefix="align-bench-train-"))
os.environ.update(
    MLFLOW_TRACKING_URI=f"sqlite:///{WORK}/mlflow.db",
    MLFLOW_DISABLE_TELEMETRY="true",
    PREFECT_HOME=str(WORK / "prefect"),
    HF_HUB_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
)

from transformers import TrainerCallback  # noqa: E402


class Clock(TrainerCallback):
    """Times trainer.train()'s loop: wall and process CPU seconds; keeps the resolved config and rows."""

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        skip = ("output_dir", "logging_dir")
        self.config = {k: v for k, v in args.to_dict().items() if k not in skip}
        self.rows = train_dataloader.dataset.to_dict() if train_dataloader is not None else None
        self.t, self.c = time.perf_counter(), time.process_time()

    def on_train_end(self, *args, **kwargs):
        self.wall, self.cpu = time.perf_counter() - self.t, time.process_time() - self.c


def bare_trl(
    method: str, recipe, dataset_dir: Path, base: str, out: Path, clock: Clock, override: dict | None = None
) -> None:
    """What a user would write with TRL alone, with the same resolved arguments as our stage."""
    import pyarrow.parquet as pq
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from tasks.training.stage import device_defaults

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)

    def rows(split):
        return pq.read_table(dataset_dir / f"{split}.parquet", columns=["prompt", "chosen", "rejected"]).to_pylist()

    common = {
        "report_to": "none",
        "disable_tqdm": True,
        "logging_steps": 1,
        **device_defaults(),
        "output_dir": str(out),
    }
    stage_args = {**(recipe.sft.args if method == "sft" else recipe.dpo.args), **(override or {})}
    if method == "sft":
        data = {
            s: Dataset.from_dict({"messages": [r["prompt"] + r["chosen"] for r in rows(s)]})
            for s in ("train", "validation")
        }
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**common, **stage_args),
            processing_class=tok,
            train_dataset=data["train"],
            eval_dataset=data["validation"],  # as the stages: validation, never test
            callbacks=[clock],
        )
    else:
        data = {s: Dataset.from_list(rows(s)) for s in ("train", "validation")}
        trainer = DPOTrainer(
            model=model,
            ref_model=AutoModelForCausalLM.from_pretrained(base),
            args=DPOConfig(**common, **stage_args),
            processing_class=tok,
            train_dataset=data["train"],
            eval_dataset=data["validation"],  # as the stages: validation, never test
            callbacks=[clock],
        )
    trainer.train()
    trainer.save_model(str(out / "final"))


def check_same_work(method: str, bare: Clock, ours: Clock) -> None:
    """Like with like: the same resolved TRL config (every field) and the same tokenised training rows."""
    diff = {
        k: (bare.config.get(k), ours.config.get(k))
        for k in bare.config.keys() | ours.config.keys()
        if bare.config.get(k) != ours.config.get(k)
    }
    if diff:
        raise SystemExit(f"{method}: bare and ours resolve different TRL configs (bare, ours): {diff}")
    if bare.rows != ours.rows:
        raise SystemExit(f"{method}: bare and ours train on different tokenised rows")


def ours(method: str, recipe, dataset_dir: Path, base: str, out: Path, clock: Clock) -> Path:
    from tasks.training.dpo import train_dpo
    from tasks.training.sft import train_sft

    fn = train_sft if method == "sft" else train_dpo
    return fn(recipe, dataset_dir, Path(base) if method == "dpo" else None, out, callbacks=[clock]).model_dir


def log_model_compare(model_dir: Path) -> dict:
    """Plain artifacts vs mlflow.transformers.log_model (explicit pip_requirements, per STACK-NOTES)."""
    import mlflow
    import transformers

    mlflow.set_experiment("bench-log-model")
    out = {}
    with mlflow.start_run():
        t = time.perf_counter()
        mlflow.log_artifacts(str(model_dir), artifact_path="model")
        out["artifacts_s"] = time.perf_counter() - t
    with mlflow.start_run():
        t = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        mlflow.transformers.log_model(
            {"model": model, "tokenizer": tok},
            name="model",
            task="text-generation",
            pip_requirements=[f"transformers=={transformers.__version__}", "torch"],
        )
        out["log_model_s"] = time.perf_counter() - t
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides (0: torch default)")
    args = parser.parse_args()
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from schemas.recipe import load_recipe
    from tasks.data.dataset import build_dataset
    from tasks.training.stage import quiet, resolve_base

    quiet()
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    dataset_dir = build_dataset(recipe, WORK / "data").path
    base = resolve_base(recipe, "sft", dataset_dir, None, WORK / "base")
    warm = {"max_steps": 2, "eval_steps": 1, "save_steps": 1}
    bare_trl("sft", recipe, dataset_dir, base, WORK / "warm-sft", Clock(), warm)
    bare_trl("dpo", recipe, dataset_dir, base, WORK / "warm-dpo", Clock(), warm)
    sft_model, table = None, []
    for method in ("sft", "dpo"):
        samples: dict[str, list[tuple[float, float, float]]] = {"bare": [], "ours": []}
        seen: dict[str, Clock] = {}
        for i in range(args.repeats):
            for side in ("bare", "ours") if i % 2 == 0 else ("ours", "bare"):
                out, clock, t0 = WORK / f"{method}-{side}-{i}", Clock(), time.perf_counter()
                start_from = base if method == "sft" else sft_model
                if side == "bare":
                    bare_trl(method, recipe, dataset_dir, start_from, out, clock)
                else:  # a fresh output root each time: this measures training, not reuse
                    model_dir = ours(method, recipe, dataset_dir, start_from, out, clock)
                    sft_model = str(model_dir) if method == "sft" and sft_model is None else sft_model
                samples[side].append((time.perf_counter() - t0, clock.wall, clock.cpu))
                seen.setdefault(side, clock)
        check_same_work(method, seen["bare"], seen["ours"])
        table.append((method, {s: [statistics.median(x[k] for x in v) for k in range(3)] for s, v in samples.items()}))
    print(f"\n{'stage':<6}{'train wall s':>22}{'ratio':>7}{'train CPU s':>22}{'ratio':>7}{'start-up s':>22}")
    print(f"{'':<6}{'bare / ours':>22}{'':>7}{'bare / ours':>22}{'':>7}{'bare / ours':>22}")
    for method, m in table:
        (bt, bw, bc), (ot, ow, oc) = m["bare"], m["ours"]
        print(
            f"{method:<6}{bw:>14.2f} / {ow:<5.2f}{ow / bw:>7.3f}{bc:>14.2f} / {oc:<5.2f}{oc / bc:>7.3f}"
            f"{bt - bw:>14.2f} / {ot - ow:<5.2f}"
        )
    print(f"(median of {args.repeats}; ratio = ours / bare TRL; torch threads {torch.get_num_threads()})")
    cmp = log_model_compare(Path(sft_model))
    size = sum(f.stat().st_size for f in Path(sft_model).rglob("*") if f.is_file())
    print(
        f"model logging ({size / 1e6:.1f} MB folder): mlflow.log_artifacts {cmp['artifacts_s']:.2f} s, "
        f"mlflow.transformers.log_model {cmp['log_model_s']:.2f} s ({cmp['log_model_s'] / cmp['artifacts_s']:.0f}x)"
    )


if __name__ == "__main__":
    main()
