import json
from pathlib import Path

import pyarrow as pa
import pytest
from rows import msg, row, table

from schemas.data_config import DataConfig, LengthLimits
from schemas.preference import Reason, content_id
from tasks.data.clean import clean_rows, normalise_unicode, read_eval_prompts


def reasons(result) -> list[str]:
    return result.quarantine["reason"].to_pylist()


def test_clean_valid_rows_all_accepted_unchanged():
    t = table(
        [row("What is 2+2?", "4.", " I don't know.", source_row=0), row("Hi", "Hello!", "Go away.", source_row=1)]
    )
    out = clean_rows(t, DataConfig())
    assert out.accepted.equals(t)
    assert out.quarantine.num_rows == 0


@pytest.mark.parametrize(
    "bad, reason",
    [
        (row("Q", "   ", "no"), Reason.EMPTY_TURN),
        (row(" \n", "yes", "no"), Reason.EMPTY_TURN),
        (row("Q", "same", "same"), Reason.IDENTICAL_SIDES),
        (row("Q", "same answer", "same  answer\n"), Reason.IDENTICAL_SIDES),
        (row("Q", "x" * 101, "no"), Reason.TOO_LONG),
    ],
)
def test_clean_bad_row_quarantined_with_reason_and_nothing_lost(bad, reason):
    good = row("Fine question", "good", "bad", source_row=1)
    t = table([bad, good])
    out = clean_rows(t, DataConfig(lengths=LengthLimits(max_chars=100)))
    assert reasons(out) == [reason.value]
    assert out.accepted["id"].to_pylist() == [good["id"]]
    assert out.accepted.num_rows + out.quarantine.num_rows == t.num_rows
    raw = json.loads(out.quarantine["raw"][0].as_py())
    assert raw["id"] == bad["id"] and out.quarantine["detail"][0].as_py()


def test_clean_too_short_turn_names_side_and_length():
    out = clean_rows(table([row("Q", "ok", "no")]), DataConfig(lengths=LengthLimits(min_chars=3)))
    assert reasons(out) == ["too_short"]
    assert out.quarantine["detail"][0].as_py() == "prompt has a turn of 1 chars < min_chars=3"


def test_clean_whitespace_in_answers_kept_byte_exact():
    r = row("Q", "\n  Indented answer.  \n", " leading space")
    out = clean_rows(table([r]), DataConfig())
    assert out.accepted["chosen"][0].as_py() == [msg("assistant", "\n  Indented answer.  \n")]
    assert out.accepted["rejected"][0].as_py() == [msg("assistant", " leading space")]


def test_clean_duplicates_keep_first_in_source_order():
    a = row("Q", "yes", "no", source="s1", source_row=7)
    b = dict(a, source="s2", source_row=3)
    out = clean_rows(table([a, b, row("Q2", "y", "n", source_row=1)]), DataConfig())
    assert reasons(out) == ["duplicate"]
    assert out.quarantine["source"][0].as_py() == "s2"
    assert "s1 row 7" in out.quarantine["detail"][0].as_py()


def test_clean_first_failing_rule_wins_once_per_row():
    dup = row("Q", "same", "same")
    out = clean_rows(table([dup, dup]), DataConfig())
    assert reasons(out) == ["identical_sides", "identical_sides"]


def test_normalise_unicode_nfc_composes_and_rehashes():
    decomposed = "Cafe\u0301?"  # e + combining acute
    r = row(decomposed, "Oui.", "Non.")
    out = normalise_unicode(table([r]), "NFC")
    got = out.to_pylist()[0]
    assert got["prompt"][0]["content"] == "Caf\u00e9?"
    assert got["id"] == content_id(got["prompt"], got["chosen"], got["rejected"]) != r["id"]


def test_normalise_unicode_none_keeps_bytes():
    t = table([row("Cafe\u0301?", "Oui.", "Non.")])
    assert normalise_unicode(t, "none").equals(t)


def test_clean_decontamination_matches_normalised_final_user_turn():
    hit = row([msg("system", "Be nice."), msg("user", "What is  the Capital of FRANCE?")], "Paris.", "Dunno.")
    out = clean_rows(
        table([hit, row("Other", "a", "b", source_row=1)]),
        DataConfig(),
        eval_prompts=["what is the capital of france?"],
    )
    assert reasons(out) == ["contaminated"]


HH_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.head300.jsonl"


@pytest.fixture(scope="module")
def hh_rows() -> pa.Table:
    from schemas.data_config import SourceConfig
    from tasks.data.sources import read_source

    return read_source(SourceConfig(name="hh", format="hh-rlhf", path=str(HH_REAL))).accepted


def user_turns(prompt: list[dict]) -> list[str]:
    return [m["content"] for m in prompt if m["role"] == "user"]


def test_clean_decontamination_matches_every_user_turn_not_only_the_last(hh_rows):
    multi = [r for r in hh_rows.to_pylist() if len(user_turns(r["prompt"])) >= 2][:5]
    assert len(multi) == 5
    openings = [f"  {user_turns(r['prompt'])[0].upper()} " for r in multi]  # normalised: case, whitespace
    out = clean_rows(hh_rows, DataConfig(), eval_prompts=openings)
    found = {r["source_row"]: r for r in out.quarantine.to_pylist() if r["reason"] == "contaminated"}
    assert {r["source_row"] for r in multi} <= set(found)
    assert all(found[r["source_row"]]["detail"].startswith("user turn 1 of") for r in multi)
    counts = out.decontamination["hh"]
    assert counts["rows"] == hh_rows.num_rows and counts["contaminated"] == len(found)
    assert counts["exact"] == counts["contaminated"] and counts["not_last_turn"] >= 5 and counts["ngram"] == 0


