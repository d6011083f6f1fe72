"""Registered versions as MLflow models: the stage's HF folder inside a pyfunc that chats or scores.

Layout of a logged model (the stage run's artifact ``model/``)::

    MLmodel  python_model.pkl  code/{tasks,schemas}/  requirements.txt  python_env.yaml  conda.yaml
    input_example.json  serving_input_example.json
    artifacts/hf/        the stage's HF folder, unchanged: from_pretrained and vLLM load it (HF_SUBPATH)

- a policy (``-sft``, ``-dpo``, ``-rl``; a causal LM folder) is a :class:`PolicyPyfunc`: one row per conversation,
  ``messages`` (a message list) or ``prompt`` (a string: one user turn); params ``max_new_tokens``,
  ``temperature`` (0 = greedy), ``top_p``, ``seed``; out: the assistant's answer per row, generated with the
  model's own chat template and stopped at its end-of-turn token (``tasks.training.generation``).
- a reward model (``-reward``; a one-label sequence classifier) is a :class:`RewardPyfunc`: one row per
  (``prompt`` message list, ``answer`` string) pair; out: its score, from ``tasks.training.reward.RewardScorer``,
  the rendering the reward stage trains and evaluates with.

:func:`log_hf_model` writes the small MLflow part with ``mlflow.pyfunc.save_model`` (explicit signature,
input example and pinned requirements: nothing is inferred and the model is never loaded) and uploads the
HF folder once, from the stage folder straight into ``artifacts/hf``. ``mlflow.pyfunc.log_model`` would
copy the folder into a temporary model directory first and load the model to validate the input example.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import math
import shutil
import tempfile
from pathlib import Path

import mlflow
import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

from schemas.recipe import PROJECT_ROOT

HF_KEY = "hf"
HF_SUBPATH = f"artifacts/{HF_KEY}"  # the HF folder inside a logged model
CODE_PACKAGES = ("tasks", "schemas")  # shipped in the model (code/), so it loads outside this checkout
MESSAGES = Array(Object([Property("role", "string"), Property("content", "string")]))
POLICY, REWARD = "policy", "reward"

POLICY_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(MESSAGES, "messages", required=False), ColSpec("string", "prompt", required=False)]),
    outputs=Schema([ColSpec("string", "answer")]),
    params=ParamSchema(
        [
            ParamSpec("max_new_tokens", "long", 128),
            ParamSpec("temperature", "double", 0.0),
            ParamSpec("top_p", "double", 1.0),
            ParamSpec("seed", "long", 0),
            ParamSpec("batch_size", "long", 8),
        ]
    ),
)
REWARD_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(MESSAGES, "prompt"), ColSpec("string", "answer")]),
    outputs=Schema([ColSpec("double", "score")]),
    params=ParamSchema([ParamSpec("batch_size", "long", 16)]),
)
POLICY_EXAMPLE = [{"messages": [{"role": "user", "content": "What is the capital of Italy?"}]}]
REWARD_EXAMPLE = [
    {"prompt": [{"role": "user", "content": "What is the capital of Italy?"}], "answer": "Rome."},
    {"prompt": [{"role": "user", "content": "What is the capital of Italy?"}], "answer": "I cannot help."},
]


def bad_input(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and this message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def message_list(value, where: str) -> list[dict]:
    """A message list from what schema enforcement hands over (lists or arrays of dicts)."""
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise bad_input(f"{where}: expected a list of {{role, content}} messages, got {type(value).__name__}")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise bad_input(f"{where}[{k}]: expected {{role: str, content: str}}, got {m!r}"[:300])
        out.append({"role": m["role"], "content": m["content"]})
    if not out:
        raise bad_input(f"{where}: empty message list")
    return out


def input_rows(model_input) -> list[dict]:
    """Rows of a pyfunc input: a DataFrame (what the server and schema enforcement produce) or a list of dicts."""
    if hasattr(model_input, "to_dict"):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        return [model_input]
    return list(model_input)


def chat_conversations(model_input) -> list[list[dict]]:
    """One conversation per row: ``messages``, or ``prompt`` as a single user turn."""
    conversations = []
    for i, row in enumerate(input_rows(model_input)):
        messages, prompt = row.get("messages"), row.get("prompt")
        if not _missing(messages):
            conversations.append(message_list(messages, f"row {i}: messages"))
        elif isinstance(prompt, str) and prompt:
            conversations.append([{"role": "user", "content": prompt}])
        else:
            raise bad_input(f"row {i}: give `messages` (a message list) or `prompt` (a string)")
    return conversations


def scored_conversations(model_input) -> list[list[dict]]:
    """prompt + answer of each row as one conversation, the answer as the final assistant turn."""
    conversations = []
    for i, row in enumerate(input_rows(model_input)):
        answer = row.get("answer")
        if not isinstance(answer, str):
            raise bad_input(f"row {i}: `answer` must be a string, got {type(answer).__name__}")
        prompt = message_list(row.get("prompt"), f"row {i}: prompt")
        conversations.append(prompt + [{"role": "assistant", "content": answer}])
    return conversations


class PolicyPyfunc(mlflow.pyfunc.PythonModel):
    """A causal LM folder as a chat model: conversations in, the assistant's answers out."""

    def load_context(self, context):
        from schemas.cai_config import GenerationSpec
        from tasks.training.generation import load_generator

        self.generator = load_generator(context.artifacts[HF_KEY], GenerationSpec(), progress=False)

    def predict(self, context, model_input, params=None):
        from schemas.cai_config import GenerationSpec
        from tasks.training.generation import GenStats

        p = {s.name: s.default for s in POLICY_SIGNATURE.params.params} | (params or {})
        try:
            settings = GenerationSpec(
                max_new_tokens=int(p["max_new_tokens"]),
                temperature=float(p["temperature"]),
                top_p=float(p["top_p"]),
                seed=int(p["seed"]),
                batch_size=int(p["batch_size"]),
            )
        except ValueError as e:
            raise bad_input(f"generation params: {e}") from None
        outputs = dataclasses.replace(self.generator, settings=settings, stats=GenStats())(
            chat_conversations(model_input)
        )
        failed = [(i, o.error) for i, o in enumerate(outputs) if o.error]
        if failed:
            raise bad_input("; ".join(f"row {i}: {error}" for i, error in failed))
        return [o.text for o in outputs]


