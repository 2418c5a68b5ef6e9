"""duquant_runtime: read DuQuant packs and apply them to models (torch, numpy, h5py only).

    from duquant_runtime import apply_pack
    report = apply_pack(model, "packs/pi05-w4a8")     # swaps nn.Linear -> DuQuantLinear
    save_calibration(model, "packs/pi05-w4a8")        # after calibration: store the activation scales
    enable_duquant_if_configured(model)               # the OPENPI_DUQUANT_* drop-in
"""

from .apply import ApplyReport, apply_pack, resolve_module_names
from .calibration import save_calibration
from .errors import DuquantError, PackError
from .fingerprint import weight_fingerprint
from .format import FORMAT_NAME, FORMAT_VERSION
from .linear import DuQuantLinear
from .mlp_activation import fuse_mlp_activations, unfuse_mlp_activations
from .mlp_layout import clear_token_minor, mark_token_minor
from .openpi import EnvConfigError, enable_duquant_if_configured
from .pack import LayerPack, Pack, load_pack
from .stats import collect_stats

__version__ = "0.1.0"

__all__ = ["apply_pack", "ApplyReport", "resolve_module_names", "DuQuantLinear", "DuquantError",
           "PackError", "weight_fingerprint", "FORMAT_NAME", "FORMAT_VERSION", "LayerPack", "Pack",
           "load_pack", "save_calibration", "mark_token_minor", "clear_token_minor", "fuse_mlp_activations",
           "unfuse_mlp_activations", "collect_stats", "enable_duquant_if_configured", "EnvConfigError", "__version__"]
