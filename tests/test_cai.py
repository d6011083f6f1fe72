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
