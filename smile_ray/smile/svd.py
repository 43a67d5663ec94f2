"""Truncated SVD of weight matrices and its content-addressed cache on disk.

Two solvers for the top-r singular triplets of a matrix A (m × n):
  exact       the eigendecomposition of the smaller Gram matrix (AᵀA or AAᵀ) in float64: the same top-r
              subspace as a full SVD, to float32 rounding, while skipping the factor that a full SVD spends on
              the discarded directions.
  randomized  a randomized range finder with power iterations (Halko, Martinsson & Tropp 2011, alg. 4.4) in
              float32: O(m·n·r) instead of O(m·n·min(m, n)). Accurate where the spectrum decays past rank r, as
              fine-tuned task vectors' do. Its factors are checked: where the residual ‖A vᵢ − σᵢ uᵢ‖ of some
              triplet exceeds RESIDUAL_TOLERANCE · σ₁ (a flat spectrum), the exact solver decomposes the matrix
              instead. bench/vs_reference.py measures its errors and speed against the exact solver.

The cache stores (U, s, V) per (layer name, content of W0, content of Wᵢ, what was decomposed) as
safetensors files. A request for rank ≤ the cached rank is a slice of the cached factors; a larger
rank is recomputed and replaces the entry. Files are written atomically, so the cache can live on
storage shared by many processes or nodes; and a decomposition is claimed (an exclusive lock on `<entry>.lock`)
while it is computed, so processes that need the same one at once, two sweeps sharing a cache for instance,
compute it once: the others wait and read it. (Where the file system has no locks, each computes it.)
"""
from __future__ import annotations

import fcntl
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash
from safetensors.torch import load_file, save_file

from smile_ray.files import default_file_mode

MIN_PARALLEL_GRAM = 256         # smaller side below which one thread is faster (bench/svd_threads.py)
SOLVERS = ("exact", "randomized")
POWER_ITERATIONS = 4            # randomized: passes of AᵀA over the sketch
SKETCH_EXTRA = 8                # randomized: the sketch holds 2·rank + SKETCH_EXTRA columns
RESIDUAL_TOLERANCE = 1e-4       # randomized: the largest accepted ‖A vᵢ − σᵢ uᵢ‖ / σ₁
GRAM_BLOCK_BYTES = 4 << 20      # on a CPU, rows are taken to float64 this many bytes at a time
_counter_lock = threading.Lock()
_svd_calls = 0


def svd_call_count() -> int:
    """Number of SVDs this process has computed (cache hits excluded)."""
    return _svd_calls


