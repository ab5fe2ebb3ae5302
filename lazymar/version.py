"""The package version (one home: the root package and the recordings it writes read it here)."""
__version__ = "0.1.0"
