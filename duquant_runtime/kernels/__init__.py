"""Fast low-bit GPU kernels for `DuQuantLinear` (Triton; imported lazily).

`duquant_runtime` imports without Triton: only `fast_path_available()` and the functions of
`w4a8` (imported on first use) touch it. The kernels compute the same function as the float
reference path of `DuQuantLinear.forward` (see docs/algorithm.md), with the activation and the
rotations in 16-bit / tf32 operands instead of float32 (error: bf16 rounding level).
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when `import triton` works (it is an optional dependency of the runtime)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401  (a broken install fails here)
    except Exception:  # ImportError, or a broken install: the reference path still works
        return False
    return True


def fast_path_available(device) -> bool:
    """True when tensors on `device` can use the Triton kernels (a CUDA device and Triton)."""
    import torch
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.is_available() and triton_available()
