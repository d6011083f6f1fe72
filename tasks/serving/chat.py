"""A small chat REPL over a registered policy (its pyfunc: the model's own template, stops at end-of-turn).

One line is one user turn; the conversation grows turn by turn until ``/reset`` (start again) or ``/exit``
(or end of input). Testable by piping stdin: lines that were not typed at a terminal are echoed, so the
output reads as a transcript.
"""

from __future__ import annotations

import sys
from typing import TextIO

COMMANDS = {"/exit": "leave", "/quit": "leave", "/reset": "start a new conversation", "/help": "this list"}


def load_chat_model(model_uri: str):
    """The policy at ``model_uri`` (its pyfunc); refuses any other kind (e.g. a reward model)."""
    from tasks.serving.pyfunc import POLICY, load_registered

    model, kind = load_registered(model_uri)
    if kind != POLICY:
        raise ValueError(f"{model_uri}: a {kind} model, not a chat model; give a policy (-sft, -dpo, -rl)")
    return model


def start(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def chat_loop(
    model, params: dict, system: str | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None
) -> list[dict]:
    """Talk to ``model`` until /exit or end of input; returns the last conversation."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    typed = stdin.isatty()
    conversation = start(system)
    print(f"chat: one line per turn; {', '.join(COMMANDS)}", file=stdout, flush=True)
    while True:
        if typed:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if not typed:
            print(f"you> {text}", file=stdout)
        if text in ("/exit", "/quit"):
            break
        if text in ("/reset", "/help"):
            conversation = start(system) if text == "/reset" else conversation
            print("(new conversation)" if text == "/reset" else COMMANDS, file=stdout, flush=True)
            continue
        conversation.append({"role": "user", "content": text})
        answer = str(model.predict([{"messages": conversation}], params=params)[0])
        conversation.append({"role": "assistant", "content": answer})
        print(f"assistant> {answer}", file=stdout, flush=True)
    return conversation
