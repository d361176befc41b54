"""The dskd command: parses, calls a library function, prints."""

from dskd_ray.cli.entry import app, main

__all__ = ["app", "main"]
