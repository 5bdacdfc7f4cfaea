"""Ray Serve application for GAP3D: `serve run serve/config.yaml`."""
