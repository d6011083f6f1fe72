"""tasks/data/sources: raw rows of each source format → canonical preference rows + quarantine rows.

Real upstream rows come from ../shared/data (never copied into the repo); the edge cases are our own
fixtures in tests/fixtures/sources (written by make_fixtures.py, one comment per row). Every read is
checked for the invariant rows_read == accepted + quarantined and for canonical, hashed rows.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path
from typing import get_args

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from schemas.data_config import SourceConfig, SourceFormat, UltraFeedbackOptions
from schemas.preference import PREFERENCE_SCHEMA, QUARANTINE_SCHEMA, PreferenceRow, Reason, content_id, prompt_hash
from tasks.data.sources import ADAPTERS, RowError, SourceResult, get_adapter, read_records, read_source
from tasks.data.sources.base import split_common_prefix
from tasks.data.sources.hh_rlhf import transcript_messages

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sources"
HH_REAL = SHARED / "hh-rlhf" / "harmless-base-test.head300.jsonl"
ORCA_REAL = SHARED / "orca_dpo_pairs" / "train.head50.jsonl"
UFB_REAL = SHARED / "ultrafeedback_binarized" / "train_prefs.row0.jsonl"
SHAREGPT_REAL = SHARED / "sharegpt" / "llamafactory-dpo-en.head100.jsonl"
H, A = "\n\nHuman: ", "\n\nAssistant: "


# ---------------------------------------------------------------- helpers


def check(result: SourceResult) -> SourceResult:
    """The contract every read keeps, whatever the input."""
    accepted, quarantine = result.accepted, result.quarantine
    assert result.rows_read == accepted.num_rows + quarantine.num_rows == result.input["rows"]
    assert accepted.schema.equals(PREFERENCE_SCHEMA, check_metadata=True)
    assert quarantine.schema.equals(QUARANTINE_SCHEMA, check_metadata=True)
    for rows in (accepted["source_row"].to_pylist(), quarantine["source_row"].to_pylist()):
        assert rows == sorted(set(rows)), "rows keep source order, each once"
    assert not set(accepted["source_row"].to_pylist()) & set(quarantine["source_row"].to_pylist())
    for row in accepted.to_pylist():
        PreferenceRow.model_validate(row)  # prompt ends with a user turn, answers are assistant turns
        assert row["source"] == result.source
        assert row["id"] == content_id(row["prompt"], row["chosen"], row["rejected"])
        assert row["prompt_hash"] == prompt_hash(row["prompt"])
    assert set(quarantine["source"].to_pylist()) <= {result.source}
    return result


def read(fmt: str, path: Path | str, **cfg) -> SourceResult:
    return check(read_source(SourceConfig(name=f"test/{fmt}", format=fmt, path=str(path), **cfg)))


def quarantined(result: SourceResult) -> dict[int, tuple[str, str]]:
    q = result.quarantine.to_pydict()
    return {r: (reason, detail) for r, reason, detail in zip(q["source_row"], q["reason"], q["detail"])}


def accepted(result: SourceResult) -> dict[int, dict]:
    return {row["source_row"]: row for row in result.accepted.to_pylist()}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def transcript(messages: list[dict]) -> str:
    return "".join((H if m["role"] == "user" else A) + m["content"] for m in messages)


# ---------------------------------------------------------------- registry


def test_adapters_keys_equal_source_format_names():
    assert set(ADAPTERS) == set(get_args(SourceFormat))


def test_get_adapter_unknown_name_raises_listing_valid_formats():
    with pytest.raises(ValueError, match="unknown source format 'hh'") as err:
        get_adapter("hh")
    for name in ADAPTERS:
        assert name in str(err.value)


def test_read_source_unknown_format_raises_listing_valid_formats():
    cfg = SourceConfig.model_construct(
        name="x", format="sharegpt", path=str(HH_REAL), hub=None, limit=None, weight=1.0, options={}
    )
    with pytest.raises(ValueError, match="valid formats: hh-rlhf, orca_dpo_pairs, ultrafeedback"):
        read_source(cfg)


def test_adapter_called_directly_without_options_returns_canonical_fields():
    row = ADAPTERS["orca_dpo_pairs"]({"system": "", "question": "Q", "chosen": "A", "rejected": " B"})
    assert row == {
        "prompt": [msg("user", "Q")],
        "chosen": [msg("assistant", "A")],
        "rejected": [msg("assistant", " B")],
        "score_chosen": None,
        "score_rejected": None,
    }


# ---------------------------------------------------------------- hh-rlhf


def test_hh_real_rows_all_accepted_and_turns_byte_exact():
    result = read("hh-rlhf", HH_REAL)
    assert result.rows_read == 300 and result.accepted.num_rows == 300
    for raw, row in zip(jsonl(HH_REAL), result.accepted.to_pylist()):
        # the transcripts rebuild exactly from the messages: nothing stripped, nothing lost
        assert transcript(row["prompt"] + row["chosen"]) == raw["chosen"]
        assert transcript(row["prompt"] + row["rejected"]) == raw["rejected"]


def test_hh_real_rows_equal_trl_extract_prompt_on_our_message_lists():
    from trl.data_utils import extract_prompt

    raws = jsonl(HH_REAL)
    for row in read("hh-rlhf", HH_REAL).accepted.to_pylist():
        raw = raws[row["source_row"]]
        peer = extract_prompt(
            {
                "chosen": transcript_messages(raw["chosen"], "chosen"),
                "rejected": transcript_messages(raw["rejected"], "rejected"),
            }
        )
        assert peer == {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}


@pytest.mark.parametrize(
    "chosen, rejected, trl_wrong, reason",
    [
        pytest.param(  # one side is a prefix: TRL hands the shared assistant turn out as both "answers"
            [msg("user", "Hi"), msg("assistant", "Hello!")],
            [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Thanks"), msg("assistant", "Bye")],
            {
                "prompt": [msg("user", "Hi")],
                "chosen": [msg("assistant", "Hello!")],
                "rejected": [msg("assistant", "Hello!"), msg("user", "Thanks"), msg("assistant", "Bye")],
            },
            Reason.PREFIX_SIDES,
            id="prefix",
        ),
        pytest.param(  # equal sides: TRL returns a "pair" of identical answers
            [msg("user", "Hi"), msg("assistant", "Hello!")],
            [msg("user", "Hi"), msg("assistant", "Hello!")],
            {
                "prompt": [msg("user", "Hi")],
                "chosen": [msg("assistant", "Hello!")],
                "rejected": [msg("assistant", "Hello!")],
            },
            Reason.PREFIX_SIDES,
            id="equal",
        ),
        pytest.param(  # sides part before the last turn: TRL's answers contain user turns
            [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Joke?"), msg("assistant", "Knock knock.")],
            [msg("user", "Hi"), msg("assistant", "Go away."), msg("user", "Joke?"), msg("assistant", "No.")],
            {
                "prompt": [msg("user", "Hi")],
                "chosen": [msg("assistant", "Hello!"), msg("user", "Joke?"), msg("assistant", "Knock knock.")],
                "rejected": [msg("assistant", "Go away."), msg("user", "Joke?"), msg("assistant", "No.")],
            },
            Reason.DIVERGENT_PROMPT,
            id="divergent",
        ),
    ],
)
def test_hh_rows_trl_gets_wrong_are_quarantined(chosen, rejected, trl_wrong, reason):
    from trl.data_utils import extract_prompt

    assert extract_prompt({"chosen": chosen, "rejected": rejected}) == trl_wrong
    with pytest.raises(RowError) as err:
        ADAPTERS["hh-rlhf"]({"chosen": transcript(chosen), "rejected": transcript(rejected)})
    assert err.value.reason == reason


def test_hh_prefix_sides_trl_on_strings_leaks_a_character_ours_quarantines():
    from trl.data_utils import extract_prompt

    chosen = f"{H}Hi{A}Hello!"
    rejected = chosen + f"{H}Thanks{A}Bye"
    peer = extract_prompt({"chosen": chosen, "rejected": rejected})
    assert peer["prompt"] == chosen[:-1] and peer["chosen"] == "!"  # the answer is the prompt's last character
    with pytest.raises(RowError) as err:
        ADAPTERS["hh-rlhf"]({"chosen": chosen, "rejected": rejected})
    assert err.value.reason == Reason.PREFIX_SIDES
    assert "chosen (2 messages) is a prefix of rejected (4 messages)" in err.value.detail


def test_hh_fast_path_equals_general_path_on_every_row():
    records = jsonl(HH_REAL) + jsonl(FIXTURES / "hh_edge_cases.jsonl")
    for record in records:
        general = split_common_prefix(
            transcript_messages(record["chosen"], "chosen"),
            transcript_messages(record["rejected"], "rejected"),
            single_answer=True,
        )
        fast = ADAPTERS["hh-rlhf"](record)
        assert (fast["prompt"], fast["chosen"], fast["rejected"]) == general


def test_hh_real_row_with_inner_human_text_keeps_it_in_assistant_turn():
    row = accepted(read("hh-rlhf", HH_REAL))[29]  # upstream "\n\nAssistant: Human: So she ..."
    assert any(m["role"] == "assistant" and m["content"].startswith("Human: So she") for m in row["prompt"])


def test_hh_real_row_with_empty_final_turn_is_accepted_for_the_cleaner():
    row = accepted(read("hh-rlhf", HH_REAL))[86]  # chosen ends with "\n\nAssistant: "
    assert row["chosen"] == [msg("assistant", "")]


def test_hh_edge_case_fixture_rows_parse_as_documented():
    rows = accepted(read("hh-rlhf", FIXTURES / "hh_edge_cases.jsonl"))
    assert len(rows) == 6
    assert [m["role"] for m in rows[0]["prompt"]] == ["user", "assistant", "user"]
    assert rows[0]["chosen"] == [msg("assistant", "Eggs, pecorino, guanciale, pepper.")]
    assert rows[1]["chosen"] == [msg("assistant", "Human: hi there")]
    assert rows[2]["prompt"] == [msg("user", " two  spaces ")]
    assert rows[2]["chosen"] == [msg("assistant", "  indented answer\n")]
    assert rows[3]["chosen"] == [msg("assistant", "")]  # trailing "\n\nAssistant:" without its space
    assert rows[4]["prompt"] == [msg("user", "Hello"), msg("user", "Anyone there?")]
    assert rows[5]["chosen"] == [msg("assistant", "Ein Gruß — 你好 🙂")]


# line (1-based, as in an editor) → reason and a piece of the detail naming what and where
HH_BAD_ROWS = {
    2: (Reason.INVALID_JSON, "hh_bad_rows.jsonl:2: invalid JSON: Expecting value"),
    4: (Reason.INVALID_UTF8, "hh_bad_rows.jsonl:4: not valid UTF-8"),
    5: (Reason.WRONG_TYPE, "hh_bad_rows.jsonl:5: expected a JSON object, found array"),
    6: (Reason.MISSING_FIELD, "hh_bad_rows.jsonl:6: missing field 'rejected'"),
    7: (Reason.WRONG_TYPE, "hh_bad_rows.jsonl:7: chosen: expected string, found number"),
    8: (Reason.MISSING_MARKER, "hh_bad_rows.jsonl:8: chosen: no '\\n\\nHuman: ' marker"),
    9: (Reason.MISSING_MARKER, "hh_bad_rows.jsonl:9: chosen: text before the first '\\n\\nHuman: ' marker: 'Note: "),
    10: (Reason.MISSING_MARKER, "hh_bad_rows.jsonl:10: chosen: no '\\n\\nAssistant: ' turn"),
    11: (Reason.PREFIX_SIDES, "hh_bad_rows.jsonl:11: chosen (2 messages) is a prefix of rejected (4 messages)"),
    12: (Reason.PREFIX_SIDES, "hh_bad_rows.jsonl:12: chosen and rejected are the same 2 messages"),
    13: (Reason.DIVERGENT_PROMPT, "hh_bad_rows.jsonl:13: sides part at message 1"),
    14: (Reason.INVALID_UTF8, "hh_bad_rows.jsonl:14: unpaired surrogate"),
    15: (Reason.BAD_TURN_ORDER, "hh_bad_rows.jsonl:15: prompt: must end with a user turn, ends with assistant"),
}


def test_hh_bad_rows_each_quarantined_with_reason_and_line():
    result = read("hh-rlhf", FIXTURES / "hh_bad_rows.jsonl")
    found = quarantined(result)
    assert sorted(found) == [line - 1 for line in HH_BAD_ROWS]
    for line, (reason, detail) in HH_BAD_ROWS.items():
        assert found[line - 1][0] == reason, line
        assert detail in found[line - 1][1], (line, found[line - 1][1])
    assert sorted(accepted(result)) == [0, 15]  # line 3 is blank: skipped, not a row
    assert result.rows_read == 15


def test_hh_quarantine_raw_is_the_original_line():
    result = read("hh-rlhf", FIXTURES / "hh_bad_rows.jsonl")
    raw = dict(zip(result.quarantine["source_row"].to_pylist(), result.quarantine["raw"].to_pylist()))
    lines = (FIXTURES / "hh_bad_rows.jsonl").read_bytes().split(b"\n")
    assert raw[5] == lines[5].decode()  # missing field: the line as JSON text
    assert raw[1] == lines[1].decode()  # invalid JSON: the text as read
    assert raw[3] == lines[3].decode("utf-8", "backslashreplace") and "\\xe9" in raw[3]  # invalid bytes shown


# ---------------------------------------------------------------- orca_dpo_pairs


def test_orca_real_rows_empty_system_gives_no_system_turn():
    raws = jsonl(ORCA_REAL)
    result = read("orca_dpo_pairs", ORCA_REAL)
    assert result.accepted.num_rows == 50
    empty = [i for i, r in enumerate(raws) if r["system"] == ""]
    assert empty == [0, 19, 28, 36]
    for i, row in accepted(result).items():
        expected = ([] if i in empty else [msg("system", raws[i]["system"])]) + [msg("user", raws[i]["question"])]
        assert row["prompt"] == expected


def test_orca_real_rows_keep_rejected_leading_space():
    raws = jsonl(ORCA_REAL)
    for i, row in accepted(read("orca_dpo_pairs", ORCA_REAL)).items():
        assert row["rejected"] == [msg("assistant", raws[i]["rejected"])]
        assert row["rejected"][0]["content"].startswith(" ")
        assert row["chosen"] == [msg("assistant", raws[i]["chosen"])]


def test_orca_strip_answer_edges_option_strips_both_answers_only():
    raws = jsonl(ORCA_REAL)
    rows = accepted(read("orca_dpo_pairs", ORCA_REAL, options={"strip_answer_edges": True}))
    assert len(rows) == 50
    for i, row in rows.items():
        assert row["chosen"] == [msg("assistant", raws[i]["chosen"].strip())]
        assert row["rejected"] == [msg("assistant", raws[i]["rejected"].strip())]
        assert row["prompt"][-1] == msg("user", raws[i]["question"])  # the prompt stays byte-exact
    assert not any(r["rejected"][0]["content"][:1].isspace() for r in rows.values())


def test_orca_bad_fields_quarantined_naming_the_field(tmp_path):
    path = write_jsonl(
        tmp_path / "orca.jsonl",
        [
            {"system": 3, "question": "Q", "chosen": "A", "rejected": "B"},
            {"system": "S", "chosen": "A", "rejected": "B"},
            {"question": "Q", "chosen": "A", "rejected": "B"},  # no system key: no system turn
        ],
    )
    result = read("orca_dpo_pairs", path)
    found = quarantined(result)
    assert found[0] == (Reason.WRONG_TYPE, "orca.jsonl:1: system: expected string or null, found number")
    assert found[1][0] == Reason.MISSING_FIELD and "missing field 'question'" in found[1][1]
    assert accepted(result)[2]["prompt"] == [msg("user", "Q")]


# ---------------------------------------------------------------- ultrafeedback (raw)

UF = FIXTURES / "ultrafeedback.jsonl"


def test_ultrafeedback_overall_score_chosen_is_highest_rejected_strictly_lower():
    result = read("ultrafeedback", UF, options={"score": "overall_score", "rejected": "random"})
    rows = accepted(result)
    assert rows[0]["prompt"] == [msg("user", "Name a prime number.")]  # no custom_system_prompt
    assert rows[0]["chosen"] == [msg("assistant", "2 is the smallest prime.")] and rows[0]["score_chosen"] == 9.0
    lower = {"7 is prime.": 7.5, "9 is prime.": 6.0, "Primes are boring.": 3.5}
    assert lower[rows[0]["rejected"][0]["content"]] == rows[0]["score_rejected"]


def test_ultrafeedback_shared_top_with_a_lower_one_picks_first_top():
    rows = accepted(read("ultrafeedback", UF, options={"score": "overall_score"}))
    assert rows[1]["chosen"] == [msg("assistant", "Paris.")] and rows[1]["score_chosen"] == 8.0
    assert rows[1]["rejected"] == [msg("assistant", "Lyon.")] and rows[1]["score_rejected"] == 5.0


@pytest.mark.parametrize("score", ["overall_score", "mean_rating"])
def test_ultrafeedback_all_tied_or_too_few_scored_quarantined(score):
    found = quarantined(read("ultrafeedback", UF, options={"score": score}))
    assert found[2][0] == Reason.TIE and f"all 2 scored completions tie at {score}" in found[2][1]
    assert found[4][0] == Reason.TOO_FEW_COMPLETIONS  # others missing, null, NaN or all "N/A"
    assert "ultrafeedback.jsonl:5: 1 of 4 completions have a score" in found[4][1]


def test_ultrafeedback_mean_rating_leaves_out_na_ratings():
    result = read("ultrafeedback", UF, options={"score": "mean_rating", "rejected": "lowest"})
    row = accepted(result)[3]
    assert row["score_chosen"] == pytest.approx((5 + 4 + 5) / 3)  # "N/A" honesty left out
    assert row["score_rejected"] == pytest.approx((2 + 3 + 2) / 3)  # m2 (all "N/A") is unscored
    assert row["rejected"] == [msg("assistant", "Yes.")]
    assert accepted(result)[0]["rejected"] == [msg("assistant", "Primes are boring.")]  # lowest mean, 1.5


def test_ultrafeedback_mean_rating_non_numeric_rating_is_wrong_type():
    found = quarantined(read("ultrafeedback", UF, options={"score": "mean_rating"}))
    assert found[5] == (
        Reason.WRONG_TYPE,
        "ultrafeedback.jsonl:6: completions[0].annotations.helpfulness.Rating: "
        "expected a number or 'N/A', found 'five'",
    )


def test_ultrafeedback_random_rejected_is_seeded_per_row_not_per_read():
    full = read("ultrafeedback", UF)
    assert read("ultrafeedback", UF, limit=1).accepted.equals(full.accepted.slice(0, 1))  # same pick in a shorter read
    picks = {
        accepted(check(read_source(SourceConfig(name="s", format="ultrafeedback", path=str(UF)), seed=s)))[0][
            "rejected"
        ][0]["content"]
        for s in range(12)
    }
    assert len(picks) > 1 and picks <= {"7 is prime.", "9 is prime.", "Primes are boring."}


def test_ultrafeedback_random_without_rng_is_a_programming_error():
    record = jsonl(UF)[0]
    with pytest.raises(ValueError, match="needs the per-row rng"):
        ADAPTERS["ultrafeedback"](record, UltraFeedbackOptions(), None)
    assert ADAPTERS["ultrafeedback"](record, UltraFeedbackOptions(), random.Random(0))["score_chosen"] == 4.75


def test_ultrafeedback_default_score_is_mean_rating_not_buggy_overall_score():
    """Upstream's overall_score bug: a critique score of 1 became 10, so a poor completion tops the row."""

    def completion(response: str, rating: str, overall: float) -> dict:
        aspects = ("helpfulness", "honesty", "instruction_following", "truthfulness")
        return {
            "response": response,
            "annotations": {a: {"Rating": rating} for a in aspects},
            "overall_score": overall,
        }

    record = {
        "instruction": "Name a prime number.",
        "completions": [completion("Primes are boring.", "1", 10.0), completion("2 is prime.", "5", 8.0)],
    }
    row = ADAPTERS["ultrafeedback"](record, None, random.Random(0))
    assert row["chosen"] == [msg("assistant", "2 is prime.")] and row["score_chosen"] == 5.0
    assert row["rejected"] == [msg("assistant", "Primes are boring.")] and row["score_rejected"] == 1.0
    buggy = ADAPTERS["ultrafeedback"](record, {"score": "overall_score"}, random.Random(0))
    assert buggy["chosen"] == [msg("assistant", "Primes are boring.")]


