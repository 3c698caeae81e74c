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

``MEDMAMBA_TRITON_LAUNCH=jit`` launches every call through Triton's own path; ``=check`` does too, and asserts that
Triton picked the remembered kernel (the GPU tests run so).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .layout import interpreted

__all__ = ["Launcher", "argument_key", "launch_mode", "use_mode"]

_MODES = ("direct", "jit", "check")
_MAX_ENTRIES = 512  # remembered kernels per Launcher (one per argument key); cleared when full


def launch_mode() -> str:
    """``direct`` (the default), ``jit`` or ``check`` from ``MEDMAMBA_TRITON_LAUNCH``; ``jit`` under the interpreter."""
    if interpreted():
        return "jit"
    mode = os.environ.get("MEDMAMBA_TRITON_LAUNCH", "direct")
    if mode not in _MODES:
        raise ValueError(f"MEDMAMBA_TRITON_LAUNCH must be one of {', '.join(_MODES)}, got {mode!r}")
    return mode


def argument_key(args: Sequence[Any]) -> tuple:
    """What Triton specialises a launch on, per positional argument (a tensor: dtype and 16-byte alignment)."""
    # Other arguments enter by value (ints, floats, None): a call site passes the same type at each position.
    return tuple([(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args])


_LAUNCHERS: list[Launcher] = []


@contextmanager
def use_mode(mode: str) -> Iterator[None]:
    """Launch every kernel of the scan backend in ``mode`` (``direct``, ``jit`` or ``check``) inside the block."""
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
        self._kernels: dict[tuple, tuple[Any, tuple]] = {}
        self._runtime: tuple[Callable, Callable, Any] | None = None
        _LAUNCHERS.append(self)

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **meta: self.launch(grid, args, meta)

    def launch(self, grid: tuple[int, ...], args: tuple, meta: dict[str, Any]) -> None:
        """Launch on the current device and stream."""
        if self.mode is None:
            self.mode = launch_mode()
        if self.mode == "jit":
            self.fn[grid](*args, **meta)
            return
        device, stream_of, knobs = self._runtime or self._load_runtime()
        dev = device()
        key = (argument_key(args), tuple(meta.items()), dev)
        hit = self._kernels.get(key)
        if hit is None or self.mode == "check":
            compiled = self.fn[grid](*args, **meta)
            if hit is not None:
                assert compiled is hit[0], f"{self.fn.__name__}: the remembered kernel is not the one Triton picked"
            self._remember(key, compiled, args, meta)
            return
        compiled, tail = hit
        stream = stream_of(dev)
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        full = (*args, *tail)
        metadata = compiled.launch_metadata(grid, stream, *full) if enter is not None else None
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        compiled.run(
            grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, metadata, enter, leave, *full
        )

    def _load_runtime(self) -> tuple[Callable, Callable, Any]:
        from triton import knobs
        from triton.runtime import driver

        self._runtime = (driver.active.get_current_device, driver.active.get_current_stream, knobs)
        return self._runtime

    def _remember(self, key: tuple, compiled: Any, args: tuple, meta: dict[str, Any]) -> None:
        # The C launcher takes every parameter of the signature in order, compile-time ones included: the
        # positional arguments, then the rest from the keywords or their defaults. Anything else (an older
        # Triton, a kernel still compiling) is not remembered and keeps Triton's own path.
        if self._params is None or not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            return
        if hasattr(compiled, "result") or compiled.function is None:
            return
        names, defaults = self._params
        if any(name in meta for name in names[: len(args)]):
            return
        tail = []
        for name in names[len(args) :]:
            if name in meta:
                tail.append(meta[name])
            elif name in defaults:
                tail.append(defaults[name])
            else:
                return
        if len(self._kernels) >= _MAX_ENTRIES:
            self._kernels.clear()
        self._kernels[key] = (compiled, tuple(tail))


def _parameters(fn: Any) -> tuple[list[str], dict[str, Any]] | None:
    python_fn = getattr(fn, "fn", None)
    if python_fn is None:
        return None
    params = inspect.signature(python_fn).parameters.values()
    names = [p.name for p in params]
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return names, defaults
