"""Launch settings of the Triton scan, per pass.

Chunks are ``CHUNK`` = 16 tokens (the tokens a thread holds at once; the recurrences are written out token by
token for 16, and for the backward's halves of 8). Per pass: ``SUB`` channels per program (one thread each; they
share the B/C loads, and the backward sums dB/dC over them), ``num_warps``, ``fill`` (programs in flight). Values
were picked on an H100/H200 with ``benchmarks/scan_gpu.py``; tests shrink them through :func:`override` to
exercise chunking, segments and sub-blocks on tiny inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from medmamba.kernels.orders import ScanOrder

from . import layout

__all__ = [
    "CHUNK", "ConvTile", "PassConfig", "backward_config", "conv_backward_tile", "conv_forward_tile", "forward_config",
    "override", "resident_programs", "target_programs",
]  # fmt: skip

CHUNK = 16  # tokens per chunk: the forward's state-saving step and the unit both kernels unroll


@dataclass(frozen=True)
class PassConfig:
    """Launch settings of one pass (forward or backward).

    Attributes:
        sub: channels per program (one thread each), a power of two; rounded down to one that divides the
            channels per group.
        num_warps: warps per program.
        segments: force this many segments per row (``None``: choose from the GPU's size).
        fill: cut segments until about ``fill`` × :func:`target_programs` programs run (small programs need
            more of them in flight to hide memory latency).
        min_segment_chunks: segments of calls cut by ``fill`` are at least this many chunks long. At SegMamba's and
            U-Mamba's 16³ stages (4,096 tokens, 24-32 rows) ``fill`` 8 alone cuts 2-chunk segments, whose states
            cost about what their tokens do. On an H200 (CUDA-graph replays, forward / forward+backward ms; the
            sweep's ``fill`` variants, both passes together not timed) U-Mamba's 16³ fp32 + z forward took 0.136 at
            2 chunks, 0.122 at 4, 0.179 at 8; SegMamba's bf16 + z 0.087 at 2, 0.079 at 3 and at 6; the backward at
            ``fill`` 4 (3-4 chunks) 0.452 -> 0.430 and 0.299 -> 0.291. With 4 in both passes (twenty-fifth pass,
            ``scan_gpu.py --only 16³ --graphs``): U-Mamba 0.134 / 0.452 -> 0.121 / 0.415, SegMamba 0.086 / 0.303 ->
            0.071 / 0.303, replays equal to eager calls bit for bit. Longer calls cut longer segments anyway.
        fill_strided: ``fill`` for calls with an order whose consecutive tokens are not neighbours in memory
            (SegMamba's slice order, column-major cross-scans): each token is a separate cache line there, so
            more programs in flight pay (``None``: ``fill``). It decides whether such a call is cut into segments.
        line_segments: cut a call with a strided order into segments of whole lines of that order
            (layout.line_chunks: at least two chunks, each segment starting at the same place in its line), instead
            of as many as ``fill_strided`` asks for. On an H100, SegMamba's three orders at 64³ (bf16): 8.0 / 28.8 ms
            forward / forward+backward with it, 10.4 / 41 ms with ``fill_strided`` 32 alone.
        maxnreg: cap on registers per thread (``None``: the compiler's choice); in the forward, for the chunk passes of
            calls that are not all raster or reversed; in the backward, for calls with a raster or reversed order.
        strided_maxnreg: the cap for calls whose every order is strided, in place of ``maxnreg``: the forward's
            line-vector passes, the backward's main pass. On an H100, SegMamba's slice order alone at 64³ (bf16 + z,
            d 96; the compiler takes 255 registers in both passes): forward 1.98 -> 1.81 ms at 128, forward+backward
            12.5 -> 10.4 ms with 168 in both passes; calls that also have raster orders ran slower with any cap.
        raster_maxnreg: (forward) the cap for calls whose every order is raster or reversed raster (``VEC_MODE``
            1 or 3, the per-token path without token offsets), in place of ``maxnreg``. At 128 both forward passes
            keep 16 one-warp programs per SM (the compiler's choice, 162-255 registers, kept 8-12): on an H100 S1
            fp32 ran 1.63 -> 1.23 ms of kernels, S1 bf16 1.03 -> 0.92, U-Mamba's 64³ stage 2.46 -> 1.90, with a few
            spills to L1; SegMamba's 64³ bf16 reversed order alone 2.03 -> 1.72 ms, raster + reversed 3.99 -> 3.26.
            Calls with strided orders spill more and ran slower (three orders 8.1 -> 10.7 ms; 168-232 registers
            were 2-9 % slower too), and the backward (255 registers) ran 0-11 % slower with 168 or 200
            (benchmarks/RESULTS.md).
        inline_ptx: let the kernels use warp-level PTX through inline assembly (shuffles, 16-byte loads) where the
            launch allows it (a CUDA device, one warp of 32 channels); the interpreter runs the plain-Triton path.
        mixed_vectors: take the per-order path (``VEC_MODE`` 2) also for calls that mix raster or reversed orders
            with strided ones (SegMamba's three orders): their raster and reversed programs move chunks by 16-byte
            loads, the strided ones gather. Calls whose orders are all raster or reversed (a bidirectional scan)
            take such a path anyway. On by default in the backward; in the forward only for calls that save for the
            backward (``mixed_vectors_saving``). On an H100, SegMamba's three orders at 64³ (bf16 + z, back to
            back): forward 8.08 ms on tiles, 8.20 mixed; forward+backward 27.09 ms with both passes on tiles,
            26.41 with the backward mixed, 25.86 with both.
        mixed_vectors_saving: (forward) ``mixed_vectors`` for the calls that save for the backward (a training
            step's forward) only.
        lines: run calls with a strided order as one segment per line, neighbouring lines across a program's 32
            lanes (layout.lines), in the forward. Off by default: correct, but on an H100 no faster (SegMamba's
            slice order at 64³, bf16: 4.83 ms forward with it, 4.16 without); its B/C loads stay one instruction
            per value (kernels/DESIGN.md).
        line_vectors: (forward) run calls of one strided order whose lines are neighbours in memory (SegMamba's
            slice order alone, Vivim's temporal one, a column-major 2D order) as line vectors (lines.py): this
            many lines per thread, side by side, with 16 states; 0: off. In the backward (2 by default): the main
            pass of such calls, ungated, as line vectors (lines_backward.py), every line a segment of the segment and
            carry passes; 2 lines per thread fit the compiler's registers (255, no spills on sm_90a in bf16), 4
            would not. On an H100, SegMamba's slice order at 64³ (bf16 + z): 9.66 -> 6.89 ms forward+backward.
        line_vector_segments: (backward) with ``line_vectors``, run the segment pass of such calls as line vectors
            too (lines_backward._bwd_lines_segment_kernel) in place of the chunk path's, which gathers each token of
            the lines from its own sector (0.95 of the 2.09 ms of segment passes of SegMamba's three orders at 64³ on
            an H100). On by default in the backward: on an H100 (bf16 + z, A/B in one run) SegMamba's three orders
            took 18.28 -> 17.86 ms forward+backward at 64³, 5.13 -> 5.05 at 32³, 2.08 -> 1.90 at 16³.
        token_segments: (backward) run the segment pass of calls whose every order is raster or reversed (``VEC_MODE``
            1 or 3, 16 states) token by token on one warp of 32 channels (tokens._seg_chunk16), in place of
            (16 tokens × 16 states × 32 channels) tiles over four warps. On sm_90a (bf16) 2,068-2,508 instructions
            per chunk and 32 channels, no shuffles or barriers, 98-223 registers, against 4 × 1,024 with 24 shuffles
            and 12 barriers. Off by default until timed on a GPU (written on the fourteenth pass with the device
            budget spent; its logic is tested under the interpreter's GPU-path emulation).
        prefetch: (both passes) in the backward, prefetch, at each chunk and half of the raster and reversed main
            pass (``VEC_MODE`` 1 or 3), the lines its per-state loops load first (B_n and C_n rows, chunk-start
            states, slots): one instruction per 32 lines. Nsight Compute on an H200 put 52 % of that kernel's stall
            samples on those loads' latency (two warps per scheduler at 255 registers hide none of it). On by default
            in the backward: on an H200 (A/B in one run) SegMamba's three orders at 64³ (bf16 + z) took 15.81 ->
            15.29 ms forward+backward (15.76 -> 15.25 in another run). In the forward's per-token main pass (the next
            chunk's lines) it measured within noise (4.25 -> 4.11 and 4.10 -> 4.08 ms forward): off there. The
            line-vector backward asking for its next states' lines (16 per state, one per token) ran slower (15.29
            -> 15.51 ms) and was not kept.
        load_ahead: (backward) in the raster and reversed main pass (``VEC_MODE`` 1 or 3), the per-state loops
            issue state n + 1's loads before state n's work and carry them in registers: in the middle-state loop
            B_n's row, A_n and the start state; in the halves' loops A_n, the start state, ρ and dA, and (16-bit
            B and C) the B_n and C_n rows as words. Those loads' first uses took 52 % of the stall samples (ncu,
            H200, before ``prefetch``). On sm_90a: bf16 255 registers, no spills, 227 -> 241-248 instructions per
            state and half, every load about 210 instructions before its use; fp32 250 registers, 213 -> 229 (the
            slots only). On by default in the backward: on an H200 (A/B in one run) SegMamba's three orders (bf16 +
            z) took 15.41 -> 14.61 ms forward+backward at 64³, 4.46 -> 4.32 at 32³, 2.44 -> 2.27 at 16³. The slots
            are loaded by non-pure asm (ptx._ld1_if's WRITTEN): as pure loads the compiler merged the halves' first
            loads and hoisted them out of the chunk loop, and the GPU read stale ρ and dA.
        line_vector_load_ahead: (backward) ``load_ahead`` in the line-vector main pass (lines_backward.py): its
            per-state loops (the middle state's, the halves') load state n + 1's A_n and B_n row (8 tokens × LV
            lines, kept in their 16 bits) during state n. Nsight Compute on an H200 put about 30 % of that kernel's
            stall samples on the first uses of those rows, yet it made no gain there (A/B in one run, SegMamba's
            three orders, bf16 + z: 14.61 -> 14.64 ms forward+backward at 64³, 4.16 -> 4.17 at 32³, 2.27 -> 2.16 at
            16³; sm_90a, Triton 3.6: 255 registers, no spills, 537/513 -> 512/504 instructions per state and half).
            That kernel is bound by L2 traffic rather than latency (68.6 % of L2 throughput, 64 % of its sectors
            beyond the ideal). Off.
        mid_states: (forward; the backward reads what it saved) a call that saves for the backward on the
            per-token path (``VEC_MODE`` 1 or 3, 16 states) or as line vectors keeps each chunk's middle state too
            (after its 8th token, in the layout of the chunk-start states: as many bytes again), and the backward's
            main pass reads it instead of recomputing it, so its middle-state loop goes. That loop was 12 % of the
            raster and reversed pass's instructions and 25 % of its stall samples (Nsight Compute, H200). It costs
            16 more stores per chunk in the forward and, at 64³ (bf16 + z, raster and reversed, batch 2, d 96), 403
            MB more saved activation. On by default: on an H200 SegMamba's three orders (bf16 + z) took 14.64 ->
            14.16 ms forward+backward at 64³ and 4.27 -> 4.09 at 32³ (16³ within noise). It also frees registers
            (238 instead of 251 as launched, sm_90a, bf16): the pass then fits a ``maxnreg`` of 168 or 144 without
            spills, and the line-vector one 200, yet every such cap ran slower (15.2-15.6 ms).
        line_vector_maxnreg: (backward) a register cap for the line-vector main pass (lines_backward.py); None: the
            compiler's 255. 200 fits without spills only with ``mid_states`` (sm_90a, bf16), and ran slower.
        split_orders: (forward) run a call whose orders mix strided and raster or reversed ones (SegMamba's three
            orders) as one call per group of neighbouring orders when a strided order alone would run as line vectors:
            each strided order alone, the raster and reversed orders between them together (``VEC_MODE`` 3).
            ``merge="sum"`` only; the groups write their orders' outputs into one fp32 buffer that the merge sums and
            gates as for one call, their gradients are concatenated along the orders, the gate's gradient is taken
            once (backward.grouped_backward). On an H100, SegMamba's three orders at 64³ (bf16 +
            z, d 96): 8.43 / 26.40 -> 5.31 / 22.67 ms forward / forward+backward per call.
        split_min_length: (forward) split only calls of at least this many tokens per sequence. Each group is a
            call of its own, with its host prologue (0.15-0.25 ms on the lent hosts): short calls (SegMamba's 16³
            stage), host-bound already, would pay it without a kernel gain to match. 32³ was chosen by that
            estimate, not yet timed.
        save_pre_gate: (forward) keep the pre-gate output of a gated call for the backward. False, for calls with
            one order: save nothing and let the backward rebuild it (``y = Σ_n C·h + D·u``) in its per-state loop,
            where it also computes dz. That saves B·C·L activation values (about 1 GB for U-Mamba's 128³ stage in
            fp32) and a pass over gy, y, z and dz, but adds 11-14 % to the backward's per-state loop (sm_90a,
            triton 3.6). The compute-bound loop costs more than the saved memory traffic, so this is off by default:
            a memory option.
        fused_carry: (forward) run the segment pass, the carry and the main pass of a call cut into segments as one
            launch (forward._fwd_fused_kernel): the row's last programs to finish their segments chain the row's
            segments, a few states each, and the others wait for them. Every program must then be resident at once,
            so the launch is a cooperative grid of at most :func:`resident_programs` programs (segments are cut
            longer to fit), and only calls of raster or reversed orders on one-warp programs take it. Two launches
            fewer per forward. Off by default: on an H200 (twenty-first pass, forward / forward+backward ms per
            call, fused against apart) U-Mamba's fp32 stages gained (16³: 0.194 / 0.861 against 0.225 / 0.964; 32³:
            0.518 / 1.827 against 0.569 / 1.828) but SegMamba's bf16 ones lost (16³: 0.147 / 0.986 against 0.134 /
            0.751; 32³: 0.355 / 1.511 against 0.324 / 1.299): the fused kernel spills more (94-146 bytes at the
            cap of 128 registers) and its in-kernel carry costs about what the carry launch did. Within a CUDA graph
            capture a stream without counters yet takes the passes apart.
        fused_max_chunks: with ``fused_carry``, fuse only calls whose segments are at most this many chunks long
            once cut to fit (the short calls, whose launches the GPU waits for).
        emulate_ptx: under ``TRITON_INTERPRET=1`` on the CPU, take the GPU path too, its inline PTX emulated by plain
            loads and gathers (ptx.py): the tests check its logic without a GPU.
    """

    sub: int = 2
    num_warps: int = 8
    segments: int | None = None
    fill: int = 1
    min_segment_chunks: int = 1
    fill_strided: int | None = None
    line_segments: bool = True
    maxnreg: int | None = None
    strided_maxnreg: int | None = None
    raster_maxnreg: int | None = None
    inline_ptx: bool = True
    mixed_vectors: bool = False
    mixed_vectors_saving: bool = False
    lines: bool = False
    line_vectors: int = 0
    line_vector_segments: bool = False
    token_segments: bool = False
    prefetch: bool = False
    load_ahead: bool = False
    line_vector_load_ahead: bool = False
    mid_states: bool = False
    line_vector_maxnreg: int | None = None
    split_orders: bool = False
    split_min_length: int = 0
    save_pre_gate: bool = True
    fused_carry: bool = False
    fused_max_chunks: int = 16
    emulate_ptx: bool = False

    def ptx(self, device: torch.device, sub: int, num_warps: int) -> bool:
        """Whether a launch with these settings takes the inline-PTX path."""
        emulated = self.emulate_ptx and device.type == "cpu" and layout.interpreted()
        return self.inline_ptx and (device.type == "cuda" or emulated) and sub == 32 and num_warps == 1

    def vector_mode(
        self,
        ptx: bool,
        orders: Sequence[ScanOrder],
        spatial: Sequence[int],
        *tensors: torch.Tensor,
        saving: bool = False,
    ) -> int:
        """The kernels' ``VEC_MODE`` for a launch (see layout.vector_mode); 0 off the inline-PTX path.

        ``saving``: a forward call that saves for the backward (``mixed_vectors_saving`` applies).
        """
        if not ptx:
            return 0
        mixed = self.mixed_vectors or (saving and self.mixed_vectors_saving)
        return layout.vector_mode(orders, spatial, *tensors, with_strided=mixed)


# H100, 2026-11-27 (fill 2-32): flat within ±3 % for raster orders at 8; the SegMamba three-order layer 64³
# 13.9 -> 10.7 ms forward and 51.0 -> 44.9 ms forward+backward at 32 instead of 8
_FORWARD = PassConfig(
    sub=32,
    num_warps=1,
    fill=8,
    min_segment_chunks=4,
    fill_strided=32,
    raster_maxnreg=128,
    strided_maxnreg=128,
    mixed_vectors_saving=True,
    line_vectors=4,
    split_orders=True,
    split_min_length=32768,
    mid_states=True,
)
# H200, 2026-11-28 (fifteenth pass): prefetch, 15.81 -> 15.29 ms forward+backward for the three orders at 64³;
# (sixteenth pass) load_ahead, 15.41 -> 14.61 ms (32³ 4.46 -> 4.32, 16³ 2.44 -> 2.27); (seventeenth pass) mid_states,
# 14.63 -> 13.96 ms
# H100, 2026-11-28: line vectors in the backward took SegMamba's slice order at 64³ (bf16 + z) from 9.66 to 6.89 ms
# forward+backward, and the three-order layer from 20.91 to 18.30 ms; their segment pass as line vectors too, 18.28 ->
# 17.86 ms (2026-11-28, thirteenth pass)
_BACKWARD = PassConfig(
    sub=32,
    num_warps=1,
    fill=8,
    min_segment_chunks=4,
    fill_strided=32,
    strided_maxnreg=168,
    mixed_vectors=True,
    line_vectors=2,
    line_vector_segments=True,
    prefetch=True,
    load_ahead=True,
)


@dataclass(frozen=True)
class ConvTile:
    """The tile of one pass of the causal conv (conv.py).

    A program of ``num_warps`` warps covers ``sub`` channels × ``block_p`` neighbouring raster offsets, ``steps`` such
    tiles one after another; ``sub`` is capped at the channels' next power of two, ``steps`` at the tiles of a row.

    H200, 2026-11-29 (``benchmarks/conv_gpu.py``, SegMamba's three orders at 64³, bf16, 96 channels, batch 2):
    forward / backward 0.60 / 1.42 ms at 4 × 128, 4 warps, 8 steps; 0.58-0.70 / 1.42-1.68 ms at 2-8 channels,
    128-256 offsets, 8-16 steps; 0.96 / 4.13 ms with the earlier 16 × 128 tile, one per program, and a one-pass
    backward.
    """

    sub: int = 4
    block_p: int = 128
    num_warps: int = 4
    steps: int = 8


_CONV_FORWARD = ConvTile()
_CONV_BACKWARD = ConvTile()
_overrides: list[dict[str, PassConfig | ConvTile]] = []


def _pick(kind: str, default):
    for o in reversed(_overrides):
        if kind in o:
            return o[kind]
    return default


def forward_config() -> PassConfig:
    """Settings of the forward passes (the innermost :func:`override`, else the defaults)."""
    return _pick("forward", _FORWARD)


def backward_config() -> PassConfig:
    """Settings of the backward passes (the innermost :func:`override`, else the defaults)."""
    return _pick("backward", _BACKWARD)


def conv_forward_tile() -> ConvTile:
    """The causal conv's forward tile (the innermost :func:`override`, else the default)."""
    return _pick("conv_forward", _CONV_FORWARD)


def conv_backward_tile() -> ConvTile:
    """The causal conv's backward tile (the innermost :func:`override`, else the default)."""
    return _pick("conv_backward", _CONV_BACKWARD)


@contextlib.contextmanager
def override(
    forward: PassConfig | None = None,
    backward: PassConfig | None = None,
    conv_forward: ConvTile | None = None,
    conv_backward: ConvTile | None = None,
) -> Iterator[None]:
    """Use other settings inside the block (tests, benchmark sweeps)."""
    given = (
        ("forward", forward),
        ("backward", backward),
        ("conv_forward", conv_forward),
        ("conv_backward", conv_backward),
    )
    entry = {k: v for k, v in given if v is not None}
    _overrides.append(entry)
    try:
        yield
    finally:
        _overrides.remove(entry)


def target_programs(device: torch.device) -> int:
    """Programs that fill the device about once: two resident 8-warp programs per SM."""
    if device.type != "cuda":
        return 8
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def resident_programs(device: torch.device, num_warps: int, registers: int) -> int:
    """How many programs of ``num_warps`` warps and ``registers`` registers per thread the device holds at once.

    From the SM count, threads and registers per SM and 32 blocks per SM at most (sm_80, sm_90); shared memory is
    not counted, so a cooperative launch may still refuse the grid (forward.run then launches the passes apart).
    """
    props = torch.cuda.get_device_properties(device)
    per_warp = -(-registers * 32 // 256) * 256  # registers are allocated per warp in units of 256
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    threads = getattr(props, "max_threads_per_multi_processor", 2048)
    per_sm = min(32, threads // (32 * num_warps), regs // (per_warp * num_warps))
    return props.multi_processor_count * per_sm
