"""Truncated SVD: the same top-r subspace and singular values as a full SVD."""
import pytest
import torch

from smile_ray.files import default_file_mode
from smile_ray.smile import svd
from smile_ray.smile.svd import SvdCache, truncated_svd


def projector(basis):
    return basis @ basis.T


@pytest.mark.parametrize("shape", [(40, 40), (90, 30), (30, 90)])
@pytest.mark.parametrize("rank", [1, 7, 30])
def test_truncated_matches_full_svd(shape, rank):
    a = torch.randn(*shape) @ torch.diag(torch.logspace(0, -2, shape[1])) * 0.05
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=True)
    f = truncated_svd(a, rank)
    assert f.u.shape == (shape[0], rank) and f.v.shape == (shape[1], rank) and f.u.dtype == torch.float32
    torch.testing.assert_close(f.s.double(), s[:rank], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(projector(f.u.double()), projector(u[:, :rank]), rtol=0, atol=1e-4)
    torch.testing.assert_close(projector(f.v.double()), projector(vh[:rank].T), rtol=0, atol=1e-4)
    torch.testing.assert_close(((f.u * f.s) @ f.v.T).double(), (u[:, :rank] * s[:rank]) @ vh[:rank], rtol=0, atol=1e-6)
    assert f.complete == (rank == min(shape))


def test_rank_is_clamped_and_null_directions_are_zero():
    low_rank = torch.randn(20, 3) @ torch.randn(3, 16)
    f = truncated_svd(low_rank, 50)
    assert f.rank == 16 and f.complete
    assert (f.s[3:] == 0).all() and (f.u[:, 3:] == 0).all() and (f.v[:, 3:] == 0).all()
    torch.testing.assert_close((f.u * f.s) @ f.v.T, low_rank, rtol=1e-4, atol=1e-4)
    zero = truncated_svd(torch.zeros(5, 4), 2)
    assert (zero.s == 0).all() and (zero.v == 0).all()


def test_cache_slices_smaller_ranks_and_refuses_larger(tmp_path):
    cache = SvdCache(tmp_path)
    f = truncated_svd(torch.randn(12, 10), 4)
    cache.put("abc", f)
    assert cache.get("abc", 2).rank == 2 and cache.get("abc", 4).rank == 4
    assert cache.get("abc", 5) is None and cache.get("missing", 1) is None
    cache.put("abc", truncated_svd(torch.randn(12, 10), 10))         # complete factors answer every rank
    assert cache.get("abc", 9).rank == 9
    assert not list(tmp_path.rglob("*.tmp"))
    entries = [path for path in tmp_path.rglob("*") if path.is_file()]        # readable by a sweep's other nodes
    assert entries and all(path.stat().st_mode & 0o777 == default_file_mode() for path in entries)


def test_small_decompositions_run_on_one_thread_and_large_ones_on_all(monkeypatch):
    from smile_ray.smile import svd

    seen = []
    decompose = svd._decompose
    monkeypatch.setattr(svd, "_decompose", lambda *args: seen.append(torch.get_num_threads()) or decompose(*args))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        svd.truncated_svd(torch.randn(512, svd.MIN_PARALLEL_GRAM - 1), 8)
        svd.truncated_svd(torch.randn(svd.MIN_PARALLEL_GRAM, 600), 8)
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def decaying(m, n, decay=1.5, seed=0):
    """A matrix with singular values j^-decay, as fine-tuned task vectors' spectra fall off."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64)).Q
    return ((u * torch.arange(1, min(m, n) + 1).double() ** -decay) @ v.T).float()


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_randomized_solver_agrees_with_the_exact_one_on_a_decaying_spectrum(shape):
    a = decaying(*shape)
    exact, fast = truncated_svd(a, 8), truncated_svd(a, 8, solver="randomized")
    assert fast.u.shape == exact.u.shape and fast.v.shape == exact.v.shape and not fast.complete
    torch.testing.assert_close(fast.s, exact.s, rtol=1e-4, atol=0)
    torch.testing.assert_close(projector(fast.v), projector(exact.v), rtol=0, atol=1e-3)
    torch.testing.assert_close((fast.u * fast.s) @ fast.v.T, (exact.u * exact.s) @ exact.v.T, rtol=0, atol=1e-5)
    again = truncated_svd(a, 8, solver="randomized")                 # seeded: the same factors every time
    assert torch.equal(again.u, fast.u) and torch.equal(again.v, fast.v)


def test_randomized_solver_hands_over_to_the_exact_one_on_a_flat_spectrum(monkeypatch):
    noise = torch.randn(300, 200, generator=torch.Generator().manual_seed(3))      # σ₈ ≈ σ₉: no sketch finds it
    assert svd._randomized(noise, 8, 24, "cpu") is None
    fast, exact = truncated_svd(noise, 8, solver="randomized"), truncated_svd(noise, 8)
    assert torch.equal(fast.u, exact.u) and torch.equal(fast.v, exact.v)


def test_randomized_solver_hands_over_to_the_exact_one_where_a_sketch_saves_nothing(monkeypatch):
    a = decaying(60, 40)
    calls = []
    monkeypatch.setattr(svd, "_randomized", lambda *args: calls.append(args) or None)
    for rank in (8, 40):                      # sketches of 24 and 88 columns, against half of 40
        fast, exact = truncated_svd(a, rank, solver="randomized"), truncated_svd(a, rank)
        assert torch.equal(fast.u, exact.u) and torch.equal(fast.s, exact.s)
    assert not calls


def damage(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:                                    # a valid file with another matrix's factors under this key
        other = truncated_svd(torch.randn(7, 5), 4)
        from safetensors.torch import save_file
        save_file({"u": other.u, "s": other.s, "v": other.v, "complete": torch.tensor([False])}, path)


@pytest.mark.parametrize("how", ["truncated", "empty", "wrong_shape"])
def test_a_damaged_cache_entry_is_named_recomputed_and_replaced(tmp_path, how):
    from smile_ray.smile.svd import Decomposer

    matrix = decaying(40, 30)
    decomposer = Decomposer(tmp_path)
    fresh = decomposer.factors(matrix, 4, "k1")
    (entry,) = [path for path in tmp_path.rglob("*.safetensors")]
    damage(entry, how)
    again = Decomposer(tmp_path)
    with pytest.warns(UserWarning, match=f"SVD cache entry {entry} is damaged"):
        recomputed = again.factors(matrix, 4, "k1")
    assert again.stats.computed == 1 and again.stats.cache_hits == 0
    assert torch.equal(recomputed.u, fresh.u) and torch.equal(recomputed.v, fresh.v)
    assert SvdCache(tmp_path).get("k1", 4, (40, 30)) is not None          # replaced by a good entry
