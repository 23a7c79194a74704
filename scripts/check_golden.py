#!/usr/bin/env python
"""Check our methods against golden cases of the official implementations.

    python scripts/check_golden.py tests/golden/cases [more files or folders]

Prints one line per failing case and `N passed, M failed`; exits 0 only when every case passes.
"""
from __future__ import annotations

import argparse
import sys

from kvbench.errors import KvbenchError
from kvbench.golden import case_paths, compare, load_case, run_case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="golden case files (*.json) or folders of them")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every problem of a failing case")
    args = parser.parse_args(argv)
    try:
        paths = case_paths(args.paths)
    except KvbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    passed = failed = 0
    for path in paths:
        try:
            case = load_case(path)
            problems = compare(case, run_case(case))
        except KvbenchError as err:
            problems = [str(err)]
        if problems:
            failed += 1
            detail = "; ".join(problems if args.verbose else problems[:3])
            more = "" if args.verbose or len(problems) <= 3 else f" (+{len(problems) - 3} more)"
            print(f"FAIL {path.name}: {detail}{more}")
        else:
            passed += 1
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
