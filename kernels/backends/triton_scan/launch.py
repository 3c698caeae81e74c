"""Launching the scan's Triton kernels with less host time than ``kernel[grid](...)``.

Triton's JIT launch specialises every argument on every call (tensor dtype and 16-byte alignment, integers equal
to 1 or divisible by 16) before its compiled C launcher runs. The scan kernels take 10-60 arguments: on the H100
hosts that was 23-57 µs per launch, of which the C launcher was 7-16 µs, and a forward launches three or four
kernels, a backward up to five. At the small stages (16³, 32³) the GPU then waits for the host.

A :class:`Launcher` keeps the compiled kernel per exact argument key: each tensor's dtype and whether its data
is 16-byte aligned, every other argument's value, the compile-time arguments and options, the device. That key
decides everything Triton specialises on, so a hit launches the same compiled kernel that Triton would pick, by
its C launcher directly. A miss (a new key, or any call under ``TRITON_INTERPRET=1``) goes through Triton's own
launch, which compiles if needed and hands back the kernel to remember.

Building and hashing that key is itself 10-20 µs per launch on the CI machine (a scan kernel's 40-60 arguments).
A call site whose every specialisation follows from a signature it has already hashed (forward.py and backward.py
key their launch settings on the inputs' shapes, strides, dtypes and alignment) launches through
:meth:`Launcher.at` instead, with a memo kept beside those settings: its first launch finds the kernel by the
argument key, later ones take it from the memo.

A direct launch goes through ``native_launch.c`` (:mod:`.native`) where the kernel's parameter layout is certain,
else through the kernel's own C launcher from Triton.

``MEDMAMBA_TRITON_LAUNCH=jit`` launches every call through Triton's own path; ``=check`` does too, and asserts that
Triton picked the remembered kernel, the memos' included (the GPU tests run so); ``=keyed`` launches directly but
ignores the memos (to time them); ``=direct-triton`` launches directly through Triton's C launchers only (to time
the native one).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from . import native
from .layout import interpreted

__all__ = ["Launcher", "argument_key", "launch_mode", "launch_stream", "use_mode"]

_MODES = ("direct", "direct-triton", "keyed", "jit", "check")
_MAX_ENTRIES = 512  # remembered kernels per Launcher (one per argument key); cleared when full


def launch_mode() -> str:
    """The launch mode (``MEDMAMBA_TRITON_LAUNCH``): direct (default), direct-triton, keyed, jit or check.

    Always ``jit`` under the interpreter.
    """
    if interpreted():
        return "jit"
    mode = os.environ.get("MEDMAMBA_TRITON_LAUNCH", "direct")
    if mode not in _MODES:
        raise ValueError(f"MEDMAMBA_TRITON_LAUNCH must be one of {', '.join(_MODES)}, got {mode!r}")
    return mode


def launch_stream(device: torch.device) -> int:
    """The handle of ``device``'s current CUDA stream, the one the launches go to."""
    return torch._C._cuda_getCurrentRawStream(device.index if device.index is not None else torch.cuda.current_device())


