"""The one content-hash helper: every key and version the pipeline derives from content (dataset versions,
stage and evaluation keys, recipe and section hashes, model identities, code versions) is ``content_hash``.

``file_sha256`` is the other hash fact: the full sha256 of a file (an input's identity in the manifest, a GGUF
model's cache key), never shortened where it is recorded.

Neither: canonical row ids and prompt hashes (``schemas.preference``: blake2b-128, the dedupe and split keys,
stable across releases).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# 16 hex characters = 64 bits: the chance that two of a million keys collide is ~3e-8 (birthday bound);
# 12 characters (48 bits) would give ~2e-3. `datasets` fingerprints (xxhash64) are 16 hex characters too.
HASH_CHARS = 16


def content_hash(obj) -> str:
    """sha256 of ``obj``, first ``HASH_CHARS`` hex characters.

    ``obj`` is ``bytes`` (hashed as they are), a ``hashlib`` hash object fed incrementally by the caller (for
    content too large to join in memory, e.g. a model folder), or any JSON value (hashed as canonical JSON:
    sorted keys, so dict order never changes a key).
    """
    if isinstance(obj, (bytes, bytearray, memoryview)):
        digest = hashlib.sha256(obj).hexdigest()
    elif hasattr(obj, "hexdigest") and hasattr(obj, "update"):
        digest = obj.hexdigest()
    else:
        digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    return digest[:HASH_CHARS]


def file_sha256(path: str | Path) -> str:
    """Full sha256 (64 hex characters) of a file's bytes, read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
