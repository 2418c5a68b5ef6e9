"""duquant_pack.rotation: canonical principal-axis block rotations."""

import pytest
import torch

from duquant_pack.rotation import column_block_grams, input_rotations, output_rotations, principal_rotations

from _util import ortho_err


def _w(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w[:, ::7] *= 5  # uneven column scales: well separated eigenvalues
    return w


def _check_canonical_signs(rot: torch.Tensor):
    for blk in rot:
        idx = blk.abs().argmax(dim=0)  # first max per column
        vals = blk[idx, torch.arange(blk.shape[1])]
        assert bool((vals > 0).all())


@pytest.mark.parametrize("out_f,in_f,block", [(40, 64, 16), (40, 70, 16), (12, 20, 64), (50, 30, 30)])
def test_rotations_orthogonal_canonical_and_descending(out_f, in_f, block):
    w = _w(out_f, in_f)
    b = min(block, in_f)
    rot = input_rotations(w, b)
    nb = -(-in_f // b)
    assert rot.dtype == torch.float64 and rot.shape == (nb, b, b)
    assert ortho_err(rot) < 1e-12
    _check_canonical_signs(rot)
    grams = column_block_grams(w, b)
    tail = in_f - (nb - 1) * b
    for i in range(nb):
        r = tail if i == nb - 1 else b
        d = rot[i, :r, :r].T @ grams[i, :r, :r] @ rot[i, :r, :r]
        ev = torch.diagonal(d)
        off = d - torch.diag(ev)
        assert float(off.abs().max()) < 1e-9 * float(ev.abs().max())  # eigenvectors
        assert bool((ev[:-1] >= ev[1:] - 1e-9).all())  # descending eigenvalues


def test_partial_last_block_is_identity_outside_corner():
    w = _w(20, 70)
    rot = input_rotations(w, 16)  # 4 full blocks + 6 columns
    last = rot[-1]
    assert torch.equal(last[6:, :], torch.eye(16, dtype=torch.float64)[6:, :])
    assert torch.equal(last[:, 6:], torch.eye(16, dtype=torch.float64)[:, 6:])
    assert ortho_err(last[:6, :6].unsqueeze(0)) < 1e-12


def test_gram_matches_definition_with_padding():
    w = _w(9, 10)
    grams = column_block_grams(w, 4)  # blocks 4, 4, 2 (+2 zero padding)
    w64 = w.double()
    torch.testing.assert_close(grams[1], w64[:, 4:8].T @ w64[:, 4:8])
    assert torch.equal(grams[2, 2:, :], torch.zeros(2, 4, dtype=torch.float64))
    torch.testing.assert_close(grams[2, :2, :2], w64[:, 8:].T @ w64[:, 8:])


def test_matches_svd_right_singular_vectors_up_to_sign():
    w = _w(30, 16, seed=3)
    rot = input_rotations(w, 16)[0]
    _, _, vh = torch.linalg.svd(w.double(), full_matrices=True)
    v = vh.T
    signs = torch.sign(v[v.abs().argmax(dim=0), torch.arange(16)])
    torch.testing.assert_close(rot, v * signs, rtol=0, atol=1e-9)


def test_deterministic_and_sign_invariant():
    w = _w(33, 48, seed=5)
    a = input_rotations(w, 16)
    b = input_rotations(w.clone(), 16)
    assert torch.equal(a, b)
    # -W has the same Gram matrices: canonical signs give the very same rotations
    torch.testing.assert_close(input_rotations(-w, 16), a, rtol=0, atol=1e-12)


def test_output_rotations_are_row_block_rotations_and_ignore_input_transform():
    w = _w(24, 40, seed=2)
    r_out = output_rotations(w, 8)
    assert r_out.shape == (3, 8, 8)
    torch.testing.assert_close(r_out, input_rotations(w.t(), 8))
    # W and W Q (Q orthogonal) have the same W W^T, hence the same output rotations
    q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(9)))
    torch.testing.assert_close(output_rotations((w.double() @ q), 8), r_out.double(), rtol=0, atol=1e-8)


def test_principal_rotations_zero_gram_gives_orthogonal_canonical_matrix():
    rot = principal_rotations(torch.zeros(2, 4, 4, dtype=torch.float64), 4)
    assert ortho_err(rot) < 1e-12
    _check_canonical_signs(rot)


def test_gram_chunking_does_not_change_results(monkeypatch):
    import duquant_pack.rotation as rot_mod
    w = _w(37, 50, seed=11)
    ref = column_block_grams(w, 16)
    monkeypatch.setattr(rot_mod, "_CHUNK_ELEMS", 64)  # one row per chunk
    torch.testing.assert_close(column_block_grams(w, 16), ref, rtol=1e-12, atol=1e-12)


def test_row_block_grams_match_definition():
    from duquant_pack.rotation import row_block_grams
    w = _w(10, 6, seed=12)
    g = row_block_grams(w, 4)  # row blocks 4, 4, 2
    w64 = w.double()
    assert g.shape == (3, 4, 4)
    torch.testing.assert_close(g[1], w64[4:8] @ w64[4:8].T)
    torch.testing.assert_close(g[2, :2, :2], w64[8:] @ w64[8:].T)
    assert torch.equal(g[2, 2:], torch.zeros(2, 4, dtype=torch.float64))