def argument_key(args: Sequence[Any]) -> tuple:
    """What Triton specialises a launch on, per positional argument (a tensor: dtype and 16-byte alignment)."""
    # Other arguments enter by value (ints, floats, None): a call site passes the same type at each position.
    return tuple([(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args])


_LAUNCHERS: list[Launcher] = []


@contextmanager
def use_mode(mode: str) -> Iterator[None]:
    """Launch every kernel of the scan backend in ``mode`` inside the block.

    ``mode``: ``direct``, ``direct-triton``, ``keyed``, ``jit`` or ``check`` (the module's doc).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
    _load_all()
    before = [(launcher, launcher.mode) for launcher in _LAUNCHERS]
    for launcher, _ in before:
        launcher.mode = "jit" if interpreted() else mode
    try:
        yield
    finally:
        for launcher, old in before:
            launcher.mode = old


def _load_all() -> None:
    # the kernel modules are imported on first use; their launchers must exist before a mode is set
    from . import backward, conv, forward, norm  # noqa: F401


class Launcher:
    """``Launcher(jit_fn)[grid](*args, **constexprs_and_options)``: launch ``jit_fn`` as ``jit_fn[grid](...)`` would.

    Call sites pass the kernel's run-time arguments positionally and only compile-time arguments (``tl.constexpr``)
    and launch options (``num_warps``, ``maxnreg``) by keyword.
    """

    def __init__(self, fn: Any, *, mode: str | None = None) -> None:
        self.fn = fn
        self.mode = mode  # None: from the environment at the first launch
        self._params = _parameters(fn)
        self._kernels: dict[tuple, tuple[Any, tuple, tuple | None]] = {}
        self._runtime: tuple[Callable, Callable, Any] | None = None
        _LAUNCHERS.append(self)

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **meta: self.launch(grid, args, meta)

    def at(self, memo: dict, slot: Hashable, grid: tuple[int, ...]) -> Callable[..., None]:
        """Launch as ``self[grid]``, keeping the kernel in ``memo[slot]`` for the next launches from this site.

        The caller keeps ``memo`` per call signature, and everything Triton specialises on (each tensor's dtype and
        alignment, each integer's value as far as equal to 1 or divisible by 16, the keywords) must follow from
        that signature: a memo hit launches without looking at the arguments.
        """
        return lambda *args, **meta: self.launch(grid, args, meta, memo, slot)

    def launch(
        self, grid: tuple[int, ...], args: tuple, meta: dict[str, Any], memo: dict | None = None, slot: Hashable = None
    ) -> None:
        """Launch on the current device and stream (``memo``, ``slot``: see :meth:`at`)."""
        if self.mode is None:
            self.mode = launch_mode()
        if self.mode == "jit":
            self.fn[grid](*args, **meta)
            return
        device, stream_of, knobs = self._runtime or self._load_runtime()
        dev = device()
        if self.mode == "keyed":
            memo = None
        hit = memo.get(slot) if memo is not None else None
        if hit is not None and hit[3] == dev and self.mode in ("direct", "direct-triton"):
            compiled, tail, spec, _ = hit
        else:
            key = (argument_key(args), tuple(meta.items()), dev)
            kept = self._kernels.get(key)
            if kept is None or self.mode == "check":
                compiled = self.fn[grid](*args, **meta)
                if kept is not None:
                    assert compiled is kept[0], (
                        f"{self.fn.__name__}: the remembered kernel is not the one Triton picked"
                    )
                if hit is not None and hit[3] == dev:
                    assert compiled is hit[0], (
                        f"{self.fn.__name__}: the kernel of memo slot {slot!r} is not the one Triton picked"
                    )
                kept = self._remember(key, compiled, args, meta)
                if memo is not None and kept is not None:
                    memo[slot] = (*kept, dev)
                return
            compiled, tail, spec = kept
            if memo is not None:
                memo[slot] = (compiled, tail, spec, dev)
        stream = stream_of(dev)
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        full = (*args, *tail)
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        if spec is not None and enter is None and leave is None and self.mode != "direct-triton":
            native_launch, function, threads, shared, kinds = spec
            native_launch(function, grid[0], g1, g2, threads, shared, stream, dev, kinds, full)
            return
        metadata = compiled.launch_metadata(grid, stream, *full) if enter is not None else None
        compiled.run(
            grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, metadata, enter, leave, *full
        )

    def _load_runtime(self) -> tuple[Callable, Callable, Any]:
        from triton import knobs
        from triton.runtime import driver

        self._runtime = (driver.active.get_current_device, driver.active.get_current_stream, knobs)
        return self._runtime

    def _remember(
        self, key: tuple, compiled: Any, args: tuple, meta: dict[str, Any]
    ) -> tuple[Any, tuple, tuple | None] | None:
        # The C launcher takes every parameter of the signature in order, compile-time ones included: the
        # positional arguments, then the rest from the keywords or their defaults. Anything else (an older
        # Triton, a kernel still compiling) is not remembered and keeps Triton's own path. Returns what a direct
        # launch takes: the kernel, the parameters after the positional ones, and the native launcher's
        # (launch, function, threads, shared bytes, kinds) where it takes the kernel.
        if self._params is None or not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            return None
        if hasattr(compiled, "result") or compiled.function is None:
            return None
        names, defaults = self._params
        if any(name in meta for name in names[: len(args)]):
            return None
        tail = []
        for name in names[len(args) :]:
            if name in meta:
                tail.append(meta[name])
            elif name in defaults:
                tail.append(defaults[name])
            else:
                return None
        if len(self._kernels) >= _MAX_ENTRIES:
            self._kernels.clear()
        entry = self._kernels[key] = (compiled, tuple(tail), native.spec_of(compiled, len(args) + len(tail)))
        return entry


def _parameters(fn: Any) -> tuple[list[str], dict[str, Any]] | None:
    python_fn = getattr(fn, "fn", None)
    if python_fn is None:
        return None
    params = inspect.signature(python_fn).parameters.values()
    names = [p.name for p in params]
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return names, defaults
