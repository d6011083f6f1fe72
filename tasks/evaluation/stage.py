"""Evaluation of one pipeline run on the held-out test split (prompts never seen in training).

Metrics (keys as logged to MLflow and tagged on registered versions; definitions in tasks/evaluation/metrics.py):
- ``rm_accuracy``: reward model, chosen scored above rejected on the test pairs (a tie counts half);
- ``dpo_accuracy``: the DPO policy's implicit reward log pi(y|x) - log ref(y|x) (ref = SFT) ranks chosen first;
- ``win_rate`` (+ ``_ci_low``/``_ci_high``, ``wins``/``ties``/``losses``): policy vs SFT answers to the same
  prompts (same seed and settings), judged by the reward model; ``win_rate_lc`` (+ CI): the same with the judge's
  length preference regressed out;
- ``win_rate_vs_base`` / ``win_rate_vs_base_lc`` (+ CIs, ``wins``/``ties``/``losses_vs_base``), ``rm_base_mean``,
  ``len_base_*``: the policy vs the untrained base model the SFT stage started from (``evaluate.versus_base``);
- ``kl_per_token``/``kl_per_sequence``: KL(policy || SFT) per token on the policy's own samples (the token ids
  it generated, scored as generated);
- ``len_policy_*``/``len_sft_*`` (answer tokens), ``len_ratio``: catches reward hacking by length;
  ``len_policy_cut_rate``/``len_sft_cut_rate``: share of answers cut at ``max_new_tokens``;
- ``rm_cut``: conversations longer than the reward model's positions, scored with their middle cut;
- ``safety_*``: red-team prompts (``evaluate.safety_prompts``): RM score and refusal rate of policy vs SFT;
  ``champion.safety_*``: the current champion on the same prompts and RM (for the promotion gates);
- ``benign_refusal_rate`` / ``benign_sft_refusal_rate`` / ``champion.benign_refusal_rate``: over-refusal, the
  refusal rate on clearly benign requests (``evaluate.benign_prompts``);
- ``win_rate_vs_champion`` (+ ``_ci_low``/``_ci_high``, ``wins``/``ties``/``losses_vs_champion``): the policy vs
  the current champion (``champion.version``) on the held-out prompts, judged by this run's reward model;
- ``contract_success``: 1.0 when the dataset's contract had no critical breach (from its manifest).

Every tensor follows the model's device (tasks/training/logprobs.py): the generators load on the GPU when
there is one, and scoring runs there too.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from schemas.cai_config import GenerationSpec
from schemas.hashing import content_hash
from tasks.data.clean import read_eval_prompts
from tasks.evaluation import metrics as eval_stats
from tasks.registry import tracking

CHAMPION_PREFIX = "champion."
_TASKS = Path(__file__).resolve().parents[1]
# The code the metrics depend on: a change to any of it evaluates again.
EVALUATION_CODE = [
    _TASKS / "evaluation" / "stage.py",
    _TASKS / "evaluation" / "metrics.py",
    _TASKS / "training" / "logprobs.py",
    _TASKS / "training" / "generation.py",
    _TASKS / "training" / "reward.py",
    _TASKS / "training" / "dpo.py",
]


# ---------------------------------------------------------------- inputs


def test_pairs(dataset_dir: Path, limit: int) -> list[dict]:
    """Test-split rows, in a stable order (by id), at most ``limit``."""
    rows = pq.read_table(
        Path(dataset_dir) / "test.parquet", columns=["id", "prompt", "chosen", "rejected", "prompt_hash"]
    ).to_pylist()
    return sorted(rows, key=lambda r: r["id"])[:limit]


def test_prompts(rows: list[dict], limit: int) -> list[list[dict]]:
    """Distinct held-out prompts (one per prompt hash), stable order, at most ``limit``."""
    seen, out = set(), []
    for r in sorted(rows, key=lambda r: r["prompt_hash"]):
        if r["prompt_hash"] not in seen:
            seen.add(r["prompt_hash"])
            out.append([{"role": m["role"], "content": m["content"]} for m in r["prompt"]])
    return out[:limit]


def read_safety_prompts(path: str | None, key: str = "evaluate.safety_prompts") -> list[list[dict]]:
    """Evaluation prompts (.txt one per line, or .jsonl/.json with a ``prompt`` field) as user turns.
    The recipe loader made the path absolute; a missing file fails naming it and its recipe key."""
    if not path:
        return []
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}: {path}: no such file")
    return [[{"role": "user", "content": t}] for t in read_eval_prompts([path])]


def contract_success(dataset_dir: Path) -> float:
    from tasks.registry.gates import contract_ok

    return 1.0 if contract_ok(json.loads((Path(dataset_dir) / "manifest.json").read_text(encoding="utf-8"))) else 0.0


# ---------------------------------------------------------------- model scoring


def with_answers(prompts: list[list[dict]], answers: list[str]) -> list[list[dict]]:
    """Each prompt's conversation completed by its answer (what the reward model scores)."""
    return [p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers)]


