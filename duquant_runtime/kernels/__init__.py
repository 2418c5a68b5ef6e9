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


MIN_CAPABILITY = (8, 0)  # bf16 tensor-core dots and the bf16x2 PTX of the weight unpack
PDL_CAPABILITY = (9, 0)  # programmatic dependent launch (griddepcontrol): Hopper and later


def capability_ok(capability: tuple[int, int]) -> bool:
    """True when a GPU of this compute capability runs the kernels (sm_80 and later)."""
    return tuple(capability) >= MIN_CAPABILITY


def pdl_ok(capability: tuple[int, int]) -> bool:
    """True when a GPU of this compute capability supports programmatic dependent launch."""
    return tuple(capability) >= PDL_CAPABILITY


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    import torch
    return tuple(torch.cuda.get_device_capability(index))


def device_capability(device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (the current one when it has no
    index); cached per device."""
    import torch
    dev = torch.device(device)
    return _capability(dev.index if dev.index is not None else torch.cuda.current_device())


def fast_path_available(device) -> bool:
    """True when tensors on `device` can use the Triton kernels: a CUDA device of compute
    capability 8.0 or later, and Triton."""
    import torch
    dev = torch.device(device)
    if not (dev.type == "cuda" and torch.cuda.is_available() and triton_available()):
        return False
    return capability_ok(device_capability(dev))
