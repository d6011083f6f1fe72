"""An unchanged re-run of `align` does nothing: the receipt of the last completed run on the same inputs.

    digest = inputs_digest(recipe, stages, runs_root, data_root)  # when the run starts: no torch, no MLflow
    done = unchanged(recipe, digest, runs_root, version_fn)     # the last completed run's results, or None
    write_receipt(recipe, digest, version, results, runs_root, ...)  # after a run that completed

``version_fn`` hashes the inputs (as ingest finds its version); it is called only when everything else matches,
so a changed recipe or code costs no second pass over large input files.

Every stage, the evaluation and the dataset are reused by their own content keys, but reaching those keys costs
a Prefect task run per stage, the MLflow parent run, the registry (is it registered? is it champion?) and the
promote subflow: seconds of a re-run that changes nothing. The receipt is the make-style short cut in front of
them. Its key covers what the run's outcome depends on and that can be read without importing MLflow or torch:
the resolved recipe, the stages asked for, the dataset version (from the inputs' hashes, as ingest finds it),
every file and model the recipe names outside its sources (their bytes, CAI's prompt files included; a model folder
or hub id by the identity the stages key it by, ``model_identity``; ``package:`` by the package's version), this
project's code (flows/, tasks/, schemas/, data_contracts/), the training libraries' versions, and the tracking
store's URI.

Only the *last* completed run of a recipe name (per output root) is a receipt: going back to an older recipe after
another one ran is not unchanged, and runs the ordinary path (which re-judges promotion against today's champion).
What the key cannot see is the registry itself: a version deleted by hand, or a champion moved by `promote/manual`
since, is not noticed. ``align(recheck=True)`` (``--recheck``) takes the ordinary path, which consults it; a run
that changed nothing of its own inputs then registers nothing new and keeps the promotion rules.

No library does this: Prefect's task caching keys one task's inputs, not "this whole flow's inputs and the
files they name", and a cached Prefect result would still be loaded through a task run per stage.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from schemas.hashing import content_hash, file_sha256
from schemas.recipe import PROJECT_ROOT

CODE_DIRS = ("flows", "tasks", "schemas", "data_contracts")
CODE_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".jinja")
LIBRARIES = (
    "accelerate",
    "bitsandbytes",
    "datasets",
    "great_expectations",
    "mlflow",
    "peft",
    "prefect",
    "pyarrow",
    "tokenizers",
    "torch",
    "transformers",
    "trl",
)
# Recipe fields that name a model (a hub id there is resolved to its commit, as the stages key it).
MODEL_FIELDS = {"name_or_path", "model", "critic_model", "reward_model", "tokenizer"}
SKIPPED_SECTIONS = ("sources", "data")  # the dataset version covers them (and their files' bytes)


def code_version() -> str:
    """This project's code and data contracts, file by file (a few hundred KB: milliseconds)."""
    h = hashlib.sha256()
    for top in CODE_DIRS:
        for path in sorted((PROJECT_ROOT / top).rglob("*")):
            if path.suffix in CODE_SUFFIXES and path.is_file() and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(PROJECT_ROOT)).encode())
                h.update(path.read_bytes())
    return content_hash(h)


def library_versions() -> dict[str, str | None]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _package_version(module: str) -> str:
    for dist in (module, module.replace("_", "-")):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "not installed"


def value_identity(field: str, value: str) -> str | None:
    """What a recipe string names, as content: a file's sha256, a folder's identity, a package's version, a
    GGUF file's size and time, a hub model's commit; None for a plain setting."""
    if value.startswith("package:"):
        return f"{value}=={_package_version(value.split(':', 1)[1])}"
    if value.startswith("gguf:"):
        path = Path(value.split(":", 1)[1]).expanduser()
        st = path.stat() if path.is_file() else None
        return f"{value}:{st.st_size}:{st.st_mtime_ns}" if st else f"{value}:missing"
    if "/" in value or "." in value:
        path = Path(value).expanduser()
        path = path if path.is_absolute() else PROJECT_ROOT / path
        if path.is_file():
            return file_sha256(path)
        if path.is_dir():  # a model folder: the identity the stages key it by
            return _model_identity(str(path))
    if field in MODEL_FIELDS and "/" in value:  # org/name: a hub model (``promote.model: dpo`` is a stage name)
        return _model_identity(value)  # its commit, from the local cache offline
    return None


def _model_identity(ref: str) -> str:
    from tasks.training.models import model_identity  # no torch

    return model_identity(ref)


