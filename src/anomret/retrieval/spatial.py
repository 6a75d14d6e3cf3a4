"""RAD retrieval: global top-K images by CLS cosine, then a spatially windowed patch 1-NN.

The RAD paper (Sec. 3.2-3.3, Eq. 8-10) scores a test patch t of layer l as

    S_l(x, t) = 1 - max { <z_t, z> : z a normalised bank patch of one of the K retrieved images,
                                      at a grid position within L∞ distance ρ of t }

with the window clipped at the grid border, and fuses layers by a weighted mean. The functions below
compute exactly that, batched and chunked so that peak memory is set by the chunk sizes and never by
the bank size N. The bank can be a plain tensor or any object whose ``__getitem__`` takes an int64 index
tensor and returns the rows (e.g. a memory-mapped fp16 file); only the rows of the retrieved neighbours
are ever read.

How the windowed 1-NN is computed. The reference grid is cut into ``tile × tile`` tiles; the queries
that can see a tile lie in the tile grown by ρ (clipped to the grid). One batched matmul compares, per
tile, those ``(tile + 2ρ)²`` query patches with the tile's patches in every neighbour image; a mask
keeps only pairs within the window, and a scatter-max folds the per-tile maxima back onto the query
grid. Each gathered neighbour patch is read once (a per-offset shift-and-compare reads it (2ρ + 1)²
times, the official per-position loop copies it (2ρ + 1)² times). With the default ``tile = 1`` the
matmuls do exactly the minimum work, ``(2ρ + 1)²`` dot products per patch and neighbour; larger tiles
trade ``(tile + 2ρ)² / (2ρ + 1)²`` times the work for larger matmuls. A ρ as large as the grid is
unconstrained 1-NN over the neighbours' patches.

On a GPU the same scores come from a Triton kernel (:mod:`anomret.retrieval.spatial_triton`) that reads
each stored neighbour row once, straight from the bank through the neighbour index: one launch for a
batch, no work buffers. The tiled matmuls above are the CPU path and the fallback wherever the kernel
does not apply (see :func:`spatial_knn_scores`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar, Literal, NamedTuple, Protocol, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from anomret.checks import integer_at_least

_EPS = 1e-12  # as F.normalize: a zero vector has cosine 0 with everything


class RowLoader(Protocol):
    """A bank that hands out rows by index, e.g. a wrapper around a memory-mapped file."""

    def __getitem__(self, index: Tensor) -> Tensor: ...


PatchBank = Tensor | RowLoader | Callable[[Tensor], Tensor]


class GlobalTopK(NamedTuple):
    """Indices ``[B, k]`` (int64) of the retrieved bank images and their cosine similarities ``[B, k]``."""

    indices: Tensor
    similarity: Tensor


@contextlib.contextmanager
def exact_matmul() -> Iterator[None]:
    """Run float32 matmuls in full precision (no TF32/bf16) inside the block, whatever the global setting.

    A caller that enabled ``torch.set_float32_matmul_precision("high")`` for its encoder would otherwise
    get 10-bit-mantissa cosines here, enough to reorder near-tied neighbours.
    """
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _compute_dtype(reference: Tensor) -> torch.dtype:
    return torch.float64 if reference.dtype == torch.float64 else torch.float32


@overload
def global_topk(
    query_cls: Tensor, bank_cls: Tensor, k: int, *, chunk: int = ..., return_similarity: Literal[False] = ...
) -> Tensor: ...
@overload
def global_topk(
    query_cls: Tensor, bank_cls: Tensor, k: int, *, chunk: int = ..., return_similarity: Literal[True]
) -> GlobalTopK: ...
def global_topk(
    query_cls: Tensor, bank_cls: Tensor, k: int, *, chunk: int = 65536, return_similarity: bool = False
) -> Tensor | GlobalTopK:
    """Indices of the ``k`` bank images most cosine-similar to each query, best first.

    Ties are broken by the lower bank index, so the result is deterministic. Neither side needs to be
    normalised (both are, in float32, chunk by chunk); the bank may be fp16/bf16 and on another device.
    Peak memory is ``B × (k + chunk)`` similarities plus one ``chunk × D`` float32 slice of the bank.

    Args:
        query_cls: ``[B, D]`` global features of the test images.
        bank_cls: ``[N, D]`` global features of the memory images.
        k: how many images to retrieve (RAD: 150 MVTec, 900 VisA / Real-IAD, 48 3D-ADAM).
        chunk: bank rows compared at once; a running top-k is kept across chunks.
        return_similarity: also return the cosine similarities of the retrieved images.

    Returns:
        ``[B, k]`` int64 indices, or a :class:`GlobalTopK` when ``return_similarity``.
    """
    if query_cls.ndim != 2 or bank_cls.ndim != 2:
        raise ValueError(
            f"global_topk expects query [B, D] and bank [N, D], got {tuple(query_cls.shape)} and "
            f"{tuple(bank_cls.shape)}"
        )
    if query_cls.shape[1] != bank_cls.shape[1]:
        raise ValueError(
            f"query dim {query_cls.shape[1]} != bank dim {bank_cls.shape[1]}: the memory was built with "
            "another encoder or layer"
        )
    n_bank = bank_cls.shape[0]
    if k < 1:
        raise ValueError(f"retrieval.k must be at least 1, got {k}")
    if k > n_bank:
        raise ValueError(
            f"retrieval.k={k} is larger than the memory ({n_bank} images); lower retrieval.k or add images"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")

    dtype, device = _compute_dtype(query_cls), query_cls.device
    query = F.normalize(query_cls.to(dtype), dim=-1, eps=_EPS)
    best_sim = torch.empty(query.shape[0], 0, dtype=dtype, device=device)
    best_idx = torch.empty(query.shape[0], 0, dtype=torch.int64, device=device)
    with exact_matmul():
        for start in range(0, n_bank, chunk):
            keys = F.normalize(
                bank_cls[start : start + chunk].to(device=device, dtype=dtype), dim=-1, eps=_EPS
            )
            sim = query @ keys.T
            idx = torch.arange(start, start + keys.shape[0], device=device).expand_as(sim)
            # The running best all have lower indices than this chunk and are already ordered, so a
            # stable sort on descending similarity keeps ties in index order.
            sim = torch.cat([best_sim, sim], dim=1)
            idx = torch.cat([best_idx, idx], dim=1)
            order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
            best_sim, best_idx = sim.gather(1, order), idx.gather(1, order)
    return GlobalTopK(best_idx, best_sim) if return_similarity else best_idx


class _Tiling(NamedTuple):
    ref_index: Tensor  # [T, t²] flat reference positions of each tile
    query_index: Tensor  # [T, S] flat query positions that can see the tile
    valid: Tensor  # [T, S, t²] pairs within the window


def _axis_tiles(size: int, tile: int, rho: int) -> tuple[Tensor, Tensor]:
    """Per tile along one axis: the reference coordinates ``[n, tile]`` and query coordinates ``[n, span]``.

    The last tile is moved back to end at the border (it overlaps its neighbour: a duplicated reference
    cannot change a max), and the query span, the tile grown by ρ, is clipped by moving it inside the
    grid, so every coordinate is real and the shapes are the same for every tile.
    """
    tile = min(tile, size)
    span = min(tile + 2 * rho, size)
    starts = torch.clamp(torch.arange(0, size, tile), max=size - tile)
    ref = starts[:, None] + torch.arange(tile)
    query_start = torch.clamp(starts - rho, min=0, max=size - span)
    query = query_start[:, None] + torch.arange(span)
    return ref, query


def _tiling(h: int, w: int, rho: int, tile: int, device: torch.device) -> _Tiling:
    ref_y, query_y = _axis_tiles(h, tile, rho)
    ref_x, query_x = _axis_tiles(w, tile, rho)
    # Tiles enumerate (tile row, tile col); positions inside a tile enumerate (row, col).
    ry = ref_y[:, None, :, None].expand(-1, ref_x.shape[0], -1, ref_x.shape[1])
    rx = ref_x[None, :, None, :].expand(ref_y.shape[0], -1, ref_y.shape[1], -1)
    qy = query_y[:, None, :, None].expand(-1, query_x.shape[0], -1, query_x.shape[1])
    qx = query_x[None, :, None, :].expand(query_y.shape[0], -1, query_y.shape[1], -1)
    n_tiles = ref_y.shape[0] * ref_x.shape[0]
    ry, rx = ry.reshape(n_tiles, -1), rx.reshape(n_tiles, -1)
    qy, qx = qy.reshape(n_tiles, -1), qx.reshape(n_tiles, -1)
    valid = ((qy[:, :, None] - ry[:, None, :]).abs() <= rho) & (
        (qx[:, :, None] - rx[:, None, :]).abs() <= rho
    )
    return _Tiling((ry * w + rx).to(device), (qy * w + qx).to(device), valid.to(device))


def _fetch(bank: PatchBank, index: Tensor) -> Tensor:
    if isinstance(bank, Tensor):
        return bank[index.to(bank.device)]
    rows = bank[index] if hasattr(bank, "__getitem__") else bank(index)
    return torch.as_tensor(rows)  # a numpy memmap hands back an ndarray


def _bank_len(bank: PatchBank) -> int | None:
    if isinstance(bank, Tensor):
        return bank.shape[0]
    try:
        return len(bank)  # type: ignore[arg-type]
    except TypeError:
        return None


Backend = Literal["auto", "torch", "triton"]


@functools.cache
def _triton_kernels() -> ModuleType | None:
    """The kernel module, or ``None`` where triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    from anomret.retrieval import spatial_triton

    return spatial_triton


