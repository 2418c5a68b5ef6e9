"""Quality report of a pack against its checkpoint: where does weight quantization hurt?

    write_report("packs/pi05-w4a8", "ckpt_dir", "report.png")   # or report.html

One row of plots per layer group (vision / language model / action expert / other):

- left: each layer's relative weight reconstruction error with the pack vs plain round-to-nearest
  (per-row absmax) at the same bits, layers in natural name order;
- right: a heat strip per layer of max/median |W_t| for every input block of the transformed
  weight (log10 colour scale): bright blocks still hold outliers after permutation and rotation.

The HTML variant is one self-contained page: the same picture embedded as base64 PNG, a summary
table per group and a per-layer table. Needs matplotlib (the optional extra ``duquant[report]``);
rendering uses the Agg canvas directly (no pyplot, no display, no network).
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np

from duquant_runtime.atomic import atomic_file
from duquant_runtime.errors import DuquantError
from duquant_runtime.fingerprint import weight_fingerprint
from duquant_runtime.pack import Pack, load_pack

from .checkpoint import Checkpoint, natural_key
from .diff import short_name
from .groups import GROUPS, group_summary, layer_group
from .quality import layer_error

_MISSING = "the quality report needs matplotlib: pip install 'duquant[report]'"


def _require_matplotlib():
    """(Figure, FigureCanvasAgg), or DuquantError naming the extra to install."""
    try:
        import matplotlib  # noqa: F401  (first, so a blocked parent package fails here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DuquantError(_MISSING) from None
    return Figure, FigureCanvasAgg


def collect_quality(pack, ckpt) -> list[dict]:
    """`quality.layer_error` of every layer of the pack (natural name order) plus its group and
    max/median block ratios; each weight is checked against the layer's weight fingerprint."""
    p = pack if isinstance(pack, Pack) else load_pack(pack)
    ck = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint(ckpt)
    rows = []
    for name in sorted(p.layer_names, key=natural_key):
        key = name + ".weight"
        if key not in ck.tensors:
            raise DuquantError(f"{ck.path}: has no tensor '{key}' (layer of the pack)")
        lp = p.layer(name)
        w = ck.read_weight(key)
        if weight_fingerprint(w) != lp.meta["weight_fingerprint"]:
            raise DuquantError(f"layer '{name}': the pack was built from a different weight than {ck.path} holds")
        q = layer_error(w, lp)
        bmax, bmed = np.asarray(q["block_max"]), np.asarray(q["block_median"])
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(bmed > 0, bmax / np.where(bmed > 0, bmed, 1.0), np.nan)
        q.update(group=layer_group(name), in_features=lp.in_features, out_features=lp.out_features,
                 block_ratio=[float(v) for v in ratio])
        rows.append(q)
    return rows


