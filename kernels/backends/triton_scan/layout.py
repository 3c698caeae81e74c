"""Host-side layout arithmetic for the Triton scan: spatial padding to 3D, per-order stride tables, grids.

Every scan order is a permutation of the spatial axes (slowest → fastest) plus a reverse flag
(``kernels/orders.py``). The kernels never permute data: the t-th token of order k is found from its index by
mixed-radix arithmetic. With the order's axes ``(p0, p1, p2)`` of sizes ``(S_p0, S_p1, S_p2)`` and the natural
(raster, last axis fastest) strides ``nat``::

    p = L - 1 - t if reverse else t
    i_fast = p % S_p2;   r = p // S_p2;   i_mid = r % S_p1;   i_slow = r // S_p1
    offset = i_slow·nat[p0] + i_mid·nat[p1] + i_fast·nat[p2]

so a 1D or 2D map is the 3D case with leading axes of size one. One row of the table per order:
``(S_p2, S_p1, nat[p2], nat[p1], nat[p0], reverse)``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from medmamba.kernels.errors import BackendUnavailableError
from medmamba.kernels.orders import ScanOrder

__all__ = [
    "ORDER_COLUMNS",
    "alignment",
    "cdiv",
    "channel_blocking",
    "directions",
    "interpreted",
    "line_chunks",
    "line_groups",
    "lines",
    "natural_inputs",
    "natural_spatial",
    "next_power_of_2",
    "order_table",
    "remembered",
    "segments",
    "spatial3",
    "strided",
    "vector_mode",
]

#: columns of one order-table row, in the order the kernels read them
ORDER_COLUMNS = ("fast_size", "mid_size", "fast_stride", "mid_stride", "slow_stride", "reverse")

_TABLE_CACHE: dict[tuple, torch.Tensor] = {}
T = TypeVar("T")

#: entries of a per-signature launch memo (forward._LAUNCHES, backward._LAUNCHES) before it is cleared
MEMO_ENTRIES = 256


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids (``triton.cdiv`` costs a JIT-function call on the host in triton 3.8)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ ``n`` (≥ 1), in plain Python, like :func:`cdiv`."""
    return 1 << max(0, n - 1).bit_length()


def spatial3(spatial: Sequence[int]) -> tuple[int, int, int]:
    """The spatial shape padded with leading ones to three axes; more than three axes are not supported."""
    spatial = tuple(int(s) for s in spatial)
    if len(spatial) > 3:
        raise BackendUnavailableError(
            f"the triton scan handles 1 to 3 spatial axes, got {len(spatial)} {spatial}; use backend='torch'"
        )
    return (1,) * (3 - len(spatial)) + spatial


def order_rows(orders: Sequence[ScanOrder], spatial: Sequence[int]) -> list[tuple[int, ...]]:
    """One table row per order (see the module docstring); plain ints, for the host and for tests."""
    return list(_order_rows(tuple(orders), tuple(int(s) for s in spatial)))


