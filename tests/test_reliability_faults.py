"""Reliability: faults while a pack is written (docs/reliability.md §3).

- SIGKILL at seeded random points of `duquant-pack build` (fresh directory, repeated kills, and
  kills while overwriting a pack of another configuration): the directory is never a mixed pack,
  and the rerun completes with bytes identical to an uninterrupted build.
- Two or three builds into one directory at once: each either completes or fails with the lock
  message, and the result is identical to a single build.
- Disk full (a patched fsync raising ENOSPC at each write of a build or a save, and a real tiny
  tmpfs where the container allows mounts): a one-line error, the previous pack intact.
- Read-only pack directory (simulated, chmod when not root, and a real read-only bind mount where
  allowed): apply_pack works, save_calibration and build fail cleanly, nothing changes.

The kill and concurrency runs use a helper process that imports the compiler once and forks one
child per `duquant-pack build` (the real CLI entry point, `duquant_pack.cli.main`), so each kill
costs a build, not an interpreter start. `DUQUANT_KILL_POINTS` sets the number of fresh
directories killed once (default 2; one directory is also killed three times and two overwrites
are killed once each).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import duquant_runtime.atomic as atomic
from duquant_pack.build import build_pack
from duquant_pack.config import resolve
from duquant_pack.errors import BuildError
from duquant_pack.verify import verify_pack
from duquant_runtime import PackError, apply_pack, load_pack, save_calibration

from _reliability_util import (SMALL_CLI, assert_one_line_error, build_small_pack, model_from_tensors, run_cli,
                               small_config, small_tensors, tree_bytes)

PRESET = "pi05-llm-expert"
SEED = 20240611
FRESH_KILLS = int(os.environ.get("DUQUANT_KILL_POINTS", "2"))
TESTS = Path(__file__).parent
LOCK_MSG = "another build is writing this pack (lock "

# Forks one child per `duquant-pack build` (argv) after importing everything once. Input: a JSON
# object; output: a JSON object on stdout. "reference": a full build, timed (seconds t_build);
# "kills": [{"argv", "fractions"}] -> per kill, the child's fate after sleeping fraction * t_build;
# "concurrent": [{"argvs"}] -> children released together, their exit codes and stderr.
FORK_HELPER = r"""
import json, os, signal, sys, time
args = json.loads(sys.argv[1])
import duquant_pack.build, duquant_pack.cli, duquant_pack.config, duquant_pack.groups  # noqa: F401
from duquant_pack.cli import main

def spawn(argv, log, barrier=None):
    pid = os.fork()
    if pid:
        return pid
    rc = 99
    try:
        for fd, suffix in ((1, ".out"), (2, ".err")):
            os.dup2(os.open(log + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        if barrier is not None:
            os.read(barrier, 1)
        rc = main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)

def fate(status):
    if os.WIFSIGNALED(status):
        return {"killed": os.WTERMSIG(status) == signal.SIGKILL, "rc": None}
    return {"killed": False, "rc": os.WEXITSTATUS(status)}

res = {}
if "reference" in args:
    t0 = time.monotonic()
    _, st = os.waitpid(spawn(args["reference"], args["log"] + "-ref"), 0)
    res["t_build"] = time.monotonic() - t0
    res["reference"] = fate(st)
kills = []
for i, job in enumerate(args.get("kills", [])):
    for j, frac in enumerate(job["fractions"]):
        pid = spawn(job["argv"], f"{args['log']}-k{i}-{j}")
        time.sleep(frac * res["t_build"])
        os.kill(pid, signal.SIGKILL)  # a child that already exited is a zombie: no error
        _, st = os.waitpid(pid, 0)
        kills.append(dict(fate(st), job=i, fraction=frac))
res["kills"] = kills
conc = []
for i, job in enumerate(args.get("concurrent", [])):
    r, w = os.pipe()
    logs = [f"{args['log']}-c{i}-{k}" for k in range(len(job["argvs"]))]
    pids = [spawn(a, log, barrier=r) for a, log in zip(job["argvs"], logs)]
    os.write(w, b"x" * len(pids))
    runs = []
    for pid, log in zip(pids, logs):
        _, st = os.waitpid(pid, 0)
        runs.append(dict(fate(st), err=open(log + ".err").read()))
    conc.append(runs)
res["concurrent"] = conc
print(json.dumps(res))
"""


def _run_helper(cmd: list[str], timeout: int = 240) -> dict:
    """Run a helper in its own process group (killed whole, forked children included, on timeout);
    return the JSON object it prints."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=TESTS.parent,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"helper did not finish in {timeout} s (a hang)")
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)


