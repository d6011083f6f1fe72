"""KTO (``dpo.method: kto``): TRL KTOTrainer on unpaired rows, TRL's conversational ``prompt`` / ``completion``
(the assistant turn) / ``label`` (desirable or not).

Rows: the preference pairs unpaired (chosen → desirable, rejected → undesirable) plus the unpaired rows the data
plane wrote for the split (``unpaired/<split>.parquet``, when there is one). ``desirable_weight`` /
``undesirable_weight`` are balanced from the label counts (the KTO paper's rule: weight × count equal on both
sides; the majority label keeps weight 1) unless the recipe's ``dpo.args`` sets them. The rows are shuffled
(seeded by ``args.seed``): KTOTrainer estimates its KL term pairing each row's prompt with the next row's
completion in the batch, so the two halves of one pair must not sit side by side.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow.parquet as pq

from tasks.training.examples import fit_to_length, to_dataset
from tasks.training.stage import StageConfigError, read_rows

__all__ = ["balanced_weights", "kto_examples", "kto_sets", "read_unpaired", "unpaired_from_pairs"]

UNPAIRED_COLUMNS = ("prompt", "completion", "label")


def _messages(turns) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in turns]


def unpaired_from_pairs(pairs: Iterable[dict]) -> list[dict]:
    """Each pair as two unpaired rows: (prompt, chosen answer, True) and (prompt, rejected answer, False)."""
    out = []
    for r in pairs:
        prompt = _messages(r["prompt"])
        out.append({"prompt": prompt, "completion": _messages(r["chosen"][-1:]), "label": True})
        out.append({"prompt": prompt, "completion": _messages(r["rejected"][-1:]), "label": False})
    return out


def read_unpaired(dataset_dir: Path, split: str) -> list[dict]:
    """Rows of ``unpaired/<split>.parquet`` (the data plane's unpaired table), or none when it is absent."""
    path = Path(dataset_dir) / "unpaired" / f"{split}.parquet"
    if not path.is_file():
        return []
    rows = pq.read_table(path, columns=list(UNPAIRED_COLUMNS)).to_pylist()
    return [
        {"prompt": _messages(r["prompt"]), "completion": _messages(r["completion"]), "label": r["label"]} for r in rows
    ]


def balanced_weights(labels: Sequence[bool]) -> dict[str, float]:
    """desirable/undesirable weights with weight × count equal on both sides (the majority label at 1.0)."""
    desirable = sum(1 for x in labels if x)
    undesirable = len(labels) - desirable
    if not desirable or not undesirable:
        missing = "desirable (label true)" if not desirable else "undesirable (label false)"
        raise StageConfigError(f"dpo: kto needs both labels; the training rows have no {missing} row")
    majority = max(desirable, undesirable)
    return {"desirable_weight": majority / desirable, "undesirable_weight": majority / undesirable}


def kto_examples(pairs: Iterable[dict], unpaired: Iterable[dict] = (), seed: int = 0) -> list[dict]:
    """The KTO rows of the pairs (unpaired) and the unpaired rows, shuffled with ``seed`` (module note)."""
    rows = unpaired_from_pairs(pairs) + [dict(r) for r in unpaired]
    random.Random(seed).shuffle(rows)
    return rows


def _fitted(tokenizer, rows: list[dict], max_length: int | None, what: str) -> tuple[list[dict], int]:
    kept, dropped = fit_to_length(tokenizer, rows, max_length)
    if not kept:
        raise StageConfigError(
            f"dpo: all {dropped} {what} rows are longer than max_length {max_length} tokens; raise dpo.args.max_length"
        )
    return kept, dropped


def kto_sets(recipe, method, tokenizer, config, dataset_dir: Path, extra_train, inputs: dict) -> dict:
    """``Method.datasets`` of kto: unpaired train (and eval) sets; sets the balanced weights on ``config``."""
    dataset_dir = Path(dataset_dir)
    pairs = read_rows([dataset_dir / "train.parquet", *extra_train])
    rows, dropped = _fitted(
        tokenizer, kto_examples(pairs, read_unpaired(dataset_dir, "train"), config.seed), config.max_length, "train"
    )
    labels = [r["label"] for r in rows]
    for key, weight in balanced_weights(labels).items():
        if key not in recipe.dpo.args:  # the recipe's own weights win
            setattr(config, key, weight)
    out = {
        "train": to_dataset(rows),
        "train_rows": len(rows),
        "train_rows_too_long": dropped,
        "desirable_rows": sum(labels),
        "undesirable_rows": len(labels) - sum(labels),
    }
    if config.eval_strategy != "no":
        held = kto_examples(read_rows([dataset_dir / "validation.parquet"]), read_unpaired(dataset_dir, "validation"))
        kept, eval_dropped = _fitted(tokenizer, held, config.max_length, "eval")
        out.update(eval=to_dataset(kept), eval_rows=len(kept), eval_rows_too_long=eval_dropped)
    return out
