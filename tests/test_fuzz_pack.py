"""Seeded fuzzing of the pack reader (docs/reliability.md §5).

Each case copies one of two small valid packs (tests/_reliability_util.py; one with stored
integers, output rotations and four bit widths, one without permutation or output rotations) and
applies one to three seeded mutations: of the manifest (as JSON: a field deleted, retyped or
changed; as text: truncated, bytes flipped, deep nesting, a huge number) or of a layer file (bytes
flipped, truncated, zeroed, appended; a dataset rewritten with another dtype, shape or NaN/Inf,
deleted or renamed; a dataset, group, attribute or link added; the stored integers changed), most
layer-file mutations followed by fixing the manifest's checksums so that the HDF5 parser and the
content checks see the damage. Every outcome must be one of:

- `load_pack` raises `PackError`;
- `Pack.verify()` returns problems (one line each), and every `pack.layer()` either raises
  `PackError` or returns;
- `Pack.verify()` returns [] and every layer reads and runs: `DuQuantLinear.from_linear` and a
  forward give finite outputs.

Any other exception type, a hang (a per-case alarm) or a crash (the cases run in a child process)
fails the test. `duquant_pack.verify.verify_pack` must never raise either, and must report a
problem whenever the runtime does. `DUQUANT_FUZZ_CASES=N` runs N cases (default 300).
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
CASES = int(os.environ.get("DUQUANT_FUZZ_CASES", "300"))
SEED = 7919
CASE_TIMEOUT_S = 20


# --- manifest mutations ----------------------------------------------------------------------------

_ODD_VALUES = [None, True, False, 0, -1, 1, 2 ** 63, 10 ** 30, 1.5, float("inf"), "", "x", "../../etc/passwd",
               "/abs", [], {}, [1, 2], {"a": 1}, "layers/../manifest.json", "sha256:" + "0" * 64]


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def mutate_manifest_json(m: dict, rng: random.Random) -> str:
    """Change one node of the parsed manifest; returns a description."""
    paths = [p for p, _ in _paths(m) if p]
    path = rng.choice(paths)
    parent, key = _get(m, path[:-1]), path[-1]
    value = parent[key]
    op = rng.choice(["delete", "odd", "odd", "number", "string", "container"])
    if op == "delete":
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    elif op == "odd":
        parent[key] = copy.deepcopy(rng.choice(_ODD_VALUES))
    elif op == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[key] = rng.choice([value + 1, value - 1, value * 2, -value, 0, value // 2 if isinstance(value, int)
                                  else value / 2, 1 << rng.randrange(1, 70)])
    elif op == "string" and isinstance(value, str):
        parent[key] = rng.choice([value[: rng.randrange(len(value) + 1)], value + "x", value.upper(),
                                  value.replace("layers/", "layers/../"), "\u2603" + value, value[::-1]])
    elif op == "container" and isinstance(value, list) and value:
        choice = rng.randrange(3)
        if choice == 0:
            value.pop(rng.randrange(len(value)))
        elif choice == 1:
            value.append(copy.deepcopy(rng.choice(value)))
        else:
            rng.shuffle(value)
    elif op == "container" and isinstance(value, dict):
        value[rng.choice(["extra", "qweight", "group_size", "smoothed", "calibration"])] = \
            copy.deepcopy(rng.choice(_ODD_VALUES))
    else:
        parent[key] = copy.deepcopy(rng.choice(_ODD_VALUES))
        op = "odd"
    return f"manifest {op} at {'/'.join(map(str, path))}"


def mutate_manifest(pack: Path, rng: random.Random) -> str:
    from duquant_runtime.format import config_hash
    mpath = pack / "manifest.json"
    kind = rng.random()
    try:
        m = json.loads(mpath.read_text())
    except (ValueError, RecursionError):  # damaged by an earlier mutation: damage the text further
        m, kind = None, max(kind, 0.6)
    if kind < 0.6 and isinstance(m, (dict, list)) and m:
        what = mutate_manifest_json(m, rng)
        if rng.random() < 0.5 and isinstance(m.get("config"), dict):  # keep the hash consistent: go deeper
            try:
                m["config_hash"] = config_hash(m["config"])
                what += " (config_hash fixed)"
            except ValueError:
                pass
        mpath.write_text(json.dumps(m, indent=2, sort_keys=True))
        return what
    raw = bytearray(mpath.read_bytes()) or bytearray(b"{}")
    if kind < 0.75:
        cut = rng.randrange(len(raw))
        mpath.write_bytes(bytes(raw[:cut]))
        return f"manifest truncated at {cut}"
    if kind < 0.9:
        n = rng.randint(1, 4)
        for _ in range(n):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        mpath.write_bytes(bytes(raw))
        return f"manifest {n} bits flipped"
    if kind < 0.95:
        mpath.write_bytes(b"[" * rng.choice([1000, 100000]) + bytes(raw))
        return "manifest deeply nested"
    mpath.write_bytes(raw.replace(b'"format_version": 2', b'"format_version": ' + b"9" * 5000, 1))
    return "manifest 5000-digit number"


# --- layer file mutations --------------------------------------------------------------------------

def _layer_path(pack: Path, rng: random.Random) -> Path:
    files = sorted(p for p in (pack / "layers").iterdir() if not p.name.startswith("."))
    return rng.choice(files)


def mutate_layer_bytes(pack: Path, rng: random.Random) -> str:
    p = _layer_path(pack, rng)
    raw = bytearray(p.read_bytes())
    op = rng.choice(["flip", "flip", "truncate", "zero", "append"])
    if op == "flip":
        n = rng.randint(1, 8)
        for _ in range(n):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        raw = raw[: rng.randrange(len(raw))]
    elif op == "zero":
        start = rng.randrange(len(raw))
        n = min(rng.randint(1, 512), len(raw) - start)
        raw[start:start + n] = bytes(n)
    else:
        raw += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    p.write_bytes(bytes(raw))
    return f"{p.name} bytes {op}"


def _cast(value, dtype):
    """`value` as a numpy scalar of `dtype` (integers wrap around, as a corrupt file would hold them)."""
    import numpy as np
    return np.asarray(value).astype(dtype)


def mutate_layer_structure(pack: Path, rng: random.Random) -> str:
    p = _layer_path(pack, rng)
    try:
        return _mutate_structure(p, rng)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:  # an earlier mutation broke the file
        return f"{p.name} structure not editable ({err.__class__.__name__})"


def _mutate_structure(p: Path, rng: random.Random) -> str:
    import h5py
    import numpy as np
    with h5py.File(p, "r+") as f:
        keys = sorted(k for k in f.keys() if isinstance(f.get(k, getlink=True), h5py.HardLink)
                      and isinstance(f[k], h5py.Dataset))
        if not keys:
            return f"{p.name} no dataset left"
        key = rng.choice(keys)
        a = f[key][()]
        op = rng.choice(["dtype", "shape", "nonfinite", "values", "delete", "rename", "add_dataset", "add_group",
                         "attribute", "soft_link", "qweight"])
        if op == "qweight" and "qweight" in f:
            key = "qweight"
            a = f[key][()]
            new = a.copy()
            idx = tuple(rng.randrange(s) for s in a.shape)
            new[idx] = _cast(rng.choice([np.iinfo(a.dtype).max, np.iinfo(a.dtype).min, 0x70, 0x07, 0x8F]), a.dtype)
            del f[key]
            f.create_dataset(key, data=new)
        elif op == "dtype":
            dt = rng.choice([np.float64, np.float16, np.int32, np.int64, np.uint8, np.int8, np.float32, np.int16])
            del f[key]
            f.create_dataset(key, data=a.astype(dt))
        elif op == "shape":
            choice = rng.randrange(5)
            if choice == 0 and a.ndim:
                new = a[: max(0, a.shape[0] - 1)]
            elif choice == 1 and a.ndim:
                new = np.concatenate([a, a[:1]])
            elif choice == 2:
                new = a.reshape(-1)
            elif choice == 3 and a.ndim >= 2:
                new = np.swapaxes(a, -1, -2).copy()
            else:
                new = a.reshape(-1)[:1].reshape(()) if a.size else a
            del f[key]
            f.create_dataset(key, data=new)
        elif op == "nonfinite" and a.dtype.kind == "f" and a.size:
            new = a.copy()
            new.reshape(-1)[rng.randrange(a.size)] = rng.choice([np.nan, np.inf, -np.inf])
            f[key][...] = new
        elif op == "values" and a.size:
            new = a.copy()
            flat = new.reshape(-1)
            i = rng.randrange(a.size)
            if a.dtype.kind == "f":
                flat[i] = _cast(rng.choice([0.0, -flat[i], flat[i] * 1.0001, 1e30, 1e-30, flat[(i + 1) % a.size]]),
                                a.dtype)
            else:
                flat[i] = _cast(rng.choice([0, -1, int(flat[(i + 1) % a.size]), a.size, 1]), a.dtype)
            f[key][...] = new
        elif op == "delete":
            del f[key]
        elif op == "rename":
            free = [k for k in ("r_in", "r_out", "perm", "weight_scale", "qweight", "smooth") if k not in f]
            f.move(key, rng.choice(free + ["other"]))
        elif op == "add_dataset":
            name = rng.choice(["smooth", "qweight", "bias", "r_out", "perm", "weight_scale"])
            if name not in f:
                f.create_dataset(name, data=np.ones(rng.choice([1, 24, 41, 48]), dtype=rng.choice(
                    [np.float32, np.int8, np.uint8])))
        elif op == "add_group":
            f.create_group(rng.choice(["g", "smooth", "extra"]) if "smooth" not in f else "g")
        elif op == "attribute":
            f.attrs[rng.choice(["format", "format_version", "entry", "new"])] = rng.choice(["x", 99, "{}"])
        elif op == "soft_link":
            target = rng.choice(keys)
            name = rng.choice([k for k in ("r_out", "perm", "weight_scale", "smooth", "qweight") if k not in f] or ["l"])
            f[name] = h5py.SoftLink("/" + target)
        else:
            op = "none"
    return f"{p.name} {op} {key}"


def fix_checksums(pack: Path) -> bool:
    """Recompute the manifest's layer sha256 values (when it still parses with the expected shape)."""
    from duquant_runtime.format import file_sha256
    try:
        m = json.loads((pack / "manifest.json").read_text())
        for e in m["layers"]:
            p = pack / e["file"]
            if isinstance(e, dict) and "/" in e["file"] and p.is_file() and p.parent == pack / "layers":
                e["sha256"] = file_sha256(p)
    except Exception:  # a mutated manifest: leave it as it is
        return False
    (pack / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True))
    return True