# ---------------------------------------------------------------- ultrafeedback_binarized


def test_binarized_real_tie_row_quarantined_by_default():
    result = read("ultrafeedback_binarized", UFB_REAL)
    assert quarantined(result)[0][0] == Reason.TIE
    assert "score_chosen == score_rejected == 8.5" in quarantined(result)[0][1]


def test_binarized_real_tie_row_kept_with_keep_ties():
    raw = jsonl(UFB_REAL)[0]
    row = accepted(read("ultrafeedback_binarized", UFB_REAL, options={"keep_ties": True}))[0]
    assert row["prompt"] == [msg("user", raw["prompt"])]
    assert row["chosen"] == [msg("assistant", raw["chosen"][1]["content"])]
    assert row["rejected"] == [msg("assistant", raw["rejected"][1]["content"])]
    assert (row["score_chosen"], row["score_rejected"]) == (8.5, 8.5)


def test_binarized_fixture_prompt_is_common_prefix_bad_rows_quarantined():
    result = read("ultrafeedback_binarized", FIXTURES / "ultrafeedback_binarized.jsonl")
    row = accepted(result)[0]
    assert row["prompt"] == [msg("user", "2+2?"), msg("assistant", "4"), msg("user", "And 3+3?")]
    assert (row["chosen"], row["rejected"]) == ([msg("assistant", "6")], [msg("assistant", "7")])
    found = quarantined(result)
    assert found[1][0] == Reason.PREFIX_SIDES and "rejected (1 messages) is a prefix of chosen" in found[1][1]
    assert found[2][0] == Reason.DIVERGENT_PROMPT and "sides part at message 0" in found[2][1]
    assert found[3] == (
        Reason.BAD_ROLE,
        "ultrafeedback_binarized.jsonl:4: chosen[1].role: 'tool' is not one of system, user, assistant",
    )


