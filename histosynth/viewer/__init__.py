"""Browser slide viewer: Deep Zoom tiles served from a pyramidal TIFF on demand, or exported as static files."""
from histosynth.viewer.export import export_viewer
from histosynth.viewer.server import SlideSource, ViewerServer, make_server, serving

__all__ = ["SlideSource", "ViewerServer", "export_viewer", "make_server", "serving"]
