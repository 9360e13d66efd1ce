"""The package version, in one place every floor may read."""

__version__ = "0.1.0"