def mutate(pack: Path, rng: random.Random) -> list[str]:
    done = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        kind = rng.random()
        if kind < 0.35:
            done.append(mutate_manifest(pack, rng))
        elif kind < 0.55:
            done.append(mutate_layer_bytes(pack, rng))
            if rng.random() < 0.7 and fix_checksums(pack):
                done[-1] += " (checksums fixed)"
        else:
            done.append(mutate_layer_structure(pack, rng))
            if rng.random() < 0.9 and fix_checksums(pack):
                done[-1] += " (checksums fixed)"
    return done


# --- one case --------------------------------------------------------------------------------------

class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout(f"case ran longer than {CASE_TIMEOUT_S} s")


def check_outcome(pack_dir: Path) -> str:
    """Classify a (possibly damaged) pack; raise AssertionError or let any unexpected exception out."""
    import torch
    from torch import nn
    from duquant_pack.verify import verify_pack
    from duquant_runtime import DuQuantLinear, PackError, load_pack

    compiler_lines = verify_pack(pack_dir)  # the CLI's verify: must never raise
    assert isinstance(compiler_lines, list) and all(isinstance(x, str) and "\n" not in x for x in compiler_lines)
    assert not any("verifying the layer files failed" in x or "cannot load the pack" in x for x in compiler_lines), \
        compiler_lines
    try:
        pack = load_pack(pack_dir)
    except PackError as err:
        assert "\n" not in str(err)
        assert compiler_lines, "the runtime refused the pack, verify_pack reported nothing"
        return "refused by load_pack"
    problems = pack.verify()
    assert isinstance(problems, list) and all(isinstance(x, str) and "\n" not in x for x in problems)
    if problems:
        assert compiler_lines, "Pack.verify reported problems, verify_pack nothing"
        for name in pack.layer_names:
            try:
                pack.layer(name)
            except PackError:
                pass
        return "problems reported by verify"
    g = torch.Generator().manual_seed(0)
    for name in pack.layer_names:
        lp = pack.layer(name)
        if lp.in_features * lp.out_features > 1 << 22:
            continue
        lin = nn.Linear(lp.in_features, lp.out_features)
        q = DuQuantLinear.from_linear(lin, lp, abits=8, act_mode="dynamic")
        y = q(torch.randn(2, lp.in_features, generator=g))
        assert y.shape == (2, lp.out_features) and bool(torch.isfinite(y).all()), name
    return "loads, verifies and runs"


