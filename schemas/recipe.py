"""One YAML recipe describes a whole run; it is validated here, once, at the edge.

Every level forbids unknown keys, and a bad recipe fails with one line per problem that names the
file, the dotted key path, what was found and what was expected.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator

from schemas.cai_config import CAIConfig
from schemas.data_config import DataConfig, SourceConfig, Strict, repeated
from schemas.eval_config import ComputeConfig, EvaluateConfig, MlflowConfig, PromoteConfig
from schemas.hashing import content_hash
from schemas.train_config import DPOStage, ModelSpec, RewardStage, RLStage, SFTStage


class RecipeError(ValueError):
    """A recipe that does not validate; the message names the file and each bad key."""


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    sources: list[SourceConfig] = Field(min_length=1)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSpec = Field(default_factory=ModelSpec)
    sft: SFTStage = Field(default_factory=SFTStage)
    cai: CAIConfig = Field(default_factory=CAIConfig)
    reward: RewardStage = Field(default_factory=RewardStage)
    dpo: DPOStage = Field(default_factory=DPOStage)
    rl: RLStage | None = Field(None, description="online RL stage; `align` runs it when this section is set")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)

    @field_validator("sources")
    @classmethod
    def check_source_names_unique(cls, v: list[SourceConfig]) -> list[SourceConfig]:
        dupes = repeated([s.name for s in v])
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {dupes}")
        return v

    def section_hash(self, *sections: str) -> str:
        """Content hash of the named top-level sections (a stage's cache key part)."""
        payload = {
            s: getattr(self, s).model_dump(mode="json")
            if not isinstance(getattr(self, s), list)
            else [x.model_dump(mode="json") for x in getattr(self, s)]
            for s in sections
        }
        return content_hash(payload)

    def recipe_hash(self) -> str:
        return content_hash(self.model_dump(mode="json"))


def format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid recipe ({err.error_count()} problem(s))"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see schemas/ for the valid keys)"
        else:
            msg = e["msg"]
        found = e.get("input")
        shown = "" if e["type"] in ("missing",) or isinstance(found, dict) else f" (found: {found!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def parse_recipe(data: dict, origin: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe is a YAML mapping, found {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, origin)) from None


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    """Read and validate a recipe file; ``overrides`` (nested dict) are merged over it first."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if overrides:
        data = deep_merge(data or {}, overrides)
    return resolve_paths(parse_recipe(data, str(path)), path)


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def find_file(p: str, recipe_path: Path) -> str:
    """A relative path in a recipe: the current directory, then the recipe's folder, then its parent
    (recipes live in <project>/recipes/), then the project root; the first that exists, else as given."""
    if Path(p).is_absolute():
        return p
    recipe_dir = recipe_path.resolve().parent
    for base in (Path.cwd(), recipe_dir, recipe_dir.parent, PROJECT_ROOT):
        if (base / p).exists():
            return str((base / p).resolve())
    return p


def resolve_paths(recipe: Recipe, recipe_path: Path) -> Recipe:
    """Make the recipe's file references absolute once, at load, so every task sees the same files."""
    for src in [*recipe.sources, *recipe.cai.prompts]:
        if src.path:
            src.path = find_file(src.path, recipe_path)
    recipe.data.decontaminate = [find_file(p, recipe_path) for p in recipe.data.decontaminate]
    recipe.data.contract = find_file(recipe.data.contract, recipe_path)
    recipe.data.sft_contract = find_file(recipe.data.sft_contract, recipe_path)
    recipe.data.unpaired_contract = find_file(recipe.data.unpaired_contract, recipe_path)
    recipe.cai.constitution = find_file(recipe.cai.constitution, recipe_path)
    if recipe.evaluate.safety_prompts:
        recipe.evaluate.safety_prompts = find_file(recipe.evaluate.safety_prompts, recipe_path)
    if recipe.evaluate.benign_prompts:
        recipe.evaluate.benign_prompts = find_file(recipe.evaluate.benign_prompts, recipe_path)
    return recipe


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
