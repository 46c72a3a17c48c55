"""Compare two run summaries value by value, leaving out what measures time or names a place.

Issue 23's check that a refactor changed no number: run the same experiment with the code before
and after, then

    python benchmarks/summary_diff.py BEFORE/summary.json AFTER/summary.json --output OUT

Equal means every value present in both summaries is equal, except wall times, throughputs,
latencies, folders and the machine/versions records (``IGNORED``, ``PLACES``). Fields only one side has
(a newer schema's additions) are listed apart, not counted as differences. Prints one line per
difference, a verdict line and JSON; exits 1 when some value differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# A key whose name contains one of these words measures time, not a result; a key in PLACES names
# a folder, the machine or how the run was executed.
IGNORED = ("seconds", "time", "latency", "gflops")
PLACES = ("dir", "tuned_bank", "pruned_bank", "machine", "versions", "execution", "experiment", "sessions")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1]}}`` -> ``{"a.b[0]": 1}``, leaving out ignored keys."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key not in PLACES and not any(word in str(key) for word in IGNORED):
                out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    a, b = flatten(before), flatten(after)
    shared = sorted(a.keys() & b.keys())
    return {"compared": len(shared),
            "different": {k: [a[k], b[k]] for k in shared if a[k] != b[k]},
            "only_before": sorted(a.keys() - b.keys()),
            "only_after": sorted(b.keys() - a.keys())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path, help="summary.json of the run with the older code")
    ap.add_argument("after", type=Path, help="summary.json of the run with the newer code")
    ap.add_argument("--output", type=Path, help="write OUTPUT.json (the result) beside the printout")
    args = ap.parse_args()
    result = compare(json.loads(args.before.read_text()), json.loads(args.after.read_text()))
    for key, (old, new) in result["different"].items():
        print(f"{key}: {old!r} -> {new!r}")
    print(f"{result['compared']} values compared, {len(result['different'])} differ; "
          f"{len(result['only_before'])} only before, {len(result['only_after'])} only after")
    print(json.dumps(result))
    if args.output:
        args.output.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return 1 if result["different"] else 0


if __name__ == "__main__":
    sys.exit(main())
