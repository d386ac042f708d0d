"""Lowest layer: paths, errors, logging, process tracking. Imports nothing else from fcvm."""