class _KernelHealth:
    """Whether a kernel launch has succeeded in this process (later failures are then real errors), or
    the error that made the first one fail (a broken triton install: the torch path is used from then on)."""

    succeeded = False
    failure: Exception | None = None


def _kernel_applies(query: Tensor, bank: PatchBank, backend: Backend) -> ModuleType | None:
    """The kernel module when the Triton path scores this call, else ``None`` (torch path)."""
    if backend == "torch" or (backend == "auto" and (not query.is_cuda or query.dtype == torch.float64)):
        return None
    kernels = _triton_kernels()
    if backend == "triton":
        if kernels is None:
            raise ValueError("backend='triton' needs triton, which is not installed")
        if query.dtype == torch.float64:
            raise ValueError("float64 queries are scored exactly by the torch path, not the fp32 kernel")
        if not (query.is_cuda or kernels.INTERPRETED):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
        return kernels
    if kernels is None or kernels.INTERPRETED:
        return None
    if _KernelHealth.failure is not None:
        return None
    if torch.cuda.get_device_capability(query.device) < (8, 0):
        return None  # the fp16 tensor-core dot needs Ampere or newer
    if isinstance(bank, Tensor) and bank.device == query.device and bank.dtype not in kernels.BANK_DTYPES:
        return None  # the kernel would need a cast copy of the whole bank
    return kernels


