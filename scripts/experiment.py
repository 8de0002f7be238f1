#!/usr/bin/env python3
"""Pre-copy convergence experiments: same as ``migrator experiment`` (see its --help).

Usage: scripts/experiment.py [--quick] [--out DIR] [--sizes ...] [--rates ...] [--bandwidths ...]
                             [--patterns ...] [--trackers ...] [--traces T1,T2] [--replot]
"""

import sys

from migrator.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["experiment", *sys.argv[1:]]))
