"""edgeseg.host: load checkpoints, export, simplify, quantize, validate, deploy and profile."""

from edgeseg.device import __version__

__all__ = ["__version__"]
