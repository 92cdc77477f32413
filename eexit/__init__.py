"""eexit: a fail-closed emergency exit for automated trading."""

__version__ = "0.1.0"
