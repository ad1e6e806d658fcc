"""CLI commands: generate."""
from histosynth.cli import app  # noqa: F401
