"""`make bench`: run every benchmark and print its Markdown table."""

from __future__ import annotations

import argparse

from bench import devcluster, inference_deployments, planner_pareto


def workers_cpu() -> str:
    """Imported when run: it needs torch (the workers extra), the others do not."""
    from bench import workers_cpu

    return workers_cpu.main()


def kv_transfer() -> str:
    """Imported when run, like workers_cpu."""
    from bench import kv_transfer

    return kv_transfer.main()


def prefix_cache() -> str:
    """Imported when run, like workers_cpu."""
    from bench import prefix_cache

    return prefix_cache.main()


BENCHMARKS = {
    "devcluster": devcluster.main,
    "inference": inference_deployments.main,
    "planner": planner_pareto.main,
    "workers": workers_cpu,
    "kv": kv_transfer,
    "prefix": prefix_cache,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], help="default: all")
    args = parser.parse_args()
    for name in args.names or BENCHMARKS:
        print(BENCHMARKS[name]())


main()