class RewardPyfunc(mlflow.pyfunc.PythonModel):
    """A reward-model folder as a judge: (prompt, answer) pairs in, one score each out."""

    def load_context(self, context):
        from tasks.training.reward import RewardScorer

        self.scorer = RewardScorer.load(context.artifacts[HF_KEY])

    def predict(self, context, model_input, params=None):
        batch_size = int((params or {}).get("batch_size", 16))
        if batch_size < 1:
            raise bad_input(f"batch_size must be >= 1, got {batch_size}")
        scorer = dataclasses.replace(self.scorer, batch_size=batch_size, cut=0, scored=0)
        return scorer(scored_conversations(model_input))


# ---------------------------------------------------------------- logging


def model_kind(model_dir: Path) -> str:
    """``reward`` for a sequence-classification folder (or a SEQ_CLS adapter), else ``policy``."""
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    if config.is_file():
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
        return REWARD if any(a.endswith("ForSequenceClassification") for a in architectures) else POLICY
    adapter = model_dir / "adapter_config.json"
    if adapter.is_file():
        return REWARD if json.loads(adapter.read_text(encoding="utf-8")).get("task_type") == "SEQ_CLS" else POLICY
    raise FileNotFoundError(f"{model_dir}: not an HF model folder (no config.json or adapter_config.json)")


@functools.cache
def project_requirements() -> tuple[str, ...]:
    """The project's runtime dependencies, each pinned to the version installed here (no inference; read once
    per process: the installed set does not change under a running process)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        declared = metadata.requires("align") or []
    except metadata.PackageNotFoundError:  # a checkout that was not pip-installed: read pyproject.toml
        import tomllib

        declared = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
            "dependencies"
        ]
    pins: list[str] = []
    for line in declared:
        req = Requirement(line)
        if req.marker is not None:  # extras (dev tools)
            continue
        try:
            version = metadata.version(req.name).split("+")[0]  # torch 2.13.0+cpu -> 2.13.0
        except metadata.PackageNotFoundError:
            pins.append(str(req))
            continue
        pins.append(f"{req.name}=={version}")
    return tuple(pins)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def python_sources(root: Path) -> list[str]:
    """Copies of the project's packages under ``root``, ``.py`` files only (no caches, no vendored assets)."""

    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "__pycache__" or not (n.endswith(".py") or (Path(folder) / n).is_dir())]

    for package in CODE_PACKAGES:
        shutil.copytree(PROJECT_ROOT / package, root / package, ignore=ignore)
    return [str(root / package) for package in CODE_PACKAGES]


