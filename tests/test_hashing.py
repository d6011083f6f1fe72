"""The one content-hash helper and the one file hash (schemas/hashing.py)."""

from __future__ import annotations

import hashlib

from schemas.hashing import HASH_CHARS, content_hash, file_sha256


def test_content_hash_json_value_is_independent_of_key_order_and_has_one_length():
    a = content_hash({"stage": "dpo", "args": {"beta": 0.1, "max_steps": 15}})
    b = content_hash({"args": {"max_steps": 15, "beta": 0.1}, "stage": "dpo"})
    assert a == b and len(a) == HASH_CHARS == 16
    assert content_hash({"stage": "dpo", "args": {"beta": 0.2, "max_steps": 15}}) != a


def test_content_hash_bytes_and_a_streamed_hash_of_the_same_bytes_agree(shared_data):
    data = (shared_data / "orca_dpo_pairs" / "train.head50.jsonl").read_bytes()
    streamed = hashlib.sha256()
    for i in range(0, len(data), 4096):
        streamed.update(data[i : i + 4096])
    assert content_hash(data) == content_hash(streamed) == hashlib.sha256(data).hexdigest()[:HASH_CHARS]


def test_file_sha256_is_the_full_digest_of_the_files_bytes(shared_data):
    path = shared_data / "hh-rlhf" / "harmless-base-test.head300.jsonl"
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest() and len(file_sha256(path)) == 64