def sample_kl(policy_out: list, policy_model, ref_model, pad_id: int | None, batch_size: int) -> dict[str, float]:
    """The one KL: per token, on the policy's own samples (the token ids it generated, end-of-turn included, after
    the prompt ids it generated from), against the reference; answers with nothing generated are left out."""
    from tasks.training.logprobs import answer_stats

    sampled = [(o.prompt_ids, o.token_ids) for o in policy_out if o.token_ids]
    stats = answer_stats(policy_model, sampled, pad_id, batch_size, ref=ref_model)
    return eval_stats.kl_summary([s.kl for s in stats], [s.tokens for s in stats])


def generation_settings(cfg) -> GenerationSpec:
    return GenerationSpec(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
    )


# ---------------------------------------------------------------- the evaluation


def heldout_preference_metrics(recipe, rows: list[dict], rm, policy_gen, ref_gen, source: str) -> dict[str, float]:
    """Held-out pair accuracy of the reward model and of the policy's implicit DPO reward (reference = SFT)."""
    from tasks.training.dpo import dpo_beta, dpo_preference_metrics

    chosen = rm([list(r["prompt"]) + list(r["chosen"]) for r in rows])
    rejected = rm([list(r["prompt"]) + list(r["rejected"]) for r in rows])
    implicit = dpo_preference_metrics(
        policy_gen.model, ref_gen.model, policy_gen.tokenizer, rows, dpo_beta(recipe), source
    )
    return {
        "rm_accuracy": eval_stats.preference_accuracy(chosen, rejected),
        "dpo_accuracy": implicit["reward_accuracy"],
        "n_pairs": float(len(rows)),
    }


def win_rates(ours: list[float], theirs: list[float], our_len: list[int], their_len: list[int], cfg, vs: str = ""):
    """RM-judged win rate of our answers over theirs on the same prompts, raw and length-controlled, each with its
    bootstrap CI; ``vs`` names the other side in the keys (``win_rate_vs_base``, ``win_rate_vs_base_lc``, ...)."""
    tag = f"_vs_{vs}" if vs else ""
    raw = eval_stats.win_outcomes(ours, theirs, cfg.tie_epsilon)
    lc = eval_stats.length_controlled_outcomes(ours, theirs, our_len, their_len, cfg.tie_epsilon)
    out = {}
    for outcomes, suffix in ((raw, ""), (lc, "_lc")):
        summary = eval_stats.win_rate_summary(outcomes, cfg.bootstrap_samples, cfg.confidence, cfg.seed)
        for k, v in summary.items():
            if k.startswith("win_rate"):
                out[k.replace("win_rate", f"win_rate{tag}{suffix}")] = v
            elif not suffix and (vs or k != "n_prompts"):
                out[f"{k}{tag}"] = v
    if not vs:
        out["n_prompts"] = float(len(raw))
    return out


def versus_base(prompts: list[list[dict]], policy_out: list, p_score: list[float], base_gen, rm, cfg) -> dict:
    """The policy against the untrained base model (the SFT stage's starting point) on the same prompts: what the
    whole recipe bought, raw and length-controlled; plus the base's own RM score and lengths."""
    base_out = base_gen(prompts)
    b_score = rm(with_answers(prompts, [o.text for o in base_out]))
    our_len, base_len = [o.num_tokens for o in policy_out], [o.num_tokens for o in base_out]
    out = win_rates(p_score, b_score, our_len, base_len, cfg, vs="base")
    out["rm_base_mean"] = sum(b_score) / len(b_score)
    out.update(eval_stats.length_stats(base_len, "len_base"))
    return out


