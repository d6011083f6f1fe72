"""Recipe sections after training: ``evaluate``, ``promote``, ``mlflow``, ``compute``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from schemas.data_config import Strict


class EvaluateConfig(Strict):
    max_prompts: int = Field(64, gt=0, description="held-out test prompts used for generation (win rate, KL, lengths)")
    max_pairs: int = Field(256, gt=0, description="held-out test pairs used for preference accuracy")
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(0.0, ge=0, description="0 = greedy (deterministic); > 0 = seeded sampling")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(16, gt=0)
    bootstrap_samples: int = Field(1000, gt=0)
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the bootstrap confidence interval")
    tie_epsilon: float = Field(1e-6, ge=0, description="|RM(policy) - RM(sft)| at or below this is a tie")
    sample_rows: int = Field(16, ge=0, description="generations logged as an MLflow table artifact")
    versus_base: bool = Field(
        True, description="also answer with the untrained base model: win_rate_vs_base (raw and length-controlled)"
    )
    safety_prompts: str | None = Field(None, description="file of red-team prompts (.txt or .jsonl `prompt`)")
    benign_prompts: str | None = Field(
        None, description="file of clearly benign requests (.txt or .jsonl `prompt`): the over-refusal rate"
    )


GateOp = Literal[">=", "<="]


class Gate(Strict):
    """An absolute gate: ``candidate[metric] <op> threshold``."""

    metric: str = Field(description="a key of the evaluation metrics (see tasks/evaluation/stage.py)")
    op: GateOp = ">="
    threshold: float


class ChampionGate(Strict):
    """A relative gate: the candidate is not worse than the current champion on the same evaluation data.

    With ``tolerance`` (the champion's own value of ``metric`` is the reference):
    ``op: ">="`` (higher is better): candidate >= champion - tolerance;
    ``op: "<="`` (lower is better):  candidate <= champion + tolerance.
    With ``threshold``: ``metric`` is itself a candidate-vs-champion measure (``win_rate_vs_champion_ci_high``),
    compared with the threshold, and it must have been measured against the current champion.
    Either form passes when there is no champion.
    """

    metric: str
    op: GateOp = ">="
    tolerance: float = Field(0.0, ge=0)
    threshold: float | None = None

    @model_validator(mode="after")
    def check_tolerance_or_threshold(self):
        if self.threshold is not None and self.tolerance:
            raise ValueError(
                f"champion gate on {self.metric!r}: give `tolerance` (relative to the champion's value) or "
                "`threshold` (for a candidate-vs-champion metric), not both"
            )
        return self


class PromoteConfig(Strict):
    model: Literal["sft", "reward", "dpo", "rl"] = Field("dpo", description="the stage whose model `align` promotes")
    gates: dict[str, Gate] = Field(default_factory=dict)
    champion_gates: dict[str, ChampionGate] = Field(default_factory=dict)
    require_contract_success: bool = Field(True, description="gate: the dataset had no critical contract breach")


class MlflowConfig(Strict):
    tracking_uri: str | None = Field(None, description="MLFLOW_TRACKING_URI overrides; default sqlite under .align/")
    experiment: str = "align"


class ComputeConfig(Strict):
    gpu_pool: str | None = None
    accelerate_config: str | None = None
    num_processes: int = 1
