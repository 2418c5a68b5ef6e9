"""Human-readable numbers for the command-line tables."""

from __future__ import annotations


def fmt_n(n: float) -> str:
    """1234567 -> '1.23M' (k, M, G; plain below 1000)."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}" if isinstance(n, float) else str(n)


def fmt_bytes(n: int) -> str:
    """Bytes in binary units: '1.50 MiB'."""
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"
