"""Command line for the local services: `python -m scripts up|demo|status|down|deploy` (what `make` runs).

It sits apart from `services.py` (the servers and workers) and `demo.py` (the demo run and its summary) so
that both import one way: demo -> services, and this entry point -> both.
"""

from __future__ import annotations

import argparse
import os
import sys

from scripts.cli import run_command
from scripts.services import Services


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["up", "demo", "down", "status", "deploy"])
    parser.add_argument("--recipe", default=os.environ.get("RECIPE", "recipes/tiny.yaml"))
    args = parser.parse_args(argv)
    svc = Services()
    os.environ.update(svc.env())  # before any prefect import: never ~/.prefect, always our server
    run_command(lambda: _check_demo_recipe(args), lambda: _run_service_command(svc, args), prefect=False)


def _check_demo_recipe(args) -> None:
    """The demo's recipe and sources, before any service starts: a bad key or a missing file fails in a second."""
    if args.command == "demo":
        from schemas.recipe import load_recipe
        from tasks.data.sources.core import check_sources

        check_sources(load_recipe(args.recipe).sources)


def _run_service_command(svc: Services, args) -> None:
    if args.command == "up":
        svc.up()
    elif args.command == "deploy":
        svc.deploy(force=True)
    elif args.command == "down":
        svc.down()
    elif args.command == "status":
        for name, pid in svc.status().items():
            print(f"{name:16s} {'running, pid ' + str(pid) if pid else 'stopped'}")
    else:
        from scripts.demo import run_demo

        svc.up()
        with svc.api():
            sys.exit(run_demo(svc, args.recipe))


if __name__ == "__main__":
    main()
