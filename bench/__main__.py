"""`make bench`: run every benchmark and print its Markdown table.

Each benchmark's module is imported only when it runs: the operator ones need the Kubernetes
client, the workers ones torch, and the GPU machine (bench/gpu.sh) has torch but not the rest.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {  # name -> module under bench/ with a main() -> Markdown
    "devcluster": "devcluster",
    "inference": "inference_deployments",
    "planner": "planner_pareto",
    "workers": "workers_cpu",
    "kv": "kv_transfer",
    "prefix": "prefix_cache",
    "decode-prefix": "decode_prefix",
    "prefill-batch": "prefill_batch",
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], help="default: all")
    args = parser.parse_args()
    for name in args.names or BENCHMARKS:
        module = importlib.import_module(f"bench.{BENCHMARKS[name]}")
        print(module.main())


main()