# ---------------------------------------------------------------- generic


def test_generic_real_sharegpt_rows_map_roles_and_keep_text():
    raws = jsonl(SHAREGPT_REAL)
    result = read("generic", SHAREGPT_REAL)
    assert result.accepted.num_rows == 100
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    for i, row in accepted(result).items():
        assert row["prompt"] == [msg(roles[m["from"]], m["value"]) for m in raws[i]["conversations"]]
        assert row["chosen"] == [msg("assistant", raws[i]["chosen"]["value"])]
        assert row["rejected"] == [msg("assistant", raws[i]["rejected"]["value"])]


def test_generic_fixture_each_row_shape_detected():
    rows = accepted(read("generic", FIXTURES / "generic.jsonl"))
    assert (rows[0]["prompt"], rows[0]["chosen"], rows[0]["score_chosen"]) == (
        [msg("user", "2+2?")],
        [msg("assistant", "4")],
        1.0,
    )  # TRL strings + scores
    assert rows[1]["prompt"] == [msg("system", "Be brief."), msg("user", "2+2?")]  # prompt prefix removed
    assert rows[1]["chosen"] == [msg("assistant", "4")]
    assert (rows[2]["prompt"], rows[2]["rejected"]) == ([msg("user", "2+2?")], [msg("assistant", "22")])  # implicit
    assert rows[3]["prompt"] == [msg("user", "Hello")]  # OpenAI
    assert rows[3]["rejected"] == [msg("assistant", "What.")]
    assert rows[4]["chosen"] == [msg("assistant", ":q! then Enter.")]  # stack-exchange: response_j preferred
    assert rows[5]["prompt"] == [msg("system", "You are terse."), msg("user", "2+2?")]  # ShareGPT + system


