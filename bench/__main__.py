"""Run the benchmark suites and write their figures to one JSON file."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from bench import (
    attest,
    cluster,
    datapath,
    e2e,
    etcd,
    identity,
    lifecycle,
    memory,
    operations,
    reconcile,
    soak,
    wg,
)
from bench.figures import Figures

SUITES: dict[str, Callable[[], Figures]] = {
    "lifecycle": lifecycle.run,
    "identity": identity.run,
    "cluster": cluster.run,
    "etcd": etcd.run,
    "datapath": datapath.run,
    "wg": wg.run,
    "attest": attest.run,
    "reconcile": reconcile.run,
    "operations": operations.run,
    "e2e": e2e.run,
    "memory": memory.run,
    "soak": soak.run,
}


def main() -> None:
    """Run the selected suites (all by default) and write ``--output``."""
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--only", nargs="*", choices=sorted(SUITES), help="run only these suites")
    args = parser.parse_args()
    results: Figures = {}
    for name in args.only or SUITES:
        print(f"bench: {name} ...", flush=True)
        results.update(SUITES[name]())
    args.output.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    for key, fig in sorted(results.items()):
        print(f"{key:45} {fig['value']:>14} {fig['unit']}")


main()
