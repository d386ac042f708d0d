"""fcvm: run Podman containers inside lightweight microVMs."""

__version__ = "0.1.0"
