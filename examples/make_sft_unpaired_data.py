"""Write the demo SFT conversations and unpaired feedback that `recipes/tiny.yaml` reads (`format: sft` and
`format: unpaired`), one row shape per line group, so the demo exercises every shape each adapter detects.

Written by us, seeded, deterministic: `python examples/make_sft_unpaired_data.py` reproduces the committed files
byte for byte. The facts are the preference demo's (`make_demo_data.qa_pairs`, same seed), so many prompts are
shared with the pairs: the one split across tables keeps each in one split everywhere. A few deliberately bad
rows show the quarantine at work: a conversation ending on a user turn, an alpaca row with an empty output, an
exact duplicate; a missing label, a label that is not a boolean, an empty completion.
"""

from __future__ import annotations

import random

from make_demo_data import EVASIVE, qa_pairs, write_jsonl


def sft_rows(pairs: list[tuple[str, str, str]]) -> list[dict]:
    rows = []
    for i, (q, good, _) in enumerate(pairs):
        shape = i % 4
        if shape == 0:  # TRL conversational / ultrachat_200k
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": good}]})
        elif shape == 1:  # ShareGPT
            rows.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": good}]})
        elif shape == 2:  # TRL prompt-completion
            rows.append({"prompt": q, "completion": good})
        else:  # alpaca
            rows.append({"instruction": q, "input": "", "output": good})
    q0, good0, _ = pairs[0]
    q1, good1, _ = pairs[1]
    rows += [
        {  # a multi-turn ShareGPT conversation with a system prompt
            "system": "You are a helpful assistant. Answer briefly and correctly.",
            "conversations": [
                {"from": "human", "value": q0},
                {"from": "gpt", "value": good0},
                {"from": "human", "value": q1},
                {"from": "gpt", "value": good1},
            ],
        },
        {"instruction": "Answer the question.", "input": q1, "output": good1},  # alpaca with an input
        {"conversations": [{"from": "human", "value": q0}]},  # ends on the user's turn -> bad_turn_order
        {"instruction": q1, "input": "", "output": ""},  # empty output -> empty_turn (cleaning)
        dict(rows[2]),  # an exact duplicate -> duplicate (cleaning)
    ]
    return rows


def unpaired_rows(pairs: list[tuple[str, str, str]], rng: random.Random) -> list[dict]:
    rows = []
    for i, (q, good, bad) in enumerate(pairs):
        label = i % 2 == 0
        answer = good if label else bad
        if i % 3 == 0:  # messages + label: the last assistant turn is the completion
            turns = [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
            rows.append({"messages": turns, "label": label})
        else:  # TRL unpaired
            rows.append({"prompt": q, "completion": answer, "label": label})
    q, good, _ = pairs[0]
    rows += [
        {"prompt": q, "completion": rng.choice(EVASIVE)},  # no label -> missing_field
        {"prompt": q, "completion": good, "label": "yes"},  # not a boolean -> wrong_type
        {"prompt": q, "completion": "", "label": False},  # empty completion -> empty_turn (cleaning)
    ]
    return rows


def main() -> None:
    pairs = qa_pairs(random.Random(1234))  # the preference demo's facts, in its order
    rng = random.Random(5678)
    sft_pick = rng.sample(pairs, 60)
    unpaired_pick = rng.sample(pairs, 60)
    write_jsonl("sft.jsonl", sft_rows(sft_pick))
    write_jsonl("unpaired.jsonl", unpaired_rows(unpaired_pick, rng))


if __name__ == "__main__":
    main()