@functools.cache
def shipped_sources() -> tuple[str, ...]:
    """``python_sources`` once per process (the code a process runs does not change under it), removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="align-code-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return tuple(python_sources(root))


def save_wrapper(model_dir: Path, path: Path) -> str:
    """The MLflow part of the model at ``path`` (no HF files: they are uploaded on their own); its kind."""
    from mlflow.models import Model

    kind = model_kind(model_dir)
    staging = Path(tempfile.mkdtemp(prefix="align-mlmodel-"))
    placeholder = staging / HF_KEY  # empty: the folder itself is uploaded into artifacts/hf afterwards
    placeholder.mkdir()
    try:
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=PolicyPyfunc() if kind == POLICY else RewardPyfunc(),
            artifacts={HF_KEY: str(placeholder)},
            code_paths=list(shipped_sources()),
            signature=POLICY_SIGNATURE if kind == POLICY else REWARD_SIGNATURE,
            input_example=POLICY_EXAMPLE if kind == POLICY else REWARD_EXAMPLE,
            pip_requirements=list(project_requirements()),
            metadata={"align_kind": kind, "hf_subpath": HF_SUBPATH},
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    meta = Model.load(str(path))  # record where the folder came from and the model's real size
    meta.flavors["python_function"]["artifacts"][HF_KEY]["uri"] = str(Path(model_dir).resolve())
    meta.model_size_bytes = _folder_bytes(path) + _folder_bytes(model_dir)
    meta.save(str(Path(path) / "MLmodel"))
    return kind


def log_hf_model(model_dir: Path, artifact_path: str = "model") -> str:
    """Log ``model_dir`` (an HF folder) as an MLflow model under ``artifact_path`` of the active run."""
    with tempfile.TemporaryDirectory(prefix="align-mlmodel-") as tmp:
        kind = save_wrapper(Path(model_dir), Path(tmp) / "model")
        mlflow.log_artifacts(str(Path(tmp) / "model"), artifact_path=artifact_path)
    mlflow.log_artifacts(str(model_dir), artifact_path=f"{artifact_path}/{HF_SUBPATH}")
    return kind


# ---------------------------------------------------------------- reading


def hf_folder(model_path: str | Path) -> Path:
    """The HF folder of a downloaded model: ``artifacts/hf`` of an MLflow model, or a plain HF folder itself
    (versions registered before they were MLflow models)."""
    model_path = Path(model_path)
    return model_path / HF_SUBPATH if (model_path / "MLmodel").is_file() else model_path


def download_hf_model(model_uri: str, dst_path: str | None = None) -> str:
    """Download only the HF folder of a model (``models:/<name>@<alias>``, ``models:/<name>/<version>``,
    ``runs:/<run>/model``, a local path) and return its local path."""
    from mlflow.artifacts import download_artifacts

    try:
        return download_artifacts(artifact_uri=f"{model_uri.rstrip('/')}/{HF_SUBPATH}", dst_path=dst_path)
    except (MlflowException, OSError):  # a plain HF folder (registered before versions were MLflow models)
        return download_artifacts(artifact_uri=model_uri, dst_path=dst_path)


@dataclasses.dataclass
class FolderPyfunc:
    """A plain HF folder (a version registered before versions were MLflow models) behind the same wrapper."""

    model: mlflow.pyfunc.PythonModel
    kind: str

    def predict(self, data, params=None):
        return self.model.predict(None, data, params)


def load_registered(model_uri: str):
    """(model with ``.predict(data, params)``, kind) for any version: its pyfunc, or, for a version that is a
    plain HF folder, the wrapper of its kind around the folder (downloaded once either way)."""
    from mlflow.artifacts import download_artifacts
    from mlflow.pyfunc import PythonModelContext

    local = Path(download_artifacts(artifact_uri=model_uri))
    if (local / "MLmodel").is_file():
        model = mlflow.pyfunc.load_model(str(local))
        return model, (model.metadata.metadata or {}).get("align_kind", "other")
    kind = model_kind(local)
    wrapper = PolicyPyfunc() if kind == POLICY else RewardPyfunc()
    wrapper.load_context(PythonModelContext(artifacts={HF_KEY: str(local)}, model_config={}))
    return FolderPyfunc(wrapper, kind), kind