def test_clean_decontamination_ngram_catches_lightly_edited_prompt(hh_rows):
    long_turn = next(t for r in hh_rows.to_pylist() for t in user_turns(r["prompt"]) if len(t.split()) >= 20)
    edited = [msg("user", "Quick question. " + long_turn.replace(".", "!") + " Thanks in advance.")]
    short = [msg("user", "Please compute 3 + 3 and explain.")]
    rows = table(
        [row(edited, "Sure.", "No."), row(short, "6.", "7.", source_row=1), row("Hi", "a", "b", source_row=2)]
    )
    evals = [long_turn, "Please compute 3 + 3."]
    assert clean_rows(rows, DataConfig(), eval_prompts=evals).quarantine.num_rows == 0  # exact misses both
    out = clean_rows(rows, DataConfig(decontaminate_ngram=13), eval_prompts=evals)
    assert reasons(out) == ["contaminated", "contaminated"] and out.accepted["source_row"].to_pylist() == [2]
    assert f"shares a 13-word run with evaluation prompt {long_turn[:60]!r}" in out.quarantine["detail"][0].as_py()
    assert "'Please compute 3 + 3.'" in out.quarantine["detail"][1].as_py()
    assert out.decontamination["s"] == {"rows": 3, "contaminated": 2, "exact": 0, "ngram": 2, "not_last_turn": 0}


def test_clean_token_limit_uses_tokenizer():
    class WordTokenizer:
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [t.split() for t in texts]}

    cfg = DataConfig(lengths=LengthLimits(max_tokens=5, tokenizer="words"))
    out = clean_rows(
        table([row("one two three", "four five six", "no"), row("a", "b", "c", source_row=1)]),
        cfg,
        tokenizer=WordTokenizer(),
    )
    assert reasons(out) == ["too_long"]
    assert "6 tokens > max_tokens=5" in out.quarantine["detail"][0].as_py()


def test_clean_token_limit_without_tokenizer_fails_clearly():
    cfg = DataConfig(lengths=LengthLimits(max_tokens=5, tokenizer="words"))
    with pytest.raises(ValueError, match="no tokenizer"):
        clean_rows(table([row("a", "b", "c")]), cfg)


def test_clean_empty_table_gives_empty_outputs():
    out = clean_rows(table([]), DataConfig())
    assert out.accepted.num_rows == 0 and out.quarantine.num_rows == 0


def test_read_eval_prompts_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first\n\nsecond\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "third"}) + "\n")
    assert read_eval_prompts([tmp_path / "a.txt", tmp_path / "b.jsonl"]) == ["first", "second", "third"]


def test_read_eval_prompts_row_without_prompt_names_file_and_row(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"q": 1}) + "\n")
    with pytest.raises(ValueError, match=r"b.jsonl row 1: .*`prompt`"):
        read_eval_prompts([tmp_path / "b.jsonl"])


def test_clean_large_row_is_quarantined_not_crashing():
    big = row("Q", "x" * 10_000_000, "no")
    out = clean_rows(table([big]), DataConfig())
    assert reasons(out) == ["too_long"]
    assert isinstance(out.accepted, pa.Table)


# ---------------------------------------------------------------- column helpers equal their plain definitions

_FUZZ = [
    "e",
    "é",
    "e\u0301",
    "\u0301",
    "ﬁ",
    "Å",
    "A\u030a",
    "\u212b",
    "한",
    "\u1100\u1161",
    " ",
    "\t",
    "\n",
    "\u3000",
    "\u2028",
    "\x1f",
    "\x85",
    "x",
    "E",
    "😀",
]


def _fuzz_texts(seed: int, n: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return ["".join(rng.choice(_FUZZ) for _ in range(rng.randint(0, 8))) for _ in range(n)]


def test_clean_blank_equals_empty_after_python_strip():
    import sys

    from tasks.data.clean import _blank

    texts = [chr(i) for i in range(sys.maxunicode + 1) if not 0xD800 <= i < 0xE000] + ["", "  ", " a ", "\u3000\t"]
    assert _blank(pa.array(texts)).to_pylist() == [not t.strip() for t in texts]


def test_clean_equal_up_to_whitespace_equals_split_join_comparison():
    from tasks.data.clean import _equal_up_to_whitespace

    a, b = _fuzz_texts(0, 4000), _fuzz_texts(1, 4000)
    b[::3] = [" ".join(t.split()) + " " for t in a[::3]]  # many equal up to whitespace
    got = _equal_up_to_whitespace(pa.array(a), pa.array(b)).tolist()
    assert got == [" ".join(x.split()) == " ".join(y.split()) for x, y in zip(a, b)]
    assert sum(got) >= 1000


@pytest.mark.parametrize("form", ["NFC", "NFKC", "NFD", "NFKD"])
def test_clean_all_normalized_equals_every_string_normalized(form):
    import unicodedata

    from tasks.data.clean import _all_normalized

    texts = _fuzz_texts(2, 300)
    for k in range(0, 300, 7):
        chunk = texts[k : k + 7]
        expected = all(unicodedata.is_normalized(form, t) for t in chunk)
        assert _all_normalized(pa.array(chunk), form) == expected, chunk
    normal = [unicodedata.normalize(form, t) for t in texts]
    assert _all_normalized(pa.array(normal + [None]), form)
