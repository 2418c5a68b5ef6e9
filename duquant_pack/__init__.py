"""duquant_pack: the offline DuQuant pack compiler (checkpoint -> versioned pack directory)."""

from duquant_runtime import __version__

__all__ = ["__version__"]
