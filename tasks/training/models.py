"""Models and tokenizers: load from a hub id or a local HF folder, or bootstrap the tiny offline default.

``bootstrap_tiny`` trains a byte-level BPE tokenizer on the train split (chat special tokens, ChatML with
``{% generation %}`` markers) and builds a tiny Llama/Qwen2 causal LM from a config, seeded, saved as a
normal HF folder. LoRA goes through PEFT; QLoRA (bitsandbytes 4-bit NF4) only where CUDA is present:
bitsandbytes 0.50 loads 4-bit models on CPU without raising, so the device is checked explicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from schemas.hashing import content_hash
from tasks.training import gguf
from tasks.training.templates import SPECIAL_TOKENS, TEMPLATES, apply_chat_template_style, end_of_turn_ids

TINY = "tiny"
PAD_TOKEN = "<|endoftext|>"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelRefError(ValueError):
    """A model reference that names nothing loadable; the message names the reference and the fix."""


def resolve_model_ref(ref: str, key: str = "model") -> str:
    """A model reference → what ``from_pretrained`` loads: a local folder's absolute path, or a hub id unchanged
    (checked against the local cache when HF_HUB_OFFLINE is set).

    ``package:<module>``: the HF folder an installed package ships (``model/`` or its own folder), or the GGUF
    file it ships, converted once into the model cache (tasks/training/gguf.py); the package is never imported.
    ``gguf:<path>``: that GGUF file, converted the same way.
    """
    if ref.startswith("package:"):
        return str(_package_model(ref, key))
    if ref.startswith("gguf:"):
        path = Path(ref.split(":", 1)[1]).expanduser()
        if path.suffix != ".gguf" or not path.is_file():
            raise ModelRefError(f"{key}: {ref!r}: no such .gguf file (give gguf:<path to a .gguf file>)")
        return str(_converted(path, ref, key))
    path = Path(ref).expanduser()
    if path.is_dir():
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise ModelRefError(f"{key}: {ref!r} is a folder but holds no config.json (not an HF model folder)")
        return str(path.resolve())
    if ref.startswith((".", "/", "~")) or not _HUB_ID.match(ref):
        raise ModelRefError(
            f"{key}: {ref!r}: no such model folder (give an existing HF folder, a hub id, package:<module> "
            f"or gguf:<file>)"
        )
    if _hub_offline() and hub_commit(ref, None) is None:
        raise ModelRefError(
            f"{key}: {ref!r}: hub model not in the local cache and HF_HUB_OFFLINE is set "
            f"(download it first or name a local folder)"
        )
    return ref


def _package_model(ref: str, key: str) -> Path:
    module_name = ref.split(":", 1)[1]
    folder = gguf.package_folder(module_name)
    if folder is None:
        raise ModelRefError(f"{key}: {ref!r}: python package {module_name!r} is not installed")
    for candidate in (folder / "model", folder):
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    files = sorted(folder.glob("*.gguf")) or sorted(folder.glob("model/*.gguf"))
    if len(files) == 1:
        return _converted(files[0], ref, key)
    found = (
        f"{len(files)} .gguf files ({', '.join(f.name for f in files)}); name one with gguf:<path>"
        if files
        else ("no model/config.json, config.json or .gguf file")
    )
    raise ModelRefError(f"{key}: {ref!r}: package folder {folder} holds {found}")


def _converted(path: Path, ref: str, key: str) -> Path:
    try:
        return gguf.converted_folder(path)
    except (ValueError, OSError, KeyError, RuntimeError) as e:  # gguf/transformers: unreadable or unsupported
        raise ModelRefError(f"{key}: {ref!r}: cannot convert {path} into an HF folder: {type(e).__name__}: {e}") from e


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_commit(ref: str, revision: str | None) -> str | None:
    """The commit a hub id at ``revision`` (branch, tag or commit; None = main) resolves to: from the local
    cache, else (online) from the hub; None when neither knows it."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref, "config.json", revision=revision)
    if isinstance(cached, str):
        return Path(cached).parent.name  # <cache>/models--org--name/snapshots/<commit>/config.json
    if _hub_offline():
        return None
    from huggingface_hub import HfApi

    return HfApi().model_info(ref, revision=revision).sha


def model_revision(model_spec, ref: str) -> str | None:
    """The recipe's ``model.revision`` where it applies: to the hub model ``model.name_or_path`` names (a folder
    or a converted GGUF has no revisions). ``model_spec`` is the recipe's ``model`` section."""
    return model_spec.revision if ref == model_spec.name_or_path and not Path(ref).is_dir() else None