@dataclass
class Factors:
    """Top-r singular triplets: A ≈ U diag(s) Vᵀ with U (m, r), s (r,), V (n, r), s descending."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    complete: bool  # r == min(m, n): every smaller rank is a slice of these factors

    @property
    def rank(self) -> int:
        return self.s.numel()

    def truncate(self, rank: int) -> "Factors":
        rank = min(rank, self.rank)
        return Factors(self.u[:, :rank], self.s[:rank], self.v[:, :rank], self.complete and rank == self.rank)


def truncated_svd(matrix: torch.Tensor, rank: int, device: torch.device | str | None = None,
                  solver: str = "exact") -> Factors:
    """Top-`rank` singular triplets of `matrix` (m × n), computed on `device` by `solver` (see SOLVERS), returned
    in float32 on CPU. The randomized solver hands over to the exact one where its sketch would not be smaller
    than half of min(m, n) (there it saves nothing) and where its factors fail the residual check.

    rank is clamped to min(m, n). Directions whose singular value is zero to working precision
    (≤ 1e-6 · s₁) get s = 0 and zero singular vectors, where a full SVD would return arbitrary
    orthonormal ones: they add nothing to an expert and nothing to a router logit.

    On a CPU, a matrix whose smaller side is below MIN_PARALLEL_GRAM is decomposed on one thread: there, more
    threads only add their start-up, and when the other cores are busy they wait on each other for tens of
    milliseconds per call (`bench/svd_threads.py`).
    """
    global _svd_calls
    on_cpu = torch.device(device or matrix.device).type == "cpu"
    with torch_threads(1 if on_cpu and min(matrix.shape) < MIN_PARALLEL_GRAM else None):
        sketch = 2 * min(rank, min(matrix.shape)) + SKETCH_EXTRA
        factors = None
        if solver == "randomized" and 2 * sketch <= min(matrix.shape):
            factors = _randomized(matrix, rank, sketch, device)
        if factors is None:
            factors = _decompose(matrix, rank, device)
    with _counter_lock:
        _svd_calls += 1
    return factors


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `count` inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if count is None or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _decompose(matrix: torch.Tensor, rank: int, device: torch.device | str | None) -> Factors:
    """truncated_svd's work, on the threads torch has now. The float64 Gram matrix and the other side's vectors
    are accumulated over blocks of rows, so the matrix is never copied whole in float64."""
    m, n = matrix.shape
    full = min(m, n)
    rank = min(rank, full)
    device = torch.device(device or matrix.device)
    rows = matrix.T if m < n else matrix         # work with the smaller Gram matrix: rows (p × q), q = min(m, n)
    block = len(rows) if device.type != "cpu" else max(1, GRAM_BLOCK_BYTES // (8 * rows.shape[1]))
    gram = torch.zeros(full, full, dtype=torch.float64, device=device)
    for b in rows.split(block):
        b = b.to(device=device, dtype=torch.float64)
        gram.addmm_(b.T, b)
    eigvals, eigvecs = torch.linalg.eigh(gram)                   # ascending
    del gram
    eigvals, eigvecs = eigvals.flip(0)[:rank], eigvecs.flip(1)[:, :rank]
    s = eigvals.clamp_min(0).sqrt()
    live = s > s[:1] * 1e-6                  # below this, the Gram matrix's float64 rounding dominates
    other = torch.cat([b.to(device=device, dtype=torch.float64) @ eigvecs for b in rows.split(block)])
    other = other / torch.where(live, s, 1.0)
    u, v = (eigvecs, other) if m < n else (other, eigvecs)
    return _factors(u, s, v, live, rank == full)


def _randomized(matrix: torch.Tensor, rank: int, sketch: int, device: torch.device | str | None) -> Factors | None:
    """truncated_svd's randomized solver: an orthonormal basis Q (m × sketch) of A Ω for a seeded Gaussian Ω,
    refined by POWER_ITERATIONS passes of A Aᵀ (re-orthonormalised at every product), then the exact SVD of the
    small Qᵀ A. The same matrix always gives the same factors (Ω is drawn from a fixed seed). None when a
    triplet's residual fails RESIDUAL_TOLERANCE. (Aᵀ uᵢ = σᵢ vᵢ holds by construction: A vᵢ is the side to check.)"""
    device = torch.device(device or matrix.device)
    a = matrix.to(device=device, dtype=torch.float32)
    generator = torch.Generator(device=device).manual_seed(0)
    omega = torch.randn(a.shape[1], sketch, generator=generator, device=device)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(POWER_ITERATIONS):
        q = torch.linalg.qr(a @ torch.linalg.qr(a.T @ q).Q).Q
    u_small, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    u, s, v = q @ u_small[:, :rank], s[:rank], vh[:rank].T
    if (a @ v - u * s).norm(dim=0).max() > RESIDUAL_TOLERANCE * s[0]:
        return None
    return _factors(u, s, v, s > s[:1] * 1e-6, False)


def _factors(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, live: torch.Tensor, complete: bool) -> Factors:
    """Factors in float32 on the CPU, the directions that are not `live` zeroed (s and both vectors)."""
    to_cpu = {"device": "cpu", "dtype": torch.float32}
    u, s, v = u * live, s * live, v * live
    return Factors(u.to(**to_cpu).contiguous(), s.to(**to_cpu), v.to(**to_cpu).contiguous(), complete)


def tensor_digest(tensor: torch.Tensor) -> str:
    """Content hash of a tensor (dtype, shape and bytes)."""
    t = tensor.detach().to("cpu").contiguous()
    h = xxhash.xxh3_128()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


@dataclass
class SvdStats:
    """What a decomposer did: SVDs computed, cache hits, and seconds spent computing."""

    computed: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, computed: int = 0, hits: int = 0, seconds: float = 0.0) -> None:
        with self._lock:
            self.computed += computed
            self.cache_hits += hits
            self.seconds += seconds


