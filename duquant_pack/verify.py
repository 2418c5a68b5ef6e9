"""`duquant-pack verify`: is a pack intact, and (with a checkpoint) was it built from these weights?

    problems = verify_pack("packs/pi05-w4a8", ckpt="ckpts/pi05")   # [] when everything holds
    summary = verify_summary(problems, "packs/pi05-w4a8", "ckpts/pi05")   # the --json object
"""

from __future__ import annotations

from pathlib import Path

import torch

from duquant_runtime.atomic import TMP_PREFIX
from duquant_runtime.errors import DuquantError, PackError
from duquant_runtime.fingerprint import weight_fingerprint
from duquant_runtime.format import CALIBRATION_DIR, LAYERS_DIR, PENDING_NAME
from duquant_runtime.pack import load_pack
from duquant_runtime.transforms import restore_weight, transform_weight

from .checkpoint import Checkpoint
from .errors import CheckpointError

ROUNDTRIP_RTOL = 1e-4
ROUNDTRIP_ATOL = 1e-6


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or err.__class__.__name__


def verify_pack(pack_dir, ckpt=None) -> list[str]:
    """Check the pack at `pack_dir` (and, with `ckpt`, its agreement with that checkpoint); return
    one line per problem, [] when everything holds. Pack and checkpoint problems never raise.

    Pack checks:
      - the manifest loads (`load_pack`: exists, is JSON, format name and version known, schema,
        config_hash matches config). When it does not, that is the only line returned;
      - `totals` agree with the layer entries (layer count, weights, layer_bytes vs the files);
      - every layer file and the calibration file, if any (`Pack.verify`: sha256 against the
        manifest, datasets, dtypes, shapes, rotations orthogonal to 1e-5, permutations valid,
        scales finite and positive);
      - stray files: every entry of ``layers/`` (and ``calibration/``) that the manifest does not
        reference is a problem, except temporary files (``.tmp-*``, an in-progress or interrupted
        write, which the next build or save deletes). When ``.pending.json`` exists (a rebuild
        over this pack has not finished; the manifest's pack is still valid, docs/format.md §1),
        unreferenced files belong to that rebuild and are not reported.

    Checkpoint checks (`ckpt`: anything `Checkpoint` accepts; a `CheckpointError` becomes a line):
      - the checkpoint fingerprint (file names, sizes, headers) equals the manifest's;
      - per layer: tensor ``<name>.weight`` exists, is 2-D with shape (out_features, in_features),
        is readable as finite float32, its `weight_fingerprint` equals the entry's, and
        restore_weight(transform_weight(W)) reproduces W within 1e-4 * max|W| + 1e-6 (the
        round trip is skipped for layers whose file failed the pack checks).
    """
    path = Path(pack_dir)
    try:
        pack = load_pack(path)
    except PackError as err:
        return [_one_line(err)]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        return [f"{path}: cannot load the pack ({err.__class__.__name__}: {_one_line(err)})"]

    problems: list[str] = []
    m = pack.manifest
    problems += _check_totals(path, m)
    try:
        problems += pack.verify()
    except Exception as err:  # a failure the reader did not anticipate: still one line, not a crash
        problems.append(f"{path}: verifying the layer files failed ({err.__class__.__name__}: {_one_line(err)})")
    problems += _stray_files(path, m)
    if ckpt is not None:
        problems += _check_checkpoint(pack, ckpt)
    return problems


def _check_totals(path: Path, m: dict) -> list[str]:
    out = []
    totals, entries = m["totals"], m["layers"]
    weights = sum(e["in_features"] * e["out_features"] for e in entries)
    if totals.get("layers") != len(entries):
        out.append(f"{path}/manifest.json: totals.layers is {totals.get('layers')!r}, the manifest lists {len(entries)}")
    if totals.get("weights") != weights:
        out.append(f"{path}/manifest.json: totals.weights is {totals.get('weights')!r}, the layers hold {weights}")
    sizes = []
    for e in entries:
        try:
            sizes.append((path / e["file"]).stat().st_size)
        except OSError:
            return out  # a missing file is reported by Pack.verify; the byte total is meaningless then
    if totals.get("layer_bytes") != sum(sizes):
        out.append(f"{path}/manifest.json: totals.layer_bytes is {totals.get('layer_bytes')!r}, "
                   f"the layer files hold {sum(sizes)}")
    return out


