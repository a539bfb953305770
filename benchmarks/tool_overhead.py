"""Benchmark: overhead of one python-tool call, `print(1)` through the sandbox (target < 100 ms median).

Run: .venv/bin/python benchmarks/tool_overhead.py [--calls 30] [--sandbox auto] [--concurrency 1]
Prints one JSON line: the isolation layer used, median/p90/min milliseconds per call, and the
calls per second when `--concurrency` calls run at once through the registry.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from metis_cli.agent.parser import ParsedToolCall
from metis_cli.agent.tools import ToolRegistry
from metis_cli.agent.tools.python_sandbox import PythonTool

TARGET_MS = 100.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--sandbox", default="auto", choices=["auto", "bwrap", "unshare", "none"])
    parser.add_argument("--concurrency", type=int, default=1, help="calls in flight at once for the throughput figure")
    args = parser.parse_args()

    tool = PythonTool(sandbox=args.sandbox)
    asyncio.run(tool.call({"code": "print(1)"}))  # warm the page cache
    per_call_ms = []
    for _ in range(args.calls):
        started = time.perf_counter()
        result = asyncio.run(tool.call({"code": "print(1)"}))
        per_call_ms.append((time.perf_counter() - started) * 1000)
        assert result.text == "1", result.text

    registry = ToolRegistry([tool], timeout_s=30, max_calls_per_rollout=1, max_concurrency=args.concurrency)
    call = ParsedToolCall(name="python", arguments={"code": "print(1)"}, raw="", error=None)
    started = time.perf_counter()
    registry.execute_many([(call, 0)] * args.calls)
    calls_per_s = args.calls / (time.perf_counter() - started)

    median_ms = statistics.median(per_call_ms)
    print(json.dumps({
        "sandbox": tool.isolation.layer,
        "calls": args.calls,
        "median_ms": round(median_ms, 1),
        "p90_ms": round(statistics.quantiles(per_call_ms, n=10)[-1], 1),
        "min_ms": round(min(per_call_ms), 1),
        "concurrency": args.concurrency,
        "calls_per_s": round(calls_per_s, 1),
        "target_ms": TARGET_MS,
        "meets_target": median_ms < TARGET_MS,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