class SvdCache:
    """Content-addressed store of truncated SVD factors under `directory` (safetensors files)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    @staticmethod
    def key(layer: str, base_digest: str, expert_digest: str, what: str) -> str:
        """Key of one decomposition: layer name, W0 and Wᵢ contents, and what was decomposed ('diff' or 'weight')."""
        return xxhash.xxh3_128(f"{layer}\0{base_digest}\0{expert_digest}\0{what}".encode()).hexdigest()

    def get(self, key: str, rank: int, shape: tuple[int, int] | None = None, warn: bool = True) -> Factors | None:
        """Cached factors truncated to `rank`, or None when absent or cached at a smaller rank. A damaged entry (a
        truncated or empty file, missing tensors, or factors that do not fit `shape`, the decomposed matrix's) is
        None too, with a warning naming the file (unless not `warn`): the caller recomputes it and `put` replaces
        it."""
        try:
            factors = self._read(key, shape)
        except DamagedEntry as damage:
            if warn:
                warnings.warn(f"SVD cache entry {self._path(key)} is damaged ({damage}); recomputing it",
                              stacklevel=3)
            return None
        if factors is None or (factors.rank < rank and not factors.complete):
            return None
        return factors.truncate(rank)

    def _read(self, key: str, shape: tuple[int, int] | None) -> Factors | None:
        """The entry's factors (None: no entry); DamagedEntry when the file cannot be read or does not fit."""
        path = self._path(key)
        try:
            tensors = load_file(path)
        except FileNotFoundError:
            return None
        except Exception as error:                      # safetensors' own error for a truncated or empty file
            raise DamagedEntry(f"unreadable: {error}") from error
        if {"u", "s", "v", "complete"} - tensors.keys():
            raise DamagedEntry(f"holds {sorted(tensors)}, not u, s, v and complete")
        u, s, v = tensors["u"], tensors["s"], tensors["v"]
        if u.dim() != 2 or v.dim() != 2 or s.dim() != 1 or not u.shape[1] == v.shape[1] == s.shape[0]:
            shapes = ", ".join(str(list(t.shape)) for t in (u, s, v))
            raise DamagedEntry(f"factors of shapes {shapes} do not fit together")
        if shape is not None and (u.shape[0], v.shape[0]) != tuple(shape):
            raise DamagedEntry(f"factors of a {u.shape[0]} × {v.shape[0]} matrix, not {shape[0]} × {shape[1]}")
        return Factors(u, s, v, bool(tensors["complete"].item()))

    @contextmanager
    def claim(self, key: str) -> Iterator[None]:
        """Hold the entry's lock (waiting for whoever holds it) while computing what it will hold."""
        lock = self._path(key).with_suffix(".lock")
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock, "a")
        except OSError:                                     # a read-only cache: nothing to claim
            yield
            return
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError:                                 # a file system without locks
                pass
            yield                                           # closing the file releases the lock

    def put(self, key: str, factors: Factors) -> None:
        """Store factors atomically, unless an entry of at least this rank is already there (a damaged one is
        replaced)."""
        path = self._path(key)
        try:
            present = self._read(key, (factors.u.shape[0], factors.v.shape[0]))
        except DamagedEntry:
            present = None
        if present is not None and (present.rank >= factors.rank or present.complete):
            return                                      # another process may have stored it meanwhile
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"u": factors.u.contiguous(), "s": factors.s.contiguous(), "v": factors.v.contiguous(),
                       "complete": torch.tensor([factors.complete])}, tmp)
            os.chmod(tmp, default_file_mode())        # shared by the sweep's nodes: not mkstemp's owner-only mode
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


class DamagedEntry(Exception):
    """An SVD cache file that cannot be read, or whose factors do not fit its matrix."""


class Decomposer:
    """Truncated SVDs through an optional cache, with statistics."""

    def __init__(self, cache: SvdCache | str | os.PathLike | None = None, device: torch.device | str | None = None,
                 solver: str = "exact"):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self.cache = SvdCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self.device = device
        self.solver = solver
        self.stats = SvdStats()

    def key(self, layer: str, base_digest: str, expert_digest: str, what: str) -> str:
        """SvdCache.key of a decomposition by this solver (the randomized solver's factors are kept apart)."""
        solved = what if self.solver == "exact" else f"{what}/{self.solver}"
        return SvdCache.key(layer, base_digest, expert_digest, solved)

    def digest(self, tensor: torch.Tensor) -> str:
        """`tensor_digest` for cache keys; "" without a cache, where no key is looked up."""
        return tensor_digest(tensor) if self.cache is not None else ""

    def factors(self, matrix: torch.Tensor, rank: int, key: str) -> Factors:
        """Top-`rank` factors of `matrix`, through the cache (if any) under `key` (see SvdCache.key); a process
        computing the same key meanwhile is waited for (`SvdCache.claim`)."""
        if self.cache is None:
            return self._compute(matrix, rank)
        cached = self.cache.get(key, rank, tuple(matrix.shape))
        if cached is None:
            with self.cache.claim(key):              # a hit takes no lock: only a computation is claimed
                cached = self.cache.get(key, rank, tuple(matrix.shape), warn=False)   # computed by its holder?
                if cached is None:
                    factors = self._compute(matrix, rank)
                    self.cache.put(key, factors)
                    return factors
        self.stats.add(hits=1)
        return cached

    def _compute(self, matrix: torch.Tensor, rank: int) -> Factors:
        start = time.perf_counter()
        factors = truncated_svd(matrix, rank, self.device, self.solver)
        self.stats.add(computed=1, seconds=time.perf_counter() - start)
        return factors
