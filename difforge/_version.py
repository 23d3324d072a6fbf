"""The version of difforge, in one place (importing it imports nothing else)."""

__version__ = "0.1.0"
