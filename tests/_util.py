"""Small helpers shared by the tests (imported as a plain module: tests/ is on sys.path)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file


def tree_bytes(root) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `root` (hidden files included)."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def save_ckpt(directory, tensors: dict, name: str = "model.safetensors") -> Path:
    """Write `tensors` as directory/name with safetensors.torch.save_file; returns the file path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def share_inputs_pack(root, model, include: str) -> Path:
    """root/pack: a --share-inputs pack (row rotations restored, 64-wide blocks) of `model`'s linear
    layers matching `include`, built from its state dict saved as root/ckpt."""
    from duquant_pack.build import build_pack
    from duquant_pack.config import resolve
    root = Path(root)
    save_ckpt(root / "ckpt", {k: v.clone() for k, v in model.state_dict().items()})
    cfg, _ = resolve(None, include=include, exclude="", row_rot="restore", block=64, share_inputs=True)
    build_pack(root / "ckpt", root / "pack", cfg, jobs=1, progress=False)
    return root / "pack"


def write_raw_safetensors(path, header: dict, data: bytes) -> Path:
    """A hand-made safetensors file: u64 header length, JSON header, data."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return Path(path)


def random_orthogonal_blocks(nb: int, b: int, *, tail: int | None = None, seed: int = 0,
                             dtype=torch.float64) -> torch.Tensor:
    """(nb, b, b) random orthogonal blocks; with `tail`, the last block is a tail x tail rotation in the
    top-left corner of an identity (the layout the pack format uses for a partial last block)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(nb, b, b, generator=g, dtype=torch.float64))
    if tail is not None and tail != b:
        last = torch.eye(b, dtype=torch.float64)
        qt, _ = torch.linalg.qr(torch.randn(tail, tail, generator=g, dtype=torch.float64))
        last[:tail, :tail] = qt
        q[-1] = last
    return q.to(dtype)


def ortho_err(r: torch.Tensor) -> float:
    """max |R_b^T R_b - I| over blocks, in float64."""
    r = r.double()
    eye = torch.eye(r.shape[-1], dtype=torch.float64)
    return float((r.transpose(-1, -2) @ r - eye).abs().max())


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (float64)."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def w4a8_operands(m: int, k: int, token_minor: bool, seed: int):
    """GPU operands of the activation kernels: x (M, K) bf16 with five 60x outlier channels
    (token-minor when asked: the transpose of a (K, M) tensor, as a gate/up GEMM leaves it for
    down_proj), a permutation (K,) and orthogonal R_in blocks (K/64, 64, 64) float16, seeded."""
    g = torch.Generator().manual_seed(seed)
    r_in = torch.linalg.qr(torch.randn(k // 64, 64, 64, generator=g, dtype=torch.float64))[0].half().contiguous()
    perm = torch.randperm(k, generator=g)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:5]] *= 60.0  # outlier channels
    x = x.bfloat16().cuda()
    if token_minor:
        x = x.t().contiguous().t()
    return x, perm.cuda(), r_in.cuda()


def w4_layer_kwargs(n: int, k: int, r_in, perm, mode: int, seed: int = 5) -> dict:
    """`w4_linear` keyword arguments of a random W4 layer (N, K) on the GPU: packed int4 codes,
    row scales, orthogonal R_out blocks (N/64, 64, 64) float16, the given R_in / perm / mode."""
    from duquant_runtime.quant import pack_int4
    g = torch.Generator().manual_seed(seed)
    r_out = torch.linalg.qr(torch.randn(n // 64, 64, 64, generator=g, dtype=torch.float64))[0].half().contiguous()
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, generator=g) * 0.01 + 0.001
    return dict(qweight=pack_int4(q).cuda(), w_scale=ws.cuda(), r_in=r_in, perm=perm, r_out=r_out.cuda(),  # noqa: C408
                bias=None, smooth=None, mode=mode)


def layer_err_vs_triton_launches(x, n: int, k: int, r_in, perm, act: str) -> float:
    """Relative error of a dynamic W4 layer (`w4_layer_kwargs`) on x with the activation path
    `act` (pick_config's ACT) against the same layer on the Triton activation launches (ACT None),
    the picked configuration otherwise."""
    from duquant_runtime.kernels import w4a8 as K
    m = x.shape[0]
    kw = w4_layer_kwargs(n, k, r_in, perm, K.MODE_DYNAMIC)
    cfg = K.pick_config(m, n, k, K.MODE_DYNAMIC)
    y = K.w4_linear(x, config={**cfg, "ACT": act}, **kw).float()
    ref = K.w4_linear(x, config={**cfg, "ACT": None}, **kw).float()
    err = float((y - ref).norm() / ref.norm())
    print(f"M={m} N={n} K={k}: {act} vs Triton activation launches {err:.2e}")
    return err


def assert_codes_within_ties(codes, s, ref_codes, ref_s) -> None:
    """Activation codes int8 (M, K) and scales (M,) equal to the reference's up to quantization
    ties moved by the order of float32 sums: scales within 1e-5 relative, codes at most one
    apart, on fewer than 0.1% of them."""
    m, k = ref_codes.shape
    assert codes.shape == (m, k) and codes.dtype == torch.int8 and s.shape == (m,)
    assert float(((s - ref_s).abs() / ref_s).max()) < 1e-5
    diff = (codes.int() - ref_codes.int()).abs()
    print(f"M={m} K={k}: codes differing {int((diff > 0).sum())} of {m * k}, max {int(diff.max())}")
    assert int(diff.max()) <= 1
    assert float((diff > 0).float().mean()) < 1e-3


def hard_rows(x: torch.Tensor) -> torch.Tensor:
    """x with rows float16 cannot hold as they are: values past 65504 (up to 3e5), a row of tiny
    values (1e-7, some 1e-30: float16 subnormal or zero), a zero row, large and tiny values mixed."""
    x = x.clone()
    m, k = x.shape
    g = torch.Generator().manual_seed(m + k)
    r = torch.randn(4, k, generator=g)
    x[1] = (r[0] * 1e5).to(x.device, x.dtype)
    x[2] = (r[1] * 1e-7).to(x.device, x.dtype)
    x[2, ::7] = (r[2, ::7] * 1e-30).to(x.device, x.dtype)
    x[4] = 0
    x[5] = (r[3] * torch.where(torch.arange(k) % 3 == 0, 1e4, 1e-6)).to(x.device, x.dtype)
    return x


def halfway_row(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row (K,) float32, halves (254,)): a token row whose dynamic scale is exactly 1/8 (absmax
    127/8) and whose columns 2 .. 255 are halves / 8, so that with identity rotations their
    quotients lie exactly halfway between two codes (-126.5 .. 126.5); bf16 holds them exactly."""
    halves = torch.arange(-127, 127) + 0.5
    row = torch.zeros(k)
    row[:2] = torch.tensor([127.0, -127.0])
    row[2:2 + halves.numel()] = halves
    return row / 8, halves


def natural_columns(codes_row: torch.Tensor, bkd: int) -> torch.Tensor:
    """A row of codes stored in the GEMM's column order (`w4a8._deint`: within each bkd-wide tile
    the even columns, then the odd ones) back in natural column order, on the CPU."""
    stored = torch.arange(codes_row.numel()).reshape(-1, bkd // 2, 2).transpose(1, 2).reshape(-1)
    return codes_row.cpu()[torch.argsort(stored)]
