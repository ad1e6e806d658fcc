"""CLI commands: evaluate and benchmark."""
from histosynth.cli import app  # noqa: F401
