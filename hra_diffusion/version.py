"""The package version (one place: the adapters record it in what they write)."""

__version__ = "0.1.0"