def test_generic_fixture_bad_rows_quarantined_naming_the_problem():
    found = quarantined(read("generic", FIXTURES / "generic.jsonl"))
    assert sorted(found) == [6, 7, 8, 9]
    assert found[6] == (
        Reason.BAD_ROLE,
        "generic.jsonl:7: conversations[1].from: 'observation' is not one of human, user, gpt, assistant, system",
    )
    assert found[7][0] == Reason.BAD_TURN_ORDER and "prompt: must end with a user turn" in found[7][1]
    assert found[8][0] == Reason.MISSING_FIELD
    for keys in (
        "conversations/chosen/rejected",
        "input/preferred_output/non_preferred_output",
        "question/response_j/response_k",
        "prompt/chosen/rejected",
        "found keys: ['bad', 'good'",
    ):
        assert keys in found[8][1]
    assert found[9] == (
        Reason.WRONG_TYPE,
        "generic.jsonl:10: chosen: expected string or array of messages, found object",
    )


def rm_static_shape(raw: dict) -> dict:
    """A real hh-rlhf row in the shape of public RM datasets: prompt up to the cue, answers continue it."""
    cut = raw["chosen"].rfind(A) + len(A) - 1  # keep "\n\nAssistant:", the space starts the answers
    return {"prompt": raw["chosen"][:cut], "chosen": raw["chosen"][cut:], "rejected": raw["rejected"][cut:]}


