"""Apply a pack to a model: map pack entries to modules, check everything, then swap the modules.

    report = apply_pack(model, "packs/pi05-w4a8")
    print(report.summary())

All checks run before the model is touched (module exists and is an `nn.Linear`, shape, weight
fingerprint against the one recorded at build time, every layer file's integrity); a failure
raises `PackError` and leaves the model unchanged. When the pack holds saved activation scales
(`save_calibration`) that fit the run (static mode, same abits, percentile and steps), every
layer they cover starts calibrated: no calibration runs, so runs are reproducible. Module names equal checkpoint keys minus
``.weight``; a model whose names carry an extra prefix (LeRobot's ``model.``) or lack one is
matched automatically when the match is unambiguous, or through an explicit `name_map`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from .errors import PackError
from .fingerprint import weight_fingerprint
from .linear import DuQuantLinear
from .pack import Pack, load_pack
from .quant import is_quantized
from .input_group import check_compatible, link_input_group
from .mlp_activation import fuse_mlp_activations
from .mlp_layout import mark_token_minor


@dataclass
class ApplyReport:
    """What `apply_pack` did: replaced module names, skipped ones with reasons, resident bytes."""

    pack: str
    replaced: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (pack layer name, reason)
    bytes_before: int = 0  # float weight + bias of the replaced modules
    bytes_after: int = 0  # everything the DuQuantLinear modules keep
    per_layer_bytes: dict = field(default_factory=dict)  # module name -> (before, after)
    warnings: list[str] = field(default_factory=list)
    calibrated: int = 0  # replaced layers whose activation scales came from the pack's calibration
    planned: list[str] = field(default_factory=list)  # module names a dry run would replace
    compiled: bool = False  # enable_duquant_if_configured compiled the pack in this call
    unchecked: list[str] = field(default_factory=list)  # modules whose weights were not fingerprinted
    input_groups: list[list[str]] = field(default_factory=list)  # linked module names (input_group.py)
    token_minor: list[str] = field(default_factory=list)  # MLP producers writing token-minor (mlp_layout.py)
    fused_mlps: dict = field(default_factory=dict)  # MLP module -> activation its down_proj computes (mlp_activation.py)

    def summary(self) -> str:
        if not self.replaced and self.planned:
            return f"dry run: {len(self.planned)} layers would be replaced, {len(self.skipped)} skipped"
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 0.0
        cal = f", {self.calibrated} with saved activation scales" if self.calibrated else ""
        cal += f", {len(self.input_groups)} input groups linked" if self.input_groups else ""
        cal += f", {len(self.fused_mlps)} MLP activations fused" if self.fused_mlps else ""
        return (f"{len(self.replaced)} layers replaced{cal}, {len(self.skipped)} skipped; "
                f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB ({ratio:.2f}x)")


def resolve_module_names(pack_names: list[str], module_names: list[str],
                         name_map: Mapping[str, str] | Callable[[str], str] | None = None) -> dict[str, str | None]:
    """Map each pack layer name to a module name (None when absent).

    Without `name_map`: the exact name, else the unique module name that ends with ``'.' + name``
    (an extra prefix in the model) or that the name ends with (a prefix in the pack). Two or more
    candidates are an error naming them.
    """
    modules = set(module_names)
    out: dict[str, str | None] = {}
    for name in pack_names:
        if name_map is not None:
            target = name_map(name) if callable(name_map) else name_map.get(name, name)
            out[name] = target if target in modules else None
            continue
        if name in modules:
            out[name] = name
            continue
        cands = [m for m in module_names if m.endswith("." + name) or name.endswith("." + m)]
        if len(cands) > 1:
            raise PackError(f"pack layer '{name}' matches several modules ({', '.join(cands[:4])}); "
                            "pass name_map to choose")
        out[name] = cands[0] if cands else None
    targets = [t for t in out.values() if t is not None]
    if len(set(targets)) != len(targets):
        dup = sorted({t for t in targets if targets.count(t) > 1})
        raise PackError(f"several pack layers map to the same module(s) {dup[:3]}; pass name_map")
    return out


def apply_pack(model: nn.Module, pack_dir, *, strict: bool = True,
               name_map: Mapping[str, str] | Callable[[str], str] | None = None,
               device: torch.device | str | None = None, act_mode: str = "static",
               abits: int | None = None, force: bool = False, dry_run: bool = False,
               check_weights: bool = True, rot_dtype: torch.dtype | None = None,
               share_inputs: bool = True, token_minor_mlp: bool = True,
               fuse_mlp_activation: bool = True) -> ApplyReport:
    """Replace the pack's layers of `model` by `DuQuantLinear` modules; returns an `ApplyReport`.

    strict: a pack layer without a matching module is an error (else it is skipped and reported).
    force: apply even when a module's weights differ from those the pack was built from (warns).
    abits: override the pack's activation bits (0 = off). act_mode: 'static' or 'dynamic'.
    dry_run: run every check (layer files included), fill `report.planned`, change nothing.
    Layers whose integers the pack stores (build --store-qweights) never read the module's float
    weight, which may then be absent (on the meta device): such a module cannot be fingerprinted
    and is accepted unchecked. check_weights=False also skips the fingerprint (a full pass over
    the weight) of stored-integer layers whose weights are present; layers without stored
    integers are always checked (their integers are computed from the module's weight). Skipped
    modules are listed in `report.unchecked`.
    device: where the new modules live. rot_dtype: dtype of their r_in/r_out blocks; default
    float16 on a CUDA device (the fused kernels' operand precision; half the bytes), else float32.
    Saved activation scales (the manifest's ``calibration``) are installed when act_mode is
    'static' and abits, act_percentile and calib_steps equal those they were calibrated with.
    share_inputs: link the layers of each of the pack's input groups (build --share-inputs) so that
    on the GPU kernels and the CPU integer path they transform the activation once and run one GEMM
    (duquant_runtime.input_group; listed in `report.input_groups`).
    token_minor_mlp: on the GPU kernel path, MLP gate/up (w1/w3, fc1) layers whose down_proj (w2,
    fc2) is replaced too write their output token-minor (same values, strides (1, s), s >= M), which
    down_proj's kernels read without a transpose launch (duquant_runtime.mlp_layout; listed in
    `report.token_minor`).
    fuse_mlp_activation: MLP modules whose layers are all replaced and whose forward computes
    down_proj(act(gate_proj(x)) * up_proj(x)) (or fc2(act(fc1(x)))) for act gelu_tanh or silu, checked
    with stand-in layers, run ``down_proj.forward_product``: on the GPU kernel path down_proj's
    prep launch computes the hidden itself, the same values as torch's two elementwise launches
    (duquant_runtime.mlp_activation; listed in `report.fused_mlps`).
    """
    pack = pack_dir if isinstance(pack_dir, Pack) else load_pack(pack_dir)
    cfg = pack.config
    abits = cfg.get("abits", 0) if abits is None else abits
    report = ApplyReport(pack=str(pack.path))
    modules = dict(model.named_modules())
    mapping = resolve_module_names(pack.layer_names, list(modules), name_map)

    targets: list[tuple[str, str]] = []  # (pack layer, module): checked, its file read below
    for pname, mname in mapping.items():
        if mname is None:
            if strict:
                raise PackError(f"pack layer '{pname}' has no module in the model "
                                "(strict=False skips it; name_map maps names)")
            report.skipped.append((pname, "no such module"))
            continue
        mod = modules[mname]
        if isinstance(mod, DuQuantLinear):
            raise PackError(f"module '{mname}' is already a DuQuantLinear (pack applied twice?)")
        if not isinstance(mod, nn.Linear):
            raise PackError(f"module '{mname}' is a {type(mod).__name__}, not nn.Linear")
        entry = pack.entry(pname)
        if tuple(mod.weight.shape) != (entry["out_features"], entry["in_features"]):
            raise PackError(f"module '{mname}' has weight {list(mod.weight.shape)}, pack layer expects "
                            f"[{entry['out_features']}, {entry['in_features']}]")
        stored = bool(entry.get("qweight", False)) and is_quantized(entry["wbits"])
        if mod.weight.device.type == "meta" or (stored and not check_weights):
            if not stored:
                raise PackError(f"module '{mname}' has no weight data (meta device) and the pack stores no "
                                "integers for it (build the pack with --store-qweights, or load the weights)")
            report.unchecked.append(mname)
            targets.append((pname, mname))
            continue
        if not bool(torch.isfinite(mod.weight).all()):
            raise PackError(f"module '{mname}' has NaN/Inf weights")
        fp = weight_fingerprint(mod.weight)
        if fp != entry["weight_fingerprint"]:
            msg = (f"module '{mname}' holds other weights than the checkpoint the pack was built from "
                   f"(fingerprint {fp[:17]} vs {entry['weight_fingerprint'][:17]})")
            if not force:
                raise PackError(msg + "; rebuild the pack for these weights, or force=True")
            warnings.warn(msg + "; applying anyway (force=True)", stacklevel=2)
            report.warnings.append(msg)
        targets.append((pname, mname))
    # every target's layer file read and checked (checksum, arrays, orthogonality), by a few threads
    planned = [(pname, mname, layer) for (pname, mname), layer in
               zip(targets, pack.read_layers([pname for pname, _ in targets]))]

    act_percentile, calib_steps = cfg.get("act_percentile", 99.9), cfg.get("calib_steps", 32)
    scales = _saved_scales(pack, report, act_mode, abits, act_percentile, calib_steps)
    if dry_run:
        report.planned = [mname for _, mname, _ in planned]
        return report
    built: list[tuple[str, nn.Module, DuQuantLinear]] = []
    if rot_dtype is None:
        rot_dtype = torch.float16 if device is not None and torch.device(device).type == "cuda" else torch.float32
    for pname, mname, layer in planned:
        lin = modules[mname]
        q = DuQuantLinear.from_linear(lin, layer, abits=abits, act_mode=act_mode,
                                      act_percentile=act_percentile, calib_steps=calib_steps,
                                      act_scale=scales.get(pname), device=device, rot_dtype=rot_dtype)
        q.layer_key = layer.meta["layer_key"]  # identifies the transforms (checked by save_calibration)
        if device is not None:
            q = q.to(device)
        if pname in scales:
            report.calibrated += 1
        built.append((mname, lin, q))
    for mname, lin, q in built:  # nothing can fail from here on
        parent_name, _, attr = mname.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, q)
        before = lin.weight.numel() * lin.weight.element_size()
        if lin.bias is not None:
            before += lin.bias.numel() * lin.bias.element_size()
        report.replaced.append(mname)
        report.per_layer_bytes[mname] = (before, q.nbytes)
        report.bytes_before += before
        report.bytes_after += q.nbytes
    if share_inputs:
        _link_groups(pack, report, {pname: q for (pname, _, _), (_, _, q) in zip(planned, built)},
                     {pname: mname for pname, mname, _ in planned})
    if token_minor_mlp:
        report.token_minor = mark_token_minor(model)
    if fuse_mlp_activation:
        report.fused_mlps = fuse_mlp_activations(model)
    return report


def _link_groups(pack: Pack, report: ApplyReport, built: dict, module_of: dict) -> None:
    """Link the replaced modules of every complete input group of the pack; a group that cannot be
    linked (a member skipped, or modules that disagree) runs unlinked and is reported."""
    seen = set()
    for name in pack.layer_names:
        group = pack.entry(name).get("input_group")
        if group is None or tuple(group) in seen:
            continue
        seen.add(tuple(group))
        if not all(g in built for g in group):
            report.warnings.append(f"input group {group} not linked: not every member was replaced")
            continue
        why = check_compatible([built[g] for g in group])
        if why is not None:
            report.warnings.append(f"input group {group} not linked: {why}")
            continue
        link_input_group([built[g] for g in group])
        report.input_groups.append([module_of[g] for g in group])


def _saved_scales(pack: Pack, report: ApplyReport, act_mode: str, abits: int, act_percentile: float,
                  calib_steps: int) -> dict:
    """The pack's saved activation scales when they fit this run (checked; raises on a bad file), else {}."""
    cal = pack.calibration
    if cal is None or act_mode != "static" or not is_quantized(abits):
        return {}
    want = {"abits": abits, "act_percentile": act_percentile, "calib_steps": calib_steps}
    diff = [f"{k}={cal[k]!r} (this run: {v!r})" for k, v in want.items() if cal[k] != v]
    if diff:
        report.warnings.append(f"saved activation scales not used: calibrated with {', '.join(diff)}; "
                               "layers calibrate again")
        return {}
    return pack.calibration_scales()
