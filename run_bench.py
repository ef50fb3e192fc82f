#!/usr/bin/env python3
"""headbench: `python run_bench.py --grid smoke` or `accelerate launch run_bench.py --grid full`.

Sub-commands: `run` (default), `report`, `evaluate`; `--help` on each.
"""

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
