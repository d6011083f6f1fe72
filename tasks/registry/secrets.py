"""Secrets stay out of what we record: MLflow params, tags and artifacts, manifests, logs.

Tokens live in the environment (``HF_TOKEN``, ``MLFLOW_TRACKING_TOKEN`` / ``MLFLOW_TRACKING_PASSWORD``, ...),
where the libraries that need them read them; nothing of ours reads them. :func:`redact` is applied where a
recipe or other user text is written out, and replaces

- the value of every secret environment variable (names in SECRET_ENV, or containing TOKEN, PASSWORD,
  SECRET, API_KEY, ...; values of 8+ characters), wherever it occurs in a string;
- the password of a URL (``https://user:password@host`` → ``https://user:***@host``);
- the value of a mapping key that names a credential (``token``, ``hub_token``, ``password``, ``api_key``, ...),

with ``***``. A token pasted into a recipe therefore shows as ``***`` in MLflow, not in clear.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

MASK = "***"
MIN_SECRET_CHARS = 8  # shorter values ("1", "true", "false") are flags, not secrets
SECRET_ENV = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HUGGINGFACE_HUB_TOKEN",
    "HF_API_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "PREFECT_API_KEY",
    "WANDB_API_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "DATABRICKS_TOKEN",
    "OPENAI_API_KEY",
)
_SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|API_KEY|ACCESS_KEY|CONNECTION_STRING|CREDENTIAL", re.I)
_NOT_SECRET = re.compile(r"^TOKENIZERS?_|_TOKENS?_(ID|IDS)$", re.I)  # TOKENIZERS_PARALLELISM and the like
SECRET_KEYS = frozenset(
    {"token", "hub_token", "push_to_hub_token", "access_token", "auth_token", "api_key", "password", "secret"}
)
_SECRET_KEY_SUFFIX = ("_password", "_secret", "_api_key", "_access_key", "_secret_key")
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^/\s:@]*):(?P<password>[^@\s/]+)@", re.I)


def is_secret_name(name: str) -> bool:
    return name.upper() in SECRET_ENV or bool(_SECRET_NAME.search(name) and not _NOT_SECRET.search(name))


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of the secret variables in `env` (os.environ by default), longest first."""
    env = os.environ if env is None else env
    values = {v for k, v in env.items() if v and len(v) >= MIN_SECRET_CHARS and is_secret_name(k)}
    return sorted(values, key=lambda v: (-len(v), v))  # longest first: a token inside another is masked last


def is_secret_key(key: str) -> bool:
    key = str(key).rsplit(".", 1)[-1].lower()
    return key in SECRET_KEYS or key.endswith(_SECRET_KEY_SUFFIX)


def redact(value, env: Mapping[str, str] | None = None):
    """`value` (str, or dicts/lists of them, any depth) with secrets masked; other types unchanged."""
    return _redact(value, secret_values(env))


def _redact(value, secrets: list[str]):
    if isinstance(value, str):
        value = _URL_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", value)
        for secret in secrets:
            value = value.replace(secret, MASK)
        return value
    if isinstance(value, Mapping):
        return {
            k: MASK if is_secret_key(k) and isinstance(v, str) and v else _redact(v, secrets) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(v, secrets) for v in value)
    return value
