"""CLI commands: data."""
from histosynth.cli import app  # noqa: F401