def head_to_head(prompts: list[list[dict]], policy_gen, sft_gen, rm, cfg, base_gen=None) -> tuple[dict, list[dict]]:
    """Policy vs SFT on the same prompts: RM-judged win rate with CI (raw and length-controlled), KL to SFT on the
    policy's samples, answer lengths and the share of answers cut at ``max_new_tokens``; with ``base_gen`` the
    same win rates against the untrained base model."""
    policy_out, sft_out = policy_gen(prompts), sft_gen(prompts)
    p_text, s_text = [o.text for o in policy_out], [o.text for o in sft_out]
    p_score, s_score = rm(with_answers(prompts, p_text)), rm(with_answers(prompts, s_text))
    p_len, s_len = [o.num_tokens for o in policy_out], [o.num_tokens for o in sft_out]
    metrics = win_rates(p_score, s_score, p_len, s_len, cfg)
    outcomes = eval_stats.win_outcomes(p_score, s_score, cfg.tie_epsilon)
    if base_gen is not None:
        metrics.update(versus_base(prompts, policy_out, p_score, base_gen, rm, cfg))
    pad_id = policy_gen.tokenizer.pad_token_id
    metrics.update(sample_kl(policy_out, policy_gen.model, sft_gen.model, pad_id, cfg.batch_size))
    metrics.update(eval_stats.length_stats([o.num_tokens for o in policy_out], "len_policy"))
    metrics.update(eval_stats.length_stats([o.num_tokens for o in sft_out], "len_sft"))
    metrics["len_policy_cut_rate"] = eval_stats.share([o.hit_max_tokens for o in policy_out])
    metrics["len_sft_cut_rate"] = eval_stats.share([o.hit_max_tokens for o in sft_out])
    metrics["len_ratio"] = metrics["len_policy_mean"] / max(metrics["len_sft_mean"], 1e-9)
    metrics["rm_policy_mean"] = sum(p_score) / len(p_score)
    metrics["rm_sft_mean"] = sum(s_score) / len(s_score)
    table = [
        {
            "prompt": p[-1]["content"],
            "policy": a,
            "sft": b,
            "rm_policy": round(x, 4),
            "rm_sft": round(y, 4),
            "outcome": {1: "win", 0: "tie", -1: "loss"}[int(o)],
        }
        for p, a, b, x, y, o in zip(prompts, p_text, s_text, p_score, s_score, outcomes)
    ]
    return metrics, table


def safety_metrics(prompts: list[list[dict]], gen, rm, prefix: str = "safety_") -> tuple[dict, list[str]]:
    """RM score and refusal rate of one model's answers to the red-team prompts."""
    answers = [o.text for o in gen(prompts)]
    scores = rm(with_answers(prompts, answers))
    return {
        f"{prefix}rm_mean": sum(scores) / len(scores),
        f"{prefix}refusal_rate": eval_stats.refusal_rate(answers),
    }, answers


def other_champion(recipe, policy_run_id: str | None) -> int | None:
    """Version of the current champion of ``<recipe>-<promote.model>``, unless there is none or it is the
    policy under evaluation itself (a reused stage re-evaluated: comparing a model with itself says nothing)."""
    from mlflow.tracking import MlflowClient

    from tasks.registry.versions import CHAMPION, alias_version, registered_name

    client = MlflowClient()
    name = registered_name(recipe.name, recipe.promote.model)
    version = alias_version(client, name, CHAMPION)
    if version is None or (policy_run_id and client.get_model_version(name, str(version)).run_id == policy_run_id):
        return None
    return version


def champion_metrics(
    recipe, version: int | None, rm, settings, prompts: dict[str, list[list[dict]]], policy_answers: list[str]
) -> dict[str, float]:
    """The current champion (``version`` of ``<recipe>-<promote.model>``) inside the candidate's evaluation, loaded
    once: its refusals on the red-team and benign prompts, and the candidate's win rate against it on the held-out
    prompts (``prompts``: {"safety", "benign", "heldout"}; ``policy_answers``: the candidate's held-out answers)."""
    from tasks.registry.versions import registered_name
    from tasks.serving.pyfunc import download_hf_model
    from tasks.training.generation import load_generator

    if version is None:
        return {}
    name = registered_name(recipe.name, recipe.promote.model)
    folder = download_hf_model(f"models:/{name}/{version}")  # the HF folder inside the MLflow model
    champion = load_generator(folder, settings, progress=False, trust_remote_code=recipe.model.trust_remote_code)
    out = {CHAMPION_PREFIX + "version": float(version)}
    if prompts["safety"]:
        out.update(safety_metrics(prompts["safety"], champion, rm, prefix=CHAMPION_PREFIX + "safety_")[0])
    out.update(refusal_metrics(prompts["benign"], champion, CHAMPION_PREFIX + "benign_"))
    out.update(win_rate_vs_champion(prompts["heldout"], policy_answers, champion, rm, recipe.evaluate))
    return out