def run_cases(bases: list[str], work: str, seeds: list[int], progress: str) -> dict:
    """Run the cases; returns {"outcomes": {kind: count}, "failures": [...]}. Writes the current
    case to `progress` first, so a crash or hang can be attributed."""
    signal.signal(signal.SIGALRM, _alarm)
    outcomes: dict[str, int] = {}
    failures = []
    for seed in seeds:
        rng = random.Random(SEED * 1_000_003 + seed)
        base = Path(rng.choice(bases))
        d = Path(work) / f"case{seed}"
        shutil.copytree(base, d)
        Path(progress).write_text(json.dumps({"seed": seed, "base": base.name, "mutations": "(mutating)"}))
        what = mutate(d, rng)
        Path(progress).write_text(json.dumps({"seed": seed, "base": base.name, "mutations": what}))
        signal.alarm(CASE_TIMEOUT_S)
        try:
            kind = check_outcome(d)
            outcomes[kind] = outcomes.get(kind, 0) + 1
        except BaseException as err:  # noqa: BLE001 - the point: anything but the above is a failure
            failures.append({"seed": seed, "base": base.name, "mutations": what,
                             "error": f"{err.__class__.__name__}: {' '.join(str(err).split())[:300]}"})
        finally:
            signal.alarm(0)
        shutil.rmtree(d)
    return {"outcomes": outcomes, "failures": failures}


