#!/usr/bin/env python3
"""Train the built-in demo model; the same as `python -m hparray.train_demo_model`."""

from __future__ import annotations

import sys

from hparray.train_demo_model import main

if __name__ == "__main__":
    sys.exit(main())