def _fork_helper(args: dict) -> dict:
    return _run_helper([sys.executable, "-c", FORK_HELPER, json.dumps(args)])


def _argv(ckpt, out, *extra):
    return ["build", str(ckpt), "--preset", PRESET, "--out", str(out), "--jobs", "1", "-q", *extra]


def _finished_layer_files(out: Path) -> int:
    d = out / "layers"
    return sum(1 for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else 0


@pytest.fixture(scope="module")
def other_pack(synth2, tmp_path_factory):
    """The pack of another configuration (wbits 8) of the same checkpoint: what --overwrite replaces."""
    out = tmp_path_factory.mktemp("other") / "pack"
    build_pack(synth2, out, resolve(PRESET, wbits=8)[0], preset=PRESET, jobs=1, progress=False)
    return out


# --- SIGKILL at random points ------------------------------------------------------------------------

KILL_JOBS = [f"fresh-{i}" for i in range(FRESH_KILLS)] + ["killed-three-times", "overwrite-0", "overwrite-1"]
CONCURRENT = ["empty directory, 2 builds", "empty directory, 3 builds", "over the same pack",
              "over another pack, --overwrite"]


@pytest.fixture(scope="module")
def forked(synth2, built_pack, other_pack, tmp_path_factory):
    """Run every kill and every concurrent build in one helper process (one interpreter start).

    Kills: fresh directories killed once, one directory killed three times in a row, and two copies
    of `other_pack` killed while being overwritten; each kill after a seeded random fraction of an
    uninterrupted build's duration. Concurrent: builds released together into one directory."""
    root = tmp_path_factory.mktemp("forked")
    rng = random.Random(SEED)
    spec = {"log": str(root / "log"), "reference": _argv(synth2, root / "scratch"), "kills": [], "concurrent": []}
    dirs = {}
    for name in KILL_JOBS:
        fractions = sorted(rng.uniform(0.05, 0.9) for _ in range(3)) if name == "killed-three-times" \
            else [rng.uniform(0.0, 1.1)]
        out = root / name / "pack"
        if name.startswith("overwrite"):
            shutil.copytree(other_pack, out)
        else:
            out.parent.mkdir()
        argv = _argv(synth2, out, *(["--overwrite"] if name.startswith("overwrite") else []))
        dirs[name] = (out, argv)
        spec["kills"].append({"argv": argv, "fractions": fractions})
    conc_dirs = {}
    for name, n in zip(CONCURRENT, (2, 3, 2, 2)):
        out = root / f"conc{len(conc_dirs)}"
        extra = []
        if name == "over the same pack":
            shutil.copytree(built_pack, out)
        elif name.startswith("over another pack"):
            shutil.copytree(other_pack, out)
            extra = ["--overwrite"]
        else:
            out.mkdir()
        conc_dirs[name] = out
        spec["concurrent"].append({"argvs": [_argv(synth2, out, *extra)] * n})
    res = _fork_helper(spec)
    assert res["reference"] == {"killed": False, "rc": 0}, res
    fates = {name: [k for k in res["kills"] if k["job"] == i] for i, name in enumerate(dirs)}
    return {"dirs": dirs, "fates": fates, "t_build": res["t_build"], "kills": res["kills"],
            "concurrent": {name: (out, runs) for (name, out), runs in zip(conc_dirs.items(), res["concurrent"])}}


@pytest.fixture(scope="module")
def killed(forked):
    return forked


@pytest.fixture(scope="module")
def concurrent(forked):
    return forked["concurrent"]


def test_kills_land_inside_the_build(killed):
    """Most kills must interrupt a running build, or the test below tests nothing."""
    interrupted = [k for k in killed["kills"] if k["killed"]]
    assert all(k["killed"] or k["rc"] == 0 for k in killed["kills"]), killed["kills"]
    assert len(interrupted) >= len(killed["kills"]) // 2, (killed["t_build"], killed["kills"])


@pytest.mark.parametrize("job", KILL_JOBS)
def test_killed_build_is_never_a_mixed_pack_and_resumes_to_identical_bytes(job, killed, built_pack, other_pack):
    out, argv = killed["dirs"][job]
    # right after the kill: no pack, an interrupted build (refused with a hint), or a complete pack
    if job.startswith("overwrite"):
        pack = load_pack(out)  # the old pack until the new manifest is committed, then the new one
        assert pack.verify() == []
        assert pack.manifest["config_hash"] in (load_pack(other_pack).manifest["config_hash"],
                                                load_pack(built_pack).manifest["config_hash"])
    elif (out / "manifest.json").exists():
        assert load_pack(out).verify() == []
    elif out.exists() and (out / "layers").is_dir():
        with pytest.raises(PackError, match="interrupted build"):
            load_pack(out)
    assert verify_pack(out) == [] or not (out / "manifest.json").exists()
    # the rerun of the same command completes, reusing what was finished
    rc, stdout, stderr = run_cli(argv + ["--json"])
    assert rc == 0, stderr
    summary = json.loads(stdout)
    assert summary["layers"] == 28 and summary["reused"] + summary["computed"] == 28
    assert not list(out.rglob(".tmp-*")) and not (out / ".pending.json").exists()
    assert tree_bytes(out) == tree_bytes(built_pack)  # manifest and every layer file, byte for byte


# --- concurrent builds into one directory ------------------------------------------------------------

@pytest.mark.parametrize("scenario", CONCURRENT)
def test_concurrent_builds_one_wins_others_fail_cleanly(scenario, concurrent, built_pack):
    out, runs = concurrent[scenario]
    assert not any(r["killed"] for r in runs), runs
    assert any(r["rc"] == 0 for r in runs), runs
    for r in runs:
        if r["rc"] != 0:
            line = assert_one_line_error(r["rc"], "", r["err"])
            assert r["rc"] == 1 and LOCK_MSG in line, r
    assert verify_pack(out) == []
    assert tree_bytes(out) == tree_bytes(built_pack)


def test_concurrent_builds_did_overlap(concurrent):
    """At least one scenario saw the lock refuse a build (the builds really ran at the same time)."""
    assert any(r["rc"] == 1 for _, runs in concurrent.values() for r in runs), concurrent


def _lose_the_race(monkeypatch, module):
    """Make the build see `out` as absent, then let another writer create it and take its lock
    before this build tries to (the window between the existence check and the lock)."""
    held = {}
    real = module.missing_ancestors

    def racing(p):
        created = real(p)
        p.mkdir(parents=True)
        (p / "layers").mkdir()
        held["fd"] = os.open(p / ".lock", os.O_CREAT | os.O_RDWR)
        fcntl.flock(held["fd"], fcntl.LOCK_EX)
        (p / ".pending.json").write_text("{}")  # the winner's scaffolding, before its first layer file
        return created

    monkeypatch.setattr(module, "missing_ancestors", racing)
    return held


def test_build_that_loses_the_lock_race_leaves_the_winners_directory(synth2, tmp_path, monkeypatch):
    import duquant_pack.build as build_mod
    out = tmp_path / "new" / "pack"
    held = _lose_the_race(monkeypatch, build_mod)
    try:
        with pytest.raises(BuildError, match="another build is writing this pack"):
            build_pack(synth2, out, resolve(PRESET)[0], preset=PRESET, jobs=1, progress=False)
        assert (out / ".lock").exists() and (out / ".pending.json").exists()
    finally:
        os.close(held["fd"])


def test_import_that_loses_the_lock_race_leaves_the_winners_directory(tmp_path, monkeypatch):
    import numpy as np
    import duquant_pack.legacy as legacy
    ckpt = tmp_path / "ckpt"
    from _util import save_ckpt
    save_ckpt(ckpt, small_tensors())
    src = tmp_path / "npz"
    src.mkdir()
    meta = {"in_features": 32, "out_features": 32, "block_size": 16, "block_out_size": 16, "enable_permute": True}
    eye = np.eye(16, dtype=np.float32)
    np.savez(src / "net.b.up_proj.npz", meta=json.dumps(meta), perm=np.arange(32), weight_scale=np.ones(32, np.float32),
             Rin_0=eye, Rin_1=eye, R_in_blocks=np.arange(2), Rout_0=eye, Rout_1=eye, R_out_blocks=np.arange(2))
    out = tmp_path / "new" / "pack"
    held = _lose_the_race(monkeypatch, legacy)
    try:
        with pytest.raises(BuildError, match="another build is writing this pack"):
            legacy.import_legacy(src, ckpt, out)
        assert (out / ".lock").exists() and (out / ".pending.json").exists()
    finally:
        os.close(held["fd"])
    monkeypatch.undo()
    shutil.rmtree(tmp_path / "new")
    assert legacy.import_legacy(src, ckpt, out).layers == 1  # the control: without the race it imports


# --- disk full ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """{'ckpt', 'pack' (SMALL_CFG), 'previous' (block 8: another configuration)}."""
    d = tmp_path_factory.mktemp("small")
    build_small_pack(d / "ckpt", d / "pack")
    rc, _, err = run_cli(["build", str(d / "ckpt"), "--out", str(d / "previous"), *SMALL_CLI, "--block", "8"])
    assert rc == 0, err
    return d


def test_small_cli_options_are_the_small_config(small):
    assert load_pack(small / "pack").manifest["config_hash"] == \
        __import__("duquant_runtime.format", fromlist=["x"]).config_hash(small_config().to_dict())


def _enospc_on_write(monkeypatch, n: int):
    """The n-th atomic write from now (1-based) fails like a full disk when it is flushed to disk."""
    calls = {"n": 0}
    real = atomic.fsync_file

    def fsync_file(path):
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path)

    monkeypatch.setattr(atomic, "fsync_file", fsync_file)
    return calls


