"""The split: by prompt hash, so one prompt is never on both sides of a split, in any table."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa


def holdout_mask(prompt_hashes: pa.ChunkedArray | pa.Array, test_fraction: float, seed: int) -> np.ndarray:
    """True where a row goes to test. Decided by (seed, prompt hash) alone: one prompt, one split."""
    salt = f"{seed}:".encode()
    # Hand-rolled on purpose: datasets' train_test_split splits rows, not prompts, and would let one prompt
    # straddle train and test; hashing the prompt key is the standard leak-free split.
    cut = int(test_fraction * 2**64)
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(salt + h.encode(), digest_size=8).digest(), "big") < cut
            for h in prompt_hashes.to_pylist()
        ),
        dtype=bool,
        count=len(prompt_hashes),
    )


def split_rows(table: pa.Table, test_fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    mask = holdout_mask(table["prompt_hash"], test_fraction, seed)
    return table.filter(pa.array(~mask)), table.filter(pa.array(mask))
