#!/usr/bin/env python3
"""The panic drill, kept at its old path for scripts: the same as `eexit drill` (eexit/drill.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eexit.drill import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