def test_generic_hh_transcript_prompt_real_rows_parse_as_hh_rlhf_does(tmp_path):
    raws = jsonl(HH_REAL)
    path = write_jsonl(tmp_path / "rm.jsonl", [rm_static_shape(r) for r in raws])
    assert all(raws[i]["chosen"] == r["prompt"] + r["chosen"] for i, r in enumerate(jsonl(path)))
    generic, hh = read("generic", path), read("hh-rlhf", HH_REAL)
    assert generic.accepted.num_rows == hh.accepted.num_rows > 250
    assert generic.accepted.select(["prompt", "chosen", "rejected"]).equals(
        hh.accepted.select(["prompt", "chosen", "rejected"])
    )
    assert [r[0] for r in quarantined(generic).values()] == [r[0] for r in quarantined(hh).values()]
    assert not any(
        H.strip() in m["content"] for row in generic.accepted["prompt"].to_pylist() for m in row if m["role"] == "user"
    )


def test_generic_hh_transcript_prompt_unparseable_quarantined_with_reason(tmp_path):
    rows = [
        {"prompt": "Human: Hi?\n\nAssistant:", "chosen": " Hello.", "rejected": " Go away."},  # no blank line
        {"prompt": f"{H}Hi?", "chosen": "Hello.", "rejected": "Go away."},  # answers have no cue to continue
        {"prompt": f"{H}Hi?{A}Hello.{A[:-1]}", "chosen": " More.", "rejected": " Less."},  # two assistant turns
        {"prompt": f"{H}Hi?{A[:-1]}", "chosen": f" Hello.{H}Thanks.", "rejected": " Go away."},  # answer goes on
        {"prompt": f"{H}Hi?{A}", "chosen": [msg("assistant", "Hello.")], "rejected": [msg("assistant", "No.")]},
    ]
    result = read("generic", write_jsonl(tmp_path / "rm.jsonl", rows))
    found = quarantined(result)
    assert found[0][0] == Reason.MISSING_MARKER and "hh transcript: chosen: no '\\n\\nHuman: ' marker" in found[0][1]
    assert found[1][0] == Reason.BAD_TURN_ORDER and "must end with the '\\n\\nAssistant:' cue" in found[1][1]
    assert found[2][0] == Reason.BAD_TURN_ORDER and "prompt: must end with a user turn" in found[2][1]
    assert found[3][0] == Reason.DIVERGENT_PROMPT and "read as one hh transcript" in found[3][1]
    assert accepted(result)[4]["prompt"] == [msg("user", "Hi?")]
    assert accepted(result)[4]["chosen"] == [msg("assistant", "Hello.")]


