"""Helpers for tests that need real process groups on a machine without a GPU."""
from .dist import GlooPool

__all__ = ["GlooPool"]
