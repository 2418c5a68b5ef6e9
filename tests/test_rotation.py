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


def _null_space_by_projector(v):
    """The greedy rule of `_null_space_basis` the direct way: form the projector I - Q Q^T, take
    its column of largest norm (first on a tie), normalize, repeat."""
    b, k = v.shape
    basis, cols, eye = v.clone(), [], torch.eye(b, dtype=v.dtype)
    for _ in range(b - k):
        resid = eye - basis @ (basis.t() @ eye)
        norms = resid.norm(dim=0)
        i = int(torch.argmax(norms))
        u = resid[:, i] / norms[i]
        u = u - basis @ (basis.t() @ u)
        u = u / u.norm()
        cols.append(u)
        basis = torch.cat([basis, u[:, None]], dim=1)
    return torch.stack(cols, dim=1) if cols else torch.empty(b, 0, dtype=v.dtype)


@pytest.mark.parametrize("b,k", [(16, 5), (64, 30), (64, 0), (128, 64), (64, 63)])
def test_null_space_basis_follows_the_greedy_unit_vector_rule(b, k):
    from duquant_pack.rotation import _null_space_basis
    g = torch.Generator().manual_seed(b + k)
    v = torch.linalg.qr(torch.randn(b, k, dtype=torch.float64, generator=g))[0] if k else torch.empty(b, 0, dtype=torch.float64)
    null = _null_space_basis(v)
    assert null.shape == (b, b - k)
    torch.testing.assert_close(null, _null_space_by_projector(v), rtol=0, atol=1e-12)
    full = torch.cat([v, null], dim=1)
    torch.testing.assert_close(full.t() @ full, torch.eye(b, dtype=torch.float64), rtol=0, atol=1e-12)


def test_null_space_of_unit_vectors_is_the_remaining_unit_vectors_with_positive_zeros():
    from duquant_pack.rotation import _null_space_basis
    v = torch.zeros(6, 2, dtype=torch.float64)
    v[0, 0] = v[3, 1] = 1.0  # e.g. a block whose weight columns other than 0 and 3 are all zero
    null = _null_space_basis(v)
    assert torch.equal(null, torch.eye(6, dtype=torch.float64)[:, [1, 2, 4, 5]])
    assert not torch.signbit(null).any()  # no -0.0: the same bytes as the identity's


def test_rank_deficient_block_rotation_is_orthogonal_and_canonical():
    w = _w(8, 64, seed=21)  # 8 rows: rank 8 in a 64-wide block, a 56-dimensional null space
    rot = input_rotations(w, 64)
    assert ortho_err(rot) < 1e-12
    _check_canonical_signs(rot)
    g = column_block_grams(w, 64)[0]
    lead = rot[0, :, :8]
    torch.testing.assert_close(lead.t() @ g @ lead, torch.diag(torch.linalg.eigvalsh(g).flip(0)[:8]), rtol=0, atol=1e-9)