# ---------------------------------------------------------------- readers, files, hub


@pytest.fixture
def orca_rows() -> list[dict]:
    return jsonl(ORCA_REAL)[:12]


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".json-array", ".json-lines", ".parquet"])
def test_read_source_every_file_format_gives_the_same_rows(tmp_path, orca_rows, suffix):
    reference = read("orca_dpo_pairs", write_jsonl(tmp_path / "ref.jsonl", orca_rows))
    if suffix == ".jsonl.gz":
        path = tmp_path / "rows.jsonl.gz"
        path.write_bytes(gzip.compress((tmp_path / "ref.jsonl").read_bytes()))
    elif suffix == ".json-array":
        path = tmp_path / "rows.json"
        path.write_text(json.dumps(orca_rows, indent=2, ensure_ascii=False), encoding="utf-8")
    elif suffix == ".json-lines":
        path = write_jsonl(tmp_path / "rows.json", orca_rows)
    else:
        path = tmp_path / "rows.parquet"
        pq.write_table(pa.Table.from_pylist(orca_rows), path)
    result = read("orca_dpo_pairs", path)
    assert result.accepted.select(["id", "source_row"]).equals(reference.accepted.select(["id", "source_row"]))
    assert result.input["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_source_single_pretty_printed_json_object_is_one_row(tmp_path, orca_rows):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(orca_rows[1], indent=2), encoding="utf-8")
    assert read("orca_dpo_pairs", path).accepted.num_rows == 1


def test_read_source_json_array_non_object_element_is_wrong_type(tmp_path, orca_rows):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([orca_rows[0], [1, 2], orca_rows[1]]), encoding="utf-8")
    result = read("orca_dpo_pairs", path)
    assert quarantined(result) == {1: (Reason.WRONG_TYPE, "rows.json[1]: expected a JSON object, found array")}
    assert result.quarantine["raw"].to_pylist() == ["[1, 2]"]


