"""eexit: a fail-closed emergency exit for automated trading."""

# The one place the version is written: setup.py reads it from this line, `eexit --version`
# prints it, every daemon's first log line names it, metrics export it as eexit_build_info.
__version__ = "0.2.0"
