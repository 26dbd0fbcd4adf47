"""The version, in a leaf module that any part of the library may import."""

__version__ = "0.1.0"