def _stray_files(path: Path, m: dict) -> list[str]:
    if (path / PENDING_NAME).exists():
        return []
    out = []
    wanted = {LAYERS_DIR: {Path(e["file"]).name for e in m["layers"]},
              CALIBRATION_DIR: {Path(m["calibration"]["file"]).name} if "calibration" in m else set()}
    for sub, keep in wanted.items():
        d = path / sub
        if not d.is_dir():
            continue
        try:
            names = sorted(p.name for p in d.iterdir())
        except OSError as err:
            out.append(f"{d}: cannot list ({_one_line(err)})")
            continue
        for name in names:
            if name not in keep and not name.startswith(TMP_PREFIX):
                out.append(f"{d / name}: not referenced by the manifest (stray file)")
    return out


def _check_checkpoint(pack, ckpt) -> list[str]:
    try:
        ck = Checkpoint(ckpt)
        fp = ck.fingerprint()
    except CheckpointError as err:
        return [f"checkpoint: {_one_line(err)}"]
    except OSError as err:
        return [f"checkpoint: {ckpt}: cannot read ({err.__class__.__name__}: {_one_line(err)})"]
    out = []
    want = pack.manifest["checkpoint"].get("sha256")
    if fp["sha256"] != want:
        out.append(f"checkpoint: {ckpt}: fingerprint {fp['sha256'][:16]} differs from the manifest's "
                   f"{str(want)[:16]} (other files, sizes or headers)")
    for e in pack.manifest["layers"]:
        name = e["name"]
        key = name + ".weight"
        info = ck.tensors.get(key)
        if info is None:
            out.append(f"layer '{name}': tensor '{key}' not in the checkpoint")
            continue
        shape = (e["out_features"], e["in_features"])
        if tuple(info.shape) != shape:
            out.append(f"layer '{name}': checkpoint tensor has shape {list(info.shape)}, the pack says "
                       f"{list(shape)} (out, in)")
            continue
        try:
            w = ck.read_weight(key)
        except CheckpointError as err:
            out.append(f"layer '{name}': {_one_line(err)}")
            continue
        fpw = weight_fingerprint(w)
        if fpw != e["weight_fingerprint"]:
            out.append(f"layer '{name}': weight fingerprint {fpw[:21]} differs from the manifest's "
                       f"{e['weight_fingerprint'][:21]} (the pack was built from other weights)")
        try:
            lp = pack.layer(name)
        except DuquantError:
            continue  # already reported by Pack.verify
        err = roundtrip_error(w, lp)
        tol = ROUNDTRIP_RTOL * float(w.abs().max()) + ROUNDTRIP_ATOL
        if not err <= tol:  # also catches NaN
            out.append(f"layer '{name}': transforms do not invert: max |restore(transform(W)) - W| = "
                       f"{err:.3e} > {tol:.3e}")
    return out


def roundtrip_error(w: torch.Tensor, lp) -> float:
    """max |restore_weight(transform_weight(W)) - W| for a float32 W (out, in) and a LayerPack."""
    w_t = transform_weight(w, lp.perm, lp.r_in, lp.r_out)
    back = restore_weight(w_t, lp.perm, lp.r_in, lp.r_out)
    return float((back - w).abs().max()) if w.numel() else 0.0


def verify_summary(problems: list[str], pack_dir, ckpt) -> dict:
    """The --json object: {"ok", "problems", "layers_checked", "checked_checkpoint"}.

    ``layers_checked`` is the number of layer entries in the manifest (0 when it did not load);
    ``checked_checkpoint`` is whether a checkpoint was given.
    """
    try:
        n = len(load_pack(pack_dir).manifest["layers"])
    except Exception:
        n = 0
    return {"ok": not problems, "problems": list(problems), "layers_checked": n,
            "checked_checkpoint": ckpt is not None}


__all__ = ["verify_pack", "verify_summary", "roundtrip_error"]