# a build writes: .pending.json, the 4 layer files (largest first), manifest.json
WRITES = {"pending marker": 1, "first layer file": 2, "third layer file": 4, "last layer file": 5, "manifest": 6}


@pytest.mark.parametrize("where", list(WRITES))
def test_disk_full_during_build_keeps_previous_pack(where, small, tmp_path, monkeypatch):
    out = tmp_path / "pack"
    shutil.copytree(small / "previous", out)
    before = tree_bytes(out)
    calls = _enospc_on_write(monkeypatch, WRITES[where])
    rc, stdout, stderr = run_cli(["build", str(small / "ckpt"), "--out", str(out), *SMALL_CLI, "--overwrite"])
    line = assert_one_line_error(rc, stdout, stderr)
    assert rc == 1 and "No space left on device" in line and calls["n"] == WRITES[where]
    monkeypatch.undo()
    after = tree_bytes(out)
    assert {k: after.get(k) for k in before} == before  # the previous pack, byte for byte
    assert not [k for k in after if Path(k).name.startswith(".tmp-")]
    extra = set(after) - set(before)
    if where != "manifest":
        assert extra <= {".pending.json"}  # the new layer files were discarded
    assert load_pack(out).verify() == [] and verify_pack(out) == []
    # space again: the same command completes, identical to a clean build
    rc, _, stderr = run_cli(["build", str(small / "ckpt"), "--out", str(out), *SMALL_CLI, "--overwrite"])
    assert rc == 0, stderr
    assert tree_bytes(out) == tree_bytes(small / "pack")


