"""Command line.

    rannc show DEPLOYMENT_FILE [--batch-size N] [--png OUT.png] [--trace rannc_event_trace.json.rank0 ...]
        print a saved deployment's report (RaNNC's show_deployment) and optionally draw it, with the measured
        timeline of trace_events files beside the simulated one
    rannc plan MODULE:FUNCTION --np N [--device h100] [--batch-size B] [--png OUT.png] [--save FILE]
        dry-run plan for N devices of a datasheet type; FUNCTION() returns (model, example_inputs), best built
        on the meta device so that any size plans on a laptop
"""

from __future__ import annotations

import argparse
import importlib

from rannc.config import load_config
from rannc.plan.deployment import show_deployment


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rannc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print (and draw) a saved deployment")
    show.add_argument("path")
    show.add_argument("--batch-size", type=int, default=None)
    show.add_argument("--png", default=None, help="draw the deployment into this PNG file")
    show.add_argument("--trace", nargs="*", default=None, help="trace_events files of a run of this deployment")
    plan = sub.add_parser("plan", help="dry-run plan of a model for N devices")
    plan.add_argument("factory", help="MODULE:FUNCTION returning (model, example_inputs)")
    plan.add_argument("--np", type=int, required=True)
    plan.add_argument("--device", default="h100")
    plan.add_argument("--batch-size", type=int, default=None, help="global batch (default: the example's rows)")
    plan.add_argument("--png", default=None)
    plan.add_argument("--save", default=None, help="save the deployment to this file")
    args = parser.parse_args(argv)
    if args.command == "show":
        deployment = show_deployment(args.path, args.batch_size)
        if args.png:
            _draw(deployment, args.png, args.trace)
    else:
        _plan(args)


def _draw(deployment, png: str, trace) -> None:
    from rannc.plan.picture import draw
    print(f"drew {draw(deployment, png, trace)}")


def _plan(args) -> None:
    from rannc.deploy import plan_dry_run
    from rannc.profile.estimate import DEVICES

    module_name, _, function = args.factory.partition(":")
    if not function:
        raise SystemExit(f"rannc plan: write the factory as MODULE:FUNCTION (got {args.factory!r})")
    if args.device not in DEVICES:
        raise SystemExit(f"rannc plan: unknown device {args.device!r}; choose one of {', '.join(sorted(DEVICES))}")
    model, inputs = getattr(importlib.import_module(module_name), function)()
    batch = args.batch_size or next(t.shape[0] for t in inputs if getattr(t, "dim", lambda: 0)() > 0)
    deployment = plan_dry_run(model, tuple(inputs), args.np, batch, DEVICES[args.device], load_config())
    print(deployment.table())
    print(f"planned in {deployment.planning_s:.2f} s")
    if args.save:
        deployment.save(args.save)
    if args.png:
        _draw(deployment, args.png, None)


if __name__ == "__main__":
    main()
