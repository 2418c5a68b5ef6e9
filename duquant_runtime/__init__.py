"""duquant_runtime: read DuQuant packs and apply them to models (torch, numpy, h5py only).

    from duquant_runtime import apply_pack
    report = apply_pack(model, "packs/pi05-w4a8")     # swaps nn.Linear -> DuQuantLinear
"""

from .apply import ApplyReport, apply_pack, resolve_module_names
from .errors import DuquantError, PackError
from .fingerprint import weight_fingerprint
from .format import FORMAT_NAME, FORMAT_VERSION
from .linear import DuQuantLinear
from .pack import LayerPack, Pack, load_pack

__version__ = "0.1.0"

__all__ = ["apply_pack", "ApplyReport", "resolve_module_names", "DuQuantLinear", "DuquantError",
           "PackError", "weight_fingerprint", "FORMAT_NAME", "FORMAT_VERSION", "LayerPack", "Pack",
           "load_pack", "__version__"]
