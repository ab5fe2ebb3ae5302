"""The cache-engine benchmarks of issue 4, written as JSON under data/bench/ (the report's numbers).

    python benchmarks/cache_bench.py [--quick]

1. `lazymar bench --model digits --schedule lazymar --json` (digits checkpoint, its defaults);
2. `lazymar bench --compute-bound --schedule lazymar --json` (mar_base-sized random weights, batch 8, 16 steps);
3. `lazymar flops --json`: MAR-B/L/H 64-step FLOPs of "none", "lazymar-released", "lazymar" and the floor.
--quick runs fewer samples and one repetition (a smoke run, not for the report).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    from lazymar.cli import main as lazymar
except ModuleNotFoundError:  # not installed: run from the checkout
    sys.path.insert(0, str(ROOT))
    from lazymar.cli import main as lazymar

OUT = ROOT / "data" / "bench"


def run(name: str, argv: list[str]) -> dict:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = lazymar(argv)
    if code:
        raise SystemExit(f"lazymar {' '.join(argv)} failed with exit code {code}")
    result = json.loads(buffer.getvalue())
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({"command": "lazymar " + " ".join(argv), "result": result}, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("digits", "compute-bound", "flops"), default=None)
    args = parser.parse_args()
    quick = ["--num-samples", "40", "--repeats", "1"] if args.quick else []
    cases = {
        "flops": ["flops", "--json"],
        "digits": ["bench", "--model", "digits", "--schedule", "lazymar", "--num-samples", "300", "--repeats", "2",
                   "--json", *quick],
        "compute-bound": ["bench", "--compute-bound", "--schedule", "lazymar", "--repeats", "2", "--json",
                          *(["--repeats", "1", "--num-iter", "4"] if args.quick else [])],
    }
    for name, argv in cases.items():
        if args.only in (None, name):
            run(name if not args.quick else f"{name}_quick", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