def refusal_metrics(prompts: list[list[dict]], gen, prefix: str) -> dict[str, float]:
    """Over-refusal: the share of clearly benign requests (``evaluate.benign_prompts``) one model refuses."""
    if not prompts:
        return {}
    return {f"{prefix}refusal_rate": eval_stats.refusal_rate([o.text for o in gen(prompts)])}


def win_rate_vs_champion(prompts: list[list[dict]], policy_answers: list[str], champion_gen, rm, cfg) -> dict:
    """The policy's RM-judged win rate (ties half, bootstrap CI) against the champion's answers to the same prompts."""
    champion_answers = [o.text for o in champion_gen(prompts)]
    ours, theirs = rm(with_answers(prompts, policy_answers)), rm(with_answers(prompts, champion_answers))
    outcomes = eval_stats.win_outcomes(ours, theirs, cfg.tie_epsilon)
    summary = eval_stats.win_rate_summary(outcomes, cfg.bootstrap_samples, cfg.confidence, cfg.seed)
    return {
        k.replace("win_rate", "win_rate_vs_champion") if k.startswith("win_rate") else f"{k}_vs_champion": v
        for k, v in summary.items()
        if k != "n_prompts"
    }


def stage_base(stage) -> str | None:
    """The model a trained stage started from (its ``result.json`` ``base_model``), or None when unknown."""
    result = Path(stage.model_dir).parent / "result.json"
    if not result.is_file():
        return None
    return json.loads(result.read_text(encoding="utf-8")).get("base_model") or None


def run_evaluation(recipe, dataset_dir: Path, sft, reward, dpo, champion: int | None = None) -> dict:
    """Evaluate the run's SFT, reward and DPO outputs (``StageResult``s); returns the metrics dict.

    Logged to a nested MLflow run ``evaluate`` (metrics, generation samples as tables) and, inside a Prefect
    run, a table artifact. Safety generations come first so that every model's red-team answers use the
    same seed (the generator reseeds per call), the champion's included.
    """
    from tasks.training.generation import load_generator
    from tasks.training.models import model_revision
    from tasks.training.reward import RewardScorer

    cfg, dataset_dir = recipe.evaluate, Path(dataset_dir)
    settings = generation_settings(cfg)
    rows = test_pairs(dataset_dir, cfg.max_pairs)
    if not rows:
        raise ValueError(f"{dataset_dir / 'test.parquet'}: no held-out rows to evaluate on")
    prompts = test_prompts(rows, cfg.max_prompts)
    red_team = read_safety_prompts(cfg.safety_prompts)
    remote = recipe.model.trust_remote_code
    rm = RewardScorer.load(reward.model_dir, cfg.batch_size, trust_remote_code=remote)
    policy = load_generator(
        str(dpo.model_dir), settings, progress=False, desc="evaluate policy", trust_remote_code=remote
    )
    ref = load_generator(str(sft.model_dir), settings, progress=False, desc="evaluate sft", trust_remote_code=remote)
    metrics: dict[str, float] = {"contract_success": contract_success(dataset_dir)}
    safety_rows: list[dict] = []
    if red_team:
        pol_safety, pol_answers = safety_metrics(red_team, policy, rm)
        sft_safety, sft_answers = safety_metrics(red_team, ref, rm, prefix="safety_sft_")
        metrics.update(pol_safety | sft_safety | {"safety_n": float(len(red_team))})
        safety_rows = [
            {
                "prompt": p[-1]["content"],
                "policy": a,
                "sft": b,
                "policy_refuses": eval_stats.is_refusal(a),
                "sft_refuses": eval_stats.is_refusal(b),
            }
            for p, a, b in zip(red_team, pol_answers, sft_answers)
        ]
    base = None
    if cfg.versus_base and (base_ref := stage_base(sft)) is not None:
        base = load_generator(
            base_ref,
            settings,
            chat_template=recipe.model.chat_template,
            progress=False,
            desc="evaluate base",
            revision=model_revision(recipe.model, base_ref),
            trust_remote_code=remote,
        )
    h2h, samples = head_to_head(prompts, policy, ref, rm, cfg, base)
    del base  # one model fewer in memory for the rest
    metrics.update(h2h)
    benign = read_safety_prompts(cfg.benign_prompts, "evaluate.benign_prompts")
    metrics.update(refusal_metrics(benign, policy, "benign_") | refusal_metrics(benign, ref, "benign_sft_"))
    held_out = {"safety": red_team, "benign": benign, "heldout": prompts}
    metrics.update(champion_metrics(recipe, champion, rm, settings, held_out, [r["policy"] for r in samples]))
    metrics.update(heldout_preference_metrics(recipe, rows, rm, policy, ref, str(dataset_dir / "test.parquet")))
    metrics["rm_cut"] = float(rm.cut)  # conversations longer than the reward model's positions (middle cut)
    with tracking.stage_run("evaluate", recipe, dataset_dir, params=cfg.model_dump(mode="json")):
        log_evaluation(metrics, samples[: cfg.sample_rows], safety_rows)
    return metrics