def _group_order(rows: list[dict]) -> list[str]:
    present = {r["group"] for r in rows}
    return [g for g in GROUPS if g in present] + sorted(present - set(GROUPS))


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per group: layers, weights, Frobenius-weighted pack / RTN error (quantized layers), worst layer,
    median and max block max/median ratio."""
    entries = [{"name": r["name"], "in_features": r["in_features"], "out_features": r["out_features"],
                "stats": ({"w_fro": r["w_fro"], "w_rel_err": r["w_rel_err"], "rtn_rel_err": r["rtn_rel_err"]}
                          if r["wbits"] > 0 else {})} for r in rows]
    base = group_summary(entries)
    out = {}
    for g in _group_order(rows):
        rs = [r for r in rows if r["group"] == g]
        ratios = np.array([v for r in rs for v in r["block_ratio"]], dtype=np.float64)
        ratios = ratios[np.isfinite(ratios)]
        quant = [r for r in rs if r["wbits"] > 0]
        worst = max(quant, key=lambda r: r["w_rel_err"]) if quant else None
        s = dict(base.get(g, {"layers": len(rs), "weights": 0, "w_rel_err": None, "rtn_rel_err": None}))
        s.update(quantized=len(quant), bits=sorted({r["wbits"] for r in rs}),
                 worst_layer=worst["name"] if worst else None, worst_err=worst["w_rel_err"] if worst else None,
                 block_ratio_median=float(np.median(ratios)) if ratios.size else None,
                 block_ratio_max=float(ratios.max()) if ratios.size else None)
        out[g] = s
    return out


def render_png(rows: list[dict], title: str = "") -> bytes:
    """The report picture as PNG bytes."""
    Figure, FigureCanvasAgg = _require_matplotlib()
    groups = _group_order(rows)
    if not groups:
        raise DuquantError("the pack has no layers to report on")
    fig = Figure(figsize=(16, 1.2 + 4.2 * len(groups)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), 2, squeeze=False, gridspec_kw={"width_ratios": [1.25, 1]})
    for gi, g in enumerate(groups):
        rs = [r for r in rows if r["group"] == g]
        labels = [short_name(r["name"]) for r in rs]
        x = np.arange(len(rs))
        ax = axes[gi][0]
        ax.bar(x - 0.2, [r["rtn_rel_err"] for r in rs], 0.4, color="#b0b0b0", label="plain RTN (absmax)")
        ax.bar(x + 0.2, [r["w_rel_err"] for r in rs], 0.4, color="#1f77b4", label="DuQuant pack")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=90, fontsize=max(4, min(8, int(600 / max(len(rs), 1)))))
        ax.set_xlim(-0.6, len(rs) - 0.4)
        ax.set_ylabel("relative weight error ||Q(W)-W|| / ||W||")
        err = [(r["w_rel_err"], r["rtn_rel_err"], r["w_fro"]) for r in rs if r["wbits"] > 0]
        n2 = sum(f * f for _, _, f in err)
        if n2 > 0:
            pe = math.sqrt(sum((e * f) ** 2 for e, _, f in err) / n2)
            re_ = math.sqrt(sum((e * f) ** 2 for _, e, f in err) / n2)
            sub = f"pack {pe:.4f} vs RTN {re_:.4f} (Frobenius-weighted)"
        else:
            sub = "no quantized layers"
        bits = sorted({r["wbits"] for r in rs})
        ax.set_title(f"{g}: {len(rs)} layers, W{'/'.join(str(b) for b in bits)} - {sub}", fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(axis="y", alpha=0.3)

        ax = axes[gi][1]
        width = max(len(r["block_ratio"]) for r in rs)
        img = np.full((len(rs), width), np.nan)
        for i, r in enumerate(rs):
            v = np.asarray(r["block_ratio"], dtype=np.float64)
            img[i, :v.size] = np.log10(np.where(v > 0, v, np.nan))
        im = ax.imshow(np.ma.masked_invalid(img), aspect="auto", interpolation="nearest", cmap="magma")
        ax.set_yticks(np.arange(len(rs)))
        ax.set_yticklabels(labels, fontsize=max(4, min(8, int(400 / max(len(rs), 1)))))
        ax.set_xlabel("input block of W_t")
        ax.set_facecolor("#e8e8e8")
        ax.set_title(f"{g}: max/median |W_t| per input block (log10)", fontsize=10)
        cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
        cb.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.985 if title else 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _f(x, fmt="{:.4f}") -> str:
    return "-" if x is None else fmt.format(x)


def render_html(rows: list[dict], png: bytes, title: str) -> str:
    """Self-contained page: the PNG as base64, a summary table per group, a per-layer table."""
    summ = summarize(rows)
    e = html.escape
    out = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:0.5em 0 1.5em}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
           "img{max-width:100%}</style></head><body>", f"<h1>{e(title)}</h1>",
           "<p>Relative weight reconstruction error ||Q(W<sub>t</sub>) - W<sub>t</sub>||<sub>F</sub> / ||W||<sub>F</sub> "
           "of the pack vs plain round-to-nearest (per-row absmax) at the same bits, and max/median |W<sub>t</sub>| "
           "per input block of the transformed weight (large = outliers left after the transforms).</p>",
           "<h2>Summary per layer group</h2><table><tr><th>group</th><th>layers</th><th>quantized</th><th>bits</th>"
           "<th>weights</th><th>pack error</th><th>RTN error</th><th>change vs RTN</th><th>worst layer</th>"
           "<th>worst error</th><th>block max/median (median)</th><th>block max/median (max)</th></tr>"]
    for g, s in summ.items():
        ch = (f"{100.0 * (s['w_rel_err'] - s['rtn_rel_err']) / s['rtn_rel_err']:+.1f}%"
              if s["w_rel_err"] is not None and s["rtn_rel_err"] else "-")
        out.append(f"<tr><td>{e(g)}</td><td>{s['layers']}</td><td>{s['quantized']}</td>"
                   f"<td>{e('/'.join(str(b) for b in s['bits']))}</td><td>{s['weights']:,}</td>"
                   f"<td>{_f(s['w_rel_err'])}</td><td>{_f(s['rtn_rel_err'])}</td><td>{ch}</td>"
                   f"<td>{e(short_name(s['worst_layer'])) if s['worst_layer'] else '-'}</td><td>{_f(s['worst_err'])}</td>"
                   f"<td>{_f(s['block_ratio_median'], '{:.1f}')}</td><td>{_f(s['block_ratio_max'], '{:.1f}')}</td></tr>")
    out.append("</table>")
    out.append(f'<img alt="weight error and block statistics per layer group" '
               f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')
    out.append("<details><summary>All layers</summary><table><tr><th>layer</th><th>group</th><th>shape</th>"
               "<th>bits</th><th>block</th><th>pack error</th><th>RTN error</th><th>block max/median (max)</th></tr>")
    for r in rows:
        finite = [v for v in r["block_ratio"] if math.isfinite(v)]
        out.append(f"<tr><td>{e(r['name'])}</td><td>{e(r['group'])}</td><td>{r['out_features']}x{r['in_features']}</td>"
                   f"<td>{r['wbits'] or '-'}</td><td>{r['block_in']}</td><td>{r['w_rel_err']:.4f}</td>"
                   f"<td>{r['rtn_rel_err']:.4f}</td><td>{_f(max(finite) if finite else None, '{:.1f}')}</td></tr>")
    out.append("</table></details></body></html>")
    return "\n".join(out) + "\n"


def write_report(pack, ckpt, out_path) -> Path:
    """Write the quality report of `pack` (Pack or directory) against `ckpt` (Checkpoint or path) to
    `out_path` (.png or .html); returns the path written."""
    return build_report(pack, ckpt, out_path)["out"]


def build_report(pack, ckpt, out_path) -> dict:
    """Like `write_report`; returns {"out": Path, "groups": per-group summary, "layers": rows}."""
    out = Path(out_path)
    kind = out.suffix.lower()
    if kind not in (".png", ".html", ".htm"):
        raise DuquantError(f"{out}: the report must be a .png or .html file")
    _require_matplotlib()  # fail before the (long) computation
    p = pack if isinstance(pack, Pack) else load_pack(pack)
    rows = collect_quality(p, ckpt)
    m = p.manifest
    title = f"duquant pack {p.path.name} ({m.get('preset') or 'custom'}, {m['config_hash'][:19]}, {len(rows)} layers)"
    png = render_png(rows, title)
    data = png if kind == ".png" else render_html(rows, png, title).encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as t:
        t.tmp.write_bytes(data)
    return {"out": out, "groups": summarize(rows), "layers": rows}