def named_inputs(obj, field: str = "") -> dict[str, str]:
    """{dotted field: identity} for every string of the recipe (outside sources and data) that names content."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not field and k in SKIPPED_SECTIONS:
                continue
            for sub, ident in named_inputs(v, str(k)).items():
                out[f"{k}.{sub}" if sub else str(k)] = ident
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            for sub, ident in named_inputs(v, field).items():
                out[f"{i}.{sub}" if sub else str(i)] = ident
    elif isinstance(obj, str) and (ident := value_identity(field, obj)) is not None:
        out[""] = ident
    return out


def inputs_digest(recipe, stages: list[str], output_root: Path, data_root: str | Path | None = None) -> str:
    """Everything of the key but the dataset version, read when the run starts (a file edited while the run
    trains then counts as changed next time)."""
    from tasks.registry.tracking import tracking_uri

    dump = recipe.model_dump(mode="json")
    payload = {
        "recipe": dump,
        "stages": list(stages),
        "named": named_inputs(dump),
        "code": code_version(),
        "libraries": library_versions(),
        "tracking": tracking_uri(recipe),
        "runs": str(Path(output_root).resolve()),
        "data": str(Path(data_root or recipe.data.output_dir).resolve()),  # where the dataset is written
    }
    return content_hash(payload)


def receipt_key(digest: str, dataset_version: str) -> str:
    return content_hash({"inputs": digest, "dataset": dataset_version})


def receipt_path(recipe, output_root: Path) -> Path:
    """One receipt per recipe name and output root: the last completed run's."""
    return Path(output_root) / recipe.name / "last-align.json"


def _paths(encoded) -> list[Path]:
    """Every path inside an encoded result (tasks.runtime.dispatch.encode)."""
    if isinstance(encoded, dict):
        if set(encoded) == {"__path__"}:
            return [Path(encoded["__path__"])]
        return [p for v in encoded.values() for p in _paths(v)]
    if isinstance(encoded, list):
        return [p for v in encoded for p in _paths(v)]
    return []


def unchanged(recipe, digest: str, output_root: Path, dataset_version: Callable[[], str]) -> dict | None:
    """The receipt of the last completed run of this recipe when its key is ``receipt_key(digest,
    dataset_version())`` and every folder and file it returned is still there; its stage results marked reused.
    None otherwise (the ordinary path runs). ``dataset_version`` is called only when the digest matches."""
    from tasks.runtime.dispatch import decode

    path = receipt_path(recipe, output_root)
    try:
        receipt = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if receipt.get("digest") != digest or receipt.get("key") != receipt_key(digest, dataset_version()):
        return None
    if not all(p.exists() for p in _paths(receipt["results"])):
        return None
    results = decode(receipt["results"])
    for name, value in results.items():
        if dataclasses.is_dataclass(value) and hasattr(value, "reused"):
            results[name] = dataclasses.replace(value, reused=True)
    results["unchanged_since"] = {k: receipt[k] for k in ("flow_run_id", "flow_run_name", "finished_at")}
    return results


def write_receipt(
    recipe, digest: str, dataset_version: str, results: dict, output_root: Path, flow_run_id=None, flow_run_name=None
) -> Path:
    """After a completed run: its results, keyed; written whole or not at all (a concurrent run writes the same)."""
    from tasks.runtime.dispatch import encode

    path = receipt_path(recipe, output_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "digest": digest,
        "key": receipt_key(digest, dataset_version),
        "flow_run_id": str(flow_run_id) if flow_run_id else None,
        "flow_run_name": flow_run_name,
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "results": encode({k: v for k, v in results.items() if k != "unchanged_since"}),
    }
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, indent=1, default=str), encoding="utf-8")
    tmp.replace(path)
    return path


def summary(recipe, results: dict) -> str:
    """One paragraph: what the unchanged re-run reports and where it comes from."""
    since = results["unchanged_since"]
    line = (
        f"align: nothing changed since flow run {since['flow_run_name'] or since['flow_run_id']} "
        f"({since['finished_at']}): the same recipe, data, named files and models, code and libraries. "
        "Every stage, the evaluation, registration and promotion are as that run left them."
    )
    promotion = results.get("promotion")
    if isinstance(promotion, dict) and promotion.get("action"):
        line += f" Its promotion of {promotion.get('model')} v{promotion.get('version')}: {promotion['action']}."
    return line + " The registry was not consulted (`--recheck` / recheck=true consults it)."
