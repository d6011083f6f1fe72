"""The prompts CAI critiques and revises: the recipe's ``cai.prompts``, cleaned and decontaminated the way the
data plane cleans human rows, minus every held-out conversation. No evaluation prompt reaches training.

Kept out, in this order, each counted in the stage metrics (``prompts_*``):
- ``prompts_quarantined_<reason>``: what the data plane quarantines. A data-plane source's rows go through
  ``tasks.data.clean.clean_rows`` with the recipe's ``data`` section (CAI reads raw sources, so rows the ingest
  quarantined, e.g. as ``contaminated``, would otherwise come back); a prompt file's prompts get the same
  Unicode form, character limits and decontamination (they have no answers for the other rules);
- decontamination (reason ``contaminated``): ``data.decontaminate`` and the evaluate section's prompt files
  (``safety_prompts``, ``benign_prompts``), matched on every user turn (``tasks/data/decontaminate.py``);
- ``prompts_held_out``: a prompt whose split key (its normalised opening user turn, ``tasks/data/split.py``) is a
  validation or test key of the dataset: CAI output trains reward and DPO, so it must not see their prompts;
- ``prompts_duplicate``: a prompt hash seen before; ``prompts_over_limit``: past ``cai.limit``.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.cai_config import PromptFile
from schemas.preference import MESSAGES, Reason, prompt_hash
from tasks.data.decontaminate import Decontaminator, evaluation_decontaminator, read_eval_prompts
from tasks.data.split import split_keys

HELD_OUT = ("validation", "test")


@dataclass(frozen=True)
class CAIPrompt:
    source: str
    source_row: int
    prompt: list[dict]  # message list ending with a user turn
    prompt_hash: str


def held_out_split_keys(dataset_dir: Path) -> set[str]:
    """Split keys of the dataset's validation and test rows: no CAI prompt may open the same way."""
    keys: set[str] = set()
    for name in HELD_OUT:
        path = Path(dataset_dir) / f"{name}.parquet"
        if path.exists():
            keys.update(split_keys(pq.read_table(path, columns=["prompt"])["prompt"]))
    return keys


def read_prompts(src, recipe, decontaminator: Decontaminator) -> tuple[list[CAIPrompt], Counter]:
    """The clean prompts of one ``cai.prompts`` entry, and what was quarantined ({reason: count})."""
    if isinstance(src, PromptFile):
        return _file_prompts(src, recipe.data, decontaminator)
    from tasks.data.clean import clean_rows
    from tasks.data.sources import read_source

    read = read_source(src, seed=recipe.data.seed)
    cleaned = clean_rows(read.accepted, recipe.data, decontaminator)
    dropped = Counter(read.quarantine["reason"].to_pylist()) + Counter(cleaned.quarantine["reason"].to_pylist())
    rows = cleaned.accepted.select(["source", "source_row", "prompt", "prompt_hash"]).to_pylist()
    return [CAIPrompt(r["source"], r["source_row"], r["prompt"], r["prompt_hash"]) for r in rows], dropped


def _file_prompts(src: PromptFile, data_cfg, decontaminator: Decontaminator) -> tuple[list[CAIPrompt], Counter]:
    """A prompt file's lines (or ``prompt`` fields) as single user turns, in the data plane's Unicode form,
    within its character limits and decontaminated."""
    texts = read_eval_prompts([src.path])[: src.limit]
    if data_cfg.unicode_form != "none":
        texts = [unicodedata.normalize(data_cfg.unicode_form, t) for t in texts]
    messages = [[{"role": "user", "content": t}] for t in texts]
    reasons = np.full(len(texts), None, dtype=object)
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    reasons[lengths < data_cfg.lengths.min_chars] = Reason.TOO_SHORT.value
    reasons[(lengths > data_cfg.lengths.max_chars) & (reasons == None)] = Reason.TOO_LONG.value  # noqa: E711
    hit = decontaminator.match(pa.array(messages, MESSAGES)).kind != None  # noqa: E711
    reasons[hit & (reasons == None)] = Reason.CONTAMINATED.value  # noqa: E711
    kept = [CAIPrompt(src.name, i, m, prompt_hash(m)) for i, m in enumerate(messages) if reasons[i] is None]
    return kept, Counter(r for r in reasons if r is not None)


def select_prompts(candidates: list[CAIPrompt], held_out: set[str], limit: int | None) -> tuple[list[CAIPrompt], dict]:
    """First occurrence of each prompt hash, minus those opening like a held-out row, up to ``limit``."""
    seen: set[str] = set()
    kept, dupes, excluded = [], 0, 0
    keys = split_keys(pa.array([p.prompt for p in candidates], MESSAGES)) if candidates else []
    for p, key in zip(candidates, keys):
        if key in held_out:
            excluded += 1
        elif p.prompt_hash in seen:
            dupes += 1
        else:
            seen.add(p.prompt_hash)
            kept.append(p)
    used = kept[:limit]
    return used, {
        "prompts_held_out": excluded,
        "prompts_duplicate": dupes,
        "prompts_over_limit": len(kept) - len(used),
        "prompts_used": len(used),
    }


def cai_prompts(recipe, dataset_dir: Path) -> tuple[list[CAIPrompt], dict]:
    """The prompts of ``recipe.cai.prompts`` that CAI may train on, and the counts of each exclusion."""
    decontaminator = evaluation_decontaminator(recipe)
    candidates, quarantined, read = [], Counter(), 0
    for src in recipe.cai.prompts:
        prompts, dropped = read_prompts(src, recipe, decontaminator)
        candidates += prompts
        quarantined += dropped
        read += len(prompts) + sum(dropped.values())
    used, counts = select_prompts(candidates, held_out_split_keys(dataset_dir), recipe.cai.limit)
    quarantine_counts = {f"prompts_quarantined_{k}": v for k, v in sorted(quarantined.items())}
    return used, {"prompts_read": read, **quarantine_counts, **counts}