def log_evaluation(metrics: dict, samples: list[dict], safety_rows: list[dict]) -> None:
    import mlflow

    tracking.log_summary(metrics)
    if samples:
        mlflow.log_table({k: [r[k] for r in samples] for k in samples[0]}, artifact_file="eval/generations.json")
    if safety_rows:
        mlflow.log_table({k: [r[k] for r in safety_rows] for k in safety_rows[0]}, artifact_file="eval/safety.json")


def evaluation_table(metrics: dict) -> list[dict]:
    return [{"metric": k, "value": round(float(v), 4)} for k, v in sorted(metrics.items())]


def publish_evaluation(recipe_name: str, metrics: dict) -> None:
    """Prefect table artifact of the metrics, when running inside a flow or task."""
    from prefect.context import FlowRunContext, TaskRunContext

    if TaskRunContext.get() or FlowRunContext.get():
        from prefect.artifacts import create_table_artifact

        key = re.sub(r"[^a-z0-9-]+", "-", f"{recipe_name}-evaluation".lower())
        create_table_artifact(
            evaluation_table(metrics),
            key=key,
            description=f"Held-out evaluation of `{recipe_name}`: policy (DPO) vs SFT",
        )


def evaluation_key(recipe, dataset_dir: Path, sft, reward, dpo, champion: int | None) -> str:
    """What the metrics depend on: the three models (their stage runs), the held-out data, the evaluate
    section and the prompt files it names (their bytes: an edited red-team file is a new evaluation), the champion
    compared against, and the code that computes them (``EVALUATION_CODE``)."""
    cfg = recipe.evaluate
    payload = {
        "dataset": Path(dataset_dir).name,
        "models": [str(r.model_dir) for r in (sft, reward, dpo)],
        "runs": [r.run_id for r in (sft, reward, dpo)],
        "evaluate": cfg.model_dump(mode="json"),
        "prompt_files": [
            content_hash(Path(f).read_bytes()) if f else None for f in (cfg.safety_prompts, cfg.benign_prompts)
        ],
        "champion": champion,
        "code": content_hash(b"".join(p.read_bytes() for p in EVALUATION_CODE)),
    }
    return content_hash(payload)


@task(name="evaluate", cache_policy=NO_CACHE)  # keyed by content below, like the training stages
def evaluate_stage(recipe, dataset_dir: Path, sft, reward, dpo) -> dict:
    """Evaluate, or reuse the metrics of an identical evaluation (same models, data, settings, champion):
    an unchanged re-run of `align` then costs no generation at all."""
    from tasks.training.stage import default_runs_root

    champion = other_champion(recipe, dpo.run_id)
    key = evaluation_key(recipe, dataset_dir, sft, reward, dpo, champion)
    path = default_runs_root() / recipe.name / Path(dataset_dir).name / f"evaluate-{key}.json"
    if path.is_file():
        metrics = json.loads(path.read_text(encoding="utf-8"))
        print(f"evaluate: reusing {path.name} (same models, data, settings and champion)")
    else:
        metrics = run_evaluation(recipe, dataset_dir, sft, reward, dpo, champion)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # its own: a concurrent run evaluating the same writes too
        tmp.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
        tmp.replace(path)
    publish_evaluation(recipe.name, metrics)
    return metrics
