"""GAP3D: a VLM prompt encoder aligned to DINOv2 space drives a frozen TRELLIS 3D generator."""

__version__ = "0.1.0"
