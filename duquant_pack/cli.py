"""`duquant-pack`: the command-line front end (a click group of small commands).

Every expected failure prints one line, ``error: ...``, on stderr and exits non-zero
(1: bad input or build failure, 2: bad usage); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click

from duquant_runtime import __version__

from .errors import DuquantError
from .formatting import fmt_bytes, fmt_n

_DEBUG = False


def _selection_options(f):
    """Options shared by `layers` and `build` (semantics of the OPENPI_DUQUANT_* variables)."""
    opts = [
        click.option("--preset", metavar="NAME", help="Start from a shipped preset (see `duquant-pack presets`); "
                     "options given here override it."),
        click.option("--scope", metavar="PREFIX", help="Only layer names starting with PREFIX (SCOPE). Default: ''."),
        click.option("--include", metavar="RE", help="Regex a layer name must match, re.search (INCLUDE). Default: "
                     "the old q/k/v/o/out_proj/fc1/fc2/gate/up/down_proj pattern."),
        click.option("--exclude", metavar="RE", help="Regex that removes matching names; '' removes none (EXCLUDE)."),
        click.option("--layers", "layers_", metavar="A,B,...", help="Exact layer names; bypasses --include/--exclude (LAYERS)."),
        click.option("--wbits", type=int, help="Weight bits for every layer; >=16 or <=0 = not quantized (WBITS_DEFAULT). Default 4."),
        click.option("--abits", type=int, help="Activation bits, recorded for the runtime; 0 = off (ABITS). Default 8."),
        click.option("--layer-wbits", metavar="NAME:BITS,...", help="Per-layer weight bits (WBITS)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _resolve_cfg(preset, scope, include, exclude, layers_, wbits, abits, layer_wbits, **rest):
    from .config import parse_layer_wbits, resolve
    layers = tuple(n.strip() for n in layers_.split(",") if n.strip()) if layers_ is not None else None
    return resolve(preset, scope=scope, include=include, exclude=exclude, layers=layers, wbits=wbits,
                   abits=abits, layer_wbits=parse_layer_wbits(layer_wbits) if layer_wbits else None, **rest)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="duquant-pack")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug):
    """Compile DuQuant packs offline from a model.safetensors checkpoint.

    \b
    Typical session:
      duquant-pack presets                          # the shipped layer sets
      duquant-pack layers CKPT --preset pi05-llm    # dry run: what would be packed
      duquant-pack build CKPT --preset pi05-llm-expert --out packs/pi05-w4a8
      duquant-pack demo                             # all of it on a small synthetic pi0.5

    A pack is a directory (manifest.json + one HDF5 file per layer) that duquant_runtime
    applies to the model at load time; docs/format.md describes it.
    """
    global _DEBUG
    _DEBUG = debug


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def presets(as_json):
    """List the shipped presets (layer sets with the QuantVLA defaults)."""
    from .config import load_preset, preset_names
    data = [load_preset(n) for n in preset_names()]
    if as_json:
        click.echo(json.dumps([{k: d[k] for k in ("name", "expected_layers", "description", "config")}
                               for d in data], indent=2))
        return
    click.echo(f"{'preset':<24} {'layers':>6}  description")
    for d in data:
        click.echo(f"{d['name']:<24} {d['expected_layers']:>6}  {d['description']}")


@cli.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@_selection_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def layers(ckpt, as_json, **sel):
    """Dry run: list the layers a build would pack (name, shape, bits) and their count.

    CKPT is a model.safetensors file, a model.safetensors.index.json, or a directory holding either.
    """
    from .checkpoint import Checkpoint
    from .selection import select_layers
    cfg, _ = _resolve_cfg(**sel)
    chosen = select_layers(Checkpoint(ckpt), cfg)
    total = sum(s.numel for s in chosen)
    if as_json:
        click.echo(json.dumps({"count": len(chosen), "weights": total, "layers": [
            {"name": s.name, "out_features": s.out_features, "in_features": s.in_features,
             "dtype": s.dtype, "wbits": s.wbits} for s in chosen]}, indent=2))
        return
    width = max(len(s.name) for s in chosen)
    click.echo(f"{'layer':<{width}}  {'out x in':>13}  {'dtype':>5}  bits")
    for s in chosen:
        bits = str(s.wbits) if s.wbits else "off"
        click.echo(f"{s.name:<{width}}  {f'{s.out_features}x{s.in_features}':>13}  {s.dtype:>5}  {bits:>4}")
    click.echo(f"{len(chosen)} layers, {total:,} weights")


@cli.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path),
              help="Pack directory. Default: packs/<checkpoint>-<preset>-<config hash>.")
@_selection_options
@click.option("--block", type=int, help="Input block size B (BLOCK). Default 64.")
@click.option("--block-out", type=int, help="Output block size (BLOCK_OUT). Default: --block.")
@click.option("--permute", type=click.Choice(["zigzag", "interleave", "none"]),
              help="Input permutation: DuQuant zigzag (default), the old code's interleave, or none (PERMUTE).")
@click.option("--permute-metric", type=click.Choice(["absmax", "energy"]),
              help="Channel magnitude zigzag sorts by. Default absmax.")
@click.option("--row-rot", type=click.Choice(["restore", "disabled", "propagate"]),
              help="Output (row) rotation (ROW_ROT). Presets: restore; otherwise disabled. propagate is refused.")
@click.option("--scale", type=click.Choice(["mse", "max"]), help="Weight scale search. Default mse.")
@click.option("--act-percentile", type=float, help="Activation percentile for runtime calibration (ACT_PCT). Default 99.9.")
@click.option("--calib-steps", type=int, help="Runtime calibration batches (CALIB_STEPS). Default 32.")
@click.option("--lambda-smooth", type=float,
              help="SmoothQuant strength a in [0, 1] (LS): with --act-stats, s_j = max|X_j|^a / max|W_j|^(1-a) "
                   "is folded into the weights and divided out of x; without statistics it is recorded only.")
@click.option("--rotation", type=click.Choice(["svd", "hadamard", "random", "greedy", "none"]),
              help="Input block rotation: svd = principal axes of the weight (default), hadamard = block "
                   "Hadamard, random = seeded random orthogonal, greedy = the DuQuant paper's outlier-driven "
                   "rotation (needs --act-stats), none = identity (no-transform baseline).")
@click.option("--rotation-seed", type=int, help="Seed of the random (and non-power-of-two Hadamard) blocks. Default 0.")
@click.option("--act-stats", "act_stats_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Activation statistics (duquant_runtime.collect_stats): enables smoothing, zigzag on "
                   "activation maxima, --rotation greedy, --rounding gptq, and static activation scales "
                   "computed offline (stored as the pack's calibration). Its sha256 enters the config.")
@click.option("--rounding", type=click.Choice(["rtn", "gptq"]),
              help="Weight rounding: rtn (round to nearest, default) or gptq (error-compensating, from the "
                   "statistics' X^T X; stores the integers in the pack).")
@click.option("--group-size", type=int, help="One weight scale per group of N consecutive columns of W_t "
                                             "(default: one per row); stores the integers in the pack.")
@click.option("--store-qweights/--no-store-qweights", default=None,
              help="Store the quantized integers of each layer in the pack (int4 packed two per byte), so "
                   "a deployment loads them instead of quantizing the float weights. Default: off.")
@click.option("--share-inputs/--no-share-inputs", default=None,
              help="One input transform (permutation, rotations, smoothing) per group of sibling layers "
                   "that read the same activation (q/k/v_proj, gate/up_proj, query/key/value), computed "
                   "from their stacked weights. The GPU runtime then runs each group as one fused "
                   "launch pair. Default: off (one transform per layer).")
@click.option("--compat", type=click.Choice(["openpi-duquant"]),
              help="Reproduce the openpi_duquant fork's numerics (interleave permutation, its R_out "
                   "convention, MSE scales) so old and new packs can be diffed.")
@click.option("--jobs", "-j", type=int, default=0, show_default=True,
              help="Worker processes (CPU; 0 = all cores) or threads feeding the GPU (--device cuda; "
                   "0 = 4). Results do not depend on it.")
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda[:N]",
              help="Where the layers are computed. A CUDA build agrees with the CPU build up to float32 "
                   "rounding (docs/algorithm.md) and is byte-identical between CUDA runs.")
@click.option("--backend", type=click.Choice(["local", "dask"]), default="local", show_default=True,
              help="local: this machine. dask: the workers of an existing Dask cluster (needs --scheduler; "
                   "workers must see CKPT and --out at the same paths).")
@click.option("--scheduler", metavar="ADDRESS", help="Dask scheduler address for --backend dask, e.g. tcp://host:8786.")
@click.option("--overwrite", is_flag=True, help="Replace a pack of another config/checkpoint in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def build(ckpt, out, jobs, device, backend, scheduler, overwrite, as_json, quiet, **opts):
    """Compile the DuQuant pack of CKPT: per selected layer a permutation, block rotations and
    weight scales, written as a versioned pack directory.

    \b
    Deterministic: the same checkpoint and options give byte-identical packs for any --jobs.
    Resumable: rerunning an interrupted (or finished) build reuses every finished layer.
    Safe: the manifest is written last; a previous pack in --out stays valid until then.
    """
    from .build import build_pack, default_out_dir
    from .config import config_hash_of
    if device != "cpu":
        from .parallel import limit_malloc_arenas
        limit_malloc_arenas()  # before any thread starts (GPU builds run layers in threads)
    act_stats_path = opts.pop("act_stats_path")
    if act_stats_path is not None:
        from .act_stats import stats_file_id
        opts["act_stats"] = stats_file_id(act_stats_path)
    cfg, preset = _resolve_cfg(**opts)
    if out is None:
        out = default_out_dir(ckpt, config_hash_of(cfg), opts["preset"])
    if cfg.lambda_smooth is not None and cfg.act_stats is None and not as_json:
        click.echo("note: --lambda-smooth is recorded but has no effect on a weight-only build "
                   "(it rescales channel energies monotonically, so no order changes)", err=True)
    if scheduler is not None and backend != "dask":
        raise click.UsageError("--scheduler is only used with --backend dask")
    summary = build_pack(ckpt, out, cfg, preset=opts["preset"], jobs=jobs, overwrite=overwrite,
                         progress=not quiet and not as_json and sys.stderr.isatty(), act_stats=act_stats_path,
                         device=device, backend=backend, scheduler=scheduler)
    if as_json:
        from .groups import group_summary
        click.echo(json.dumps(dict(summary.to_dict(), groups=group_summary(summary.entries)), indent=2))
        return
    _print_build(summary)


def _print_build(summary) -> None:
    from .groups import group_summary
    click.echo(f"pack      {summary.out_dir}")
    click.echo(f"layers    {summary.layers} ({summary.computed} computed, {summary.reused} reused), "
               f"{summary.weights:,} weights")
    click.echo(f"time      {summary.seconds:.2f} s ({fmt_n(summary.weights_per_second)} weights/s)")
    click.echo(f"size      {fmt_bytes(summary.pack_bytes)}")
    click.echo(f"config    {summary.config_hash}")
    groups = group_summary(summary.entries)
    click.echo("")
    click.echo(f"{'group':<16} {'layers':>6} {'weights':>9}  {'W err pack':>10}  {'W err RTN':>9}")
    for name, g in groups.items():
        we = f"{g['w_rel_err']:.4f}" if g["w_rel_err"] is not None else "-"
        re_ = f"{g['rtn_rel_err']:.4f}" if g["rtn_rel_err"] is not None else "-"
        click.echo(f"{name:<16} {g['layers']:>6} {fmt_n(g['weights']):>9}  {we:>10}  {re_:>9}")
    click.echo("(W err: relative Frobenius error of the quantized weight, pack transforms vs plain "
               "round-to-nearest with per-row absmax scales, same bits)")


@cli.command()
@click.option("--arch", type=click.Choice(["pi05", "pi0"]), default="pi05", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for model.safetensors.")
@click.option("--layers", "n_layers", type=int, help="Keep the first N decoder layers of each tower.")
@click.option("--width-div", type=int, default=1, show_default=True, help="Divide widths by 1, 2, 4 or 8.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--include", metavar="RE", help="Only write tensors whose key matches RE (re.search).")
def synth(arch, out, n_layers, width_div, seed, dtype, include):
    """Write a synthetic pi0 / pi0.5 checkpoint with the real key names, heavy-tailed weights and
    outlier channels (deterministic for a seed; streamed, so full size needs little memory)."""
    from .synth import write_synth
    t0 = time.perf_counter()
    path = write_synth(out, arch, n_layers, width_div, seed, dtype, include)
    click.echo(f"wrote {path} ({fmt_bytes(path.stat().st_size)}) in {time.perf_counter() - t0:.1f} s")


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("packs/demo-pi05-llm-expert"),
              show_default=True, help="Pack directory (rebuilt from scratch).")
@click.option("--layers", "n_layers", type=int, default=2, show_default=True, help="Decoder layers per tower.")
@click.option("--width-div", type=int, default=4, show_default=True, help="Width divisor of the synthetic model.")
@click.option("--jobs", "-j", type=int, default=0, show_default=True, help="Worker processes; 0 = all cores.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def demo(out, n_layers, width_div, jobs, as_json):
    """Synthesize a small pi0.5 checkpoint, build it with the pi05-llm-expert preset, and report
    what was packed, the time, the pack size and the weight error vs plain round-to-nearest."""
    from .build import PENDING_NAME, build_pack
    from .config import resolve
    from .synth import write_synth
    if out.exists():
        if not ((out / "manifest.json").exists() or (out / PENDING_NAME).exists()):
            raise click.UsageError(f"{out} exists and is not a pack; choose another --out")
        shutil.rmtree(out)
    cfg, _ = resolve("pi05-llm-expert")
    with tempfile.TemporaryDirectory(prefix="duquant-demo-") as tmp:
        t0 = time.perf_counter()
        ckpt = write_synth(Path(tmp), "pi05", n_layers, width_div, seed=0)
        t_synth = time.perf_counter() - t0
        if not as_json:
            click.echo(f"synthetic pi0.5 ({n_layers} layers per tower, widths / {width_div}): "
                       f"{fmt_bytes(ckpt.stat().st_size)} in {t_synth:.1f} s")
        summary = build_pack(ckpt.parent, out, cfg, preset="pi05-llm-expert", jobs=jobs,
                             progress=not as_json and sys.stderr.isatty())
    if as_json:
        from .groups import group_summary
        click.echo(json.dumps(dict(summary.to_dict(), synth_seconds=round(t_synth, 3),
                                   groups=group_summary(summary.entries)), indent=2))
        return
    _print_build(summary)


@cli.command("inspect")
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_cmd(pack, as_json):
    """Show what a pack holds: format and tool versions, config, checkpoint fingerprint, layers by
    group with their weight error, bits and block sizes, calibration, bytes on disk."""
    from .inspect import format_inspect, inspect_pack
    info = inspect_pack(pack)
    click.echo(json.dumps(info, indent=2) if as_json else format_inspect(info))


@cli.command("verify")
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--ckpt", type=click.Path(path_type=Path),
              help="Also check the pack against this checkpoint: fingerprints, shapes, and that the "
                   "transforms followed by their inverse reproduce every weight.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify_cmd(pack, ckpt, as_json):
    """Check a pack: manifest schema and version, every file's checksum, rotations orthogonal to
    1e-5, permutations valid, scales finite and positive, no stray files. Exit 0 when everything
    holds, 1 with one line per problem otherwise."""
    from .verify import verify_pack, verify_summary
    problems = verify_pack(pack, ckpt)
    if as_json:
        click.echo(json.dumps(verify_summary(problems, pack, ckpt), indent=2))
    elif problems:
        for line in problems:
            click.echo(" ".join(line.split()))
    else:
        click.echo(f"ok: {pack}" + (f" matches {ckpt}" if ckpt else ""))
    if problems:
        raise click.exceptions.Exit(1)


@cli.command("diff")
@click.argument("pack_a", type=click.Path(path_type=Path))
@click.argument("pack_b", type=click.Path(path_type=Path))
@click.option("--ckpt", type=click.Path(path_type=Path),
              help="Recompute each pack's weight reconstruction error per layer from this checkpoint "
                   "(otherwise the errors recorded at build time are compared).")
@click.option("--top", type=int, default=10, show_default=True, help="Most-changed layers to list.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (every layer).")
def diff_cmd(pack_a, pack_b, ckpt, top, as_json):
    """Compare two packs: is config B better than A, and where? Leads with the verdict and a
    per-group error table, then the config differences and the most-changed layers (permutation,
    rotations after sign canonicalization, scales, weight error of each)."""
    from .diff import diff_packs, format_diff
    d = diff_packs(pack_a, pack_b, ckpt)
    click.echo(json.dumps(d, indent=2) if as_json else format_diff(d, top=top))


@cli.command("report")
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--ckpt", type=click.Path(path_type=Path), required=True, help="The checkpoint the pack was built from.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="report.png or report.html")
@click.option("--json", "as_json", is_flag=True, help="Also print the per-group and per-layer numbers as JSON.")
def report_cmd(pack, ckpt, out, as_json):
    """Draw where quantization hurts: per layer group, the weight error with the pack vs plain
    round-to-nearest at the same bits, and per input block the max/median of the transformed
    weights. Needs matplotlib (pip install 'duquant[report]')."""
    from .report import build_report
    rep = build_report(pack, ckpt, out)
    if as_json:
        click.echo(json.dumps(dict(rep, out=str(rep["out"])), indent=2))
        return
    click.echo(f"wrote {rep['out']}")
    for name, g in rep["groups"].items():
        click.echo(f"  {name:<16} " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in g.items()))


@cli.command("import-legacy")
@click.argument("npz_dir", type=click.Path(path_type=Path))
@click.option("--ckpt", type=click.Path(path_type=Path), required=True,
              help="The checkpoint the .npz files were made from (every shape is checked against it).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Pack directory to write.")
@click.option("--wbits", type=int, help="Weight bits (default: the files' meta, else 4).")
@click.option("--abits", type=int, default=8, show_default=True, help="Activation bits recorded for the runtime.")
@click.option("--row-rot", type=click.Choice(["restore", "disabled"]), default="restore", show_default=True,
              help="Import the files' output rotations (old ROW_ROT=restore) or drop them (ROW_ROT=0).")
@click.option("--overwrite", is_flag=True, help="Replace a duquant pack already in --out.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def import_legacy_cmd(npz_dir, ckpt, out, wbits, abits, row_rot, overwrite, as_json):
    """Convert a directory of openpi_duquant per-layer .npz packs (layer name = file name minus
    .npz) into a versioned pack. Never unpickles; every file and shape is checked before anything
    is written."""
    from .legacy import import_legacy
    summary = import_legacy(npz_dir, ckpt, out, overwrite=overwrite, wbits=wbits, abits=abits, row_rot=row_rot)
    if as_json:
        from .groups import group_summary
        click.echo(json.dumps(dict(summary.to_dict(), groups=group_summary(summary.entries)), indent=2))
        return
    _print_build(summary)


def main(argv=None) -> int:
    """Console entry point: run the group, turn expected errors into one line and an exit code."""
    try:
        rv = cli.main(args=argv, prog_name="duquant-pack", standalone_mode=False)
        return rv if isinstance(rv, int) else 0  # click returns an Exit's code here
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("error: interrupted (rerun the same command to resume)", err=True)
        return 130
    except click.UsageError as e:
        if _DEBUG:
            raise
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        click.echo(f"error: {' '.join(e.format_message().split())}{hint}", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
        return 1
    except DuquantError as e:
        if _DEBUG:
            raise
        click.echo(f"error: {' '.join(str(e).split())}", err=True)
        return 1
    except OSError as e:  # the system refused (disk full, read-only file system, permissions): not a bug
        if _DEBUG:
            raise
        where = f"{e.filename}: " if e.filename else ""
        reason = os.strerror(e.errno) if e.errno else " ".join(str(e).split()) or e.__class__.__name__
        click.echo(f"error: {where}{reason}", err=True)
        return 1
    except Exception as e:  # an unexpected failure: still one line, with a way to see more
        if _DEBUG:
            raise
        click.echo(f"error: internal error: {e.__class__.__name__}: {' '.join(str(e).split())} "
                   "(rerun with --debug for the traceback)", err=True)
        return 3


if __name__ == "__main__":
    sys.exit(main())