@functools.lru_cache(maxsize=256)
def _order_rows(orders: tuple[ScanOrder, ...], spatial: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    # cached: a launch asks for them several times (strided, directions, lines, the device table)
    nd = len(spatial)
    shape = spatial3(spatial)
    natural = (shape[1] * shape[2], shape[2], 1)
    lead = 3 - nd
    rows = []
    for order in orders:
        perm = tuple(range(lead)) + tuple(lead + a for a in order.resolve(nd))
        p0, p1, p2 = perm
        rows.append((shape[p2], shape[p1], natural[p2], natural[p1], natural[p0], int(order.reverse)))
    return tuple(rows)


def strided(orders: Sequence[ScanOrder], spatial: Sequence[int]) -> bool:
    """Whether some order steps more than one element between consecutive tokens (a new cache line per token).

    That is an order whose fastest axis is not the map's last one, e.g. SegMamba's slice order.
    """
    return any(fast_size > 1 and fast_stride != 1 for fast_size, _, fast_stride, *_ in order_rows(orders, spatial))


def directions(orders: Sequence[ScanOrder], spatial: Sequence[int]) -> list[int]:
    """Per order: 1 if it reads token t at raster offset t, -1 at offset L - 1 - t (the reversed raster order), else 0.

    Such orders read each chunk as neighbours in memory, which the kernels can load as 16-byte vectors.
    """
    L = math.prod(spatial3(spatial))
    out = []
    for fast, mid, st_fast, st_mid, st_slow, rev in order_rows(orders, spatial):
        slow = L // (fast * mid)
        natural = (fast == 1 or st_fast == 1) and (mid == 1 or st_mid == fast) and (slow == 1 or st_slow == fast * mid)
        out.append((-1 if rev else 1) if natural else 0)
    return out


def lines(orders: Sequence[ScanOrder], spatial: Sequence[int], element_size: int, lanes: int) -> tuple[int, int]:
    """``(G, F)``: one segment per line of ``F`` tokens, ``G`` neighbouring lines per program; ``(1, 0)``: no.

    An order that scans an axis of stride > 1 first (SegMamba's slice order, Vivim's temporal one, a column-major
    cross-scan) reads a new 32-byte sector per token and uses 2 or 4 bytes of it. When its second axis has stride 1,
    its lines (one pass along the first axis) are neighbours in memory: token j of line i + 1 sits next to token j
    of line i. Cutting the sequence into one segment per line (the carry pass chains them) and giving G = 32 bytes /
    element size neighbouring lines to the lanes of a program makes each load of G lanes one full sector. Every
    other order of the call must be the raster or reversed raster one (segment s + 1 then starts ±F tokens after
    segment s), and the strided orders must share F (a multiple of the 16-token chunk).
    """
    G = 32 // element_size
    if lanes % G:
        return 1, 0
    F = 0
    for (fast, mid, _, st_mid, _, rev), d in zip(order_rows(orders, spatial), directions(orders, spatial), strict=True):
        if d != 0:
            continue
        if rev or st_mid != 1 or fast % 16 or mid % G or (F and fast != F):
            return 1, 0
        F = fast
    return (G, F) if F else (1, 0)


def line_groups(orders: Sequence[ScanOrder], spatial: Sequence[int], per_thread: int) -> int:
    """Line length ``F`` when a call can run as line vectors (lines.py), ``per_thread`` lines a thread; 0: no.

    One order that scans an axis of stride > 1 first, whose second axis has stride 1 (its lines are neighbours in
    memory, see :func:`lines`), not reversed, with lines of whole chunks and a multiple of ``per_thread`` lines per
    value of its slowest axis (a group of lines shares it).
    """
    if len(orders) != 1 or per_thread < 1:
        return 0
    ((fast, mid, st_fast, st_mid, _, rev),) = order_rows(orders, spatial)
    if fast < 2 or st_fast == 1 or st_mid != 1 or rev or fast % 16 or mid % per_thread:
        return 0
    return fast


def line_chunks(orders: Sequence[ScanOrder], spatial: Sequence[int], chunk: int, most: int = 8) -> int:
    """Chunks per segment that start every segment at the same position along each strided order's lines; 0: none.

    A strided order (SegMamba's slice order: depth fastest, H·W elements between tokens) reads each token from a new
    32-byte sector, shared with the neighbouring lines (the next w) that other segments read. Segments in flight
    together are neighbours, so when each starts at the same place in its line (its length a multiple of the line
    length F) they read the same sectors at about the same time and most reads hit in L2. With segments cut at
    arbitrary places the phases drift apart: on an H100 the three-order call at 64³ ran 10.4 / 41 ms against
    8.0 / 28.8 ms with one line per segment (benchmarks/RESULTS.md). The answer is the least multiple of
    ``F / gcd(F, chunk)`` over the call's strided orders, or 0 when that exceeds ``most`` chunks.
    """
    align = 1
    for (fast, *_), d in zip(order_rows(orders, spatial), directions(orders, spatial), strict=True):
        if d == 0 and fast > 1:
            align = math.lcm(align, fast // math.gcd(fast, chunk))
    return align if align <= most else 0


def remembered(memo: dict, key: tuple, derive: Callable[[], T]) -> T:
    """``memo[key]``, derived by ``derive()`` on a miss; a memo of ``MEMO_ENTRIES`` entries is cleared first."""
    value = memo.get(key)
    if value is None:
        if len(memo) >= MEMO_ENTRIES:
            memo.clear()
        value = memo[key] = derive()
    return value


def alignment(*tensors: torch.Tensor | None) -> tuple[bool | None, ...]:
    """Per tensor, whether its data starts 16-byte aligned (``None`` for ``None``): part of a launch memo's key."""
    return tuple(None if x is None else x.data_ptr() % 16 == 0 for x in tensors)


def interpreted() -> bool:
    """Whether Triton runs under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _aligned(spatial: Sequence[int], tensors: Sequence[torch.Tensor]) -> bool:
    # whole chunks (L a multiple of 16 tokens) and every row of every tensor starting 16-byte aligned
    if math.prod(spatial3(spatial)) % 16:
        return False
    for x in tensors:
        per = 16 // x.element_size()
        if x.data_ptr() % 16 or any(st % per for st in x.stride()[: x.dim() - len(spatial)]):
            return False
    return True


def vector_mode(
    orders: Sequence[ScanOrder], spatial: Sequence[int], *tensors: torch.Tensor, with_strided: bool = True
) -> int:
    """The kernels' ``VEC_MODE``.

    1: every order is the raster one; 3: every order is raster or reversed raster (the kernels decide per order
    which way a chunk's neighbours are read); 2: some are, and the others are strided (decided per order too; 0 for
    such a call unless ``with_strided``); 0: none, or rows not aligned.
    """
    if not _aligned(spatial, tensors):
        return 0
    dirs = directions(orders, spatial)
    if all(d == 1 for d in dirs):
        return 1
    if all(dirs):
        return 3
    return 2 if any(dirs) and with_strided else 0


def order_table(orders: Sequence[ScanOrder], spatial: Sequence[int], device: torch.device) -> torch.Tensor:
    """``(K, 6)`` int32 table of :func:`order_rows` on ``device``.

    Cached: a host-to-device copy on every call would synchronise the stream.
    """
    return _device_table("orders", orders, spatial, device, order_rows)


def division_table(orders: Sequence[ScanOrder], spatial: Sequence[int], device: torch.device) -> torch.Tensor:
    """``(K, 18)`` int32 table on ``device``, cached as :func:`order_table`.

    Per order: its :func:`order_rows` row, then the (magic, shift) of :func:`divisor` for its fast, mid and slow
    strides and its fast, mid and slow sizes.
    """

    def rows(orders, spatial):
        L = math.prod(spatial)
        out = []
        for row in order_rows(orders, spatial):
            fast, mid, st_fast, st_mid, st_slow, _ = row
            sizes = (st_fast, st_mid, st_slow, fast, mid, L // (fast * mid))
            out.append((*row, *(v for d in sizes for v in divisor(d))))
        return out

    return _device_table("divisions", orders, spatial, device, rows)


def divisor(d: int) -> tuple[int, int]:
    """``(magic, shift)`` with ``n // d == umulhi(n, magic) >> shift`` for every ``0 ≤ n < 2³¹``.

    ``magic`` is given as the int32 of the same bits; ``(0, 0)`` for ``d = 1``.

    Granlund and Montgomery's round-up method for 31-bit numerators: ``magic = ⌈2^(31 + l) / d⌉`` with
    ``l = ⌈log2 d⌉`` fits in 32 bits. A kernel's integer division by a runtime value takes about 20 instructions;
    this takes two.
    """
    if d < 1:
        raise ValueError(f"divisor must be positive, got {d}")
    if d == 1:
        return 0, 0
    bits = (d - 1).bit_length()
    magic = -(-(1 << (31 + bits)) // d)
    return (magic - (1 << 32) if magic >= 1 << 31 else magic), bits - 1


def _device_table(kind: str, orders, spatial, device: torch.device, make_rows) -> torch.Tensor:
    key = (kind, tuple(orders), tuple(spatial), str(device))
    table = _TABLE_CACHE.get(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"the Triton scan's first call at spatial shape {tuple(spatial)} is being captured in a CUDA graph; "
                "run one call of that shape before capturing (torch.cuda.make_graphed_callables does so itself)"
            )
        table = torch.tensor(make_rows(tuple(orders), tuple(spatial)), dtype=torch.int32, device=device)
        _TABLE_CACHE[key] = table
    return table


def _spatial_contiguous(x: torch.Tensor, nd: int) -> bool:
    expected = 1
    for size, stride in zip(reversed(x.shape[-nd:]), reversed(x.stride()[-nd:]), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def natural_spatial(x: torch.Tensor, nd: int) -> torch.Tensor:
    """``x`` with its trailing ``nd`` spatial axes contiguous (the kernels address voxels by their raster index).

    The leading axes keep any strides (a stride-0 expand over orders stays one). Only an input whose spatial
    block is itself strided or broadcast (constant B/C, a permuted view) is copied.
    """
    return x if (x.is_contiguous() or _spatial_contiguous(x, nd)) else x.contiguous()


def natural_inputs(u, delta, B, C, z) -> tuple:
    """The canonical ``u, delta, B, C, z`` (z may be None) as the forward takes them.

    Each gets its spatial block contiguous (:func:`natural_spatial`); ``u`` is ``(B, K, C, *S)``.
    """
    nd = u.ndim - 3
    u, delta, B, C = (natural_spatial(x, nd) for x in (u, delta, B, C))
    return u, delta, B, C, natural_spatial(z, nd) if z is not None else None


def channel_blocking(channels: int, groups: int, sub: int) -> int:
    """Channels per program: the largest power of two ≤ ``sub`` that divides the channels of one group.

    A program's channels share one group so that it loads each B/C tile once for all of them.
    """
    sub = math.gcd(sub, channels // groups)
    return 1 << (sub.bit_length() - 1)


def segments(
    nchunks: int, rows: int, target_programs: int, min_fill: float = 0.6, *, align: int = 0, min_chunks: int = 1
) -> tuple[int, int]:
    """``(nsplit, chunks_per_segment)``: how many independent segments each row's sequence is cut into.

    A row (batch, order, channel block) walks its chunks in order. When rows alone do not fill the GPU, the
    sequence is cut into segments whose start states come from a cheaper state-only pass and a carry pass.
    With ``align`` (see :func:`line_chunks`), segments are the shortest multiple of ``align`` chunks of at least
    two chunks, however many that makes. Otherwise segments are at least ``min_chunks`` chunks long (short
    sequences: a segment's state costs as many bytes as a few chunks' tokens, in the segment, carry and main pass).
    """
    if rows >= min_fill * target_programs or nchunks == 1:
        return 1, nchunks
    if align:
        per = min(nchunks, align * math.ceil(2 / align))
        return math.ceil(nchunks / per), per
    want = min(nchunks, math.ceil(2 * target_programs / rows))
    per = min(nchunks, max(min_chunks, math.ceil(nchunks / want)))
    return math.ceil(nchunks / per), per
