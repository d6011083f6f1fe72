"""An expectation suite file (data_contracts/*.yaml) as a validated model: the schema of the contracts that
tasks/data/contracts.py runs through Great Expectations."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class SmallData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    below_rows: int = Field(gt=0, description="rows of all splits under which `severity` applies instead")
    severity: Literal["critical", "warning"] = "warning"


class ExpectationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    view: Literal["rows", "splits", "sources", "quarantine"]
    type: str = Field(description="GX 1.x expectation in snake_case, e.g. expect_column_values_to_be_in_set")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    severity: Literal["critical", "warning"]
    description: str
    small_data: SmallData | None = None
    report: list[str] = Field(
        default_factory=list, description="view columns shown beside each unexpected row in reports (e.g. counts)"
    )

    @field_validator("type")
    @classmethod
    def check_type_is_gx_expectation(cls, v: str) -> str:
        gx_expectation_class(v)  # raises naming the type; the caller adds the expectation id
        return v

    def severity_for(self, total_rows: int) -> str:
        if self.small_data is not None and total_rows < self.small_data.below_rows:
            return self.small_data.severity
        return self.severity


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    version: int
    params: dict[str, Any] = Field(default_factory=dict, description="placeholder defaults; run params win")
    expectations: list[ExpectationSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def check_ids_unique(self):
        seen: set[str] = set()
        for e in self.expectations:
            if e.id in seen:
                raise ValueError(f"expectation id {e.id!r} is used twice: ids name rules in breach messages")
            seen.add(e.id)
        return self


def gx_expectation_class(type_name: str) -> type:
    """``expect_column_values_to_be_in_set`` → ``great_expectations.expectations.ExpectColumnValuesToBeInSet``."""
    import great_expectations.expectations as gxe

    cls = getattr(gxe, "".join(part.capitalize() for part in type_name.split("_")), None)
    if not (type_name.startswith("expect_") and isinstance(cls, type) and issubclass(cls, gxe.Expectation)):
        raise ValueError(f"unknown expectation type {type_name!r}: not a class in great_expectations.expectations")
    return cls
