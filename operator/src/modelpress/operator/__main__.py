"""`modelpress-operator` (or `python -m modelpress.operator`): run the operator.

Serves the namespaces given by `--namespace` or `MODELPRESS_WATCH_NAMESPACES` (comma-separated),
or every namespace with `--all-namespaces`. Liveness is served at `--liveness` for the probe.
"""

import argparse
import logging
import sys

import kopf

from modelpress.operator.config import OperatorConfig
from modelpress.operator.handlers import register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelpress-operator", description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", "-n", action="append", default=[], help="serve this namespace (repeatable)")
    parser.add_argument("--all-namespaces", "-A", action="store_true", help="serve every namespace (needs a ClusterRole)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL")
    parser.add_argument("--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        config = OperatorConfig.from_env()
    except ValueError as err:
        sys.exit(f"modelpress-operator: {err}")
    namespaces = tuple(args.namespace) or config.namespaces
    if bool(namespaces) == args.all_namespaces:
        sys.exit("modelpress-operator: give --namespace/MODELPRESS_WATCH_NAMESPACES or --all-namespaces (exactly one)")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kopf.run(
        registry=register(kopf.OperatorRegistry(), config),
        memo=kopf.Memo(config=config),
        standalone=True,
        clusterwide=args.all_namespaces,
        namespaces=namespaces,
        liveness_endpoint=args.liveness,
    )


if __name__ == "__main__":
    main()
