"""Command line: `rannc show DEPLOYMENT_FILE [--batch-size N]` prints a saved deployment's report."""

from __future__ import annotations

import argparse

from rannc.plan.deployment import show_deployment


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rannc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print a saved deployment (RaNNC's show_deployment)")
    show.add_argument("path")
    show.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "show":
        show_deployment(args.path, args.batch_size)


if __name__ == "__main__":
    main()
