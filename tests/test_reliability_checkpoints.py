"""Reliability: bad checkpoints given to `duquant-pack build` / `build_pack` (docs/reliability.md §1).

Every case is run three ways: through the Python API into a fresh directory, through the CLI into
a fresh directory, and through the CLI with `--overwrite` into a directory holding a previous
pack. Each must give one error line naming the file or the tensor, a non-zero exit, no pack
directory (fresh), or the previous pack's files untouched and still verifying.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from duquant_pack.build import build_pack
from duquant_pack.errors import CheckpointError, ConfigError, DuquantError
from duquant_runtime import load_pack

from _reliability_util import assert_one_line_error, run_cli, small_config, small_tensors, tree_bytes
from _util import save_ckpt

CLI_CFG = ["--include", "proj$", "--exclude", "", "--block", "16", "--row-rot", "restore", "--jobs", "1", "-q"]
Q = "net.a.q_proj.weight"


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n])


def _with_header(src: Path, dst: Path, edit) -> Path:
    """Copy of safetensors `src` with its JSON header edited by edit(header) (same data bytes)."""
    raw = src.read_bytes()
    n, header = _header(src)
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return dst


def _pickle_payload(marker: Path) -> bytes:
    """Protocol-0 pickle bytes whose unpickling would create `marker` (written by hand, no pickler)."""
    return b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."


def _good(d: Path, **extra) -> Path:
    t = small_tensors()
    t.update(extra)
    return save_ckpt(d, t)


# --- the cases: name -> builder(tmp) -> (checkpoint path, extra CLI args, error class, regex) -------

def _missing(tmp):
    return tmp / "absent" / "model.safetensors", [], CheckpointError, r"absent/model\.safetensors: no such file"


def _empty_file(tmp):
    p = tmp / "e" / "model.safetensors"
    p.parent.mkdir()
    p.write_bytes(b"")
    return p, [], CheckpointError, r"e/model\.safetensors: not a safetensors file \(too short: 0 bytes\)"


def _empty_dir(tmp):
    (tmp / "emptydir").mkdir()
    return tmp / "emptydir", [], CheckpointError, r"emptydir: directory holds neither model\.safetensors"


def _truncated_mid_tensor(tmp):
    src = _good(tmp / "src")
    n, header = _header(src)
    start, end = header[Q]["data_offsets"]
    dst = tmp / "t" / "model.safetensors"
    dst.parent.mkdir()
    dst.write_bytes(src.read_bytes()[: 8 + n + (start + end) // 2])  # cut inside the q_proj weight
    return dst, [], CheckpointError, r"t/model\.safetensors: truncated: tensor '[^']+' ends at byte \d+"


def _truncated_in_header(tmp):
    src = _good(tmp / "src")
    n, _ = _header(src)
    dst = tmp / "h" / "model.safetensors"
    dst.parent.mkdir()
    dst.write_bytes(src.read_bytes()[: 8 + n // 2])
    return dst, [], CheckpointError, r"h/model\.safetensors: not a safetensors file \(header length \d+ does not fit"


def _header_length_lies(tmp):
    src = _good(tmp / "src")
    raw = bytearray(src.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw))  # longer than the file
    dst = tmp / "l" / "model.safetensors"
    dst.parent.mkdir()
    dst.write_bytes(bytes(raw))
    return dst, [], CheckpointError, r"l/model\.safetensors: not a safetensors file \(header length"


def _header_size_lies(tmp):
    def edit(h):
        h[Q]["shape"] = [24, 40]  # the offsets still span 24 x 41 bf16 values
    p = _with_header(_good(tmp / "src"), tmp / "s" / "model.safetensors", edit)
    return p, [], CheckpointError, r"s/model\.safetensors: header of 'net\.a\.q_proj\.weight' is inconsistent"


def _header_offset_beyond_data(tmp):
    def edit(h):
        start, end = h[Q]["data_offsets"]
        size = end - start
        last = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
        h[Q]["data_offsets"] = [last, last + size]
    p = _with_header(_good(tmp / "src"), tmp / "o" / "model.safetensors", edit)
    return p, [], CheckpointError, r"o/model\.safetensors: truncated: tensor 'net\.a\.q_proj\.weight' ends at byte"


def _header_overlap(tmp):
    key2 = "net.b.o_proj.weight"

    def edit(h):
        s, e = h[key2]["data_offsets"]
        qs, _ = h[Q]["data_offsets"]
        h[key2]["data_offsets"] = [qs, qs + (e - s)]
    p = _with_header(_good(tmp / "src"), tmp / "ov" / "model.safetensors", edit)
    return p, [], CheckpointError, r"ov/model\.safetensors: header is inconsistent: tensors '[^']+' and '[^']+' overlap"


def _header_reversed_offsets(tmp):
    def edit(h):
        s, e = h[Q]["data_offsets"]
        h[Q]["data_offsets"] = [e, s]
    p = _with_header(_good(tmp / "src"), tmp / "r" / "model.safetensors", edit)
    return p, [], CheckpointError, r"r/model\.safetensors: header of 'net\.a\.q_proj\.weight' is inconsistent"


def _header_negative_dim(tmp):
    def edit(h):
        h[Q]["shape"] = [-24, -41]
    p = _with_header(_good(tmp / "src"), tmp / "n" / "model.safetensors", edit)
    return p, [], CheckpointError, r"n/model\.safetensors: header entry for 'net\.a\.q_proj\.weight' is malformed"


def _header_not_json(tmp):
    src = _good(tmp / "src")
    raw = bytearray(src.read_bytes())
    raw[8] = ord("[")
    raw[9] = ord("{")
    dst = tmp / "j" / "model.safetensors"
    dst.parent.mkdir()
    dst.write_bytes(bytes(raw))
    return dst, [], CheckpointError, r"j/model\.safetensors: not a safetensors file \(header is not JSON"


def _random_bytes(tmp):
    p = tmp / "rnd" / "model.safetensors"
    p.parent.mkdir()
    p.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(5),
                                dtype=torch.uint8).numpy().tobytes())
    return p, [], CheckpointError, r"rnd/model\.safetensors: not a safetensors file"


def _text_file(tmp):
    p = tmp / "txt" / "model.safetensors"
    p.parent.mkdir()
    p.write_text("these are not the weights you are looking for\n" * 20)
    return p, [], CheckpointError, r"txt/model\.safetensors: not a safetensors file"


def _hdf5_file(tmp):
    import h5py
    p = tmp / "h5" / "model.safetensors"
    p.parent.mkdir()
    with h5py.File(p, "w") as f:
        f.create_dataset(Q, data=torch.randn(24, 41).numpy())
    return p, [], CheckpointError, r"h5/model\.safetensors: not a safetensors file"


def _pickle_zip(tmp):
    """What torch.save writes (a zip holding data.pkl), named like a checkpoint; never unpickled."""
    p = tmp / "pt" / "model.safetensors"
    p.parent.mkdir()
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", _pickle_payload(tmp / "UNPICKLED"))
    return p, [], CheckpointError, r"pt/model\.safetensors: not a safetensors file"


def _raw_pickle(tmp):
    p = tmp / "pk" / "model.safetensors"
    p.parent.mkdir()
    p.write_bytes(_pickle_payload(tmp / "UNPICKLED"))
    return p, [], CheckpointError, r"pk/model\.safetensors: not a safetensors file"


def _dtype(dtype, tag):
    def case(tmp):
        w = (torch.randn(24, 41) * 4).to(dtype)
        p = _good(tmp / f"dt{tag}", **{Q: w})
        return p, [], ConfigError, rf"selected tensor 'net\.a\.q_proj\.weight' has dtype {tag}; only BF16, F16, F32"
    return case


def _non_finite(value, count):
    def case(tmp):
        w = small_tensors()[Q].float()
        w.view(-1)[torch.arange(count) * 7] = value
        p = _good(tmp / "nf", **{Q: w.to(torch.bfloat16)})
        return p, [], CheckpointError, rf"nf/model\.safetensors: tensor 'net\.a\.q_proj\.weight' has {count} NaN/Inf values"
    return case


def _one_d_selected(tmp):
    p = _good(tmp / "oned")
    return p, ["--layers", "net.norm,net.a.q_proj"], ConfigError, \
        r"selected tensor 'net\.norm\.weight' has shape \[24\]: not a 2-D linear weight"


def _three_d_selected(tmp):
    p = _good(tmp / "threed", **{"net.c.conv_proj.weight": torch.randn(8, 4, 3)})
    return p, [], ConfigError, r"selected tensor 'net\.c\.conv_proj\.weight' has shape \[8, 4, 3\]: not a 2-D"


def _empty_weight_selected(tmp):
    p = _good(tmp / "zero", **{"net.c.empty_proj.weight": torch.zeros(0, 8)})
    return p, [], ConfigError, r"selected tensor 'net\.c\.empty_proj\.weight' is empty"


def _sharded(tmp, drop_shard=False, lie=False, escape=False):
    t = small_tensors()
    keys = sorted(t)
    d = tmp / "sharded"
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for fname, ks in shards.items():
        save_ckpt(d, {k: t[k] for k in ks}, name=fname)
        weight_map.update({k: fname for k in ks})
    if lie:
        weight_map[keys[0]] = "model-00002-of-00002.safetensors"
    if escape:
        weight_map[keys[0]] = "../model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if drop_shard:
        (d / "model-00002-of-00002.safetensors").unlink()
    return d


def _missing_shard(tmp):
    return _sharded(tmp, drop_shard=True), [], CheckpointError, \
        r"model\.safetensors\.index\.json: shard model-00002-of-00002\.safetensors is missing"


def _index_lies(tmp):
    return _sharded(tmp, lie=True), [], CheckpointError, \
        r"index lists '[^']+' in model-00002-of-00002\.safetensors but that shard does not hold it"


def _index_escapes(tmp):
    return _sharded(tmp, escape=True), [], CheckpointError, \
        r"model\.safetensors\.index\.json: shard name '\.\./model-00001-of-00002\.safetensors' is not a plain file name"


def _index_not_json(tmp):
    d = _sharded(tmp)
    (d / "model.safetensors.index.json").write_text('{"weight_map": ')
    return d, [], CheckpointError, r"model\.safetensors\.index\.json: not a valid safetensors index"


CASES = {
    "missing file": _missing,
    "empty file": _empty_file,
    "empty directory": _empty_dir,
    "truncated mid-tensor": _truncated_mid_tensor,
    "truncated inside the header": _truncated_in_header,
    "header length larger than the file": _header_length_lies,
    "header shape disagrees with offsets": _header_size_lies,
    "header offsets beyond the data": _header_offset_beyond_data,
    "header offsets overlap": _header_overlap,
    "header offsets reversed": _header_reversed_offsets,
    "header negative dimension": _header_negative_dim,
    "header not JSON": _header_not_json,
    "random bytes": _random_bytes,
    "text file": _text_file,
    "HDF5 file": _hdf5_file,
    "torch.save zip (pickle inside)": _pickle_zip,
    "raw pickle": _raw_pickle,
    "I64 weight selected": _dtype(torch.int64, "I64"),
    "I8 weight selected": _dtype(torch.int8, "I8"),
    "F64 weight selected": _dtype(torch.float64, "F64"),
    "F8_E4M3 weight selected": _dtype(torch.float8_e4m3fn, "F8_E4M3"),
    "NaN in a selected weight": _non_finite(float("nan"), 3),
    "Inf in a selected weight": _non_finite(float("-inf"), 1),
    "1-D tensor selected": _one_d_selected,
    "3-D tensor selected": _three_d_selected,
    "empty (0 x n) weight selected": _empty_weight_selected,
    "sharded index naming a missing shard": _missing_shard,
    "sharded index naming the wrong shard": _index_lies,
    "sharded index shard path escaping": _index_escapes,
    "sharded index not JSON": _index_not_json,
}


@pytest.fixture(scope="module")
def previous_pack(tmp_path_factory):
    """A pack built with CLI_CFG from the good small checkpoint (copied by each test that damages it)."""
    d = tmp_path_factory.mktemp("prev")
    _good(d / "ckpt")
    rc, out, err = run_cli(["build", str(d / "ckpt"), "--out", str(d / "pack"), *CLI_CFG])
    assert rc == 0, err
    return d / "pack"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_api(case, tmp_path):
    ckpt, extra, err_cls, pattern = CASES[case](tmp_path)
    out = tmp_path / "out" / "pack"
    over = {"layers": tuple(extra[1].split(",")), "layer_wbits": {}} if extra else {}  # the CLI's --layers
    with pytest.raises(DuquantError) as ei:
        build_pack(ckpt, out, small_config(**over), jobs=1, progress=False)
    assert type(ei.value) is err_cls
    msg = str(ei.value)
    assert "\n" not in msg and re.search(pattern, msg), msg
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "UNPICKLED").exists()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_cli_fresh_out(case, tmp_path):
    ckpt, extra, _, pattern = CASES[case](tmp_path)
    out = tmp_path / "out" / "pack"
    rc, stdout, stderr = run_cli(["build", str(ckpt), "--out", str(out), *CLI_CFG, *extra])
    line = assert_one_line_error(rc, stdout, stderr)
    assert rc == 1
    assert re.search(pattern, line), line
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "UNPICKLED").exists()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_cli_keeps_previous_pack(case, tmp_path, previous_pack):
    ckpt, extra, _, pattern = CASES[case](tmp_path)
    out = tmp_path / "pack"
    shutil.copytree(previous_pack, out)
    before = tree_bytes(out)
    rc, stdout, stderr = run_cli(["build", str(ckpt), "--out", str(out), *CLI_CFG, *extra, "--overwrite"])
    line = assert_one_line_error(rc, stdout, stderr)
    assert re.search(pattern, line), line
    after = tree_bytes(out)
    assert {k: after.get(k) for k in before} == before  # every file of the previous pack, byte for byte
    # a failure inside the build (after the checkpoint opened) leaves its identity marker, nothing else
    assert set(after) - set(before) <= {".pending.json"}
    assert load_pack(out).verify() == []


def test_non_finite_values_outside_the_selection_are_not_an_error(tmp_path):
    """Only selected weights are read: a NaN in a bias or an unselected tensor does not stop the build."""
    t = small_tensors()
    t["net.a.q_proj.bias"][0] = float("nan")
    t["net.norm.weight"][3] = float("inf")
    ckpt = save_ckpt(tmp_path / "c", t)
    s = build_pack(ckpt, tmp_path / "p", small_config(), jobs=1, progress=False)
    assert s.layers == 4 and load_pack(tmp_path / "p").verify() == []
