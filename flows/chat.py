"""Chat with a registered policy from the terminal (a quick look by a person; not a Prefect flow).

    python -m flows.chat --model models:/tiny-dpo@champion [--max-new-tokens 128] [--temperature 0.7]
        [--top-p 0.95] [--seed 0] [--system "You are concise."]

One line per user turn; the conversation is kept until /reset; /exit or end of input leaves. The model's
own chat template renders it and generation stops at its end-of-turn token (the version's pyfunc,
tasks/serving/pyfunc.py). Piped stdin works: `printf 'Hi\\nAnd then?\\n' | python -m flows.chat --model ...`.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None, stdin=None, stdout=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m flows.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="e.g. models:/tiny-dpo@champion or models:/tiny-dpo/2")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system", default=None, help="a system message to start every conversation with")
    args = parser.parse_args(argv)

    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks.registry import tracking
    from tasks.serving.chat import chat_loop, load_chat_model

    mlflow.set_tracking_uri(tracking.tracking_uri(None))
    try:
        model = load_chat_model(args.model)
    except (ValueError, MlflowException) as e:
        raise SystemExit(f"error: {e}") from None
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    return chat_loop(model, {**params, "seed": args.seed}, args.system, stdin, stdout)


if __name__ == "__main__":
    main()
