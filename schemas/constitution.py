"""A constitution: the principles the CAI stage critiques and revises against (recipes/constitutions/*.yaml).

Our layout (YAML or JSON)::

    name: hhh
    sampling: random            # or round_robin: which principle each prompt gets
    principles:
      - {id: harmless-dangerous, critique: "Identify ...", revision: "Rewrite ..."}
    few_shot:                   # optional example conversations, put before every prompt
      - principle: harmless-dangerous
        messages: [{role: user, content: ...}, {role: assistant, content: ...}, ...]

Hugging Face's CAI recipe layout (llm-swarm ``examples/constitutional-ai``) is read too:
``{"constitutions": [{"critic", "revision"}], "system_chat": [[{role, content}, ...], ...]}``; its
principles get ids ``<file stem>-<index>`` (``anthropic-03``), its ``system_chat`` become the few-shot examples.

The output tables of the stage are defined here as well (next to the principles they name).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.data_config import Strict, repeated
from schemas.preference import MESSAGES, SCHEMA_VERSION, Message

PRINCIPLE_ID = r"^[a-z0-9][a-z0-9_.-]*$"


class ConstitutionError(ValueError):
    """A constitution file that does not validate; the message names the file and each bad field."""


class Principle(Strict):
    id: str = Field(pattern=PRINCIPLE_ID, description="kept on every CAI row as source `cai/<id>`")
    critique: str = Field(min_length=1, description="critique request, sent as a user turn after the response")
    revision: str = Field(min_length=1, description="revision request, sent as a user turn after the critique")


class FewShotExample(Strict):
    principle: str | None = Field(None, description="id of the principle it demonstrates (documentation only)")
    messages: list[Message] = Field(min_length=2)

    @field_validator("messages")
    @classmethod
    def check_turns_alternate(cls, v: list[Message]) -> list[Message]:
        roles = [m.role for m in v]
        if "system" in roles[1:]:
            raise ValueError("a system turn may only come first")
        roles = roles[1:] if roles[0] == "system" else roles
        expected = ["user", "assistant"] * (len(roles) // 2 + 1)
        if not roles or roles != expected[: len(roles)] or roles[-1] != "assistant":
            raise ValueError(f"turns must alternate user/assistant and end with assistant; found roles {roles}")
        if any(not m.content.strip() for m in v):
            raise ValueError("every few-shot turn needs content")
        return v


class Constitution(Strict):
    name: str
    description: str = ""
    sampling: Literal["random", "round_robin"] = "random"
    principles: list[Principle] = Field(min_length=1)
    few_shot: list[FewShotExample] = Field(default_factory=list)

    @field_validator("principles")
    @classmethod
    def check_principle_ids_unique(cls, v: list[Principle]) -> list[Principle]:
        dupes = repeated([p.id for p in v])
        if dupes:
            raise ValueError(f"principle ids must be unique; repeated: {dupes}")
        return v

    def principle(self, pid: str) -> Principle:
        for p in self.principles:
            if p.id == pid:
                return p
        raise KeyError(f"constitution {self.name!r} has no principle {pid!r}; ids: {[p.id for p in self.principles]}")


class _HFPrinciple(BaseModel):
    model_config = ConfigDict(extra="forbid")
    critic: str = Field(min_length=1)
    revision: str = Field(min_length=1)


class _HFConstitution(BaseModel):
    """The JSON layout of Hugging Face's CAI recipe, validated with its own field names."""

    model_config = ConfigDict(extra="forbid")
    constitutions: list[_HFPrinciple] = Field(min_length=1)
    system_chat: list[list[Message]] = Field(default_factory=list)


def _format_error(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid constitution ({err.error_count()} problem(s))"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_constitution(data: object, origin: str = "<constitution>", stem: str = "constitution") -> Constitution:
    """Validate a loaded mapping in either layout (HF's is recognised by its `constitutions` key)."""
    if not isinstance(data, dict):
        raise ConstitutionError(f"{origin}: a constitution is a mapping, found {type(data).__name__}")
    try:
        if "constitutions" in data:
            hf = _HFConstitution.model_validate(data)
            width = max(2, len(str(len(hf.constitutions) - 1)))
            slug = "".join(c if c.isalnum() else "-" for c in stem.lower()).strip("-") or "constitution"
            return Constitution(
                name=stem,
                description=f"Hugging Face CAI recipe layout ({origin})",
                principles=[
                    Principle(id=f"{slug}-{i:0{width}d}", critique=p.critic, revision=p.revision)
                    for i, p in enumerate(hf.constitutions)
                ],
                few_shot=[FewShotExample(messages=chat) for chat in hf.system_chat],
            )
        return Constitution.model_validate(data)
    except ValidationError as e:
        raise ConstitutionError(_format_error(e, origin)) from None


def load_constitution(path: str | Path) -> Constitution:
    """Read a constitution file (.yaml/.yml/.json, our layout or HF's) and validate it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConstitutionError(f"{path}: constitution file not found") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConstitutionError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    return parse_constitution(data, str(path), stem=path.stem)


# The CAI stage's trace table (pairs: PREFERENCE_SCHEMA, SFT rows: schemas.sft SFT_SCHEMA).
# One row per prompt, accepted or not: the full trace (row_id is `source_row` on the other tables).
CAI_SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.int64(), nullable=False),
        pa.field("prompt_source", pa.string(), nullable=False),
        pa.field("prompt_source_row", pa.int64(), nullable=False),
        pa.field("prompt", MESSAGES, nullable=False),
        pa.field("prompt_hash", pa.string(), nullable=False),
        pa.field("principle_id", pa.string(), nullable=False),
        pa.field("critique_request", pa.string(), nullable=False),
        pa.field("revision_request", pa.string(), nullable=False),
        pa.field("initial", pa.string(), nullable=False),
        pa.field("critique", pa.string(), nullable=False),
        pa.field("revision", pa.string(), nullable=False),
        pa.field("initial_truncated", pa.bool_(), nullable=False),
        pa.field("critique_truncated", pa.bool_(), nullable=False),
        pa.field("revision_truncated", pa.bool_(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "accepted" or the quarantine reason
        pa.field("pair_id", pa.string(), nullable=True),
    ],
    metadata={"align.schema_version": SCHEMA_VERSION},
)
