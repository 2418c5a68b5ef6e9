"""The keys of a W4 kernel launch configuration (`w4a8.pick_config` / `resolve_config`, and the
`config` overrides of `w4a8.w4_linear`): what they mean is in `pick_config`'s docstring. Kept
apart from the kernels so that tools check an override without Triton: a misspelt key would
otherwise be ignored, and an A/B would time the picked launches twice under two names."""

from __future__ import annotations

CONFIG_KEYS = frozenset({
    # activation launches (Triton prep + quantize)
    "G", "BMP", "TILES", "XLOAD", "prep_warps", "prep_warps_hidden", "prep_stages", "BMQ", "QCH", "QRUNS", "QFASTDIV", "BKQ", "SATCVT",
    "PDL", "PREP_PDL",
    # activation launches on sm_90 (Gluon: `w4a8_act`, `w4a8_cluster`)
    "ACT", "ACT_BM", "ACT_TT", "ACT_STAGES", "ACT_WARPS", "ACT_RCACHE", "ACT_F16", "ACT_AREG", "ACT_FASTDIV",
    "ACT_MAXNREG", "CL", "CL_BM", "CL_WARPS",
    # the GEMM (Triton `_gemm_kernel`, or the register-operand Gluon GEMM where GEMM is "rs")
    "BN", "BMT", "BK", "GROUP", "SWAP", "SPLIT", "num_warps", "num_stages", "RESTORE", "PART_RESTORE", "TAIL_BMT",
    "EPI_EARLY", "GEMM", "RS_CONFIG", "RS_STAGES", "RS_RESTORE", "RS_TRIGGER", "RS_PDL", "RS_TAIL_OVERLAP",
    # `resolve_config`: start from the picks of another token count
    "PICK_M",
})


def check_config(config: dict) -> None:
    """ValueError naming the keys of `config` (and of its RS_CONFIG) that are not launch-configuration
    keys."""
    keys = set(config) | set(config.get("RS_CONFIG") or {})
    unknown = sorted(k for k in keys if k not in CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown launch-configuration keys {unknown} (known: {', '.join(sorted(CONFIG_KEYS))})")
