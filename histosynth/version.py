"""The version of histosynth, on its own so any module can record it without importing the package root."""
__version__ = "0.1.0"
