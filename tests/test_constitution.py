"""Constitution files: our YAML layout, Hugging Face's CAI-recipe JSON, and clear errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.constitution import ConstitutionError, load_constitution, parse_constitution
from schemas.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_load_constitution_shipped_default_validates():
    c = load_constitution(ROOT / "recipes" / "constitutions" / "hhh.yaml")
    assert c.name == "hhh" and len(c.principles) >= 6 and c.sampling == "random"
    assert c.few_shot and c.few_shot[0].messages[-1].role == "assistant"


@pytest.mark.parametrize(("name", "principles"), [("anthropic", 16), ("grok", 2)])
def test_load_constitution_hf_json_maps_principles_and_few_shot(shared_data, name, principles):
    path = shared_data / "constitution" / f"{name}.json"
    raw = json.loads(path.read_text())
    c = load_constitution(path)
    assert [p.id for p in c.principles][:2] == [f"{name}-00", f"{name}-01"]
    assert len(c.principles) == principles
    assert c.principles[1].critique == raw["constitutions"][1]["critic"]
    assert c.principles[1].revision == raw["constitutions"][1]["revision"]
    assert [[m.model_dump() for m in ex.messages] for ex in c.few_shot] == raw["system_chat"]


def test_load_constitution_hf_json_missing_revision_names_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"constitutions": [{"critic": "a"}, {"critic": "b", "revision": "c"}]}))
    with pytest.raises(ConstitutionError, match=r"bad\.json.*\n  constitutions\.0\.revision: Field required"):
        load_constitution(path)


def test_load_constitution_yaml_missing_critique_names_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nprinciples:\n  - {id: a, critique: c, revision: r}\n  - {id: b, revision: r}\n")
    with pytest.raises(ConstitutionError, match=r"principles\.1\.critique: Field required"):
        load_constitution(path)


def test_parse_constitution_unknown_key_is_named():
    with pytest.raises(ConstitutionError, match=r"principles\.0\.critic: unknown field"):
        parse_constitution({"name": "x", "principles": [{"id": "a", "critic": "c", "revision": "r"}]})


def test_parse_constitution_duplicate_ids_rejected():
    p = {"id": "a", "critique": "c", "revision": "r"}
    with pytest.raises(ConstitutionError, match=r"principles: .*repeated: \['a'\]"):
        parse_constitution({"name": "x", "principles": [p, p]})


def test_parse_constitution_few_shot_ending_with_user_rejected():
    bad = {
        "name": "x",
        "principles": [{"id": "a", "critique": "c", "revision": "r"}],
        "few_shot": [
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "q2"},
                ]
            }
        ],
    }
    with pytest.raises(ConstitutionError, match=r"few_shot\.0\.messages: .*end with assistant"):
        parse_constitution(bad)


def test_parse_constitution_bad_sampling_named():
    with pytest.raises(ConstitutionError, match=r"sampling: Input should be 'random' or 'round_robin'"):
        parse_constitution(
            {"name": "x", "sampling": "shuffle", "principles": [{"id": "a", "critique": "c", "revision": "r"}]}
        )


def test_load_constitution_invalid_yaml_says_so(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [x\n")
    with pytest.raises(ConstitutionError, match=r"broken\.yaml: not valid YAML"):
        load_constitution(path)


def test_cai_recipe_prompt_file_and_source_both_accepted():
    cai = {
        "prompts": [
            {"name": "red", "format": "prompts", "path": "r.txt"},
            {"name": "hh", "format": "hh-rlhf", "path": "h.jsonl"},
        ],
        "mix": {"reward": {"weight": 0.5, "max_fraction": 0.25}},
    }
    recipe = parse_recipe(
        {"name": "t", "sources": [{"name": "s", "format": "generic", "path": "g.jsonl"}], "cai": cai}
    )
    assert [type(p).__name__ for p in recipe.cai.prompts] == ["PromptFile", "SourceConfig"]
    assert recipe.cai.mix.reward.max_fraction == 0.25
