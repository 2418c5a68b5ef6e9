"""The parallel, resumable, deterministic pack build.

    summary = build_pack("ckpt_dir", "packs/out", cfg, jobs=2)

Order of work: open and check the checkpoint, select layers, check the output directory (all
before anything is written); lock the directory; compute every layer in joblib worker processes
(each opens the checkpoint itself, computes single-threaded so results do not depend on the job
count, and writes its own layer file); write the manifest last (the commit point); delete layer
files no longer referenced.

Layer files are named ``layers/<name>.<key16>.h5`` where the key hashes the layer name, its
settings, the algorithm version and the weight's fingerprint: an existing file with that name is
the finished result of the same computation and is reused (resume, incremental rebuild), and a
previous pack in the directory stays intact until the new manifest replaces its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from duquant_runtime import __version__
from duquant_runtime.atomic import LOCK_NAME, TMP_PREFIX, fsync_dir, pack_lock, write_json_atomic
from duquant_runtime.errors import PackError
from duquant_runtime.fingerprint import weight_fingerprint
from duquant_runtime.format import (PENDING_NAME, CALIBRATION_DIR, FORMAT_NAME, FORMAT_VERSION, LAYERS_DIR, MANIFEST,
                                    canonical_json, config_hash, file_sha256)
from duquant_runtime.pack import load_pack

from .checkpoint import Checkpoint
from .config import BuildConfig
from .errors import BuildError, CheckpointError
from .act_stats import check_stats_file, layer_stats_digest, read_layer_stats, write_offline_calibration
from .layer import ALGORITHM_VERSION, LayerSpec, compute_input_side, compute_layer
from .parallel import BACKENDS, run_unordered
from .selection import SelectedLayer, select_layers
from .shared_inputs import input_groups
from .writer import reusable_entry, write_layer_file

_OWN_ENTRIES = {MANIFEST, LAYERS_DIR, LOCK_NAME, PENDING_NAME, CALIBRATION_DIR}


@dataclass
class BuildSummary:
    out_dir: Path
    config_hash: str
    layers: int
    computed: int
    reused: int
    weights: int
    seconds: float
    pack_bytes: int
    entries: list = field(default_factory=list)

    @property
    def weights_per_second(self) -> float:
        return self.weights / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "config_hash": self.config_hash, "layers": self.layers,
                "computed": self.computed, "reused": self.reused, "weights": self.weights,
                "seconds": round(self.seconds, 3), "weights_per_second": round(self.weights_per_second),
                "pack_bytes": self.pack_bytes}


def layer_file_name(name: str, key: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:180]
    return f"{LAYERS_DIR}/{safe}.{key[:16]}.h5"


def layer_key(name: str, spec: LayerSpec, weight_fp: str, device: str = "cpu", group: list | None = None) -> str:
    """Identity of one layer's computation. A CUDA build's float rounding differs from the CPU's,
    so its files get their own keys (and a CPU rebuild never reuses them, nor the reverse).
    `group`: [name, weight fingerprint, statistics digest] of every member of a shared input
    transform (the transform depends on all of them)."""
    ident = {"algorithm": ALGORITHM_VERSION, "format": FORMAT_VERSION, "name": name,
             "spec": spec.to_dict(), "weight": weight_fp}
    if device != "cpu":
        ident["device"] = device
    if group is not None:
        ident["input_group"] = group
    return hashlib.sha256(canonical_json(ident).encode()).hexdigest()


# --- worker side -------------------------------------------------------------------------------

_CKPT_CACHE: dict[tuple[str, str, str], Checkpoint] = {}


def _checkpoint(path: str, fingerprint: str, build_id: str) -> Checkpoint:
    """The checkpoint at `path`, opened once per worker process and build (never reused by a later
    build: the file may have been rewritten with equal headers); it must still be the one the
    driver selected layers from (same header fingerprint)."""
    key = (path, fingerprint, build_id)
    ck = _CKPT_CACHE.get(key)
    if ck is None:
        ck = Checkpoint(path)
        if ck.fingerprint()["sha256"] != fingerprint:
            raise CheckpointError(f"{path}: checkpoint changed during the build; rerun")
        _CKPT_CACHE.clear()  # one checkpoint at a time: drop handles of earlier ones
        _CKPT_CACHE[key] = ck
    return ck


@contextmanager
def _single_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def build_one_layer(ckpt_path: str, ckpt_fp: str, build_id: str, layer: SelectedLayer, spec: LayerSpec,
                    out_dir: str, act_stats: str | None = None, device: str = "cpu") -> dict:
    """Read, fingerprint, compute (or reuse) and write one layer; returns its manifest entry.
    On the CPU the computation is single-threaded (results do not depend on the job count)."""
    return build_input_group(ckpt_path, ckpt_fp, build_id, [layer], [spec], out_dir, act_stats, device)[0]


def build_input_group(ckpt_path: str, ckpt_fp: str, build_id: str, layers: list[SelectedLayer],
                      specs: list[LayerSpec], out_dir: str, act_stats: str | None = None,
                      device: str = "cpu") -> list[dict]:
    """`build_one_layer` for layers that share one input transform (shared_inputs.py), computed
    from their weights stacked row-wise (the first member's activation statistics); a single
    layer is a group of one with its own transform. Returns one result per layer."""
    t0 = time.perf_counter()
    grouped = len(layers) > 1
    with (_single_thread() if device == "cpu" else nullcontext()):
        ck = _checkpoint(ckpt_path, ckpt_fp, build_id)
        fps, weights = [], []
        for layer in layers:  # fingerprints first: the keys of all members depend on all of them
            raw = ck.read_weight(layer.key, dtype=None)
            fps.append(weight_fingerprint(raw))  # of the stored dtype: bf16 bytes hash directly
            weights.append(raw.to(torch.float32) if device == "cpu" else raw.to(device).to(torch.float32))
            del raw
        if act_stats is not None:  # the layer's statistics are part of its computation (act_stats.py)
            specs = [replace(spec, act_stats=layer_stats_digest(act_stats, layer.name))
                     for layer, spec in zip(layers, specs)]
        ident = [[layer.name, fp, spec.act_stats] for layer, fp, spec in zip(layers, fps, specs)] if grouped else None
        keys = [layer_key(layer.name, spec, fp, _device_kind(device), ident)
                for layer, spec, fp in zip(layers, specs, fps)]
        rels = [layer_file_name(layer.name, key) for layer, key in zip(layers, keys)]
        paths = [Path(out_dir) / rel for rel in rels]
        entries = [reusable_entry(path, key) if path.is_file() else None for path, key in zip(paths, keys)]
        reused = all(e is not None for e in entries)
        if not reused:
            stats = [read_layer_stats(act_stats, layer.name, layer.in_features, xtx=spec.rounding == "gptq")
                     if act_stats else None for layer, spec in zip(layers, specs)]
            shared = None
            if grouped:
                stacked = torch.cat(weights)
                shared = compute_input_side(stacked, specs[0], stats[0])
                del stacked
            for i, (layer, spec) in enumerate(zip(layers, specs)):
                res = compute_layer(weights[i], spec, stats[i], shared)
                weights[i] = None
                entries[i] = _new_entry(layer, spec, keys[i], rels[i], fps[i], res,
                                        [m.name for m in layers] if grouped else None)
                write_layer_file(paths[i], name=layer.name, layer_key=keys[i], weight_fingerprint=fps[i],
                                 perm=res.perm, r_in=res.r_in, r_out=res.r_out, weight_scale=res.weight_scale,
                                 entry_json=canonical_json(entries[i]), qweight=res.qweight, smooth=res.smooth)
                del res
        for layer, entry, path in zip(layers, entries, paths):
            # the file holds what depends on the layer key only; these depend on this build
            entry["source_dtype"] = layer.dtype
            entry["sha256"] = file_sha256(path)
    seconds = (time.perf_counter() - t0) / len(layers)
    return [{"entry": entry, "reused": reused, "seconds": seconds} for entry in entries]


def _new_entry(layer: SelectedLayer, spec: LayerSpec, key: str, rel: str, fp: str, res, group: list | None) -> dict:
    """The manifest entry of a freshly computed layer (also stored in its file)."""
    entry = {"name": layer.name, "file": rel, "in_features": layer.in_features,
             "out_features": layer.out_features, "wbits": spec.wbits, "block_in": res.block_in,
             "block_out": res.block_out, "permuted": res.perm is not None,
             "weight_fingerprint": fp, "layer_key": key, "stats": res.stats}
    if res.qweight is not None:
        entry["qweight"] = True
    if res.smooth is not None:
        entry["smoothed"] = True
    if spec.group_size and res.weight_scale is not None:
        entry["group_size"] = spec.group_size
    if group is not None:
        entry["input_group"] = group
    return entry


# --- driver side -------------------------------------------------------------------------------

def inspect_out_dir(out: Path, identity: dict, overwrite: bool) -> None:
    """Refuse to build into a directory holding something else, unless --overwrite for our own packs."""
    if not out.exists():
        return
    if not out.is_dir():
        raise BuildError(f"{out}: exists and is not a directory")
    entries = {p.name for p in out.iterdir()}
    foreign = {e for e in entries - _OWN_ENTRIES if not e.startswith(TMP_PREFIX)}
    if foreign:
        raise BuildError(f"{out}: not empty and not a duquant pack (found {sorted(foreign)[:3]}); "
                         "choose another --out")
    previous = None
    if MANIFEST in entries:
        try:
            m = load_pack(out).manifest
            previous = {"config_hash": m["config_hash"], "checkpoint": m["checkpoint"]["sha256"]}
        except PackError as err:
            if not overwrite:
                raise BuildError(f"{out}: holds an unreadable pack ({err}); use --overwrite to replace it") from None
    elif PENDING_NAME in entries:
        try:
            previous = json.loads((out / PENDING_NAME).read_text())
        except (OSError, ValueError):
            previous = None
    if previous is not None and previous != identity and not overwrite:
        what = "configuration" if previous.get("config_hash") != identity["config_hash"] else "checkpoint"
        raise BuildError(f"{out}: holds a pack of a different {what} ({previous.get('config_hash', '?')[:19]}); "
                         "use --overwrite to replace it, or another --out")


def default_out_dir(ckpt_path: Path, cfg_hash: str, preset: str | None, root: Path = Path("packs")) -> Path:
    base = ckpt_path.name if ckpt_path.is_dir() else ckpt_path.parent.name
    return root / f"{base or 'checkpoint'}-{preset or 'custom'}-{cfg_hash.split(':')[1][:8]}"


def build_pack(ckpt_path, out_dir, cfg: BuildConfig, *, preset: str | None = None, jobs: int | None = None,
               overwrite: bool = False, progress: bool = True, act_stats=None, device: str = "cpu",
               backend: str = "local", scheduler: str | None = None) -> BuildSummary:
    """Build (or resume, or refresh) the pack of `cfg` for a checkpoint into `out_dir`.

    act_stats: the activation statistics file (duquant_runtime.collect_stats) whose id
    (act_stats.stats_file_id) is `cfg.act_stats`; needed exactly when that is set."""
    t0 = time.perf_counter()
    act_stats = check_stats_file(cfg, act_stats)
    device = check_device(device)
    if backend not in BACKENDS:
        raise BuildError(f"unknown backend '{backend}' (choose {', '.join(BACKENDS)})")
    if backend == "dask" and not scheduler:
        raise BuildError("--backend dask needs --scheduler ADDRESS (the address of a running Dask scheduler)")
    ckpt = Checkpoint(ckpt_path)
    selected = select_layers(ckpt, cfg)
    chash = config_hash(cfg.to_dict())
    out = Path(out_dir)
    identity = {"config_hash": chash, "checkpoint": ckpt.fingerprint()["sha256"]}
    inspect_out_dir(out, identity, overwrite)
    # jobs: CPU worker processes, or threads feeding the GPU (default 4)
    jobs = _resolve_jobs(jobs) if device == "cpu" or backend != "local" else (jobs if jobs and jobs > 0 else 4)
    run = dict(jobs=jobs, device=device, backend=backend, scheduler=scheduler)

    created = missing_ancestors(out)  # directories this build creates, innermost first
    out.mkdir(parents=True, exist_ok=True)
    with pack_lock(out, BuildError, "another build is writing this pack"):
        try:
            inspect_out_dir(out, identity, overwrite)  # again, now that we hold the lock
            manifest, results = _build_locked(ckpt, selected, cfg, preset, out, identity, run, progress, act_stats)
        except BaseException as err:
            if not isinstance(err, KeyboardInterrupt):  # an interrupted build keeps its files to resume
                remove_created(out, created)
            raise
    reused = sum(1 for r in results if r["reused"])
    entries = manifest["layers"]
    return BuildSummary(out_dir=out, config_hash=chash, layers=len(entries), computed=len(entries) - reused,
                        reused=reused, weights=manifest["totals"]["weights"],
                        seconds=time.perf_counter() - t0,
                        pack_bytes=manifest["totals"]["layer_bytes"] + (out / MANIFEST).stat().st_size,
                        entries=entries)


def _build_locked(ckpt: Checkpoint, selected: list[SelectedLayer], cfg: BuildConfig, preset: str | None,
                  out: Path, identity: dict, run: dict, progress: bool,
                  act_stats: str | None = None) -> tuple[dict, list[dict]]:
    """The build proper, under the lock. `run`: jobs, device, backend, scheduler (see build_pack)."""
    layers_dir = out / LAYERS_DIR
    layers_dir.mkdir(exist_ok=True)
    cal_dir = out / CALIBRATION_DIR
    for stale in (*out.glob(TMP_PREFIX + "*"), *layers_dir.glob(TMP_PREFIX + "*"),
                  *(cal_dir.glob(TMP_PREFIX + "*") if cal_dir.is_dir() else ())):
        stale.unlink()  # left by a killed build or save (we hold the lock: nobody is writing them)
    before = {p.name for p in layers_dir.iterdir()}
    write_json_atomic(out / PENDING_NAME, identity)
    try:
        results = _run_layers(str(ckpt.path), identity["checkpoint"], selected, cfg, str(out), progress,
                              act_stats, **run)
    except BaseException as err:
        if not isinstance(err, KeyboardInterrupt):  # an interrupted build keeps its files to resume
            discard_new_layer_files(out, before)
        raise
    by_name = {r["entry"]["name"]: r["entry"] for r in results}
    entries = [by_name[s.name] for s in selected]
    cfg_dict = cfg.to_dict()
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "tool": {"name": "duquant", "version": __version__, "algorithm_version": ALGORITHM_VERSION,
                 **({"device": _device_kind(run["device"])} if run["device"] != "cpu" else {})},
        "preset": preset, "config": cfg_dict, "config_hash": identity["config_hash"],
        "checkpoint": ckpt.fingerprint(), "layers": entries,
        "totals": {"layers": len(entries), "weights": sum(s.numel for s in selected),
                   "layer_bytes": sum((out / e["file"]).stat().st_size for e in entries)},
    }
    calibration = _kept_calibration(out, entries)
    if act_stats is not None:  # static activation scales computed offline from the statistics
        calibration = write_offline_calibration(out, entries, act_stats, cfg) or calibration
    if calibration is not None:
        manifest["calibration"] = calibration
    write_json_atomic(out / MANIFEST, manifest)  # the commit point
    (out / PENDING_NAME).unlink(missing_ok=True)
    prune_calibration(cal_dir, calibration)
    keep = {Path(e["file"]).name for e in entries}
    for p in layers_dir.iterdir():
        if p.name not in keep:
            p.unlink()
    fsync_dir(layers_dir)
    return manifest, results


def _kept_calibration(out: Path, entries: list[dict]) -> dict | None:
    """The previous manifest's saved activation scales (duquant_runtime.save_calibration), kept only
    when the new manifest lists exactly the same layer entries; any change drops them."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        prev = load_pack(out).manifest
    except PackError:
        return None
    if "calibration" not in prev or prev["layers"] != json.loads(json.dumps(entries)):
        return None
    return prev["calibration"]


def prune_calibration(cal_dir: Path, calibration: dict | None) -> None:
    """After the commit: delete calibration files the new manifest does not reference."""
    if not cal_dir.is_dir():
        return
    keep = Path(calibration["file"]).name if calibration is not None else None
    for p in cal_dir.iterdir():
        if p.name != keep:
            p.unlink()
    if keep is None:
        cal_dir.rmdir()
    else:
        fsync_dir(cal_dir)


def discard_new_layer_files(out: Path, before: set) -> None:
    """After a failed write: delete the layer files not in `before` (the names present when the
    write began), and the pending marker when the directory held no layer files then."""
    for p in (out / LAYERS_DIR).iterdir():
        if p.name not in before:
            p.unlink(missing_ok=True)
    if not before:
        (out / PENDING_NAME).unlink(missing_ok=True)


def missing_ancestors(out: Path) -> list[Path]:
    """`out` and its ancestors that do not exist yet, innermost first."""
    missing = []
    p = out.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def remove_created(out: Path, created: list[Path]) -> None:
    """After a failed write: remove `out` and the ancestors this writer created (`created`, innermost
    first, from `missing_ancestors`) when `out` holds only scaffolding. Call it only while holding the
    directory's lock: a writer that lost the race for the lock must not delete the holder's directory."""
    if not created or not only_scaffolding(out):
        return
    shutil.rmtree(out, ignore_errors=True)
    for parent in created[1:]:
        try:
            parent.rmdir()  # only if still empty
        except OSError:
            break


def only_scaffolding(out: Path) -> bool:
    """True when `out` holds nothing but an empty layers/ dir, the lock and the pending marker."""
    if not out.is_dir():
        return False
    for p in out.iterdir():
        if p.name == LAYERS_DIR and p.is_dir() and not any(p.iterdir()):
            continue
        if p.name in (LOCK_NAME, PENDING_NAME):
            continue
        return False
    return True


def _resolve_jobs(jobs: int | None) -> int:
    n = os.cpu_count() or 1
    if jobs is None or jobs == 0:
        return n
    if jobs < 0:
        return max(1, n + 1 + jobs)
    return jobs


def check_device(device: str) -> str:
    """'cpu', or a CUDA device ('cuda', 'cuda:N') that exists; else a BuildError."""
    if device == "cpu":
        return device
    if not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise BuildError(f"--device: '{device}' is not 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise BuildError(f"--device {device}: no CUDA device is available (torch {torch.__version__})")
    index = int(device[5:]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise BuildError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    # initialise cuBLAS and cuSOLVER here, once: their lazy initialisation is not thread-safe
    g = torch.eye(4, dtype=torch.float64, device=device)
    torch.linalg.eigh(torch.bmm(g[None], g[None]))
    torch.cuda.synchronize(device)
    return device


def _device_kind(device: str) -> str:
    return device.split(":")[0]


def _run_layers(ckpt_path: str, ckpt_fp: str, selected: list[SelectedLayer], cfg: BuildConfig, out: str,
                progress: bool, act_stats: str | None, jobs: int, device: str, backend: str,
                scheduler: str | None) -> list[dict]:
    # one task per layer or shared-input group; biggest first: better load balance (results do not
    # depend on the order)
    groups = input_groups(selected, cfg)
    in_group = {m.name for g in groups for m in g}
    tasks = groups + [[s] for s in selected if s.name not in in_group]
    tasks.sort(key=lambda t: (-sum(s.numel for s in t), t[0].name))
    build_id = f"{os.getpid()}-{time.time_ns()}"
    args = [(ckpt_path, ckpt_fp, build_id, t, [cfg.layer_spec(s.name) for s in t], out, act_stats, device)
            for t in tasks]
    if backend == "local" and device != "cpu":
        backend = "threads"  # one process feeds the GPU; threads overlap reading/hashing/writing
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(s.numel for s in selected), unit="w", unit_scale=True, desc="packing",
                   dynamic_ncols=True, leave=False)
    results = []
    try:
        for rs in run_unordered(build_input_group, args, backend=backend, jobs=jobs, scheduler=scheduler):
            results.extend(rs)
            if bar is not None:
                bar.update(sum(r["entry"]["in_features"] * r["entry"]["out_features"] for r in rs))
                bar.set_postfix_str(f"{len(results)}/{len(selected)} layers")
    finally:
        if bar is not None:
            bar.close()
    return results


__all__ = ["build_pack", "BuildSummary", "default_out_dir", "layer_key", "build_one_layer", "build_input_group"]
