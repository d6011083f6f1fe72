"""schemas/preference.py: the column-wise hashes (content_ids, prompt_hashes) equal the per-row definitions.

content_id / prompt_hash stay the one definition (CAI and cleaning call them per row); the column-wise
versions are the ingest hot path and must give the same strings on every input, real or awkward.
"""

from __future__ import annotations

import json
import random
import sys
import unicodedata
from pathlib import Path

import pyarrow as pa
import pytest

from schemas.data_config import SourceConfig
from schemas.preference import (
    MESSAGES,
    Reason,
    content_id,
    content_ids,
    normalise_prompt_text,
    normalise_prompt_texts,
    prompt_hash,
    prompt_hashes,
)
from tasks.data.sources import read_source

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL = [
    ("hh-rlhf", SHARED / "hh-rlhf" / "harmless-base-test.head300.jsonl", {}),
    ("orca_dpo_pairs", SHARED / "orca_dpo_pairs" / "train.head50.jsonl", {}),
    (
        "ultrafeedback_binarized",
        SHARED / "ultrafeedback_binarized" / "train_prefs.row0.jsonl",
        {"keep_ties": True},
    ),  # its one real row is a tie
    ("generic", SHARED / "sharegpt" / "llamafactory-dpo-en.head100.jsonl", {}),
]
SPACES = [chr(i) for i in range(sys.maxunicode + 1) if chr(i).isspace()]
# Characters where NFKC, casefold or whitespace rules bite: ligatures, sharp s, final sigma, combining
# marks, full-width letters, Kelvin sign, non-breaking and ideographic spaces, separators \x1c-\x1f, NUL.
AWKWARD = [
    "ﬁ",
    "ß",
    "ς",
    "Σ",
    "e\u0301",
    "\u0301",
    "Ａ",
    "\u212a",
    "İ",
    "ǅ",
    "①",
    "😀",
    "\x00",
    "\x85",
    "a",
    "Z",
    "0",
    ".",
    "\\",
    "\u200b",
    "\ufeff",
] + SPACES


def _column(rows: list[list[dict]]) -> pa.ListArray:
    return pa.array(rows, type=MESSAGES)


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(AWKWARD) for _ in range(rng.randint(0, 12)))


def _random_turns(rng: random.Random, roles: tuple[str, ...]) -> list[dict]:
    return [{"role": rng.choice(roles), "content": _random_text(rng)} for _ in range(rng.randint(0, 4))]


@pytest.mark.parametrize("fmt, path, options", REAL, ids=[f for f, _, _ in REAL])
def test_column_hashes_equal_row_hashes_on_real_rows(fmt, path, options):
    rows = read_source(SourceConfig(name=fmt, format=fmt, path=str(path), options=options)).accepted.to_pylist()
    assert rows
    prompt, chosen, rejected = (_column([r[k] for r in rows]) for k in ("prompt", "chosen", "rejected"))
    assert content_ids(prompt, chosen, rejected) == [content_id(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    assert prompt_hashes(prompt) == [prompt_hash(r["prompt"]) for r in rows]


def test_column_hashes_equal_row_hashes_on_unicode_and_whitespace_edge_cases():
    rng = random.Random(0)
    rows = [[_random_turns(rng, ("user", "assistant", "system")) for _ in range(3)] for _ in range(3000)]
    rows += [
        [[{"role": "user", "content": t}], [], [{"role": "assistant", "content": t}]]
        for t in ["", " ", "  a  ", "What is  AI?", "what is ai?", "\t\r\n", "x\x1cy", "É", "E\u0301"]
    ]
    prompt, chosen, rejected = (_column([r[k] for r in rows]) for k in range(3))
    assert content_ids(prompt, chosen, rejected) == [content_id(*r) for r in rows]
    assert prompt_hashes(prompt) == [prompt_hash(r[0]) for r in rows]


def test_column_hashes_of_a_sliced_array_are_those_of_its_rows():
    rng = random.Random(1)
    rows = [_random_turns(rng, ("user", "assistant")) for _ in range(50)]
    column = _column(rows)
    assert prompt_hashes(column[7:31]) == [prompt_hash(r) for r in rows[7:31]]
    assert content_ids(column[7:31], column[8:32], column[9:33]) == [
        content_id(a, b, c) for a, b, c in zip(rows[7:31], rows[8:32], rows[9:33])
    ]


def test_normalise_prompt_texts_equals_python_on_every_ascii_and_space_character():
    singles = [chr(i) for i in range(128)] + SPACES
    texts = singles + [f"{a}A{b}b{a}{b}c{a}" for a in singles for b in (" ", "\t", "\x1f", "\u3000", "x")]
    texts += [unicodedata.normalize("NFD", "Ünïcödé ΣΑΣ"), "ﬁnal  ß\u00a0Straße"]
    assert normalise_prompt_texts(pa.array(texts)).to_pylist() == [normalise_prompt_text(t) for t in texts]


def test_read_source_lone_surrogate_in_json_array_quarantined_invalid_utf8(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
        {"chosen": "\n\nHuman: hi \\ud800\n\nAssistant: a", "rejected": "\n\nHuman: hi \\ud800\n\nAssistant: b"},
        {
            "chosen": "\n\nHuman: caf\u00e9 \\ud83d\\ude00\n\nAssistant: a",
            "rejected": "\n\nHuman: caf\u00e9 \\ud83d\\ude00\n\nAssistant: b",
        },
    ]
    path = tmp_path / "rows.json"
    path.write_text("[" + ",".join(json.dumps(r).replace("\\\\ud", "\\ud") for r in rows) + "]", encoding="utf-8")
    result = read_source(SourceConfig(name="hh", format="hh-rlhf", path=str(path)))
    q = result.quarantine.to_pylist()
    assert [(r["source_row"], r["reason"]) for r in q] == [(1, Reason.INVALID_UTF8.value)]
    assert "unpaired surrogate" in q[0]["detail"]
    accepted = result.accepted.to_pylist()
    assert [r["source_row"] for r in accepted] == [0, 2]
    assert accepted[1]["prompt"][0]["content"] == "caf\u00e9 \U0001f600"
    assert [r["id"] for r in accepted] == [content_id(r["prompt"], r["chosen"], r["rejected"]) for r in accepted]