def test_disk_full_api_error(small, tmp_path, monkeypatch):
    """Through the API the failure is the OS error itself (errno ENOSPC) or a BuildError; nothing else."""
    out = tmp_path / "pack"
    shutil.copytree(small / "previous", out)
    _enospc_on_write(monkeypatch, WRITES["third layer file"])
    with pytest.raises((OSError, BuildError)) as ei:
        build_pack(small / "ckpt", out, small_config(), jobs=1, progress=False, overwrite=True)
    assert getattr(ei.value, "errno", None) == errno.ENOSPC or "No space left" in str(ei.value)
    monkeypatch.undo()
    assert load_pack(out).verify() == [] and load_pack(out).config["block"] == 8


def _calibrated(pack: Path):
    model = model_from_tensors(small_tensors())
    apply_pack(model, pack)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(2):  # calib_steps = 2
            for name in ("net.a.q_proj", "net.a.down_proj", "net.b.o_proj", "net.b.up_proj"):
                m = model.get_submodule(name)
                m(torch.randn(3, m.in_features, generator=g))
    return model


@pytest.mark.parametrize("where", ["scales file", "manifest"])
def test_disk_full_during_save_calibration_keeps_pack(where, small, tmp_path, monkeypatch):
    pack = tmp_path / "pack"
    shutil.copytree(small / "pack", pack)
    model = _calibrated(pack)
    before = tree_bytes(pack)
    _enospc_on_write(monkeypatch, 1 if where == "scales file" else 2)
    with pytest.raises(PackError, match=r"cannot save the calibration \(OSError: \[Errno 28\] No space left") as ei:
        save_calibration(model, pack)
    assert "\n" not in str(ei.value)
    monkeypatch.undo()
    assert tree_bytes(pack) == before
    assert verify_pack(pack) == []  # no stray calibration file either
    assert save_calibration(model, pack)["layers"] == 4  # space again: it saves


