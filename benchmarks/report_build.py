"""Milliseconds to build one run's report (report.md and report.html) on this CPU, and the import's cost.

    python benchmarks/report_build.py runs/<run>             # 30 builds after the first
    python benchmarks/report_build.py runs/<run> --repeat 100

"import" is `import cifar10_cnn.report` (most of a `cifar10 report` command's time); "first" is the first
build (the HTML template is compiled then); "median" and "min" are over the builds after it. Each build
reads the run directory, renders both pages and writes them atomically (two fsyncs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    started = time.perf_counter()
    from cifar10_cnn.report import write_report

    imported = time.perf_counter()
    write_report(args.run)
    first = time.perf_counter()
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        write_report(args.run)
        times.append(time.perf_counter() - t0)
    print(
        f"import {1e3 * (imported - started):.0f} ms, first build {1e3 * (first - imported):.1f} ms, then "
        f"median {1e3 * statistics.median(times):.1f} ms, min {1e3 * min(times):.1f} ms over {args.repeat}"
    )


if __name__ == "__main__":
    main()