def model_identity(ref: str, revision: str | None = None) -> str:
    """Content identity of a model: a converted GGUF folder's key (the file's sha256), a folder's file hash
    (large files by name+size), or ``hub:<id>@<commit>`` (the revision resolved; unresolvable: as given)."""
    path = Path(ref)
    if not path.is_dir():
        if not _HUB_ID.match(ref):
            return f"hub:{ref}"
        commit = hub_commit(ref, revision)
        return f"hub:{ref}@{commit or revision or 'main'}"
    if converted := gguf.folder_identity(path):
        return converted
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        if size <= 64 << 20:
            h.update(f.read_bytes())
    return content_hash(h)


# ---------------------------------------------------------------- tiny offline bootstrap


def _train_texts(train_parquet: Path) -> list[str]:
    table = pq.read_table(train_parquet, columns=["prompt", "chosen", "rejected"])
    texts = []
    for col in ("prompt", "chosen", "rejected"):
        for messages in table.column(col).to_pylist():
            texts.extend(m["content"] for m in messages)
    return texts


def build_tiny_tokenizer(texts: list[str], vocab_size: int, template: str = "chatml"):
    """Byte-level BPE trained on ``texts`` with every chat style's special tokens (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN] + [t for name in TEMPLATES for t in SPECIAL_TOKENS[name]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=PAD_TOKEN, additional_special_tokens=specials[1:]
    )
    apply_chat_template_style(fast, "chatml" if template == "auto" else template)
    return fast


def bootstrap_tiny(model_cfg, train_parquet: str | Path, out_dir: str | Path) -> Path:
    """Build the tiny default (tokenizer trained on ``train_parquet`` + seeded random model) into ``out_dir``.

    ``model_cfg`` is the recipe's ``model`` section (or its ``tiny`` part). Written atomically; an existing
    complete folder is returned as is.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny = getattr(model_cfg, "tiny", model_cfg)
    template = getattr(model_cfg, "chat_template", "chatml")
    tokenizer = build_tiny_tokenizer(_train_texts(Path(train_parquet)), tiny.vocab_size, template)
    config = AutoConfig.for_model(
        tiny.architecture,
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(tiny.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists() and not (out_dir / "config.json").is_file():
        shutil.rmtree(out_dir)  # an incomplete folder
    try:
        tmp.rename(out_dir)
    except OSError:  # a concurrent run renamed its folder (same seed, same data) first: keep it, as that run
        if not (out_dir / "config.json").is_file():  # may be training from it already
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ---------------------------------------------------------------- loading


def load_tokenizer(
    ref: str | Path, chat_template: str = "auto", revision: str | None = None, trust_remote_code: bool = False
):
    """Tokenizer with a chat template installed (its own under ``auto``) and a pad token set. A repository's own
    code runs only with ``trust_remote_code`` (the recipe's ``model.trust_remote_code``), never by a prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ref), revision=revision, trust_remote_code=trust_remote_code)
    added = apply_chat_template_style(tokenizer, chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.init_kwargs["align_added_tokens"] = added  # read by callers that must resize embeddings
    return tokenizer


def added_token_ids(tokenizer) -> list[int]:
    """Ids of the special tokens ``load_tokenizer`` had to add for the chat template (new embedding rows)."""
    return tokenizer.convert_tokens_to_ids(tokenizer.init_kwargs.get("align_added_tokens") or [])


def _dtype(name: str):
    import torch

    return {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_causal_lm(
    ref: str | Path,
    dtype: str = "float32",
    quantization_config=None,
    tokenizer=None,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """Causal LM from a folder or hub id (at ``revision``); embeddings resized when the tokenizer gained
    template tokens."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": _dtype(dtype), "revision": revision, "trust_remote_code": trust_remote_code}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = AutoModelForCausalLM.from_pretrained(str(ref), **kwargs)
    _fit_tokenizer(model, tokenizer)
    return model


def load_reward_model(
    ref: str | Path,
    dtype: str = "float32",
    quantization_config=None,
    tokenizer=None,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """Sequence-classification model with one output (the reward), from an LM, an encoder or an RM folder."""
    from transformers import AutoModelForSequenceClassification

    kwargs = {"dtype": _dtype(dtype), "num_labels": 1, "revision": revision, "trust_remote_code": trust_remote_code}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = AutoModelForSequenceClassification.from_pretrained(str(ref), **kwargs)
    _fit_tokenizer(model, tokenizer)
    return model


def _fit_tokenizer(model, tokenizer) -> None:
    if tokenizer is None:
        return
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id


# ---------------------------------------------------------------- LoRA / QLoRA


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_quantization_supported(quantization: str, key: str = "lora.quantization") -> None:
    """QLoRA needs CUDA; bitsandbytes on CPU does not raise by itself, so refuse here in one line."""
    if quantization != "none" and not cuda_available():
        raise ValueError(
            f"{key}: {quantization!r} (QLoRA, bitsandbytes) needs a CUDA GPU and none is present; "
            f"set quantization: none or run on a GPU host"
        )


def quantization_config(lora_cfg):
    """BitsAndBytesConfig for the recipe's ``lora.quantization`` (4-bit NF4 = QLoRA), or None."""
    if lora_cfg is None or lora_cfg.quantization == "none":
        return None
    check_quantization_supported(lora_cfg.quantization)
    import torch
    from transformers import BitsAndBytesConfig

    if lora_cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def peft_config(lora_cfg, task_type: str = "CAUSAL_LM", new_token_ids: list[int] = ()):
    """PEFT LoraConfig from the recipe's ``lora`` section (task_type CAUSAL_LM or SEQ_CLS), or None.

    ``new_token_ids``: embedding rows the chat template added (random at first): trained too, as PEFT
    trainable tokens (tied output rows follow), or the model could never learn to read or emit them."""
    if lora_cfg is None:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.lora_alpha,
        lora_dropout=lora_cfg.lora_dropout,
        target_modules=lora_cfg.target_modules,
        task_type=task_type,
        trainable_token_indices=list(new_token_ids) or None,
    )


def apply_lora(model, lora_cfg, task_type: str = "CAUSAL_LM", new_token_ids: list[int] = ()):
    """Wrap ``model`` with LoRA adapters (k-bit preparation first when it is quantized)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model)
    return get_peft_model(model, peft_config(lora_cfg, task_type, new_token_ids))


def finalise_model_folder(saved: Path, tokenizer, out_dir: Path, load_base=None) -> Path:
    """A trained model's saved folder (``trainer.save_model`` / ``save_pretrained``) → the stage's final HF folder.

    A LoRA adapter is merged into ``load_base()`` (the base as training loaded it: same dtype, embeddings resized
    for the tokens the template added) with ``merge_and_unload``: the folder is then a plain model that
    ``from_pretrained`` and vLLM load with no PEFT. Without ``load_base`` (a quantized QLoRA base, which cannot be
    merged losslessly) the adapter stays, and ``adapter_config.json`` names the base (load with PEFT). The saved
    generation config stops at the template's end of turn; the tokenizer is written beside it. ``saved`` is
    consumed; the folder appears at ``out_dir`` whole or not at all.
    """
    from transformers import GenerationConfig

    saved, out_dir = Path(saved), Path(out_dir)
    adapter = (saved / "adapter_config.json").is_file()
    merge = adapter and load_base is not None
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent))
    if merge:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base(), saved).merge_and_unload()
        set_stop_tokens(model.generation_config if model.can_generate() else None, tokenizer)
        model.save_pretrained(tmp)
        shutil.rmtree(saved)
    else:
        tmp.rmdir()
        saved.rename(tmp)
        if (tmp / "generation_config.json").is_file():
            gen = GenerationConfig.from_pretrained(tmp)
            set_stop_tokens(gen, tokenizer)
            gen.save_pretrained(tmp)
    (tmp / "training_args.bin").unlink(missing_ok=True)  # the trainer's pickle: not part of a model folder
    tokenizer.save_pretrained(tmp)
    (tmp / "align_model.json").write_text(json.dumps({"merged": not adapter or merge}), encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def set_stop_tokens(gen, tokenizer) -> None:
    """A generation config that stops at the template's end-of-turn token (plus the model's own eos), so a
    plain ``model.generate`` ends an answer where the template ends an assistant turn. ``None``: a model that
    generates nothing (a sequence-classification head)."""
    if gen is None:
        return
    own = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    stop = sorted({*end_of_turn_ids(tokenizer), *(i for i in own if i is not None)})
    gen.eos_token_id = stop or None  # a list, as generate() accepts it: every id ends the answer
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
