"""Recipe sections of the training stages: ``model``, ``sft``, ``reward``, ``dpo``, ``rl``.

Each stage's ``args`` are TRL config fields, spelled as TRL spells them, passed through unchanged
(tasks check them against the TRL config class, so an unknown field fails naming the key).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from schemas.data_config import Strict

TOKEN_ARGS = frozenset({"hub_token", "push_to_hub_token"})  # TrainingArguments fields that would hold a token


class TinyModel(Strict):
    """Shape of the offline bootstrap model (a Llama config, random init, seeded)."""

    architecture: Literal["llama", "qwen2"] = "llama"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 2048
    max_position_embeddings: int = 1024
    seed: int = 0


class ModelSpec(Strict):
    name_or_path: str = Field("tiny", description="hub id, local HF folder, or `tiny` (offline bootstrap)")
    chat_template: Literal["auto", "chatml", "zephyr", "llama3"] = "auto"
    tiny: TinyModel = Field(default_factory=TinyModel)
    revision: str | None = None
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = Field(
        False, description="run the model repository's own Python code (auto_map) when loading it; off unless set"
    )


class LoraSpec(Strict):
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    quantization: Literal["none", "4bit", "8bit"] = "none"


class StageConfig(Strict):
    model: str | None = Field(
        None, description="base model (folder, hub id, package:<module>); empty = the previous stage's output"
    )
    lora: LoraSpec | None = None
    args: dict = Field(default_factory=dict, description="TRL config fields, passed through")

    @field_validator("args")
    @classmethod
    def _no_token_in_args(cls, args: dict) -> dict:
        found = sorted(k for k in args if k in TOKEN_ARGS)
        if found:
            raise ValueError(
                f"{found[0]}: a token does not belong in a recipe (the recipe is logged to MLflow); set HF_TOKEN "
                "in the environment, where the hub client reads it"
            )
        return args


class SFTStage(StageConfig):
    """SFT trains on the dataset's sft table (``format: sft`` sources, data/<version>/sft/) and, with
    ``from_pairs``, on prompt + chosen answer of every preference pair."""

    from_pairs: bool = Field(True, description="also train on prompt + chosen of the preference pairs")


class RewardStage(StageConfig):
    pass


class DPOStage(StageConfig):
    method: Literal["dpo", "orpo", "simpo", "kto"] = Field(
        "dpo",
        description="dpo: trl.DPOTrainer; orpo / simpo: trl.experimental ORPOTrainer / CPOTrainer(simpo); "
        "kto: trl.KTOTrainer on the pairs unpaired (chosen desirable, rejected undesirable) plus unpaired rows",
    )
    eval_beta: float | None = Field(
        None, gt=0, description="beta of the held-out implicit reward vs the base model; default args.beta or 0.1"
    )


class RLStage(StageConfig):
    """Online RL against the reward model: ``args`` are RLOOConfig / GRPOConfig fields, as TRL spells them."""

    method: Literal["rloo", "grpo"] = Field("rloo", description="rloo: trl.RLOOTrainer; grpo: trl.GRPOTrainer")
    reward_model: str | None = Field(
        None, description="reward model (folder, hub id, package:<module>); empty = the pipeline's reward stage output"
    )
    heldout_prompts: int = Field(
        64, gt=0, description="held-out prompts answered greedily for reward_mean_start / reward_mean_final"
    )
