from histosynth.version import __version__  # noqa: F401


def load(path):
    """Load a saved histosynth model folder (see ``histosynth.models.bundle.load_bundle``)."""
    from histosynth.models.bundle import load_bundle

    return load_bundle(path)
