"""The canonical tables of the data plane in one registry: what reading, cleaning, splitting and the contracts
need to know of each (its schema, message columns, content ids and prompt turns), so each step is written once.

| table | written to | split key column |
|---|---|---|
| preference | ``data/<version>/{train,validation,test}.parquet`` | prompt |
| sft | ``data/<version>/sft/{train,validation,test}.parquet`` | messages |
| unpaired | ``data/<version>/unpaired/{train,validation,test}.parquet`` | prompt |

Every table is split by the same key (the normalised first user turn) with the same draw, so one prompt is never
in train of one table and test of another; the quarantine table (``schemas.preference.QUARANTINE_SCHEMA``) names
the table a row was kept out of.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from schemas.preference import PREFERENCE_SCHEMA, content_id, messages_ids
from schemas.sft import SFT_SCHEMA, sft_id, without_last_turn
from schemas.unpaired import UNPAIRED_SCHEMA, unpaired_id


def _array(column) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


@dataclass(frozen=True)
class Table:
    name: str
    schema: pa.Schema
    messages: tuple[str, ...]  # message-list columns, in id order
    scalars: tuple[str, ...]  # the other columns an adapter fills (scores, label)
    split_column: str  # the MESSAGES column whose first user turn is the split key
    folder: str  # under data/<version>/ ("" = the top level)
    _ids: Callable[[Mapping], list[str]]
    _prompts: Callable[[Mapping], pa.ListArray]
    _row_id: Callable[[dict], str]
    _row_prompt: Callable[[dict], list[dict]]

    def ids(self, columns: Mapping) -> list[str]:
        """Content id of every row of ``columns`` (a table, or a dict of arrays)."""
        return self._ids({k: _array(columns[k]) for k in (*self.messages, *self.scalars)})

    def prompts(self, columns: Mapping) -> pa.ListArray:
        """The prompt turns of every row (``MESSAGES``): what the prompt hash and decontamination read."""
        return self._prompts({k: _array(columns[k]) for k in self.messages})

    def row_id(self, row: dict) -> str:
        return self._row_id(row)

    def row_prompt(self, row: dict) -> list[dict]:
        return self._row_prompt(row)


PREFERENCE = Table(
    "preference",
    PREFERENCE_SCHEMA,
    ("prompt", "chosen", "rejected"),
    ("score_chosen", "score_rejected"),
    "prompt",
    "",
    lambda c: messages_ids(c["prompt"], c["chosen"], c["rejected"]),
    lambda c: c["prompt"],
    lambda r: content_id(r["prompt"], r["chosen"], r["rejected"]),
    lambda r: r["prompt"],
)
SFT = Table(
    "sft",
    SFT_SCHEMA,
    ("messages",),
    (),
    "messages",
    "sft",
    lambda c: messages_ids(c["messages"]),
    lambda c: without_last_turn(c["messages"]),
    lambda r: sft_id(r["messages"]),
    lambda r: list(r["messages"][:-1]),
)
UNPAIRED = Table(
    "unpaired",
    UNPAIRED_SCHEMA,
    ("prompt", "completion"),
    ("label",),
    "prompt",
    "unpaired",
    lambda c: messages_ids(c["prompt"], c["completion"], suffix=pc.if_else(c["label"], "true", "false")),
    lambda c: c["prompt"],
    lambda r: unpaired_id(r["prompt"], r["completion"], r["label"]),
    lambda r: r["prompt"],
)

TABLES: dict[str, Table] = {t.name: t for t in (PREFERENCE, SFT, UNPAIRED)}


def get_table(name: str) -> Table:
    try:
        return TABLES[name]
    except KeyError:
        raise ValueError(f"unknown canonical table {name!r}; valid: {', '.join(TABLES)}") from None
