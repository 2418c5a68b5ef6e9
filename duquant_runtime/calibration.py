"""Save calibrated static activation scales into a pack, so later runs skip calibration.

    report = apply_pack(model, "packs/pi05-w4a8")         # static mode: layers calibrate ...
    for batch in calibration_batches: model(batch)          # ... over their first calib_steps calls
    save_calibration(model, "packs/pi05-w4a8")              # a new manifest revision, atomically
    apply_pack(fresh_model, "packs/pi05-w4a8").calibrated   # every layer starts calibrated

The scales go to ``calibration/act_scales.<sha16>.h5`` (one float32 dataset per layer, written to
a temporary name, fsynced, renamed; no timestamps, so equal scales give equal bytes) and the
manifest gains a top-level ``calibration`` object; its ``config`` and ``config_hash`` stay as they
were (calibration is not part of the build configuration). docs/format.md §10 has the layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import TMP_PREFIX, atomic_file, fsync_dir, h5_image, pack_lock, write_json_atomic
from .errors import PackError
from .format import (CALIBRATION_DIR, CALIBRATION_FORMAT_NAME, CALIBRATION_FORMAT_VERSION, MANIFEST,
                     file_sha256, validate_manifest)
from .linear import DuQuantLinear
from .pack import Pack, calibration_dataset_names, load_pack



def save_calibration(model: nn.Module, pack_dir, *, partial: bool = False) -> dict:
    """Store the calibrated activation scales of `model`'s static-mode DuQuantLinear layers in the
    pack at `pack_dir` (the pack they were applied from); returns the manifest's new
    ``calibration`` object.

    Layers still calibrating are an error naming them, unless `partial=True` (then only the
    calibrated ones are saved; the others calibrate again in later runs). Every failure raises
    `PackError` and leaves the pack as it was.
    """
    pack = load_pack(pack_dir)
    layers = _calibrated_layers(model, pack, partial)
    settings = _common_settings(layers)
    path = pack.path
    if not os.access(path, os.W_OK | os.X_OK):
        raise PackError(f"{path}: pack directory is not writable; cannot save the calibration")
    try:
        with pack_lock(path, PackError, "a build is writing this pack; save the calibration after it finishes"):
            current = load_pack(path)  # again, under the lock: a build may have committed meanwhile
            if (current.manifest["config_hash"], current.manifest["layers"]) != \
                    (pack.manifest["config_hash"], pack.manifest["layers"]):
                raise PackError(f"{path}: the pack changed while saving the calibration; apply it again")
            cal_dir = path / CALIBRATION_DIR
            cal_dir.mkdir(exist_ok=True)
            for stale in cal_dir.glob(TMP_PREFIX + "*"):
                stale.unlink()
            keys = [pack.entry(n)["layer_key"] for n, _ in layers]  # verified by _calibrated_layers
            rel, digest = _write_scales(cal_dir, layers, keys, settings)
            manifest = dict(current.manifest)
            manifest["calibration"] = {"file": rel, "sha256": digest, "layers": len(layers), **settings}
            validate_manifest(manifest)
            try:
                write_json_atomic(path / MANIFEST, manifest)  # the commit point
            except BaseException:  # not committed: the new file would be a stray one (verify reports it)
                if rel != (current.calibration or {}).get("file"):
                    (path / rel).unlink(missing_ok=True)
                raise
            keep = Path(rel).name
            for p in cal_dir.iterdir():
                if p.name != keep:
                    p.unlink()
            fsync_dir(cal_dir)
    except OSError as err:
        raise PackError(f"{path}: cannot save the calibration ({err.__class__.__name__}: "
                        f"{' '.join(str(err).split())})") from None
    return manifest["calibration"]


def _calibrated_layers(model: nn.Module, pack: Pack, partial: bool) -> list[tuple[str, DuQuantLinear]]:
    """(pack layer name, module) of every calibrated static-mode layer, in the pack's layer order."""
    static = [(m, mod) for m, mod in model.named_modules()
              if isinstance(mod, DuQuantLinear) and mod.abits and mod.act_mode == "static"]
    if not static:
        raise PackError("the model has no static-mode DuQuantLinear layers with activation quantization: "
                        "nothing to calibrate")
    waiting = [f"{m} ({mod.calib_calls}/{mod.calib_steps} calls)" for m, mod in static if mod.act_scale is None]
    if waiting and not partial:
        raise PackError(f"{len(waiting)} layer(s) still calibrating: {', '.join(waiting[:3])}"
                        f"{', ...' if len(waiting) > 3 else ''}; run more forward passes, or partial=True "
                        "to save only the calibrated layers")
    by_name: dict[str, tuple[str, DuQuantLinear]] = {}
    for mname, mod in static:
        if mod.act_scale is None:
            continue
        name = mod.name
        if name in by_name:
            raise PackError(f"modules '{by_name[name][0]}' and '{mname}' both carry pack layer '{name}'")
        if name not in pack.layer_names:
            raise PackError(f"module '{mname}' holds pack layer '{name}', which is not a layer of {pack.path} "
                            "(was the model built from another pack?)")
        e = pack.entry(name)
        if mod.in_features != e["in_features"] or mod.out_features != e["out_features"]:
            raise PackError(f"module '{mname}' is {mod.out_features}x{mod.in_features}, pack layer '{name}' "
                            f"is {e['out_features']}x{e['in_features']}")
        key = getattr(mod, "layer_key", None)
        if key is None:  # built by from_linear directly: compare its transforms with the pack's
            lp = pack.layer(name)
            same = torch.equal(mod.r_in.detach().cpu(), lp.r_in) and (
                (mod.perm is None and lp.perm is None) or
                (mod.perm is not None and lp.perm is not None and torch.equal(mod.perm.cpu(), lp.perm)))
            key = e["layer_key"] if same else "other transforms"
        if key != e["layer_key"]:
            raise PackError(f"module '{mname}' was built from other transforms than layer '{name}' of "
                            f"{pack.path} (another pack or an older revision)")
        by_name[name] = (mname, mod)
    if not by_name:
        raise PackError("no layer has finished calibrating; run forward passes first")
    return [(n, by_name[n][1]) for n in pack.layer_names if n in by_name]


