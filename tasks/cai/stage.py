"""Constitutional AI self-critique: prompt → initial response → critique → revision, as one conversation.

For each prompt (cleaned and decontaminated as human data, never a validation or test conversation:
tasks/cai/prompts.py) a principle is sampled (seeded random or
round-robin) and the conversation grows turn by turn, the constitution's few-shot examples first::

    [few-shot turns...] user: prompt → assistant: initial → user: critique request → assistant: critique
                        → user: revision request → assistant: revision

Each round is one batched call of a generator (tasks/generation.py), so a tiny model on a CPU and a
7B model on vLLM run the same code. Outputs, in ``<dataset_dir>/cai/``: preference pairs (chosen =
revision, rejected = initial; canonical schema, ``source = cai/<principle id>``), SFT rows (prompt +
revision, TRL ``messages``), quarantine (same codes as human data), samples (the full trace of every
prompt) and the training mixes the recipe's ``cai.mix`` asks for (``mix/{sft,reward,dpo}.parquet``); after the
reward stage, ``rescore.json``: the trained reward model on the CAI pairs it did not train on.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from schemas.cai_config import MixSpec
from schemas.constitution import CAI_SAMPLES_SCHEMA, Constitution, Principle
from schemas.hashing import content_hash
from schemas.preference import (
    PREFERENCE_SCHEMA,
    QUARANTINE_SCHEMA,
    Reason,
    content_id,
    normalise_prompt_text,
)
from schemas.sft import SFT_SCHEMA
from tasks.cai.prompts import CAIPrompt, cai_prompts
from tasks.training.generation import Generator, GenOutput

ECHO_WORDS = 8  # a revision holding any 8-word run of a request (or all of a shorter one) echoes it


# ---------------------------------------------------------------- principles and conversations


def sample_principles(constitution: Constitution, n: int, policy: str, seed: int) -> list[Principle]:
    """One principle per prompt: ``round_robin`` cycles in file order; ``random`` draws seeded, uniform."""
    ps = constitution.principles
    if policy == "round_robin":
        return [ps[i % len(ps)] for i in range(n)]
    if policy != "random":
        raise ValueError(f"cai.sampling: unknown policy {policy!r}; valid: random, round_robin")
    import random

    rng = random.Random(seed)
    return [rng.choice(ps) for _ in range(n)]


def few_shot_turns(constitution: Constitution, k: int | None) -> list[dict]:
    """The first ``k`` (all when None) example conversations, flattened into one list of turns."""
    examples = constitution.few_shot if k is None else constitution.few_shot[:k]
    return [m.model_dump() for ex in examples for m in ex.messages]


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


@dataclass
class CAISample:
    row_id: int
    prompt: CAIPrompt
    principle: Principle
    initial: GenOutput
    critique: GenOutput
    revision: GenOutput

    def conversation(self, few_shot: list[dict] = ()) -> list[dict]:
        return [
            *few_shot,
            *self.prompt.prompt,
            assistant(self.initial.text),
            user(self.principle.critique),
            assistant(self.critique.text),
            user(self.principle.revision),
            assistant(self.revision.text),
        ]


SKIPPED = GenOutput("", False, 0, "skipped: an earlier turn of this conversation failed")


def _round(generate: Generator, convs: list[list[dict] | None]) -> list[GenOutput]:
    """Generate for the live conversations only (None = dead row) and put the answers back in place."""
    live = [i for i, c in enumerate(convs) if c is not None]
    outs = generate([convs[i] for i in live]) if live else []
    if len(outs) != len(live):
        raise RuntimeError(f"generator returned {len(outs)} outputs for {len(live)} conversations")
    result = [SKIPPED] * len(convs)
    for i, o in zip(live, outs):
        result[i] = o
    return result


def critique_and_revise(
    prompts: list[CAIPrompt],
    principles: list[Principle],
    few_shot: list[dict],
    generate: Generator,
    critic: Generator | None = None,
) -> list[CAISample]:
    """Three batched rounds: initial (``generate``), critique and revision (``critic``, default ``generate``)."""
    critic = critic or generate
    convs: list[list[dict] | None] = [[*few_shot, *p.prompt] for p in prompts]
    initial = _round(generate, convs)
    convs = [
        None if o.error else [*c, assistant(o.text), user(pr.critique)] for c, o, pr in zip(convs, initial, principles)
    ]
    critique = _round(critic, convs)
    convs = [
        None if c is None or o.error else [*c, assistant(o.text), user(pr.revision)]
        for c, o, pr in zip(convs, critique, principles)
    ]
    revision = _round(critic, convs)
    return [
        CAISample(i, p, pr, a, b, c)
        for i, (p, pr, a, b, c) in enumerate(zip(prompts, principles, initial, critique, revision))
    ]


# ---------------------------------------------------------------- quarantine rules


def echoes(text: str, request: str, window: int = ECHO_WORDS) -> bool:
    """True when ``text`` repeats ``request`` (any ``window``-word run of it, or all of it if shorter)."""

    def words_of(t: str) -> list[str]:  # punctuation-blind: "answer:" repeats "answer"
        return re.sub(r"[^\w]+", " ", normalise_prompt_text(t)).split()

    words, hay = words_of(request), f" {' '.join(words_of(text))} "
    k = min(window, len(words))
    return k > 0 and any(f" {' '.join(words[i : i + k])} " in hay for i in range(len(words) - k + 1))


def quarantine_reason(s: CAISample) -> tuple[Reason, str] | None:
    """The first rule a sample breaks (reason, detail naming the turn), or None when it makes a good pair."""
    turns = {"initial": s.initial, "critique": s.critique, "revision": s.revision}
    for name, out in turns.items():
        if out.error:
            return Reason.TOO_LONG if "context" in out.error else Reason.EMPTY_TURN, f"{name}: {out.error}"
    for name, out in turns.items():
        if not out.text.strip():
            return Reason.EMPTY_TURN, f"{name}: the generated text is empty"
    for name in ("initial", "revision"):  # both go into the pair; a cut-off critique still guides a revision
        if turns[name].hit_max_tokens:
            return Reason.TRUNCATED, f"{name}: hit max_new_tokens ({turns[name].num_tokens} tokens) without a stop"
    for what, request in (("critique", s.principle.critique), ("revision", s.principle.revision)):
        if echoes(s.revision.text, request):
            return Reason.ECHOED_INSTRUCTIONS, f"revision: repeats the {what} request of {s.principle.id!r}"
    if normalise_prompt_text(s.revision.text) == normalise_prompt_text(s.initial.text):
        return Reason.UNREVISED, "revision: identical to the initial response (after normalisation)"
    return None


# ---------------------------------------------------------------- output tables


@dataclass
class CAITables:
    pairs: pa.Table
    sft: pa.Table
    quarantine: pa.Table
    samples: pa.Table
    reasons: dict = field(default_factory=dict)


def source_of(p: Principle) -> str:
    return f"cai/{p.id}"


def build_tables(samples: list[CAISample]) -> CAITables:
    """Accepted samples → pairs + SFT rows; the rest → quarantine; every sample → the trace table."""
    pairs, sft, quarantine, trace = [], [], [], []
    for s in samples:
        src, prompt = source_of(s.principle), s.prompt.prompt
        chosen, rejected = [assistant(s.revision.text)], [assistant(s.initial.text)]
        verdict = quarantine_reason(s)
        pid = None
        if verdict is None:
            pid = content_id(prompt, chosen, rejected)
            pairs.append(
                {
                    "id": pid,
                    "source": src,
                    "source_row": s.row_id,
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "score_chosen": None,
                    "score_rejected": None,
                    "prompt_hash": s.prompt.prompt_hash,
                }
            )
            sft.append(
                {
                    "id": content_id(prompt, chosen, []),
                    "source": src,
                    "source_row": s.row_id,
                    "messages": prompt + chosen,
                    "prompt_hash": s.prompt.prompt_hash,
                }
            )
        else:
            raw = {
                "prompt": prompt,
                "principle": s.principle.id,
                "initial": s.initial.text,
                "critique": s.critique.text,
                "revision": s.revision.text,
            }
            quarantine.append(
                {
                    "source": src,
                    "source_row": s.row_id,
                    "table": "sft",  # the revision (an SFT row, and the chosen side of its pair) was rejected
                    "reason": verdict[0].value,
                    "detail": verdict[1],
                    "raw": json.dumps(raw, ensure_ascii=False),
                }
            )
        trace.append(
            {
                "row_id": s.row_id,
                "prompt_source": s.prompt.source,
                "prompt_source_row": s.prompt.source_row,
                "prompt": prompt,
                "prompt_hash": s.prompt.prompt_hash,
                "principle_id": s.principle.id,
                "critique_request": s.principle.critique,
                "revision_request": s.principle.revision,
                "initial": s.initial.text,
                "critique": s.critique.text,
                "revision": s.revision.text,
                "initial_truncated": s.initial.hit_max_tokens,
                "critique_truncated": s.critique.hit_max_tokens,
                "revision_truncated": s.revision.hit_max_tokens,
                "status": "accepted" if verdict is None else verdict[0].value,
                "pair_id": pid,
            }
        )
    return CAITables(
        pa.Table.from_pylist(pairs, schema=PREFERENCE_SCHEMA),
        pa.Table.from_pylist(sft, schema=SFT_SCHEMA),
        pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA),
        pa.Table.from_pylist(trace, schema=CAI_SAMPLES_SCHEMA),
        dict(sorted(Counter(q["reason"] for q in quarantine).items())),
    )


def mix_rows(table: pa.Table, spec: MixSpec, human_rows: int, seed: int) -> pa.Table:
    """The CAI rows one training set gets: a seeded ``weight`` share, capped at ``max_fraction`` × human rows.

    Rows are drawn by a seeded hash of their id, so a row's fate does not depend on its position.
    """
    n = round(table.num_rows * spec.weight)
    if spec.max_fraction is not None:
        n = min(n, int(human_rows * spec.max_fraction))
    order = sorted(
        range(table.num_rows),
        key=lambda i: hashlib.blake2b(f"{seed}:{table['id'][i].as_py()}".encode(), digest_size=8).digest(),
    )
    return table.take(pa.array(sorted(order[:n]), type=pa.int64()))


def counts_for_contract(tables: CAITables, principles: list[Principle]) -> dict:
    """Per CAI source: prompts generated (read) = accepted + quarantined (the data plane's invariant)."""
    acc = Counter(tables.pairs["source"].to_pylist())
    qua = Counter(tables.quarantine["source"].to_pylist())
    read = Counter(tables.samples["principle_id"].to_pylist())
    names = sorted({source_of(p) for p in principles} & (set(acc) | set(qua)))
    return {
        "per_source": {s: {"read": read[s.split("/", 1)[1]], "accepted": acc[s], "quarantined": qua[s]} for s in names}
    }


def examples_markdown(samples: pa.Table, k: int = 3, width: int = 300) -> str:
    """A few traces as Markdown (the Prefect artifact): accepted ones first."""
    rows = sorted(samples.to_pylist(), key=lambda r: (r["status"] != "accepted", r["row_id"]))[:k]

    def cut(t: str) -> str:
        t = " ".join(t.split()).replace("|", "\\|")
        return (t[:width] + "…") if len(t) > width else t

    lines = [f"# CAI examples ({samples.num_rows} prompts)", ""]
    for r in rows:
        lines += [
            f"## row {r['row_id']} · principle `{r['principle_id']}` · {r['status']}",
            "",
            "| turn | text |",
            "|---|---|",
            f"| prompt | {cut(r['prompt'][-1]['content'])} |",
            f"| initial | {cut(r['initial'])} |",
            f"| critique request | {cut(r['critique_request'])} |",
            f"| critique | {cut(r['critique'])} |",
            f"| revision request | {cut(r['revision_request'])} |",
            f"| revision | {cut(r['revision'])} |",
            "",
        ]
    return "\n".join(lines)


def prepare(recipe, constitution: Constitution, dataset_dir: Path):
    """Prompts (+ selection counts), one principle per prompt, and the few-shot turns."""
    cfg = recipe.cai
    prompts, counts = cai_prompts(recipe, dataset_dir)
    principles = sample_principles(constitution, len(prompts), cfg.sampling or constitution.sampling, cfg.seed)
    return prompts, principles, few_shot_turns(constitution, cfg.few_shot), counts


# ---------------------------------------------------------------- the stage

CODE_VERSION = "1"  # bump when the output of the same inputs changes


@dataclass
class CAIResult:
    out_dir: Path
    files: dict[str, Path]  # pairs, sft, quarantine, samples, manifest
    mix: dict[str, Path]  # sft/reward/dpo → canonical rows to pass to that stage as extra training data
    metrics: dict
    run_id: str | None
    reused: bool = False


def cai_stage_key(recipe, dataset_dir: Path, model_ref: str, critic_ref: str) -> str:
    from tasks.registry.tracking import read_dataset_version
    from tasks.training.models import model_identity, model_revision

    payload = {
        "cai": recipe.cai.model_dump(mode="json"),
        "dataset": read_dataset_version(dataset_dir),
        "constitution": content_hash(Path(recipe.cai.constitution).read_bytes()),
        "model": model_identity(model_ref, model_revision(recipe.model, model_ref)),
        "critic": model_identity(critic_ref, model_revision(recipe.model, critic_ref)),
        "template": recipe.model.chat_template,
        "code": CODE_VERSION,
    }
    return content_hash(payload)


def rescore(reward_dir: Path, pairs: pa.Table) -> dict:
    """Reward of the initial vs the revised response on ``pairs`` (does revising help, by the reward model?)."""
    from tasks.training.reward import score_conversations

    rows = pairs.to_pylist()
    if not rows:
        return {}
    revised = score_conversations(reward_dir, [r["prompt"] + r["chosen"] for r in rows])
    initial = score_conversations(reward_dir, [r["prompt"] + r["rejected"] for r in rows])
    n = len(rows)
    return {
        "reward_initial_mean": sum(initial) / n,
        "reward_revision_mean": sum(revised) / n,
        "revision_scores_higher_share": sum(b > a for a, b in zip(initial, revised)) / n,
    }


RESCORE_PREFIX = "cai_rescore_"


def heldout_rescore(cai: CAIResult, reward_dir: Path) -> dict:
    """The trained reward model on the CAI pairs it did *not* train on (revision = chosen vs initial = rejected).

    The reward stage trains on ``mix/reward.parquet`` (a share of the CAI pairs), so scoring those would flatter
    it; only the held-out pairs (by id) are scored. Metrics: ``cai_rescore_pairs`` (accepted CAI pairs),
    ``cai_rescore_reward_train_pairs`` (of them in reward training), ``cai_rescore_heldout_pairs`` (the rest),
    and on the held-out pairs alone ``cai_rescore_heldout_reward_initial_mean`` / ``..._reward_revision_mean`` /
    ``..._revision_scores_higher_share``; with no held-out pair, no score (count 0). Cached in
    ``<cai>/rescore.json`` by the pairs, the reward mix and the reward model's content: an unchanged re-run
    loads no model.
    """
    from tasks.training.models import model_identity

    out_dir, reward_dir = Path(cai.out_dir), Path(reward_dir)
    key = content_hash(
        {
            "pairs": content_hash(Path(cai.files["pairs"]).read_bytes()),
            "reward_mix": content_hash(Path(cai.mix["reward"]).read_bytes()),
            "reward_model": model_identity(str(reward_dir)),
            "code": CODE_VERSION,
        }
    )
    cache = out_dir / "rescore.json"
    if cache.is_file() and (done := json.loads(cache.read_text(encoding="utf-8")))["key"] == key:
        return done["metrics"]
    pairs = pq.read_table(cai.files["pairs"], columns=["id", "prompt", "chosen", "rejected"])
    trained = set(pq.read_table(cai.mix["reward"], columns=["id"])["id"].to_pylist())
    held = [i for i, pid in enumerate(pairs["id"].to_pylist()) if pid not in trained]
    heldout = pairs.take(pa.array(held, type=pa.int64()))
    metrics = {
        f"{RESCORE_PREFIX}pairs": pairs.num_rows,
        f"{RESCORE_PREFIX}reward_train_pairs": pairs.num_rows - heldout.num_rows,
        f"{RESCORE_PREFIX}heldout_pairs": heldout.num_rows,
        **{f"{RESCORE_PREFIX}heldout_{k}": v for k, v in rescore(reward_dir, heldout).items()},
    }
    partial = cache.with_suffix(".json.tmp")
    partial.write_text(json.dumps({"key": key, "metrics": metrics}, indent=2) + "\n", encoding="utf-8")
    partial.replace(cache)
    return metrics


def log_rescore(recipe, run_id: str | None, metrics: dict) -> bool:
    """Log the rescore metrics into the CAI stage's run when this tracking store holds it (and they are not
    there yet); returns whether the run holds them afterwards."""
    import time

    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from tasks.registry.tracking import metric_name, run_in_store, setup

    if run_id is None:
        return False
    if mlflow.active_run() is None:
        setup(recipe)
    client = MlflowClient()
    if not run_in_store(client, run_id):
        print(f"cai rescore: the CAI run {run_id} is not in this tracking store; metrics not logged")
        return False
    logged = client.get_run(run_id).data.metrics
    now = int(time.time() * 1000)
    new = [Metric(metric_name(k), float(v), now, 0) for k, v in metrics.items() if logged.get(metric_name(k)) != v]
    if new:
        client.log_batch(run_id, metrics=new)
    return True


@task(name="cai-rescore", cache_policy=NO_CACHE)  # keyed by content in heldout_rescore
def cai_rescore_stage(recipe, cai: CAIResult, reward) -> dict:
    """Flow entry, after the reward stage: ``reward`` is its StageResult. The held-out rescore metrics, also
    logged into the CAI stage's MLflow run."""
    metrics = heldout_rescore(cai, Path(reward.model_dir))
    log_rescore(recipe, cai.run_id, metrics)
    return metrics


def check_contract(recipe, tables: CAITables, principles: list[Principle], docs_dir: Path):
    """The human data's contract on the CAI pairs (as train, no held-out splits): split-size rules do not apply."""
    from tasks.data.contracts import ContractBreach, run_contract
    from tasks.data.dataset import contract_params

    params = {**contract_params(recipe), "allowed_sources": sorted({source_of(p) for p in principles})}
    result = run_contract(
        {"train": tables.pairs},
        tables.quarantine,
        counts_for_contract(tables, principles),
        recipe.data.contract,
        docs_dir,
        params,
    )
    bad = [f for f in result.critical_failures if f["table"] != "splits"]
    if bad:
        raise ContractBreach(
            "CAI data contract: "
            + "; ".join(
                f"{f['name']} [{f['table']}]: {f['unexpected_count']} row(s), e.g. {f['unexpected_ids']}" for f in bad
            )
        )
    return result


def write_outputs(
    tmp: Path, out_dir: Path, tables: CAITables, mixes: dict[str, pa.Table], manifest: dict
) -> dict[str, Path]:
    """Write every file into ``tmp`` (a sibling of ``out_dir``), then swap it into place: no torn ``cai/``."""
    import shutil

    from tasks.data.dataset import write_parquet
    from tasks.data.sources.readers import file_sha256

    (tmp / "mix").mkdir(exist_ok=True)
    named = {
        "pairs": tables.pairs,
        "sft": tables.sft,
        "quarantine": tables.quarantine,
        "samples": tables.samples,
        **{f"mix/{k}": v for k, v in mixes.items()},
    }
    for name, table in named.items():
        write_parquet(table, tmp / f"{name}.parquet")
        manifest["files"][f"{name}.parquet"] = {"rows": table.num_rows, "sha256": file_sha256(tmp / f"{name}.parquet")}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return {n: out_dir / f"{n}.parquet" for n in ("pairs", "sft", "quarantine", "samples")} | {
        "manifest": out_dir / "manifest.json"
    }


def log_tracking(tables: CAITables, metrics: dict, contract_summary: dict | None) -> None:
    import mlflow

    from tasks.registry.tracking import log_summary

    log_summary(metrics)
    mlflow.log_dict(tables.reasons, "cai/quarantine_reasons.json")
    if contract_summary:
        mlflow.log_dict(contract_summary, "cai/contract.json")
    df = tables.samples.select(["row_id", "principle_id", "initial", "critique", "revision", "status"]).to_pandas()
    df.insert(1, "prompt", [p[-1]["content"] for p in tables.samples["prompt"].to_pylist()])
    mlflow.log_table(df, artifact_file="cai/samples.json")
    mlflow.log_text(examples_markdown(tables.samples), "cai/examples.md")


def publish_cai_examples(tables: CAITables) -> None:
    """Prefect markdown artifact with a few examples, when running inside a flow or task."""
    from prefect.context import FlowRunContext, TaskRunContext

    if TaskRunContext.get() or FlowRunContext.get():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(
            examples_markdown(tables.samples),
            key="cai-examples",
            description="Constitutional AI: prompt, principle, initial, critique, revision",
        )


def resolve_models(recipe, sft_model_dir: Path | None) -> tuple[str, str]:
    """(model for initial responses, model for critique/revision) as loadable references."""
    from tasks.training.models import resolve_model_ref

    cfg = recipe.cai
    if cfg.model:
        model = resolve_model_ref(cfg.model, "cai.model")
    elif sft_model_dir is not None:
        model = resolve_model_ref(str(sft_model_dir), "cai: SFT model")
    else:
        raise ValueError("cai: no model; run the sft stage first or set cai.model in the recipe")
    return model, resolve_model_ref(cfg.critic_model, "cai.critic_model") if cfg.critic_model else model


def run_cai(
    recipe,
    dataset_dir: Path,
    sft_model_dir: Path | None = None,
    generate: Generator | None = None,
    critic: Generator | None = None,
) -> CAIResult:
    """Run (or reuse) the CAI stage into ``<dataset_dir>/cai/``. ``generate``/``critic`` replace the models."""
    import tempfile
    import time

    from schemas.constitution import load_constitution
    from tasks.registry.tracking import stage_run
    from tasks.training.generation import load_generator
    from tasks.training.models import model_revision

    cfg, dataset_dir = recipe.cai, Path(dataset_dir)
    out_dir = dataset_dir / "cai"
    model_ref, critic_ref = resolve_models(recipe, sft_model_dir) if generate is None else ("<injected>",) * 2
    key = cai_stage_key(recipe, dataset_dir, model_ref, critic_ref) if generate is None else None
    manifest_path = out_dir / "manifest.json"
    if key and manifest_path.exists() and (done := json.loads(manifest_path.read_text()))["key"] == key:
        return _result(out_dir, done, reused=True)

    constitution = load_constitution(cfg.constitution)
    prompts, principles, few_shot, counts = prepare(recipe, constitution, dataset_dir)
    if not prompts:
        raise ValueError(f"cai.prompts: no prompts left to critique ({counts}); name a prompt source in the recipe")
    params = {
        "constitution": cfg.constitution,
        "principles": len(constitution.principles),
        "model": model_ref,
        "critic_model": critic_ref,
        **cfg.model_dump(mode="json", exclude={"prompts", "constitution"}),
    }
    with stage_run("cai", recipe, dataset_dir, params) as run_id:
        if generate is None:
            remote = recipe.model.trust_remote_code
            generate = load_generator(
                model_ref,
                cfg.generation,
                cfg.backend,
                recipe.model.chat_template,
                desc="cai",
                revision=model_revision(recipe.model, model_ref),
                trust_remote_code=remote,
            )
            if critic_ref != model_ref:
                critic = load_generator(
                    critic_ref,
                    cfg.generation,
                    cfg.backend,
                    recipe.model.chat_template,
                    desc="cai critic",
                    revision=model_revision(recipe.model, critic_ref),
                    trust_remote_code=remote,
                )
        started = time.perf_counter()
        samples = critique_and_revise(prompts, principles, few_shot, generate, critic)
        seconds = time.perf_counter() - started
        tables = build_tables(samples)
        tokens = sum(
            g.stats.tokens for g in {id(x): x for x in (generate, critic) if x}.values() if hasattr(g, "stats")
        )
        metrics = {
            **counts,
            "pairs": tables.pairs.num_rows,
            "quarantined": tables.quarantine.num_rows,
            "generate_seconds": round(seconds, 3),
            "rows_per_s": round(len(samples) / seconds, 3),
            "tokens_generated": tokens,
            "tokens_per_s": round(tokens / seconds, 3),
            **{f"quarantine_{k}": v for k, v in tables.reasons.items()},
            **{f"principle_{k}": v for k, v in sorted(Counter(p.id for p in principles).items())},
        }
        human_rows = pq.read_metadata(dataset_dir / "train.parquet").num_rows
        mixes = {
            name: mix_rows(tables.pairs, getattr(cfg.mix, name), human_rows, cfg.seed)
            for name in ("sft", "reward", "dpo")
        }
        metrics.update({f"mix_{k}_rows": v.num_rows for k, v in mixes.items()})
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-cai-", dir=dataset_dir))
        contract = check_contract(recipe, tables, principles, tmp / "data_docs")
        manifest = {
            "key": key,
            "constitution": constitution.name,
            "model": model_ref,
            "critic_model": critic_ref,
            "metrics": metrics,
            "quarantine_reasons": tables.reasons,
            "run_id": run_id,
            "contract": contract.summary,
            "files": {},
        }
        files = write_outputs(tmp, out_dir, tables, mixes, manifest)
        log_tracking(tables, metrics, contract.summary)
        publish_cai_examples(tables)
    return _result(out_dir, manifest, reused=False, files=files)


def _result(out_dir: Path, manifest: dict, reused: bool, files: dict | None = None) -> CAIResult:
    files = files or {n: out_dir / f"{n}.parquet" for n in ("pairs", "sft", "quarantine", "samples")} | {
        "manifest": out_dir / "manifest.json"
    }
    mix = {k: out_dir / "mix" / f"{k}.parquet" for k in ("sft", "reward", "dpo")}
    return CAIResult(out_dir, files, mix, manifest["metrics"], manifest.get("run_id"), reused)


@task(name="cai", cache_policy=NO_CACHE)  # reuse is keyed by content in run_cai, not by Prefect's cache
def cai_stage(recipe, dataset_dir: Path, sft, output_root: Path | None = None) -> CAIResult:
    """Flow entry: ``sft`` is the SFT StageResult (None: the recipe's cai.model). Outputs live beside the
    dataset (``<dataset_dir>/cai``); ``output_root`` is accepted for the stage signature and unused. The
    reward model rescores the pairs later, after the reward stage (``cai_rescore_stage``)."""
    return run_cai(recipe, Path(dataset_dir), sft.model_dir if sft is not None else None)
