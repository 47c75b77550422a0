#!/usr/bin/env python3
"""Train the built-in demo model; the same as `python -m hparray.demo.train`."""

from __future__ import annotations

import sys

from hparray.demo.train import main

if __name__ == "__main__":
    sys.exit(main())
