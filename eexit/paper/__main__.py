"""`python -m eexit.paper`: serve the paper exchange (see eexit/paper/__init__.py)."""
import sys

from eexit.paper import main

sys.exit(main())
