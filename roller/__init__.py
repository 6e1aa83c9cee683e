"""roller: the Release Operations Controller."""

__version__ = "0.1.0"