def spatial_knn_scores(
    query: Tensor,
    bank: PatchBank,
    neighbors: Tensor,
    rho: int,
    *,
    neighbor_chunk: int = 32,
    query_chunk: int = 1,
    tile: int = 1,
    backend: Backend = "auto",
) -> Tensor:
    """RAD's spatially conditioned patch score: ``1 - max cosine`` over the window of the K neighbours.

    For every query patch (i, j): the largest cosine similarity between it and any patch (i', j') of any of
    its K neighbour images with ``|i - i'| <= rho`` and ``|j - j'| <= rho``; positions outside the grid are
    absent (never padded). ``rho = 0`` compares the same position only.

    Args:
        query: ``[B, h, w, D]`` test patch features (normalised here, in float32; float64 stays float64).
        bank: ``[N, h, w, D]`` memory patch features of the same layer, any float dtype (or int8 values
            whose per-vector scales were left out: cosine ignores them) and device; or an object whose
            ``bank[index]`` (or a callable whose ``bank(index)``) takes an int64 CPU index tensor and
            returns those rows ``[n, h, w, D]``. Only rows named in ``neighbors`` are read, at most
            ``query_chunk × neighbor_chunk`` at a time unless the bank is a tensor on the query's device,
            and are cast to float on the query's device.
        neighbors: ``[B, K]`` bank indices per query (from :func:`global_topk`).
        rho: L∞ window radius (RAD: 1 MVTec / 3D-ADAM, 2 VisA, 0 Real-IAD).
        neighbor_chunk: neighbour images per query processed at once.
        query_chunk: queries processed at once (the torch path takes ``neighbor_chunk // K`` of them when
            that is more, so a step holds up to ``neighbor_chunk`` neighbour grids whatever K).
        tile: reference tile side of the torch path (see the module docstring); 1 was fastest on CPU at
            the paper's shapes.
        backend: ``"auto"`` uses the Triton kernel where it applies (below) and the torch path elsewhere;
            ``"torch"`` or ``"triton"`` force one.

    The Triton kernel (:mod:`anomret.retrieval.spatial_triton`) scores the call when the query is a CUDA
    tensor of a GPU of compute capability 8.0 or newer, not float64, and triton is installed. A bank
    tensor on the query's device (fp16, int8, bf16 or fp32; another dtype goes to the torch path) is read
    in place through ``neighbors``, all queries and neighbours in one launch, whatever its strides; a
    compact tensor of a batch's unique rows with remapped ``neighbors`` is read the same way. Any other
    bank is read ``query_chunk × neighbor_chunk`` rows at a time and moved to the device. Products are as
    exact as fp32's and sums are fp32 (see the kernel module). Should the first launch in a process fail
    (a broken triton install), a warning says why and the torch path is used from then on.

    Peak working memory of the torch path, with ``n = query_chunk × neighbor_chunk`` gathered neighbour
    grids and ``s`` bytes per stored value: ``n × h·w × D × (s + 4)`` bytes for the rows in tile order and
    their float32 cast (``n × h·w × D × 4`` for a float32 bank), plus ``n × h·w × D × s`` for the rows a
    loader returns, plus ``n × h·w × (tile + 2ρ)² × 4`` bytes of similarities. It grows with neither N nor
    K. At the paper's shape (28×28, D 768, fp16 bank) the default chunks need about 90 MB. The kernel
    needs ``B × h·w × D × 8`` bytes for the normalised queries and their fp16 halves, plus the moved rows
    of a bank that is not on the device.

    Returns:
        ``[B, h, w]`` scores in float32 (float64 for a float64 query), in ``[0, 2]``.
    """
    if query.ndim != 4:
        raise ValueError(f"query must be [B, h, w, D], got shape {tuple(query.shape)}")
    if neighbors.ndim != 2 or neighbors.shape[0] != query.shape[0]:
        raise ValueError(
            f"neighbors must be [B, K] with B = {query.shape[0]} queries, got shape {tuple(neighbors.shape)}"
        )
    if neighbors.dtype.is_floating_point or neighbors.dtype == torch.bool:
        raise ValueError(f"neighbors must hold integer bank indices, got dtype {neighbors.dtype}")
    if neighbors.shape[1] < 1:
        raise ValueError("neighbors is empty: retrieve at least one bank image per query (retrieval.k >= 1)")
    if not isinstance(rho, int) or isinstance(rho, bool) or rho < 0:
        raise ValueError(f"rho must be a non-negative integer, got {rho!r}")
    if neighbor_chunk < 1 or query_chunk < 1:
        raise ValueError(f"chunk sizes must be at least 1, got {neighbor_chunk=} {query_chunk=}")
    if tile < 1:
        raise ValueError(f"tile must be at least 1, got {tile}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    n_bank = _bank_len(bank)
    if n_bank is not None:
        in_range = ((neighbors >= 0) & (neighbors < n_bank)).all()
        if neighbors.is_cuda:
            # Checked on the device: a host synchronisation per layer would stall the queue of kernels.
            torch._assert_async(
                in_range, f"neighbor indices must lie in [0, {n_bank}) for a memory of {n_bank}"
            )
        elif not bool(in_range):
            raise ValueError(
                f"neighbor indices must lie in [0, {n_bank}) for a memory of {n_bank} images, got "
                f"[{int(neighbors.min())}, {int(neighbors.max())}]"
            )
    h, w, dim = query.shape[1:]
    if isinstance(bank, Tensor) and tuple(bank.shape[1:]) != (h, w, dim):
        raise ValueError(_shape_mismatch(tuple(bank.shape[1:]), (h, w, dim)))
    rho = min(rho, max(h, w) - 1)  # a window wider than the grid is the whole grid

    kernels = _kernel_applies(query, bank, backend)
    if kernels is None:
        return _torch_scores(query, bank, neighbors, rho, neighbor_chunk, query_chunk, tile)
    if backend == "triton" or _KernelHealth.succeeded:
        return _kernel_scores(kernels, query, bank, neighbors, rho, neighbor_chunk, query_chunk)
    try:
        scores = _kernel_scores(kernels, query, bank, neighbors, rho, neighbor_chunk, query_chunk)
    except ValueError:
        raise
    except Exception as error:
        _KernelHealth.failure = error
        warnings.warn(
            f"the Triton kernel of spatial_knn_scores failed ({type(error).__name__}: {error}); scoring "
            "with the torch path from now on",
            RuntimeWarning,
            stacklevel=2,
        )
        return _torch_scores(query, bank, neighbors, rho, neighbor_chunk, query_chunk, tile)
    _KernelHealth.succeeded = True
    return scores


def _kernel_scores(
    kernels: ModuleType,
    query: Tensor,
    bank: PatchBank,
    neighbors: Tensor,
    rho: int,
    neighbor_chunk: int,
    query_chunk: int,
) -> Tensor:
    batch, h, w, dim = query.shape
    device = query.device
    window = kernels.WindowMax(F.normalize(query.float(), dim=-1, eps=_EPS), rho)
    if isinstance(bank, Tensor) and bank.device == device and bank.dtype in kernels.BANK_DTYPES:
        window.fold(bank, neighbors.to(device, torch.int64))
        return window.scores()
    neighbors_cpu = neighbors.to("cpu", torch.int64)
    for q0 in range(0, batch, query_chunk):
        for k0 in range(0, neighbors.shape[1], neighbor_chunk):
            index = neighbors_cpu[q0 : q0 + query_chunk, k0 : k0 + neighbor_chunk]
            rows = _fetch(bank, index.reshape(-1))
            if tuple(rows.shape) != (index.numel(), h, w, dim):
                raise ValueError(_shape_mismatch(tuple(rows.shape[1:]), (h, w, dim)))
            local = torch.arange(index.numel(), device=device).view(index.shape)
            window.fold(rows.to(device), local, first=q0)
    return window.scores()


def _torch_scores(
    query: Tensor,
    bank: PatchBank,
    neighbors: Tensor,
    rho: int,
    neighbor_chunk: int,
    query_chunk: int,
    tile: int,
) -> Tensor:
    batch, h, w, dim = query.shape
    dtype, device = _compute_dtype(query), query.device
    # With fewer neighbours than a chunk holds, several queries share a step (the same products: each
    # query's matmuls are its own), so small K costs a few steps instead of one per query.
    query_chunk = max(query_chunk, neighbor_chunk // min(neighbor_chunk, neighbors.shape[1]))
    tiling = _tiling(h, w, rho, tile, device)
    n_tiles, ref_per_tile = tiling.ref_index.shape
    span = tiling.query_index.shape[1]
    invalid = ~tiling.valid  # [T, S, t²]
    scatter_index = tiling.query_index.reshape(-1)

    # A contiguous tensor bank is gathered straight into tile order; a loader's rows are fetched first.
    direct = isinstance(bank, Tensor) and bank.is_contiguous()
    # Indices live where they are used, so no chunk waits on a host-to-device copy.
    neighbors_at = neighbors.to(bank.device if isinstance(bank, Tensor) and direct else "cpu", torch.int64)
    # Work buffers are allocated once and reused across chunks: on CPU a fresh allocation of this size
    # costs more in page faults than the copy that fills it.
    max_ref = min(query_chunk, batch) * min(neighbor_chunk, neighbors.shape[1]) * n_tiles * ref_per_tile
    buffers: dict[torch.dtype, Tensor] = {}

    def buffer(kind: torch.dtype, rows: int) -> Tensor:
        if kind not in buffers:
            buffers[kind] = torch.empty(max_ref, dim, dtype=kind, device=device)
        return buffers[kind][:rows]

    sim_buffer = torch.empty(max_ref * span, dtype=dtype, device=device)
    positions = tiling.ref_index.reshape(1, -1, 1)
    if isinstance(bank, Tensor) and direct:
        positions = positions.to(bank.device)

    out = torch.empty(batch, h * w, dtype=dtype, device=device)
    with exact_matmul():
        for q0 in range(0, batch, query_chunk):
            q = F.normalize(query[q0 : q0 + query_chunk].to(dtype), dim=-1, eps=_EPS).reshape(-1, h * w, dim)
            n_q = q.shape[0]
            q_tiles = q[:, tiling.query_index].reshape(n_q * n_tiles, span, dim)
            best = torch.full((n_q, h * w), -math.inf, dtype=dtype, device=device)
            for k0 in range(0, neighbors.shape[1], neighbor_chunk):
                index = neighbors_at[q0 : q0 + n_q, k0 : k0 + neighbor_chunk]
                n_k, n_rows = index.shape[1], index.numel()
                if direct:
                    assert isinstance(bank, Tensor)
                    source, first_row = bank.view(-1, dim), index
                else:
                    rows = _fetch(bank, index.reshape(-1))
                    if tuple(rows.shape) != (n_rows, h, w, dim):
                        raise ValueError(_shape_mismatch(tuple(rows.shape[1:]), (h, w, dim)))
                    source = rows.to(device).reshape(-1, dim)
                    first_row = torch.arange(n_rows, device=device).view(n_q, n_k)
                # Rows [q, K, h·w] -> tiles [q, T, t², K]: each tile's patches of every neighbour together.
                flat = (first_row.view(n_q, 1, n_k) * (h * w) + positions).reshape(-1)
                if source.device == device:
                    gathered = torch.index_select(source, 0, flat, out=buffer(source.dtype, flat.shape[0]))
                else:
                    gathered = source.index_select(0, flat).to(device)
                ref = gathered if gathered.dtype == dtype else buffer(dtype, flat.shape[0]).copy_(gathered)
                inv_norm = torch.linalg.vector_norm(ref, dim=-1).clamp_min_(_EPS).reciprocal_()
                n_ref = ref_per_tile * n_k
                sim = sim_buffer[: n_q * n_tiles * span * n_ref].view(n_q * n_tiles, span, n_ref)
                torch.bmm(q_tiles, ref.view(n_q * n_tiles, n_ref, dim).transpose(1, 2), out=sim)
                sim = sim.view(n_q, n_tiles, span, ref_per_tile, n_k)
                sim.mul_(inv_norm.view(n_q, n_tiles, 1, ref_per_tile, n_k))
                pair_best = sim.amax(dim=4).masked_fill_(invalid, -math.inf)  # [q, T, S, t²]
                tile_best = pair_best.amax(dim=3).reshape(n_q, -1)  # [q, T·S]
                best.scatter_reduce_(1, scatter_index.expand(n_q, -1), tile_best, reduce="amax")
            out[q0 : q0 + n_q] = 1 - best
    return out.view(batch, h, w)


def _shape_mismatch(bank_shape: tuple[int, ...], query_shape: tuple[int, ...]) -> str:
    return (
        f"the memory holds patch grids of shape {bank_shape} but the queries are {query_shape}: bank and test "
        "features must come from the same encoder, layer and image size"
    )


def layer_weights(
    layers: Sequence[Any], weights: Mapping[Any, float] | Sequence[float] | None
) -> list[float]:
    """Non-negative fusion weights, one per layer, renormalised to sum to 1 (``None``: equal weights)."""
    if weights is None:
        return [1 / len(layers)] * len(layers)
    values = [float(weights[layer]) for layer in layers] if isinstance(weights, Mapping) else list(weights)
    if len(values) != len(layers):
        raise ValueError(f"{len(values)} layer weights for {len(layers)} layers {list(layers)}")
    if any(v < 0 or not math.isfinite(v) for v in values) or sum(values) <= 0:
        raise ValueError(f"layer weights must be finite, non-negative and not all zero, got {values}")
    total = sum(values)
    return [v / total for v in values]


def multilayer_spatial_knn_scores(
    queries: Mapping[Any, Tensor],
    banks: Mapping[Any, PatchBank],
    neighbors: Tensor,
    rho: int,
    *,
    weights: Mapping[Any, float] | Sequence[float] | None = None,
    **kwargs: Any,
) -> Tensor:
    """RAD's fused map (Eq. 10): the weighted mean over layers of :func:`spatial_knn_scores`.

    ``queries`` and ``banks`` are keyed by layer; ``weights`` (by layer or in ``queries`` order) are
    renormalised to sum to 1, equal by default as in the paper. Extra keyword arguments go to
    :func:`spatial_knn_scores`.
    """
    layers = list(queries)
    if not layers:
        raise ValueError("no layers to score")
    missing = [layer for layer in layers if layer not in banks]
    if missing:
        raise ValueError(f"the memory has no patch features for layers {missing} (it has {list(banks)})")
    fused: Tensor | None = None
    for layer, weight in zip(layers, layer_weights(layers, weights), strict=True):
        scores = spatial_knn_scores(queries[layer], banks[layer], neighbors, rho, **kwargs).mul_(weight)
        fused = scores if fused is None else fused.add_(scores)
    assert fused is not None
    return fused


@dataclass
class SpatialRetrieval:
    """Configured RAD retrieval (``retrieval=spatial``): global top-K images, then windowed patch 1-NN.

    Args:
        k: images retrieved per test image (RAD: 150 MVTec, 900 VisA / Real-IAD, 48 3D-ADAM);
            ``None`` retrieves every memory image (the "no global retrieval" ablation).
        rho: L∞ window radius (RAD: 1, 2 VisA, 0 Real-IAD); ``None`` searches the whole grid of each
            neighbour (the "no spatial conditioning" ablation).
        cap_k: use ``min(k, memory size)`` when the memory is smaller than ``k`` (few-shot) instead of
            refusing the run; the K used is recorded in the results.
        neighbor_chunk / query_chunk / tile: working-memory and speed knobs of :func:`spatial_knn_scores`.
    """

    kind: ClassVar[str] = "spatial"
    k: int | None = 150
    rho: int | None = 1
    cap_k: bool = False
    neighbor_chunk: int = 32
    query_chunk: int = 1
    tile: int = 1

    def __post_init__(self) -> None:
        integer_at_least(self.k, "retrieval.k", 1, none="every memory image: no global retrieval")
        integer_at_least(self.rho, "retrieval.rho", 0, none="the whole grid: no spatial conditioning")
        for name in ("neighbor_chunk", "query_chunk", "tile"):
            integer_at_least(getattr(self, name), f"retrieval.{name}", 1)

    def k_for(self, n_bank: int) -> int:
        """The K used with a memory of ``n_bank`` images; a clear error when it cannot be met."""
        if self.k is None:
            return n_bank
        if self.k > n_bank:
            if self.cap_k:
                return n_bank
            raise ValueError(
                f"retrieval.k={self.k} is larger than the memory ({n_bank} images). Fix: lower retrieval.k to "
                f"at most {n_bank}, add images to the memory, or set retrieval.cap_k=true to use all {n_bank}."
            )
        return self.k

    def neighbors(self, query_cls: Tensor, bank_cls: Tensor) -> Tensor:
        """``[B, K]`` indices of each query's K most similar memory images (all of them when ``k`` is null)."""
        n_bank = bank_cls.shape[0]
        k = self.k_for(n_bank)
        if self.k is None:
            return torch.arange(n_bank, device=query_cls.device).expand(query_cls.shape[0], -1)
        return global_topk(query_cls, bank_cls, k)

    def scores(
        self,
        queries: Mapping[Any, Tensor],
        banks: Mapping[Any, PatchBank],
        neighbors: Tensor,
        weights: Mapping[Any, float] | Sequence[float] | None = None,
    ) -> Tensor:
        """Fused patch scores ``[B, h, w]`` of the layers in ``queries`` (Eq. 8-10)."""
        h, w = next(iter(queries.values())).shape[1:3]
        rho = max(h, w) if self.rho is None else self.rho
        return multilayer_spatial_knn_scores(
            queries,
            banks,
            neighbors,
            rho,
            weights=weights,
            neighbor_chunk=self.neighbor_chunk,
            query_chunk=self.query_chunk,
            tile=self.tile,
        )