def test_read_records_broken_json_array_raises_naming_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"a": 1},\n {"a": ', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.json: invalid JSON array at line 2"):
        list(read_records(path))


def test_read_records_unsupported_suffix_raises_listing_suffixes(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported file type; expected one of .jsonl, .jsonl.gz, .json, .parquet"):
        list(read_records(path))


def test_read_records_blank_lines_keep_line_index_and_bom_is_dropped(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n   \n{"a": 2}\r\n')
    rows = list(read_records(path))
    assert [(i, rec, err) for i, rec, _, err in rows] == [(0, {"a": 1}, None), (3, {"a": 2}, None)]


def test_read_source_missing_file_names_source_and_path(tmp_path):
    cfg = SourceConfig(name="demo/missing", format="hh-rlhf", path="nowhere/rows.jsonl")
    with pytest.raises(FileNotFoundError, match=r"source 'demo/missing': file not found: 'nowhere/rows.jsonl'"):
        read_source(cfg, base_dir=tmp_path)


def test_read_source_relative_path_tries_cwd_then_base_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = SourceConfig(name="rel", format="generic", path="sources/generic.jsonl")
    from_base = check(read_source(cfg, base_dir=FIXTURES.parent))
    assert from_base.rows_read == 10 and from_base.input["path"] == str(FIXTURES / "generic.jsonl")
    (tmp_path / "sources").mkdir()
    write_jsonl(tmp_path / "sources" / "generic.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert check(read_source(cfg, base_dir=FIXTURES.parent)).rows_read == 1  # the working directory wins


def test_read_source_input_records_name_format_path_digest_rows():
    result = read("orca_dpo_pairs", ORCA_REAL, limit=5)
    assert result.input == {
        "name": "test/orca_dpo_pairs",
        "format": "orca_dpo_pairs",
        "table": "preference",
        "path": str(ORCA_REAL),
        "sha256": hashlib.sha256(ORCA_REAL.read_bytes()).hexdigest(),
        "rows": 5,
    }


def test_read_source_hub_calls_load_dataset_with_recipe_arguments(monkeypatch, orca_rows):
    import datasets

    calls, made = [], []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        made.append(datasets.Dataset.from_list(orca_rows))
        return made[-1]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = {"path": "Intel/orca_dpo_pairs", "split": "train", "revision": "0123abc", "data_files": "train.jsonl"}
    result = check(read_source(SourceConfig(name="hub/orca", format="orca_dpo_pairs", hub=hub)))
    assert calls == [
        (
            "Intel/orca_dpo_pairs",
            {"name": None, "data_dir": None, "data_files": "train.jsonl", "split": "train", "revision": "0123abc"},
        )
    ]
    assert result.input["hub"]["revision"] == "0123abc" and result.input["sha256"] == made[0]._fingerprint
    assert "path" not in result.input and result.rows_read == 12
    local = read("orca_dpo_pairs", ORCA_REAL, limit=12)
    assert result.accepted["id"].equals(local.accepted["id"])


def test_read_source_hub_bad_row_raw_is_serialised_record(monkeypatch):
    import datasets

    rows = [{"system": "", "question": None, "chosen": "A", "rejected": "B"}]
    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kw: datasets.Dataset.from_list(rows))
    result = check(read_source(SourceConfig(name="hub/x", format="orca_dpo_pairs", hub={"path": "x/y"})))
    assert quarantined(result)[0] == (Reason.WRONG_TYPE, "x/y row 0: question: expected string, found null")
    assert json.loads(result.quarantine["raw"][0].as_py()) == rows[0]


# ---------------------------------------------------------------- limit, weight, determinism


def test_read_source_limit_counts_bad_rows_but_not_blank_lines():
    result = read("hh-rlhf", FIXTURES / "hh_bad_rows.jsonl", limit=5)
    assert result.rows_read == 5
    assert sorted(accepted(result)) + sorted(quarantined(result)) == [0, 1, 3, 4, 5]


def test_read_source_weight_keeps_seeded_fraction_rest_downsampled():
    result = read("hh-rlhf", HH_REAL, weight=0.5)
    assert 110 < result.accepted.num_rows < 190
    assert set(result.quarantine["reason"].to_pylist()) == {Reason.DOWNSAMPLED}
    assert "not drawn at weight 0.5 (seed 42" in result.quarantine["detail"][0].as_py()
    other_seed = check(
        read_source(SourceConfig(name="test/hh-rlhf", format="hh-rlhf", path=str(HH_REAL), weight=0.5), seed=7)
    )
    assert set(other_seed.accepted["id"].to_pylist()) != set(result.accepted["id"].to_pylist())


def test_read_source_weight_draw_follows_row_content_not_position(tmp_path):
    reversed_path = tmp_path / "reversed.jsonl"
    reversed_path.write_text(
        "".join(reversed(HH_REAL.read_text(encoding="utf-8").splitlines(keepends=True))), encoding="utf-8"
    )
    kept = set(read("hh-rlhf", HH_REAL, weight=0.3).accepted["id"].to_pylist())
    assert kept == set(read("hh-rlhf", reversed_path, weight=0.3).accepted["id"].to_pylist())


@pytest.mark.parametrize(
    "fmt, path, options",
    [
        ("hh-rlhf", HH_REAL, {}),
        ("ultrafeedback", UF, {"rejected": "random"}),
        ("generic", FIXTURES / "generic.jsonl", {}),
    ],
)
def test_read_source_same_input_and_seed_gives_identical_tables(fmt, path, options):
    first = read(fmt, path, weight=0.7, options=options)
    second = read(fmt, path, weight=0.7, options=options)
    assert first.accepted.equals(second.accepted) and first.quarantine.equals(second.quarantine)


def test_source_config_rejects_options_of_another_format():
    with pytest.raises(ValidationError, match="keep_ties"):
        SourceConfig(name="x", format="ultrafeedback", path="x.jsonl", options={"keep_ties": True})


def test_tiny_recipe_sources_all_read(monkeypatch):
    from schemas.recipe import load_recipe

    monkeypatch.chdir(ROOT)
    for cfg in load_recipe(ROOT / "recipes" / "tiny.yaml").sources:
        if get_adapter(cfg.format).table != "preference":  # sft / unpaired: tests/test_sft_unpaired.py
            continue
        result = check(read_source(cfg))
        assert result.accepted.num_rows > 0, cfg.name


def test_read_source_spool_dir_is_shared_memory_only_with_room_to_spare():
    import tasks.data.sources.core as core

    assert core._spool_dir(1 << 60) is None  # far more than any /dev/shm holds: the temporary directory
    assert core._spool_dir(1) in ("/dev/shm", None)


def test_read_source_large_file_parallel_parts_equal_serial_read(tmp_path, monkeypatch, shared_data):
    import sys

    import tasks.data.sources.core as core
    from tasks.data import preload

    lines = (shared_data / "hh-rlhf" / "harmless-base-test.head300.jsonl").read_text(encoding="utf-8").splitlines()
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(lines[:120] + ["{not json", ""] + lines[120:]) + "\n", encoding="utf-8")
    cfg = SourceConfig(name="hh", format="hh-rlhf", path=str(path))
    serial = read_source(cfg)
    monkeypatch.setattr(core, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(core.os, "cpu_count", lambda: 3)
    (tmp_path / "spool").mkdir()
    monkeypatch.setattr(core, "_spool_dir", lambda size: str(tmp_path / "spool"))
    assert len(core._parallel_ranges(cfg, path)) == 3
    calls = []
    (tmp_path / "align_slow_hook_import.py").write_text("import time\ntime.sleep(0.5)\nVALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def hook():
        calls.append("parsing")
        preload.import_in_background("align_slow_hook_import")

    parallel = read_source(cfg, while_parsing=hook)
    assert calls == ["parsing"]  # called once, in this process, while the workers parse
    # its background import finished before read_source went on to import anything itself
    assert sys.modules["align_slow_hook_import"].VALUE == 1 and not preload._threads
    assert not list((tmp_path / "spool").iterdir()), "the workers' batch files are removed once mapped"
    assert parallel.accepted.equals(serial.accepted) and parallel.quarantine.equals(serial.quarantine)
    assert parallel.rows_read == serial.rows_read == 301
    assert parallel.input == serial.input
    assert serial.quarantine.filter(pc.equal(serial.quarantine["reason"], "invalid_json"))[
        "source_row"
    ].to_pylist() == [120]
