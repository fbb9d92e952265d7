"""`python -m distillad.benchmark.speed_child`: the isolated speed measurement process (see `speed.speed_report`).

Its own module, which the package does not import, so that `python -m` runs it once: running a module the
package's __init__ already imported executes it a second time as __main__ (and runpy warns about it).
One JSON request in (the arguments of speed_report), one JSON result file out; a user error is written as
{"error", "kind"} for the caller to raise again, anything else fails the process with its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distillad.benchmark.measure import peak_rss_mb


def main(argv: list[str] | None = None) -> int:
    """Measure the request in this fresh process and write the result (or the user error) to --result."""
    parser = argparse.ArgumentParser(prog="python -m distillad.benchmark.speed_child")
    parser.add_argument("--request", required=True, help="JSON object, the arguments of speed_report")
    parser.add_argument("--result", required=True, type=Path)
    args = parser.parse_args(argv)
    from distillad.benchmark.speed import CHILD_ERRORS, measure_here
    from distillad.errors import DistilladError
    from distillad.io import atomic_write_json

    runtime_rss, _ = peak_rss_mb()      # Python + torch + distillad, before any model exists
    request = json.loads(args.request)
    try:
        result = measure_here(request)
    except (DistilladError, ValueError, FileNotFoundError) as error:
        kind = type(error).__name__
        if kind not in CHILD_ERRORS and isinstance(error, ValueError):
            kind = "ValueError"
        atomic_write_json(args.result, {"error": str(error), "kind": kind})
        return 2
    result["runtime_rss_mb"] = runtime_rss
    atomic_write_json(args.result, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