# --- read-only pack directory --------------------------------------------------------------------------

def _read_only_os(monkeypatch):
    """Simulate a read-only file system for os.open / os.replace / os.mkdir / builtins.open writes."""
    import builtins
    real_open, real_os_open = builtins.open, os.open
    erofs = OSError(errno.EROFS, os.strerror(errno.EROFS))

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_os_open(path, flags, *a, **k)

    def b_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *a, **k)

    def refuse(*a, **k):
        raise erofs

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", b_open)
    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.setattr(os, "mkdir", refuse)


def test_read_only_simulated_apply_works_save_fails_cleanly(small, tmp_path, monkeypatch):
    pack = tmp_path / "pack"
    shutil.copytree(small / "pack", pack)
    before = tree_bytes(pack)
    import duquant_runtime.calibration as calibration
    monkeypatch.setattr(calibration.os, "access", lambda *a, **k: True)  # the pre-check passes: the writes fail
    _read_only_os(monkeypatch)
    model = _calibrated(pack)  # apply_pack and calibration need no write access
    assert sum(m.act_scale is not None for m in model.modules() if hasattr(m, "act_scale")) == 4
    with pytest.raises(PackError, match=r"cannot save the calibration \(OSError: \[Errno 30\] Read-only file system"):
        save_calibration(model, pack)
    monkeypatch.undo()
    assert tree_bytes(pack) == before


def test_read_only_chmod(small, tmp_path):
    """The real thing where chmod binds (not as root; the bind-mount test below covers root)."""
    pack = tmp_path / "pack"
    shutil.copytree(small / "pack", pack)
    before = tree_bytes(pack)
    for p in (pack, pack / "layers"):
        os.chmod(p, 0o555)
    try:
        if os.access(pack, os.W_OK):
            pytest.skip("running as root: chmod does not make the directory read-only")
        model = _calibrated(pack)
        with pytest.raises(PackError, match="pack directory is not writable"):
            save_calibration(model, pack)
        rc, out, err = run_cli(["build", str(small / "ckpt"), "--out", str(pack), *SMALL_CLI])
        assert_one_line_error(rc, out, err)
    finally:
        for p in (pack, pack / "layers"):
            os.chmod(p, 0o755)
    assert tree_bytes(pack) == before


# --- real mounts in a private mount namespace (tiny tmpfs, read-only bind mount) --------------------------

