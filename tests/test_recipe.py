from pathlib import Path

import pytest
import yaml

from schemas.recipe import RecipeError, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def minimal(**over) -> dict:
    base = {"name": "t", "sources": [{"name": "a", "format": "generic", "path": "x.jsonl"}]}
    base.update(over)
    return base


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name and recipe.sources


def test_tiny_recipe_paths_resolve_to_shipped_files(tiny_recipe):
    for src in tiny_recipe.sources:
        assert Path(src.path).is_file(), src.path
    assert Path(tiny_recipe.data.contract).is_file()


def test_recipe_unknown_key_named_with_its_path():
    with pytest.raises(RecipeError, match=r"data\.test_fractoin: unknown key"):
        parse_recipe(minimal(data={"test_fractoin": 0.2}), "r.yaml")


def test_recipe_unknown_format_lists_valid_formats():
    bad = minimal(sources=[{"name": "a", "format": "alpaca", "path": "x"}])
    with pytest.raises(RecipeError) as e:
        parse_recipe(bad, "r.yaml")
    msg = str(e.value)
    assert "sources.0.format" in msg and "'alpaca'" in msg
    for name in ("hh-rlhf", "orca_dpo_pairs", "ultrafeedback", "ultrafeedback_binarized", "generic"):
        assert name in msg


def test_recipe_source_needs_exactly_one_location():
    with pytest.raises(RecipeError, match="exactly one of `path` or `hub`"):
        parse_recipe(minimal(sources=[{"name": "a", "format": "generic"}]), "r.yaml")


def test_recipe_bad_format_option_names_source_and_key():
    bad = minimal(sources=[{"name": "uf", "format": "ultrafeedback", "path": "x", "options": {"scroe": "x"}}])
    with pytest.raises(
        RecipeError,
        match=r"source 'uf' \(format 'ultrafeedback'\): options.scroe: unknown key \(valid options: score, rejected\)",
    ):
        parse_recipe(bad, "r.yaml")


def test_recipe_duplicate_source_names_rejected():
    src = {"name": "a", "format": "generic", "path": "x"}
    with pytest.raises(RecipeError, match=r"repeated: \['a'\]"):
        parse_recipe(minimal(sources=[src, src]), "r.yaml")


def test_recipe_test_fraction_out_of_range_named():
    with pytest.raises(RecipeError, match=r"data\.test_fraction: .*less than 1 \(found: 1\.5\)"):
        parse_recipe(minimal(data={"test_fraction": 1.5}), "r.yaml")


def test_recipe_file_missing_or_not_yaml_named(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="bad.yaml: not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_recipe_relative_path_resolves_next_to_recipe(tmp_path, monkeypatch):
    (tmp_path / "rows.jsonl").write_text("{}\n")
    (tmp_path / "r.yaml").write_text(
        yaml.safe_dump(minimal(sources=[{"name": "a", "format": "generic", "path": "rows.jsonl"}]))
    )
    monkeypatch.chdir("/")
    assert load_recipe(tmp_path / "r.yaml").sources[0].path == str(tmp_path / "rows.jsonl")


def test_recipe_overrides_merge_before_validation(tiny_recipe):
    r = load_recipe(ROOT / "recipes" / "tiny.yaml", overrides={"data": {"test_fraction": 0.25}})
    assert r.data.test_fraction == 0.25 and r.data.seed == tiny_recipe.data.seed
    assert r.recipe_hash() != tiny_recipe.recipe_hash()
