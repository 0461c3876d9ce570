"""Tollgate: an API gateway and AI gateway."""

__version__ = "0.1.0"
