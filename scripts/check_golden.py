#!/usr/bin/env python
"""Check our methods against golden cases of the official implementations.

    python scripts/check_golden.py tests/golden/cases tests/golden/cases-2026 [more files or folders]

Every case runs through the same code path as a real model (`kvbench.golden.run_case`). Prints one line per
failing case, one per case whose method kvbench does not implement (SKIP, never counted as passed), and
`N passed, M failed[, K skipped (method not implemented: ...)]`. Exit status: 0 when every case passed; 1 when
any failed (or none ran); 3 when none failed but some were skipped (0 with --allow-missing).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

from kvbench.errors import KvbenchError
from kvbench.golden import MethodNotImplemented, case_paths, compare, load_case, run_case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="golden case files (*.json) or folders of them")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every problem of a failing case")
    parser.add_argument("--allow-missing", action="store_true",
                        help="exit 0 when the only problem is cases of methods kvbench does not implement")
    args = parser.parse_args(argv)
    try:
        paths = case_paths(args.paths)
    except KvbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    passed = failed = 0
    skipped: Counter = Counter()
    for path in paths:
        try:
            case = load_case(path)
            problems = compare(case, run_case(case))
        except MethodNotImplemented:
            skipped[case["method"]] += 1
            print(f"SKIP {path.name}: skipped: method not implemented ({case['method']})")
            continue
        except KvbenchError as err:
            problems = [str(err)]
        if problems:
            failed += 1
            detail = "; ".join(problems if args.verbose else problems[:3])
            more = "" if args.verbose or len(problems) <= 3 else f" (+{len(problems) - 3} more)"
            print(f"FAIL {path.name}: {detail}{more}")
        else:
            passed += 1
    summary = f"{passed} passed, {failed} failed"
    if skipped:
        missing = ", ".join(f"{name} ({count})" for name, count in sorted(skipped.items()))
        summary += f", {sum(skipped.values())} skipped (method not implemented: {missing})"
    print(summary)
    if failed or passed == 0:
        return 1
    return 3 if skipped and not args.allow_missing else 0


if __name__ == "__main__":
    sys.exit(main())
