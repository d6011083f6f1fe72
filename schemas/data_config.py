"""Recipe sections of the data plane: ``sources`` and ``data``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The adapter names; tasks/data/sources/formats.py registers exactly these (a test keeps the two in step).
SourceFormat = Literal[
    "hh-rlhf", "orca_dpo_pairs", "ultrafeedback", "ultrafeedback_binarized", "generic", "sft", "unpaired"
]


def repeated(values: list) -> list:
    """The values that occur more than once, sorted (for `check_*_unique` validators)."""
    seen, dupes = set(), set()
    for v in values:
        (dupes if v in seen else seen).add(v)
    return sorted(dupes)


class Strict(BaseModel):
    """Base of every recipe model: unknown keys are errors (typos fail at load, naming the key)."""

    model_config = ConfigDict(extra="forbid")


class HubSource(Strict):
    """Arguments of ``datasets.load_dataset`` for a source on the Hugging Face Hub."""

    path: str
    name: str | None = None
    data_dir: str | None = None
    data_files: str | list[str] | None = None
    split: str = "train"
    revision: str | None = None


class UltraFeedbackOptions(Strict):
    # mean_rating by default: upstream `overall_score` has a known bug (some critique scores of 1 became 10,
    # so poor completions rank first); HuggingFaceH4/ultrafeedback_binarized re-derived its pairs from the
    # mean of the four aspect ratings for that reason.
    score: Literal["overall_score", "mean_rating"] = Field(
        "mean_rating", description="completion score: mean of the aspect ratings, or the buggy overall_score"
    )
    rejected: Literal["random", "lowest"] = "random"


class BinarizedOptions(Strict):
    keep_ties: bool = False


class OrcaOptions(Strict):
    strip_answer_edges: bool = Field(
        False,
        description="strip whitespace at both ends of chosen and rejected: upstream every rejected answer "
        "starts with a space and no chosen one does, a label a reward model learns instead of the preference",
    )


class NoOptions(Strict):
    pass


FORMAT_OPTIONS: dict[str, type[Strict]] = {
    "hh-rlhf": NoOptions,
    "orca_dpo_pairs": OrcaOptions,
    "ultrafeedback": UltraFeedbackOptions,
    "ultrafeedback_binarized": BinarizedOptions,
    "generic": NoOptions,
    "sft": NoOptions,  # SFT conversations (schemas/sft.py): the row shape is detected per row
    "unpaired": NoOptions,  # unpaired feedback (schemas/unpaired.py): prompt/completion/label or messages/label
}


class SourceConfig(Strict):
    name: str = Field(description="provenance label written to every row's `source`, e.g. hh-rlhf/harmless-base")
    format: SourceFormat
    path: str | None = Field(None, description="local .jsonl, .jsonl.gz, .json or .parquet file")
    hub: HubSource | None = None
    limit: int | None = Field(None, gt=0, description="read at most this many rows (the first ones)")
    weight: float = Field(1.0, gt=0, le=1, description="fraction of this source's rows kept (seeded by row id)")
    options: dict = Field(default_factory=dict, description="format-specific options")
    split: Literal["validation", "test"] | None = Field(
        None,
        description="keep the source's own held-out split (e.g. ultrafeedback_binarized test_prefs): every row "
        "goes to this split, none is re-split, and rows of any table opening with one of its prompts follow it; "
        "the hash split then draws no rows into that split",
    )

    @model_validator(mode="after")
    def check_exactly_one_location(self):
        if (self.path is None) == (self.hub is None):
            raise ValueError(f"source {self.name!r}: give exactly one of `path` or `hub`")
        return self

    @model_validator(mode="after")
    def check_options_fit_format(self):
        model = FORMAT_OPTIONS[self.format]
        try:
            model.model_validate(self.options)
        except ValidationError as e:  # re-raised naming the source, the key and the valid keys
            problems = "; ".join(
                f"options.{'.'.join(map(str, err['loc']))}: "
                + ("unknown key" if err["type"] == "extra_forbidden" else err["msg"])
                for err in e.errors()
            )
            valid = ", ".join(model.model_fields) or "none"
            raise ValueError(
                f"source {self.name!r} (format {self.format!r}): {problems} (valid options: {valid})"
            ) from None
        return self

    def typed_options(self) -> Strict:
        return FORMAT_OPTIONS[self.format].model_validate(self.options)


class LengthLimits(Strict):
    min_chars: int = Field(1, ge=0, description="every prompt/answer turn must have at least this many characters")
    max_chars: int = Field(32_000, gt=0, description="a single turn longer than this is quarantined")
    max_tokens: int | None = Field(None, gt=0, description="prompt+longer answer, in tokens of `tokenizer`")
    tokenizer: str | None = Field(None, description="HF tokenizer (hub id or folder) for `max_tokens`")

    @model_validator(mode="after")
    def check_tokenizer_for_tokens(self):
        if self.max_tokens is not None and self.tokenizer is None:
            raise ValueError("data.lengths.max_tokens needs data.lengths.tokenizer")
        return self


class DataConfig(Strict):
    output_dir: str = "data"
    test_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="share of prompts held out for the evaluate stage (unused when a source brings its test split)",
    )
    validation_fraction: float = Field(
        0.1,
        ge=0.01,
        lt=1,
        description="share of prompts carved from train for in-training evaluation and checkpoint choice; "
        "at least 0.01 (every training stage evaluates on it, never on test)",
    )
    seed: int = 42
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    lengths: LengthLimits = Field(default_factory=LengthLimits)
    decontaminate: list[str] = Field(
        default_factory=list,
        description="files of evaluation prompts (.txt one per line, or .jsonl with `prompt`) removed from train",
    )
    decontaminate_ngram: int | None = Field(
        None,
        ge=4,
        description="also drop rows whose user turn shares a run of this many words with an evaluation prompt "
        "(or holds all of a shorter one), e.g. 13; empty = exact matches of normalised user turns only",
    )
    split_tolerance: float = Field(
        0.05, ge=0, lt=1, description="allowed |share - fraction| of the test and validation splits (contract)"
    )
    contract: str = Field("data_contracts/preference.yaml", description="expectation suite for the splits")
    sft_contract: str = Field("data_contracts/sft.yaml", description="expectation suite of the sft table")
    unpaired_contract: str = Field(
        "data_contracts/unpaired.yaml", description="expectation suite of the unpaired table"
    )

    @model_validator(mode="after")
    def check_holdout_fractions(self):
        held_out = self.test_fraction + self.validation_fraction
        if held_out > 0.5:
            raise ValueError(
                f"data.test_fraction ({self.test_fraction}) + data.validation_fraction ({self.validation_fraction}) "
                f"= {held_out:g} holds out more than half the prompts; lower one of them (train keeps the rest)"
            )
        return self