NS_HELPER = r"""
import ctypes, gc, json, os, shutil, subprocess, sys
args = json.loads(sys.argv[1])
sys.path.insert(0, args["tests"])
import torch
from _reliability_util import SMALL_CLI, model_from_tensors, run_cli, small_tensors, tree_bytes
from duquant_pack.cli import main
from duquant_pack.verify import verify_pack
from duquant_runtime import PackError, apply_pack, save_calibration

def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)

def in_child(fn, log, like_a_process=False):
    # fn() in a forked child; like_a_process: exit like a console script (garbage collection and the
    # C exit handlers), so a crash at exit shows as a signal. -> (rc or -signal, out, err)
    pid = os.fork()
    if pid == 0:
        try:
            for fd, suffix in ((1, ".out"), (2, ".err")):
                os.dup2(os.open(log + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            rc = fn()
        except BaseException:
            os._exit(99)
        sys.stdout.flush()
        sys.stderr.flush()
        if not like_a_process:
            os._exit(rc)
        gc.collect()  # what interpreter shutdown would free (h5py objects included) ...
        ctypes.CDLL(None).exit(rc)  # ... and the C libraries' exit handlers (HDF5's), without torch's slow teardown
    _, st = os.waitpid(pid, 0)
    rc = os.WEXITSTATUS(st) if os.WIFEXITED(st) else -os.WTERMSIG(st)
    return rc, open(log + ".out").read(), open(log + ".err").read()

def cli_in_child(argv, log):
    return in_child(lambda: main(argv), log)

def verify_in_child(pack, log):
    # torch work happens in children only, until the last fork (a parent that ran torch's thread
    # pool can deadlock its forked children)
    return json.loads(in_child(lambda: print(json.dumps(verify_pack(pack))) or 0, log)[1])

def calibrated_model(pack):
    model = model_from_tensors(small_tensors())
    apply_pack(model, pack)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(2):
            for n in ("net.a.q_proj", "net.a.down_proj", "net.b.o_proj", "net.b.up_proj"):
                m = model.get_submodule(n)
                m(torch.randn(3, m.in_features, generator=g))
    return model

def save(pack):
    model = calibrated_model(pack)
    try:
        save_calibration(model, pack)
        print("saved")
    except PackError as err:
        print(f"PackError: {err}")
    return 0

res = {"full": []}
# 1. disk full on real tmpfs mounts of several sizes, over a previous pack of another configuration
for i, size_kb in enumerate(args["sizes_kb"]):
    full = f"{args['mnt']}/full{i}"
    os.makedirs(full)
    sh("mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", full)
    out = full + "/pack"
    shutil.copytree(args["previous"], out)
    before = tree_bytes(out)
    argv = ["build", args["ckpt"], "--out", out, *SMALL_CLI, "--overwrite"]
    rc, o, e = in_child(lambda: main(argv), f"{args['mnt']}/log{i}", like_a_process=True)
    after = tree_bytes(out)
    r = {"size_kb": size_kb, "rc": rc, "out": o, "err": e, "kept": all(after.get(k) == v for k, v in before.items()),
         "extra": sorted(set(after) - set(before)), "verify": verify_in_child(out, f"{args['mnt']}/verify{i}")}
    sh("mount", "-o", "remount,size=16m", full)
    r["rerun"] = cli_in_child(argv, f"{args['mnt']}/rerun{i}")
    r["rerun_same_as_clean"] = tree_bytes(out) == tree_bytes(args["clean"])
    res["full"].append(r)
# 2. disk full while saving a calibration (the scales file, then the manifest, do not fit)
res["save"] = []
for i, extra_kb in enumerate((0, 8)):
    full = f"{args['mnt']}/cal{i}"
    os.makedirs(full)
    pack = full + "/pack"
    sh("mount", "-t", "tmpfs", "-o", f"size={args['clean_kb'] + extra_kb}k", "tmpfs", full)
    shutil.copytree(args["clean"], pack)
    before = tree_bytes(pack)
    rc, o, e = in_child(lambda: save(pack), f"{args['mnt']}/cal{i}", like_a_process=True)
    res["save"].append({"rc": rc, "out": o, "err": e, "unchanged": tree_bytes(pack) == before,
                        "verify": verify_in_child(pack, f"{args['mnt']}/calverify{i}")})
# 3. read-only bind mount of a pack (in this process: no fork after this point)
pack = args["mnt"] + "/ro/pack"
shutil.copytree(args["clean"], pack)
before = tree_bytes(pack)
sh("mount", "--bind", pack, pack)
sh("mount", "-o", "remount,bind,ro", pack)
r = {"writable": os.access(pack, os.W_OK)}
model = calibrated_model(pack)
r["replaced"] = sum(1 for m in model.modules() if type(m).__name__ == "DuQuantLinear")
for label in ("save", "save_past_access_check"):
    if label == "save_past_access_check":
        import duquant_runtime.calibration as cal
        cal.os.access = lambda *a, **k: True
    try:
        save_calibration(model, pack)
        r[label] = "saved"
    except PackError as err:
        r[label] = str(err)
r["build"] = run_cli(["build", args["ckpt"], "--out", pack, *SMALL_CLI])
r["verify"] = run_cli(["verify", pack])
r["unchanged"] = tree_bytes(pack) == before
res["ro"] = r
print(json.dumps(res))
"""