def _common_settings(layers: list[tuple[str, DuQuantLinear]]) -> dict:
    """The activation settings shared by every saved layer (they are recorded once)."""
    seen = {(int(m.abits), float(m.act_percentile), int(m.calib_steps)) for _, m in layers}
    if len(seen) != 1:
        raise PackError(f"the calibrated layers use different activation settings (abits, act_percentile, "
                        f"calib_steps) {sorted(seen)[:3]}; one calibration file holds one setting")
    abits, pct, steps = seen.pop()
    return {"abits": abits, "act_percentile": pct, "calib_steps": steps, "act_mode": "static"}


def _write_scales(cal_dir: Path, layers: list[tuple[str, DuQuantLinear]], keys: list[str],
                  settings: dict) -> tuple[str, str]:
    """Write the HDF5 file under a temporary name, fsync, rename to act_scales.<sha16>.h5."""
    names = [n for n, _ in layers]
    with atomic_file(cal_dir / "act_scales.h5") as t:
        with h5_image(t.tmp) as f:
            f.attrs["format"] = CALIBRATION_FORMAT_NAME
            f.attrs["format_version"] = CALIBRATION_FORMAT_VERSION
            f.attrs["names"] = json.dumps(names)
            f.attrs["layer_keys"] = json.dumps(keys)
            for key in ("abits", "act_mode", "act_percentile", "calib_steps"):
                f.attrs[key] = settings[key]
            for dname, (_, mod) in zip(calibration_dataset_names(len(layers)), layers):
                arr = np.ascontiguousarray(mod.act_scale.detach().to("cpu", torch.float32).numpy(), dtype="<f4")
                f.create_dataset(dname, data=arr, track_times=False)
        digest = file_sha256(t.tmp)
        t.final = cal_dir / f"act_scales.{digest[:16]}.h5"
    final = t.final
    return f"{CALIBRATION_DIR}/{final.name}", digest


__all__ = ["save_calibration"]