def build_bases(root: Path) -> list[str]:
    """Two small packs of one checkpoint: A (SMALL_CFG: stored integers, output rotations, 0/3/4/8
    bits) and B (no permutation, no output rotation, 3 bits, block 32, stored integers)."""
    sys.path.insert(0, str(TESTS))
    from _reliability_util import build_small_pack
    build_small_pack(root / "ckpt", root / "A")
    build_small_pack(root / "ckpt", root / "B", permute="none", row_rot="disabled", wbits=3, block=32,
                     layer_wbits={"net.b.up_proj": 16})
    return [str(root / "A"), str(root / "B")]


CHILD = r"""
import json, sys
import torch
torch.set_num_threads(1)  # tiny tensors: threads only add contention
sys.path.insert(0, sys.argv[1])
import test_fuzz_pack as F
args = json.loads(sys.argv[2])
print(json.dumps(F.run_cases(args["bases"], args["work"], args["seeds"], args["progress"])))
"""


@pytest.fixture
def workdir(tmp_path):
    """A scratch directory in memory (/dev/shm) when there is one: the cases are file-system bound."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="duquant-fuzz-", dir="/dev/shm"))
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


def test_fuzzed_packs_load_cleanly_or_fail_with_pack_error(workdir, tmp_path):
    from duquant_runtime import load_pack
    bases = build_bases(workdir)
    for b in bases:
        assert load_pack(b).verify() == []  # the control: both bases are valid
    (workdir / "work").mkdir()
    progress = tmp_path / "progress.json"
    args = {"bases": bases, "work": str(workdir / "work"), "seeds": list(range(CASES)), "progress": str(progress)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(TESTS), json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60 + CASES * 2)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"fuzz run hung; last case: {progress.read_text() if progress.exists() else '?'}")
    last = progress.read_text() if progress.exists() else "?"
    assert proc.returncode == 0, f"fuzz run crashed (exit {proc.returncode}); last case: {last}; {err[-2000:]}"
    res = json.loads(out)
    assert res["failures"] == [], json.dumps(res["failures"][:5], indent=1)
    counts = res["outcomes"]
    assert sum(counts.values()) == CASES
    # the mutations reach every stage: some packs are refused at load, some by verify, some survive
    for kind in ("refused by load_pack", "problems reported by verify", "loads, verifies and runs"):
        assert counts.get(kind, 0) >= CASES // 50, counts
