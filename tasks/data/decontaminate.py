"""Decontamination: keep evaluation prompts out of everything that trains (the data plane and CAI).

A prompt is contaminated when ANY of its user turns (not only the last: multi-turn rows that open with an
evaluation prompt would otherwise pass) matches an evaluation prompt, both normalised as in
``schemas.preference.normalise_prompt_text`` (NFKC, case-folded, whitespace collapsed):

- ``exact``: the normalised turn equals a normalised evaluation prompt;
- ``ngram`` (``data.decontaminate_ngram: n``, off by default): the turn shares a run of ``n`` words with
  an evaluation prompt (words = ``\\w+`` runs of the normalised text, so punctuation does not matter), or
  contains all of an evaluation prompt shorter than ``n`` words as one run; this catches lightly edited
  prompts ("…of Canada? Answer in one word."). GPT-3's decontamination used 13-word runs.

:meth:`Decontaminator.match` returns one verdict per row (kind + a detail naming the turn and, for
n-grams, the evaluation prompt), so callers quarantine and count by kind per source.

The list is every prompt an evaluation reads (:func:`evaluation_prompt_files`): the ``data.decontaminate``
files and the evaluate section's prompt files (``safety_prompts``, ``benign_prompts``, ...); the data plane and
the CAI stage both keep them out (the test and validation splits are kept out by the split itself).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.preference import normalise_prompt_text, normalise_prompt_texts

_WORD = re.compile(r"\w+")
KINDS = ("exact", "ngram")


@dataclass
class Verdicts:
    """Per row: the match kind ("exact", "ngram") or None, and a detail for the quarantine table."""

    kind: np.ndarray  # object array of str | None
    detail: np.ndarray  # object array of str | None
    not_last_turn: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # hit before the last turn


@dataclass
class Decontaminator:
    exact: set[str]
    ngram: int | None = None
    grams: dict[int, dict[str, int]] = field(default_factory=dict)  # run length → {joined words: prompt index}
    starts: dict[str, set[int]] = field(default_factory=dict)  # first word → run lengths starting with it
    prompts: list[str] = field(default_factory=list)

    @classmethod
    def from_prompts(cls, texts: Iterable[str], ngram: int | None = None) -> Decontaminator:
        prompts = [t for t in texts if t.strip()]
        out = cls({normalise_prompt_text(t) for t in prompts}, ngram, prompts=prompts)
        if ngram:
            for k, text in enumerate(prompts):
                words = _WORD.findall(normalise_prompt_text(text))
                size = min(ngram, len(words))
                for i in range(len(words) - size + 1) if size else ():
                    out.grams.setdefault(size, {}).setdefault(" ".join(words[i : i + size]), k)
                    out.starts.setdefault(words[i], set()).add(size)
        return out

    def __bool__(self) -> bool:
        return bool(self.exact)

    def match(self, prompts: pa.ChunkedArray | pa.ListArray) -> Verdicts:
        """One verdict per row of a ``MESSAGES`` column; the first matching user turn names the row."""
        arr = prompts.combine_chunks() if isinstance(prompts, pa.ChunkedArray) else prompts
        n = len(arr)
        kind, detail = np.full(n, None, dtype=object), np.full(n, None, dtype=object)
        not_last = np.zeros(n, dtype=bool)
        if not self.exact or n == 0:
            return Verdicts(kind, detail, not_last)
        flat = arr.flatten()
        parents = pc.list_parent_indices(arr).to_numpy()
        offsets = pc.subtract(arr.offsets, arr.offsets[0]).to_numpy()
        users = np.flatnonzero(pc.equal(flat.field("role"), "user").fill_null(False).to_numpy(zero_copy_only=False))
        texts = normalise_prompt_texts(flat.field("content").take(pa.array(users, pa.int64())))
        hit = pc.is_in(texts, value_set=pa.array(sorted(self.exact), pa.string())).to_numpy(zero_copy_only=False)
        found = {}  # row → (flat index, kind, what)
        for j in np.flatnonzero(hit):
            found.setdefault(int(parents[users[j]]), (int(users[j]), "exact", "is an evaluation prompt"))
        if self.ngram:
            for j, text in enumerate(texts.to_pylist()):
                row = int(parents[users[j]])
                if row in found:
                    continue
                k = self._shared_run(_WORD.findall(text))
                if k is not None:
                    what = f"shares a {self.ngram}-word run with evaluation prompt {self.prompts[k][:60]!r}"
                    found[row] = (int(users[j]), "ngram", what)
        for row, (i, how, what) in found.items():
            turn, turns = i - offsets[row], offsets[row + 1] - offsets[row]
            kind[row] = how
            detail[row] = f"user turn {turn + 1} of {turns} prompt turns {what} (decontamination, {how})"
            not_last[row] = turn + 1 < turns
        return Verdicts(kind, detail, not_last)

    def _shared_run(self, words: list[str]) -> int | None:
        """Index of an evaluation prompt sharing a run with these words (runs start at a known first word)."""
        for i, w in enumerate(words):
            for size in self.starts.get(w, ()):
                k = self.grams[size].get(" ".join(words[i : i + size]))
                if k is not None:
                    return k
        return None


def counts_per_source(sources: pa.ChunkedArray | pa.Array, verdicts: Verdicts, mask: np.ndarray) -> dict:
    """{source: {rows, contaminated, exact, ngram, not_last_turn}} over the rows where ``mask`` holds
    (the rows quarantined as contaminated), ``rows`` counting every row checked."""
    names = np.asarray(sources.to_pylist(), dtype=object)
    out: dict[str, dict[str, int]] = {}
    for name in sorted(set(names.tolist())):
        of = names == name
        hit = of & mask
        out[name] = {
            "rows": int(of.sum()),
            "contaminated": int(hit.sum()),
            **{k: int((hit & (verdicts.kind == k)).sum()) for k in KINDS},
            "not_last_turn": int((hit & verdicts.not_last_turn).sum()),
        }
    return out


def evaluation_prompt_files(recipe) -> list[str]:
    """Every file of prompts an evaluation reads, none of which may reach training: ``data.decontaminate`` and
    the evaluate section's ``*_prompts`` files (red-team and benign prompts), each once."""
    named = [value for key, value in recipe.evaluate if key.endswith("_prompts") and isinstance(value, str)]
    return list(dict.fromkeys([*recipe.data.decontaminate, *filter(None, named)]))


def evaluation_decontaminator(recipe) -> Decontaminator:
    """The recipe's decontamination: its evaluation prompts, matched as ``data.decontaminate_ngram`` says."""
    return Decontaminator.from_prompts(
        read_eval_prompts(evaluation_prompt_files(recipe)), recipe.data.decontaminate_ngram
    )


def read_eval_prompts(paths: Iterable[str | Path]) -> list[str]:
    """Evaluation prompts to keep out of training: .txt (one per line) or .jsonl/.json with a `prompt` field."""
    prompts: list[str] = []
    for path in map(Path, paths):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".txt":
            prompts += [line for line in text.splitlines() if line.strip()]
            continue
        records = (
            json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
        for k, rec in enumerate(records):
            p = rec.get("prompt") if isinstance(rec, dict) else None
            if not isinstance(p, str):
                raise ValueError(f"{path} row {k}: decontamination file rows need a string `prompt`")
            prompts.append(p)
    return prompts