def _namespaces_available(tmp: Path) -> bool:
    probe = tmp / "probe"
    probe.mkdir()
    try:
        r = subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "-o", "size=64k",
                            "tmpfs", str(probe)], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _kb(root: Path) -> int:
    """tmpfs kilobytes of the files under root (4 KiB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4 for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def mounted(small, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ns")
    if not _namespaces_available(tmp):
        pytest.skip("cannot mount in a private mount namespace here (unshare -m / mount not permitted)")
    new_kb = _kb(small / "pack" / "layers")
    base = _kb(small / "previous") + 4  # the previous pack and the pending marker
    sizes = [base + new_kb * i // 5 for i in range(1, 5)]  # the disk fills at four points of the new files
    args = {"tests": str(TESTS), "mnt": str(tmp), "sizes_kb": sizes, "previous": str(small / "previous"),
            "clean": str(small / "pack"), "clean_kb": _kb(small / "pack"), "ckpt": str(small / "ckpt")}
    return _run_helper(["unshare", "-m", "--propagation", "private", sys.executable, "-c", NS_HELPER, json.dumps(args)])


def test_real_tmpfs_full_keeps_previous_pack_then_rerun_completes(mounted):
    for full in mounted["full"]:
        assert full["rc"] != 0, full
        assert full["kept"] and full["verify"] == [], full
        assert set(full["extra"]) <= {".pending.json"}, full  # no new layer file, no temporary left
        assert full["rerun"][0] == 0, full["rerun"]
        assert full["rerun_same_as_clean"], full


def test_real_tmpfs_full_is_a_one_line_error(mounted):
    for full in mounted["full"]:
        line = assert_one_line_error(full["rc"], full["out"], full["err"])
        assert full["rc"] == 1 and "No space left on device" in line, full


def test_real_tmpfs_full_during_save_calibration(mounted):
    """The calibration file is built in memory and written with plain file I/O: a clean PackError."""
    assert len(mounted["save"]) == 2
    for r in mounted["save"]:
        assert r["rc"] == 0 and r["err"] == "", r  # no crash, no h5py noise
        assert r["out"].startswith("PackError: ") and "cannot save the calibration (OSError: [Errno 28] No space " \
            "left on device" in r["out"] and r["out"].count("\n") == 1, r
        assert r["unchanged"] and r["verify"] == [], r


def test_real_read_only_mount_apply_works_writes_fail_cleanly(mounted):
    ro = mounted["ro"]
    assert ro["writable"] is False and ro["replaced"] == 4
    assert ro["save"].endswith("pack directory is not writable; cannot save the calibration")
    assert "cannot save the calibration (OSError: [Errno 30] Read-only file system" in ro["save_past_access_check"]
    rc, out, err = ro["build"]
    line = assert_one_line_error(rc, out, err)
    assert rc == 1 and "Read-only file system" in line
    assert ro["verify"][0] == 0 and ro["verify"][1].startswith("ok:")
    assert ro["unchanged"]
