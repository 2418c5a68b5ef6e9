"""duquant_runtime: read DuQuant packs and apply their transforms (torch, numpy, h5py only)."""

from .errors import DuquantError, PackError
from .fingerprint import weight_fingerprint
from .format import FORMAT_NAME, FORMAT_VERSION
from .pack import LayerPack, Pack, load_pack

__version__ = "0.1.0"

__all__ = ["DuquantError", "PackError", "weight_fingerprint", "FORMAT_NAME", "FORMAT_VERSION",
           "LayerPack", "Pack", "load_pack", "__version__"]
