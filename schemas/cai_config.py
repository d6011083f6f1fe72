"""Recipe section of the Constitutional-AI stage: ``cai``.

```yaml
cai:
  constitution: recipes/constitutions/hhh.yaml    # our YAML layout, or HF's CAI-recipe JSON
  prompts:                                        # any data-plane source (its prompts), or a plain prompt file
    - {name: demo/hh-rlhf, format: hh-rlhf, path: examples/data/hh-rlhf.jsonl}
    - {name: demo/red-team, format: prompts, path: examples/data/cai_prompts.txt}
  limit: 64                                       # after cleaning, decontamination, held-out exclusion, dedupe
  generation: {max_new_tokens: 64, temperature: 0.7, top_p: 0.95, stop: ["\\n\\n"], batch_size: 8}
  mix: {sft: {weight: 1.0}, reward: {weight: 1.0, max_fraction: 0.5}, dpo: {weight: 1.0}}
```
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from schemas.data_config import SourceConfig, Strict


class GenerationSpec(Strict):
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(0.7, ge=0, description="0 = greedy decoding")
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(8, gt=0)
    stop: list[str] = Field(default_factory=list, description="stop strings; the text is cut before the first one")


class PromptFile(Strict):
    """A plain prompt file: .txt (one prompt per line) or .jsonl / .json with a `prompt` string per row."""

    name: str
    format: Literal["prompts"]
    path: str
    limit: int | None = Field(None, gt=0)


PromptSource = Annotated[SourceConfig | PromptFile, Field(discriminator="format")]


class MixSpec(Strict):
    """How CAI rows join one training set: a seeded share of them, optionally capped relative to human rows."""

    weight: float = Field(1.0, ge=0, le=1, description="share of the accepted CAI rows used (0 = none)")
    max_fraction: float | None = Field(
        None, ge=0, description="at most this many CAI rows per human training row (e.g. 0.5)"
    )


class MixConfig(Strict):
    sft: MixSpec = Field(default_factory=MixSpec, description="CAI SFT rows (prompt + revision) into SFT")
    reward: MixSpec = Field(default_factory=MixSpec, description="CAI pairs into reward-model training")
    dpo: MixSpec = Field(default_factory=MixSpec, description="CAI pairs into DPO training")


class CAIConfig(Strict):
    constitution: str = "recipes/constitutions/hhh.yaml"
    sampling: Literal["random", "round_robin"] | None = Field(
        None, description="principle sampling; empty = the constitution's own `sampling`"
    )
    few_shot: int | None = Field(None, ge=0, description="few-shot conversations used; empty = all of them")
    seed: int = Field(0, description="principle sampling seed")
    prompts: list[PromptSource] = Field(default_factory=list)
    limit: int | None = Field(
        None, gt=0, description="prompts used, after cleaning, decontamination, held-out exclusion and dedupe"
    )
    model: str | None = Field(None, description="model for the initial response; empty = the SFT stage's output")
    critic_model: str | None = Field(
        None, description="model for critique and revision (RLAIF with a stronger model); empty = `model`"
    )
    backend: Literal["hf", "vllm"] = "hf"
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    mix: MixConfig = Field(default_factory=MixConfig)
