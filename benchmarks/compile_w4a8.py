"""Offline sm_90 compile of the W4 GEMM (kernels/w4a8.py `_gemm_kernel`): no GPU needed.
(`compile_act` / `act_report`: the same for the Gluon activation passes, kernels/w4a8_act.py.)

    python benchmarks/compile_w4a8.py [--k 2048] [--tiles 64/128/128/4/4,64/128/128/4/3,...] [--json]

For each tile BN/BMT/BK/num_warps/num_stages and both activation kinds (int8 codes, bf16
values) it compiles the kernel for sm_90 the way the runtime launches it (pointer arguments
16-byte aligned) and reports from the generated code:
- the wgmma instruction shape and how many wgmma groups each wait leaves in flight
  (`wgmma.wait_group N`; 0 = the loop waits for every dot);
- registers per thread (Triton's bundled `ptxas -v` on the PTX) and shared memory per program;
- programs per SM that fit (65536 registers, 227 KB shared memory): with every dot waited for,
  other resident programs are what hides the weight unpack and the loads.
This is how the v5 tiles of `pick_config` were chosen before timing them (sweep_w4a8.py).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REGS_PER_SM, SMEM_PER_SM = 65536, 232448  # sm_90


def compile_sm90(source, fn, types: dict, consts: dict, options: dict, divisible: tuple = ()):
    """triton.compile of the jitted fn for sm_90 through `source` (Triton's ASTSource or Gluon's):
    arguments in consts are constants, the others typed by `types`; pointers (and the integers
    named in `divisible`) 16-divisible, as the runtime specializes them."""
    import triton
    from triton.backends.compiler import GPUTarget
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: ("constexpr" if n in consts else types[n]) for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*") or n in divisible}
    return triton.compile(source(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=options)


def wgmma_shapes(ptx: str) -> list[str]:
    """The distinct wgmma instruction shapes/types of PTX, e.g. "m64n64k16.f32.bf16.bf16"."""
    return sorted({re.search(r"wgmma\.mma_async\.sync\.aligned\.(\S+)", line).group(1)
                   for line in ptx.splitlines() if "wgmma.mma_async" in line})


def compile_gemm(int8: bool, bn: int, bmt: int, bk: int, warps: int, stages: int, k: int, swap: bool = True,
                 restore: int = 0, epi_early: bool = False):
    """The compiled `_gemm_kernel` (triton CompiledKernel) for one tile, sm_90; restore: the
    R_out restore variant (`_finish` RESTORE); epi_early: the epilogue operands loaded first
    (EPI_EARLY)."""
    from triton.compiler import ASTSource

    from duquant_runtime.kernels import w4a8 as kernels
    fn = kernels._gemm_kernel
    types = {"a_ptr": "*i8" if int8 else "*bf16", "tok_scale_ptr": "*fp32", "w_ptr": "*u8", "w_scale_ptr": "*fp32",
             "rout_ptr": "*fp16", "bias_ptr": "*fp32", "out_ptr": "*bf16", "M": "i32", "N": "i32",
             "stride_om": "i32", "M_OUT": "i32", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    consts = {"K": k, "INT8": int8, "BN": bn, "BMT": bmt, "BK": bk, "GROUP": 8, "SWAP": swap, "SPLIT": 1, "BO": 64,
              "HAS_ROUT": True, "HAS_BIAS": False, "F32_DOT": False, "PDL": False, "PF_N": 4, "PF": 4,
              "RESTORE": restore, "PART_RESTORE": False, "EPI_EARLY": epi_early, "stride_on": 1}  # row-major output: the runtime specializes a stride of 1 as a constant
    return compile_sm90(ASTSource, fn, types, consts, {"num_warps": warps, "num_stages": stages})


def ptxas_output(ptx: str) -> str:
    """ptxas -v's messages (sm_90a) for `ptx`: registers, spills, C7515 warnings."""
    import triton
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(ptx)
        res = subprocess.run([str(ptxas), "--gpu-name", "sm_90a", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=False)
    return res.stderr + res.stdout


def registers(ptx: str) -> int | None:
    """Registers per thread that ptxas allocates for `ptx` (sm_90a), None if it cannot tell."""
    m = re.search(r"Used (\d+) registers", ptxas_output(ptx))
    return int(m.group(1)) if m else None


def report(int8: bool, tile: tuple[int, ...], k: int) -> dict:
    bn, bmt, bk, warps, stages = tile
    ck = compile_gemm(int8, bn, bmt, bk, warps, stages, k)
    ptx = ck.asm["ptx"]
    shapes = wgmma_shapes(ptx)
    waits = sorted({int(line.split()[-1].rstrip(";")) for line in ptx.splitlines() if "wgmma.wait_group" in line})
    regs = registers(ptx)
    smem = ck.metadata.shared
    per_sm = None
    if regs:
        per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
        per_sm = min(REGS_PER_SM // (per_warp * warps), SMEM_PER_SM // max(smem, 1))
    return {"operand": "int8" if int8 else "bf16", "BN": bn, "BMT": bmt, "BK": bk, "num_warps": warps,
            "num_stages": stages, "K": k, "wgmma": shapes, "wait_group_in_flight": waits, "registers": regs,
            "shared_bytes": smem, "programs_per_sm": per_sm}


def compile_act(pass_: int, bm: int = 128, warps: int = 4, k: int = 16384, areg: bool = False,
                rcache: bool = False, f16: bool = False, vec: int = 8):
    """The compiled `w4a8_act._act_kernel` (triton CompiledKernel) for sm_90, one pass (1: token
    maxima, 2: codes) of one token tile per program, as `act_codes` launches it on the LLM
    down_proj (no PDL): x^T row stride and M multiples of `vec` (`copy_tokens`; the arguments
    ld / vec and M / vec specialized as multiples of 16)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from duquant_runtime.kernels import w4a8_act
    fn = w4a8_act._act_kernel
    types = {"xt_ptr": "*bf16", "ldv": "i32", "mv": "i32", "perm_ptr": "*i64", "r_ptr": "*fp16", "tokmax_ptr": "*fp32",
             "codes_ptr": "*i8", "tok_scale_ptr": "*fp32", "rs_ptr": "*bf16"}
    consts = {"K": k, "TT": 1, "BM": bm, "B": 64, "BKD": 256, "STAGES": 1, "PASS": pass_, "HAS_PERM": True,
              "QMIN": -128, "QMAX": 127, "FASTDIV": True, "AREG": areg, "PDL": False, "RCACHE": rcache, "SATCVT": True,
              "num_warps": warps, "F16": f16, "VEC": vec}
    # an odd ld / vec or M / vec (e.g. M = 700, vec 4) is not specialized: compile both ways
    return compile_sm90(GluonASTSource, fn, types, consts, {"num_warps": warps},
                        divisible=("ldv", "mv") if vec == 8 else ())


def act_report(pass_: int, bm: int = 128, warps: int = 4, areg: bool = False, f16: bool = False,
               vec: int = 8) -> dict:
    """What the generated code of one `_act_kernel` pass does: wgmma shapes, cp.async widths
    (bytes), global store and atomic forms, registers per thread, shared bytes per program."""
    ck = compile_act(pass_, bm, warps, areg=areg, f16=f16, vec=vec)
    ptx = ck.asm["ptx"]
    lines = [line.strip() for line in ptx.splitlines()]
    return {"pass": pass_, "BM": bm, "num_warps": warps, "AREG": areg, "F16": f16, "VEC": vec,
            "wgmma": wgmma_shapes(ptx),
            "cp_async_bytes": sorted({int(re.search(r"cp\.async\.c[ag]\.shared\.global\S*\s*\[[^\]]*\],\s*\[[^\]]*\],"
                                                r"\s*(\w+)", x).group(1), 0)
                                      for x in lines if re.search(r"cp\.async\.c[ag]\.shared", x)}),
            "global_stores": sorted({x.split()[1] for x in lines if x.startswith("@") and " st.global" in x}),
            "atomics": sorted({x.split()[1] for x in lines if x.startswith("@") and " atom." in x}),
            "conversions": sorted({x.split()[0] for x in lines if x.startswith("cvt.rni")}),
            "registers": registers(ptx), "shared_bytes": ck.metadata.shared}


def compile_cluster(k: int = 2048, xt: bool = False, cl: int = 8, bm: int = 64, warps: int = 4, f16: bool = False):
    """The compiled `w4a8_cluster._cluster_kernel` (triton CompiledKernel) for sm_90: x (M, K)
    row-major (xt False) or token-minor, clusters of cl programs over bm tokens, with PDL."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from duquant_runtime.kernels import w4a8_cluster
    fn = w4a8_cluster._cluster_kernel
    types = {"x_ptr": "*bf16", "sxm": "i32", "sxk": "i32", "M": "i32", "MP": "i32", "xt_ptr": "*bf16",
             "part_ptr": "*fp32", "perm_ptr": "*i64", "r_ptr": "*fp16", "codes_ptr": "*i8", "tok_scale_ptr": "*fp32"}
    consts = {"K": k, "CL": cl, "BM": bm, "B": 64, "BKD": 256, "CHK": min(w4a8_cluster.CH, k // cl), "XT": xt, "HAS_PERM": True, "QMIN": -128,
              "QMAX": 127, "PDL": True, "SATCVT": True, "num_warps": warps, ("sxm" if xt else "sxk"): 1, "F16": f16}
    return compile_sm90(GluonASTSource, fn, types, consts, {"num_warps": warps},
                        divisible=("MP", "sxk" if xt else "sxm"))


def cluster_report(k: int = 2048, xt: bool = False, cl: int = 8, f16: bool = False) -> dict:
    """What the generated code of `_cluster_kernel` does: wgmma shapes, cluster barriers, cp.async
    widths (bytes), global store forms, registers per thread, shared bytes per program."""
    ck = compile_cluster(k, xt, cl, f16=f16)
    ptx = ck.asm["ptx"]
    lines = [line.strip() for line in ptx.splitlines()]
    return {"K": k, "token_minor": xt, "CL": cl, "F16": f16, "wgmma": wgmma_shapes(ptx),
            "cluster_barriers": sum(line.startswith("barrier.cluster.arrive") for line in lines),
            "cp_async_bytes": sorted({int(re.search(r"cp\.async\.c[ag]\.shared\.global\S*\s*\[[^\]]*\],\s*\[[^\]]*\],"
                                                r"\s*(\w+)", x).group(1), 0)
                                      for x in lines if re.search(r"cp\.async\.c[ag]\.shared", x)}),
            "global_stores": sorted({x.split()[1] for x in lines if x.startswith("@") and " st.global" in x}
                                    | {x.split()[0] for x in lines if x.startswith("st.global")}),
            "registers": registers(ptx), "shared_bytes": ck.metadata.shared}


def compile_rs(bn: int = 128, bmt: int = 128, bk: int = 256, warps: int = 8, stages: int = 4, restore: bool = True,
               token_minor: bool = False, has_rout: bool = True, bias: bool = False, pdl: bool = False, split: int = 1,
               release: bool = False, end_wait: bool = False):
    """The compiled `w4a8_rs._rs_gemm_kernel` (triton CompiledKernel) for sm_90: one (bn, bmt) tile
    with bk-wide K steps, its restore in the epilogue (restore) into a row-major or token-minor out,
    split-K `split` ways; release / end_wait: the kernel's RELEASE / END_WAIT (a launch of the last
    tokens overlapping the main one)."""
    import triton.experimental.gluon.language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from duquant_runtime.kernels import w4a8_rs

    def desc(blk):
        return f"tensordesc<i8[{blk[0]}, {blk[1]}],{gl.NVMMASharedLayout.get_default_for(blk, gl.int8)!r}>"
    fn = w4a8_rs._rs_gemm_kernel
    types = {"w_desc": desc([bn, bk // 2]), "alo_desc": desc([bmt, bk // 2]), "ahi_desc": desc([bmt, bk // 2]),
             "tok_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "rout_ptr": "*fp16", "bias_ptr": "*bf16",
             "out_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_om": "i32", "stride_on": "i32", "M_OUT": "i32",
             "ws_ptr": "*i32", "cnt_ptr": "*i32"}
    consts = {"STAGES": stages, "GROUP": 8, "WAIT": 2, "BARRIER": True, "TRIGGER": False, "RESTORE": restore,
              "HAS_ROUT": has_rout, "HAS_BIAS": bias, "BO": 64, "TOKEN_MINOR": token_minor, "PDL": pdl, "SPLIT": split,
              "RELEASE": release, "END_WAIT": end_wait, "num_warps": warps,
              ("stride_om" if token_minor else "stride_on"): 1}
    return compile_sm90(GluonASTSource, fn, types, consts, {"num_warps": warps}, divisible=("N", "K"))


def rs_report(bn: int = 128, bmt: int = 128, bk: int = 256, warps: int = 8, stages: int = 4, restore: bool = True,
              token_minor: bool = False, pdl: bool = False, split: int = 1, release: bool = False,
              end_wait: bool = False) -> dict:
    """What the generated code of one `_rs_gemm_kernel` variant does: wgmma shapes, the wait depths,
    whether ptxas serializes its wgmma (C7515), registers, shared bytes."""
    ck = compile_rs(bn, bmt, bk, warps, stages, restore, token_minor, pdl=pdl, split=split, release=release,
                    end_wait=end_wait)
    ptx = ck.asm["ptx"]
    msgs = ptxas_output(ptx)
    return {"BN": bn, "BMT": bmt, "BK": bk, "num_warps": warps, "stages": stages, "restore": restore,
            "token_minor": token_minor, "pdl": pdl, "split": split, "griddepcontrol_wait": ptx.count("griddepcontrol.wait"),
            "launch_dependents": ptx.count("griddepcontrol.launch_dependents"),
            "wgmma": wgmma_shapes(ptx),
            "waits": sorted({int(line.split()[-1].rstrip(";")) for line in ptx.splitlines() if "wgmma.wait_group" in line}),
            "serialized": "C7515" in msgs, "registers": registers(ptx), "shared_bytes": ck.metadata.shared}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=2048, help="K (in_features)")
    ap.add_argument("--tiles", default="64/128/128/4/4,64/128/128/4/3,64/128/256/4/2,64/64/128/4/4,128/128/256/8/3",
                    help="comma-separated BN/BMT/BK/num_warps/num_stages")
    ap.add_argument("--operand", default="both", choices=("both", "int8", "bf16"))
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    try:
        tiles = [tuple(int(v) for v in t.split("/")) for t in args.tiles.split(",")]
        if any(len(t) != 5 for t in tiles):
            raise ValueError
    except ValueError:
        print(f"error: --tiles must be BN/BMT/BK/warps/stages[,...], got {args.tiles!r}", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("error: Triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    kinds = {"both": (True, False), "int8": (True,), "bf16": (False,)}[args.operand]
    rows = [report(int8, t, args.k) for int8 in kinds for t in tiles]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'operand':7s} {'BN/BMT/BK/warps/stages':22s} {'wgmma':28s} {'in flight':9s} {'regs':>4s} "
          f"{'smem KB':>7s} {'per SM':>6s}")
    for r in rows:
        tile = f"{r['BN']}/{r['BMT']}/{r['BK']}/{r['num_warps']}/{r['num_stages']}"
        print(f"{r['operand']:7s} {tile:22s} {','.join(r['wgmma']):28s} {str(r['wait_group_in_flight']):9s} "
              f"{r['registers'] or '?':>4} {r['shared_bytes'] / 1024:7.1f} {r['programs_per_sm'] or '?':>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
