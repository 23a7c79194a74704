"""`python -m kvbench.ruler.report RESULTS... [--out DIR]`: an alias of `python -m kvbench.report`, which writes the
RULER tables (one per length and the mean over lengths, with CIs, n, Status, bold and dagger) and figures (score vs
length, score vs budget) with every other benchmark's, through the one report stack (kvbench.report).
"""
from __future__ import annotations

import sys

from kvbench.report.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
