"""The library's version, on the ground floor: the profile cache key reads it without importing the package's
public face."""

__version__ = "0.1.0"
