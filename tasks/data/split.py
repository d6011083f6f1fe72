"""The split: train / validation / test, decided per *conversation opening*, so no prompt (and no conversation
that opens the same way) sits in two splits, in any table.

- The split key of a row is the hash of its first user turn, normalised as in
  ``schemas.preference.normalise_prompt_text`` (NFKC, case-folded, whitespace collapsed). Hashing the whole
  prompt let a multi-turn row that opens with a test prompt land in train (the real hh-rlhf rows have such
  pairs), and the same question with and without a system prompt straddle the split. Rows with the same
  prompt share their opening, so they share a split too (the contract checks both).
- One uniform number per key, fixed by (seed, key): below ``test_fraction`` → test (so test does not move when
  the validation fraction changes), then the next ``validation_fraction`` → validation (carved from what was
  train), the rest → train. ``validation`` drives in-training evaluation and checkpoint choice; ``test`` is
  read by the evaluate stage only.
- One split across tables (:func:`split_tables`): preference, sft and unpaired rows are keyed and drawn the same
  way (the sft table by the first user turn of its ``messages``), so a prompt is never in train of one table and
  test of another.
- A source may keep its own held-out split (``sources[].split``: e.g. ultrafeedback_binarized ``test_prefs``):
  its rows all go there, and so does every row of any table with the same key (test wins over validation);
  the hash split then draws nothing into that split, the source's split replacing the drawn one.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.preference import normalise_prompt_texts

SPLITS = ("train", "validation", "test")


class Splits(NamedTuple):
    train: pa.Table
    validation: pa.Table
    test: pa.Table


def split_keys(prompts: pa.ChunkedArray | pa.ListArray) -> list[str]:
    """The split key of every row of a ``MESSAGES`` column: hash of its normalised first user turn."""
    arr = prompts.combine_chunks() if isinstance(prompts, pa.ChunkedArray) else prompts
    openings = [""] * len(arr)
    if len(arr):
        flat = arr.flatten()
        users = np.flatnonzero(pc.equal(flat.field("role"), "user").fill_null(False).to_numpy(zero_copy_only=False))
        parents = pc.list_parent_indices(arr).to_numpy()[users]
        rows, first = np.unique(parents, return_index=True)  # the first user turn of each row
        texts = normalise_prompt_texts(flat.field("content").take(pa.array(users[first], pa.int64())))
        for row, text in zip(rows.tolist(), texts.to_pylist()):
            openings[row] = text or ""
    return [hashlib.blake2b(t.encode("utf-8"), digest_size=16).hexdigest() for t in openings]


def assign_splits(keys: list[str], test_fraction: float, validation_fraction: float, seed: int) -> np.ndarray:
    """The split of each key (train, validation or test), decided by (seed, key) alone: one key, one split."""
    # Hand-rolled on purpose: datasets' train_test_split splits rows, not prompts, and would let one prompt
    # straddle the splits; hashing the key is the standard leak-free split.
    salt = f"{seed}:".encode()
    draws = np.fromiter(
        (int.from_bytes(hashlib.blake2b(salt + k.encode(), digest_size=8).digest(), "big") for k in keys),
        dtype=np.uint64,
        count=len(keys),
    )
    test_cut, validation_cut = (
        np.uint64(min(int(f * 2**64), 2**64 - 1)) for f in (test_fraction, test_fraction + validation_fraction)
    )
    return np.where(draws < test_cut, "test", np.where(draws < validation_cut, "validation", "train"))


def split_rows(table: pa.Table, test_fraction: float, validation_fraction: float, seed: int) -> Splits:
    """The canonical preference rows split three ways (row order kept within each split)."""
    return split_tables({"preference": (table, "prompt")}, test_fraction, validation_fraction, seed)["preference"]


def drawn_fractions(test_fraction: float, validation_fraction: float, pinned: dict[str, str]) -> tuple[float, float]:
    """The (test, validation) shares the hash split draws: 0 for a split a source keeps as its own."""
    values = set(pinned.values())
    return (0.0 if "test" in values else test_fraction, 0.0 if "validation" in values else validation_fraction)


def hold(held: dict[str, str], keys, sources, pinned: dict[str, str]) -> None:
    """Add to ``held`` (key → split) the keys of rows of pinned sources (source → split); test wins."""
    for key, source in zip(keys, sources):
        if source in pinned and held.get(key) != "test":
            held[key] = pinned[source]


def split_tables(
    tables: dict[str, tuple[pa.Table, str]],
    test_fraction: float,
    validation_fraction: float,
    seed: int,
    pinned: dict[str, str] | None = None,
) -> dict[str, Splits]:
    """Every table split by the one rule (module doc): ``tables`` maps a name to (rows, the ``MESSAGES`` column
    whose first user turn is the key); ``pinned`` maps a source to the split it keeps as its own."""
    pinned = pinned or {}
    keys = {name: split_keys(table[column]) for name, (table, column) in tables.items()}
    held: dict[str, str] = {}  # key → the split a pinned source holds it in
    for name, (table, _) in tables.items():
        hold(held, keys[name], table["source"].to_pylist(), pinned)
    test_draw, validation_draw = drawn_fractions(test_fraction, validation_fraction, pinned)
    out = {}
    for name, (table, _) in tables.items():
        where = assign_splits(keys[name], test_draw, validation_draw, seed)
        if held:
            where = np.array([held.get(k, w) for k, w in zip(keys[name], where.tolist())], dtype=object)
        out[name] = Splits(*(table.filter(pa.array(where == split)) for split in SPLITS))
    return out
