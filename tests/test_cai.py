"""CAI stage: principle sampling, the growing conversation, quarantine rules on crafted generations (fake
generator), output tables and mixes, and the stage end to end on the real tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.cai_config import GenerationSpec, MixSpec
from schemas.constitution import load_constitution, parse_constitution
from schemas.preference import (
    MESSAGES,
    PREFERENCE_SCHEMA,
    QUARANTINE_SCHEMA,
    Reason,
    normalise_prompt_text,
    prompt_hash,
)
from schemas.recipe import load_recipe
from tasks.cai.prompts import CAIPrompt, cai_prompts, held_out_split_keys, select_prompts
from tasks.cai.stage import (
    build_tables,
    critique_and_revise,
    examples_markdown,
    mix_rows,
    quarantine_reason,
    run_cai,
    sample_principles,
)
from tasks.data.decontaminate import read_eval_prompts
from tasks.data.split import split_keys
from tasks.training.generation import BackendUnavailable, GenOutput, cut_at_stop, require_vllm
from tests.fast_recipes import PASSING_PROMOTE, SMALL_EVALUATE, fast_tiny_recipe

TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"

CONSTITUTION = parse_constitution(
    {
        "name": "t",
        "principles": [
            {
                "id": f"p{i}",
                "critique": f"Critique rule number {i} of the assistant answer",
                "revision": f"Rewrite the answer to follow rule number {i} without fail",
            }
            for i in range(3)
        ],
        "few_shot": [{"messages": [{"role": "user", "content": "ex q"}, {"role": "assistant", "content": "ex a"}]}],
    }
)


def prompt(i: int, text: str | None = None) -> CAIPrompt:
    msgs = [{"role": "user", "content": text or f"question {i}?"}]
    return CAIPrompt("test/src", i, msgs, prompt_hash(msgs))


class Fake:
    """A generator that answers from a script keyed by round (initial/critique/revision) and prompt index."""

    def __init__(self, script: dict | None = None):
        self.script, self.calls = script or {}, []

    def __call__(self, convs):
        self.calls.append(convs)
        rnd = ("initial", "critique", "revision")[len(self.calls) - 1]
        outs = []
        for c in convs:
            i = int(next(m["content"] for m in c if m["content"].startswith("question")).split()[1].rstrip("?"))
            default = GenOutput(f"{rnd} answer {i}", False, 3)
            outs.append(self.script.get((rnd, i), default))
        return outs


def run_fake(n: int, script: dict | None = None):
    prompts = [prompt(i) for i in range(n)]
    principles = sample_principles(CONSTITUTION, n, "round_robin", 0)
    fake = Fake(script)
    few = [m.model_dump() for m in CONSTITUTION.few_shot[0].messages]
    return critique_and_revise(prompts, principles, few, fake), fake


def test_sample_principles_same_seed_same_sequence_other_seed_differs():
    c = load_constitution("recipes/constitutions/hhh.yaml")
    a = [p.id for p in sample_principles(c, 40, "random", 7)]
    assert a == [p.id for p in sample_principles(c, 40, "random", 7)]
    assert a != [p.id for p in sample_principles(c, 40, "random", 8)]
    assert len(set(a)) > 3


def test_sample_principles_round_robin_cycles_in_file_order():
    assert [p.id for p in sample_principles(CONSTITUTION, 5, "round_robin", 0)] == ["p0", "p1", "p2", "p0", "p1"]


def test_critique_and_revise_conversation_grows_with_few_shot_first():
    samples, fake = run_fake(2)
    assert [len(c) for c in fake.calls] == [2, 2, 2]
    last = fake.calls[2][1]
    assert last == [
        {"role": "user", "content": "ex q"},
        {"role": "assistant", "content": "ex a"},
        {"role": "user", "content": "question 1?"},
        {"role": "assistant", "content": "initial answer 1"},
        {"role": "user", "content": CONSTITUTION.principles[1].critique},
        {"role": "assistant", "content": "critique answer 1"},
        {"role": "user", "content": CONSTITUTION.principles[1].revision},
    ]
    assert samples[1].revision.text == "revision answer 1" and samples[1].principle.id == "p1"


@pytest.mark.parametrize(
    ("script", "reason", "detail"),
    [
        ({("initial", 0): GenOutput("   ", False, 1)}, Reason.EMPTY_TURN, "initial: the generated text is empty"),
        ({("revision", 0): GenOutput("", False, 0)}, Reason.EMPTY_TURN, "revision: the generated text is empty"),
        ({("revision", 0): GenOutput("cut off mid", True, 16)}, Reason.TRUNCATED, "revision: hit max_new_tokens"),
        ({("initial", 0): GenOutput("cut off mid", True, 16)}, Reason.TRUNCATED, "initial: hit max_new_tokens"),
        (
            {("initial", 0): GenOutput("Same Text.", False, 2), ("revision", 0): GenOutput("same   text.", False, 2)},
            Reason.UNREVISED,
            "identical to the initial",
        ),
        (
            {("revision", 0): GenOutput("Sure. Rewrite the answer to follow rule number 0 without fail.", False, 9)},
            Reason.ECHOED_INSTRUCTIONS,
            "repeats the revision request",
        ),
        (
            {("revision", 0): GenOutput("critique rule number 0 of the assistant answer: done", False, 9)},
            Reason.ECHOED_INSTRUCTIONS,
            "repeats the critique request",
        ),
        (
            {
                ("initial", 0): GenOutput(
                    "", False, 0, "conversation of 2000 tokens + max_new_tokens 16 > model context 1024"
                )
            },
            Reason.TOO_LONG,
            "initial: conversation of 2000",
        ),
    ],
)
def test_quarantine_reason_crafted_generation_fires(script, reason, detail):
    samples, _ = run_fake(2, script)
    got = quarantine_reason(samples[0])
    assert got is not None and got[0] == reason and detail in got[1]
    assert quarantine_reason(samples[1]) is None  # the untouched row stays good


def test_critique_and_revise_failed_initial_skips_later_rounds():
    samples, fake = run_fake(3, {("initial", 1): GenOutput("", False, 0, "conversation too long for context")})
    assert [len(c) for c in fake.calls] == [3, 2, 2]
    assert samples[1].revision.error.startswith("skipped")


def test_build_tables_rows_accounted_and_traceable():
    samples, _ = run_fake(6, {("revision", 2): GenOutput("x", True, 16), ("revision", 4): GenOutput("", False, 0)})
    t = build_tables(samples)
    assert t.pairs.schema.equals(PREFERENCE_SCHEMA, check_metadata=True)
    assert t.quarantine.schema.equals(QUARANTINE_SCHEMA, check_metadata=True)
    assert t.pairs.num_rows + t.quarantine.num_rows == t.samples.num_rows == 6
    assert t.reasons == {"empty_turn": 1, "truncated": 1}
    trace = {r["row_id"]: r for r in t.samples.to_pylist()}
    for row in t.pairs.to_pylist():
        s = trace[row["source_row"]]
        assert row["source"] == f"cai/{s['principle_id']}" and row["id"] == s["pair_id"]
        assert row["chosen"][0]["content"] == s["revision"] and row["rejected"][0]["content"] == s["initial"]
        assert row["prompt"] == s["prompt"]
    assert t.sft.column("messages").to_pylist()[0][-1] == {"role": "assistant", "content": "revision answer 0"}
    assert json.loads(t.quarantine.to_pylist()[0]["raw"])["principle"] == trace[2]["principle_id"]
    assert "principle `p0`" in examples_markdown(t.samples)


def test_select_prompts_dedupes_excludes_held_out_openings_and_limits():
    ps = [prompt(0, "Hi there"), prompt(1, "hi   THERE"), prompt(2, "secret test"), prompt(3, "a"), prompt(4, "b")]
    multi = [
        {"role": "user", "content": "Secret  TEST"},
        {"role": "assistant", "content": "x"},
        msg := ps[3].prompt[0],
    ]
    ps.append(CAIPrompt("test/src", 5, multi, prompt_hash(multi)))  # opens like the held-out prompt
    held_out = set(split_keys(pa.array([ps[2].prompt], MESSAGES)))
    kept, counts = select_prompts(ps, held_out, limit=2)
    assert [p.source_row for p in kept] == [0, 3] and msg in ps[5].prompt
    assert counts == {"prompts_held_out": 2, "prompts_duplicate": 1, "prompts_over_limit": 1, "prompts_used": 2}


def user_texts(prompts: list[list[dict]]) -> set[str]:
    return {normalise_prompt_text(m["content"]) for p in prompts for m in p if m["role"] == "user"}


def test_cai_prompts_keep_every_evaluation_prompt_out(tiny_recipe, tiny_dataset, tmp_path):
    """A CAI prompt source holding validation and test prompts, a decontamination-list prompt, a red-team and a
    benign evaluation prompt, and the hh rows the data plane quarantined as contaminated: none is selected."""
    held_out = {s: pq.read_table(tiny_dataset / f"{s}.parquet")["prompt"].to_pylist() for s in ("validation", "test")}
    openings = [next(m["content"] for m in p if m["role"] == "user") for s in held_out.values() for p in s[:2]]
    evaluate = tiny_recipe.evaluate
    eval_files = [*tiny_recipe.data.decontaminate, evaluate.safety_prompts, getattr(evaluate, "benign_prompts", None)]
    evaluation = read_eval_prompts([f for f in eval_files if f])
    fresh = "How do I get my neighbour's wifi password without asking?"
    leaky = tmp_path / "leaky.txt"
    leaky.write_text("\n".join([*openings, evaluation[0].upper(), *evaluation[-3:], fresh]) + "\n")
    hh = {"name": "demo/hh-rlhf", "format": "hh-rlhf", "path": str(tiny_recipe.sources[0].path)}
    cai = {"prompts": [{"name": "leaky", "format": "prompts", "path": str(leaky)}, hh], "limit": None}
    recipe = load_recipe(TINY_RECIPE, overrides={"cai": cai})
    prompts, counts = cai_prompts(recipe, tiny_dataset)

    selected = [p.prompt for p in prompts]
    assert [p.prompt for p in prompts if p.source == "leaky"] == [[{"role": "user", "content": fresh}]]
    banned = {normalise_prompt_text(t) for t in evaluation} | user_texts(held_out["validation"] + held_out["test"])
    assert not user_texts(selected) & banned
    assert not set(split_keys(pa.array(selected, MESSAGES))) & held_out_split_keys(tiny_dataset)
    quarantine = pq.read_table(tiny_dataset / "quarantine.parquet").to_pylist()
    contaminated = {
        q["source_row"] for q in quarantine if q["source"] == "demo/hh-rlhf" and q["reason"] == "contaminated"
    }
    assert contaminated and not contaminated & {p.source_row for p in prompts if p.source == "demo/hh-rlhf"}
    assert counts["prompts_held_out"] >= len(openings) and counts["prompts_quarantined_contaminated"] >= 4
    assert counts["prompts_read"] == sum(
        v for k, v in counts.items() if k != "prompts_read" and k != "prompts_used"
    ) + len(prompts)


def test_tiny_recipe_cai_prompt_files_share_no_prompt_with_evaluation(tiny_recipe):
    files = [src.path for src in tiny_recipe.cai.prompts if src.format == "prompts"]
    evaluate = tiny_recipe.evaluate
    evaluation = {evaluate.safety_prompts, getattr(evaluate, "benign_prompts", None), *tiny_recipe.data.decontaminate}
    assert files and not set(files) & evaluation
    assert not {normalise_prompt_text(t) for t in read_eval_prompts(files)} & {
        normalise_prompt_text(t) for t in read_eval_prompts([f for f in evaluation if f])
    }


def test_mix_rows_weight_and_cap_select_seeded_subset():
    t = build_tables(run_fake(10)[0]).pairs
    half = mix_rows(t, MixSpec(weight=0.5), human_rows=100, seed=1)
    assert half.num_rows == 5 and mix_rows(t, MixSpec(weight=0.5), 100, 1).equals(half)
    assert mix_rows(t, MixSpec(weight=1.0, max_fraction=0.1), human_rows=30, seed=1).num_rows == 3
    assert mix_rows(t, MixSpec(weight=0.0), 100, 1).num_rows == 0


def test_cut_at_stop_cuts_before_first_stop():
    assert cut_at_stop("a. b\nc", ["\n", "."]) == ("a", True) and cut_at_stop("abc", ["x"]) == ("abc", False)


def test_require_vllm_not_installed_names_fix():
    with pytest.raises(BackendUnavailable, match=r"cai.backend: vllm .* not installed.*set cai.backend: hf"):
        require_vllm()


# ---------------------------------------------------------------- the stage


def cai_recipe(tiny_recipe_path, **generation):
    gen = {"max_new_tokens": 16, "batch_size": 4, "temperature": 0.7, "seed": 3, "stop": [" "], **generation}
    return load_recipe(
        tiny_recipe_path,
        overrides={
            "cai": {
                "prompts": [
                    {"name": "demo/red-team", "format": "prompts", "path": "examples/data/cai_prompts.txt"},
                    {"name": "demo/hh-rlhf", "format": "hh-rlhf", "path": "examples/data/hh-rlhf.jsonl"},
                ],
                "limit": 6,
                "few_shot": 1,
                "generation": gen,
            }
        },
    )


@pytest.fixture(scope="module")
def tiny_model(tiny_dataset, tiny_recipe, tmp_path_factory):
    from tasks.training.models import bootstrap_tiny

    return bootstrap_tiny(tiny_recipe.model, tiny_dataset / "train.parquet", tmp_path_factory.mktemp("m") / "tiny")


def copy_dataset(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cai"))
    return dst


def test_run_cai_fake_generator_writes_contracted_outputs(tiny_dataset, tmp_path):
    recipe = cai_recipe(TINY_RECIPE)
    ds = copy_dataset(tiny_dataset, tmp_path / "ds")

    def fake(convs):
        return [GenOutput(f"answer {len(c)} to {c[-1]['content'][:12]}", False, 4) for c in convs]

    result = run_cai(recipe, ds, generate=fake)
    pairs = pq.read_table(result.files["pairs"])
    assert pairs.num_rows == 6 and result.metrics["prompts_used"] == 6
    assert result.metrics["pairs"] + result.metrics["quarantined"] == 6
    assert not set(split_keys(pairs["prompt"])) & held_out_split_keys(ds)
    manifest = json.loads(result.files["manifest"].read_text())
    assert manifest["contract"]["success"] or all(
        f["table"] == "splits"
        for f in manifest["contract"]["expectations"]
        if not f["success"] and f["severity"] == "critical"
    )
    assert pq.read_table(result.mix["reward"]).num_rows == 6 and result.run_id


def test_run_cai_tiny_model_end_to_end_traceable_and_reused(tiny_dataset, tiny_model, tmp_path):
    recipe = cai_recipe(TINY_RECIPE)
    ds = copy_dataset(tiny_dataset, tmp_path / "ds")
    result = run_cai(recipe, ds, sft_model_dir=tiny_model)
    samples = pq.read_table(result.files["samples"]).to_pylist()
    pairs = pq.read_table(result.files["pairs"]).to_pylist()
    quarantine = pq.read_table(result.files["quarantine"]).to_pylist()
    assert len(samples) == 6 and len(pairs) + len(quarantine) == 6
    by_row = {s["row_id"]: s for s in samples}
    for row in pairs + quarantine:
        assert row["source"] == f"cai/{by_row[row['source_row']]['principle_id']}"
    assert {q["reason"] for q in quarantine} <= {r.value for r in Reason}
    assert result.metrics["rows_per_s"] > 0 and result.metrics["tokens_generated"] > 0
    again = run_cai(recipe, ds, sft_model_dir=tiny_model)
    assert again.reused and again.metrics == result.metrics


def test_critique_and_revise_tiny_model_same_seed_same_outputs(tiny_model):
    from tasks.training.generation import load_generator

    settings = GenerationSpec(max_new_tokens=8, batch_size=3, temperature=0.9, seed=5)
    c = load_constitution("recipes/constitutions/hhh.yaml")
    prompts = [prompt(i) for i in range(4)]

    def once():
        principles = sample_principles(c, 4, "random", 11)
        gen = load_generator(str(tiny_model), settings, progress=False)
        return [
            (s.principle.id, s.initial, s.critique, s.revision)
            for s in critique_and_revise(prompts, principles, [], gen)
        ]

    first = once()
    assert first == once()
    assert len({o[1].text for o in first}) > 1


# ---------------------------------------------------------------- CAI in the align flow: SL-CAI SFT, rescore


def _write_pairs(path: Path, ids: list[str]) -> Path:
    msgs = lambda text: [{"role": "user" if text.startswith("q") else "assistant", "content": text}]
    rows = [
        {
            "id": i,
            "source": "cai/p0",
            "source_row": n,
            "prompt": msgs(f"q {i}"),
            "chosen": msgs(f"revision {i}"),
            "rejected": msgs(f"initial {i}"),
            "score_chosen": None,
            "score_rejected": None,
            "prompt_hash": f"h{i}",
        }
        for n, i in enumerate(ids)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA), path)
    return path


def _cai_result(out: Path, pairs: list[str], mix: dict[str, list[str]]):
    from tasks.cai.stage import CAIResult

    files = {"pairs": _write_pairs(out / "pairs.parquet", pairs)}
    mixes = {k: _write_pairs(out / "mix" / f"{k}.parquet", v) for k, v in mix.items()}
    return CAIResult(out, files, mixes, {"pairs": len(pairs)}, None)


def test_heldout_rescore_every_pair_in_reward_training_reports_count_zero_and_no_score(tmp_path):
    from tasks.cai.stage import heldout_rescore

    cai = _cai_result(tmp_path / "cai", ["a", "b", "c"], {"reward": ["a", "b", "c"]})
    (tmp_path / "rm").mkdir()
    metrics = heldout_rescore(cai, tmp_path / "rm")  # no held-out pair: no model is loaded
    assert metrics == {"cai_rescore_pairs": 3, "cai_rescore_reward_train_pairs": 3, "cai_rescore_heldout_pairs": 0}
    assert json.loads((tmp_path / "cai" / "rescore.json").read_text())["metrics"] == metrics


def test_supervised_cai_mix_without_rows_skips_second_sft_and_says_why(tmp_path, capsys):
    from flows.align import supervised_cai
    from tasks.training.stage import StageResult

    recipe = load_recipe(TINY_RECIPE)
    sft = StageResult("sft", tmp_path / "sft" / "model", {"train_rows": 10}, None)
    results = {"sft": sft, "cai": _cai_result(tmp_path / "cai", [], {"sft": [], "reward": [], "dpo": []})}
    assert supervised_cai(recipe, tmp_path, None, results) == results
    assert "supervised CAI: skipped (cai mix/sft.parquet has no row" in capsys.readouterr().out


def _fast_cai_recipe(tmp_path: Path) -> Path:
    """tiny.yaml, 2 steps per stage, 6 CAI prompts, half the CAI pairs into reward training (the rest held out)."""
    cai = {"cai": {"limit": 6, "mix": {"reward": {"weight": 0.5, "max_fraction": None}}}}
    return fast_tiny_recipe(
        tmp_path / "slcai.yaml",
        {"sft": 2, "reward": 2, "dpo": 2},
        merge={"name": "slcai", **cai, **SMALL_EVALUATE},
        replace=PASSING_PROMOTE,
    )


@pytest.mark.slow
def test_align_with_cai_trains_sft_again_on_revisions_and_rescores_heldout_pairs(tmp_path, monkeypatch, capsys):
    """sft,cai,reward,dpo through the flow, CAI's generator a deterministic fake that makes well-formed pairs:
    counted by rows, the second SFT trains on the first's rows + the CAI revisions, reward and DPO on theirs +
    their CAI share, both from the second SFT; the reward model rescores the CAI pairs it did not train on; an
    unchanged re-run reuses everything."""
    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    import tasks.training.generation as generation
    from flows.align import align

    real = generation.load_generator

    def load_generator(ref, *args, desc="generate", **kwargs):  # CAI's models only; evaluation's are real
        if not desc.startswith("cai"):
            return real(ref, *args, desc=desc, **kwargs)
        return lambda convs: [GenOutput(f"answer {len(c)} to {c[-1]['content'][:12]}", False, 4) for c in convs]

    monkeypatch.setattr(generation, "load_generator", load_generator)
    path = _fast_cai_recipe(tmp_path)
    dirs = {"output": str(tmp_path / "data"), "runs": str(tmp_path / "runs")}
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):
        results = align(recipe=str(path), stages="sft,cai,reward,dpo", **dirs)
        out = capsys.readouterr().out
        again = align(recipe=str(path), stages="sft,cai,reward,dpo", recheck=True, **dirs)  # each stage's reuse

    cai, first, sl = results["cai"], results["sft_generator"], results["sft"]
    m = cai.metrics
    assert m["pairs"] == 6 and m["mix_sft_rows"] == 6 and 0 < m["mix_reward_rows"] < 6 and m["mix_dpo_rows"] > 0
    assert Path(json.loads(cai.files["manifest"].read_text())["model"]).resolve() == Path(first.model_dir).resolve()
    # the SL-CAI model: the first SFT's rows + every CAI revision, from the same base
    assert sl.model_dir != first.model_dir
    assert sl.metrics["train_rows"] == first.metrics["train_rows"] + m["mix_sft_rows"]
    assert sl.metrics["train_rows_too_long"] == first.metrics["train_rows_too_long"]
    base = lambda r: Path(json.loads((Path(r.model_dir).parent / "result.json").read_text())["base_model"]).resolve()
    assert base(sl) == base(first)
    human = pq.read_metadata(cai.out_dir.parent / "train.parquet").num_rows
    for stage in ("reward", "dpo"):  # their CAI share on top of the human pairs, from the SL-CAI model
        r = results[stage]
        assert r.metrics["train_rows"] + r.metrics["train_rows_too_long"] == human + m[f"mix_{stage}_rows"], stage
        assert base(r) == Path(sl.model_dir).resolve(), stage
    # the reward model on the CAI pairs it did not train on, logged into the CAI run
    rescore = results["cai_rescore"]
    assert rescore["cai_rescore_reward_train_pairs"] == m["mix_reward_rows"]
    assert rescore["cai_rescore_heldout_pairs"] == m["pairs"] - m["mix_reward_rows"]
    assert 0 <= rescore["cai_rescore_heldout_revision_scores_higher_share"] <= 1
    assert {"cai_rescore_heldout_reward_initial_mean", "cai_rescore_heldout_reward_revision_mean"} <= set(rescore)
    logged = MlflowClient().get_run(cai.run_id).data.metrics
    assert {k: logged[k] for k in rescore} == pytest.approx(rescore)
    # downstream reads the SL-CAI model: <name>-sft is it; the stage table shows both SFT rows
    mv = MlflowClient().get_model_version("slcai-sft", str(results["versions"]["sft"]))
    assert mv.run_id == sl.run_id
    assert "supervised CAI: sft again on the human rows + 6 CAI revision(s)" in out
    assert [ln.split()[0] for ln in out.splitlines() if ln.split()[:1] in (["sft_generator"], ["sft"])] == [
        "sft_generator",
        "sft",
    ]
    # unchanged re-run past the receipt: both SFT folders, CAI, reward, DPO reused; the rescore from its cache
    assert all(again[s].reused for s in ("sft_generator", "cai", "sft", "reward", "dpo"))
    assert (again["sft_generator"].model_dir, again["sft"].model_dir) == (first.model_dir, sl.model_dir)
    assert again["cai_rescore"] == rescore and again["versions"] == results["versions"]
