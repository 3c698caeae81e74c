"""A lean C launcher for the compiled kernels that :class:`launch.Launcher` launches directly.

Triton's C launcher costs 6-15 µs per scan launch on the lent GPU hosts: for every pointer argument it calls the
tensor's ``data_ptr()`` and then asks the driver for the pointer's attributes (``cuPointerGetAttribute``), to
refuse host memory with a clear error. A scan kernel takes 10-20 pointers, and a 16³ forward+backward launches 8
kernels, where the GPU waits for the host. The scan's call sites pass CUDA tensors that they allocated or
checked, so ``native_launch.c`` skips the driver's question; otherwise it packs the parameters as Triton's
launcher does and calls ``cuLaunchKernel``.

It takes a compiled kernel only when the layout of its parameters is certain (:func:`kinds_of`): every argument a
pointer, a 32- or 64-bit int, a 32-bit float or a compile-time constant, no scratch memory, one CTA per program,
no cooperative or programmatic launch. Any other kernel, a missing C compiler or CUDA driver, or
``MEDMAMBA_NATIVE_LAUNCH=0`` keeps Triton's launcher. The module is built with Triton's own helper
(``triton.runtime.build.compile_module_from_src``), which caches it beside Triton's kernels.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["enabled", "kinds_of", "load", "spec_of", "status"]

_SOURCE = Path(__file__).with_name("native_launch.c")
_MODULE_NAME = "medmamba_native_launch"
_KINDS = {"i32": "i", "i64": "l", "fp32": "f", "f32": "f", "constexpr": "x"}
_MAX_PARAMS = 254  # native_launch.c's MAX_PARAMS

_module: ModuleType | None = None
_failed: str | None = None  # why the module could not be built


def enabled() -> bool:
    """Whether direct launches may use the native launcher (``MEDMAMBA_NATIVE_LAUNCH``, default on)."""
    return os.environ.get("MEDMAMBA_NATIVE_LAUNCH", "1") not in ("0", "false", "no", "off")


def load() -> ModuleType | None:
    """The compiled ``native_launch.c`` module, built on first use; None where it cannot be built."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    try:
        from triton.runtime.build import compile_module_from_src

        _module = compile_module_from_src(_SOURCE.read_text(), _MODULE_NAME)
    except Exception as exc:  # no compiler, no Python headers: Triton's launcher stays
        _failed = f"{type(exc).__name__}: {exc}"
        logging.getLogger(__name__).warning("medmamba: native kernel launcher not built (%s); using Triton's", exc)
    return _module


def status() -> str | None:
    """None when direct launches go through the native launcher, else why they keep Triton's (for ``medmamba info``).

    Builds the module if it was not built yet.
    """
    if not enabled():
        return "off (MEDMAMBA_NATIVE_LAUNCH=0)"
    if load() is None:
        return f"not built ({_failed})"
    return None


def kinds_of(compiled: Any, n_args: int) -> bytes | None:
    """One byte per argument of ``compiled`` (``native_launch.c``'s kinds), or None if its layout is not certain.

    ``n_args``: how many arguments a launch passes (every parameter of the signature, compile-time ones included).
    """
    src, meta = getattr(compiled, "src", None), getattr(compiled, "metadata", None)
    signature = getattr(src, "signature", None)
    if not isinstance(signature, dict) or meta is None or len(signature) != n_args:
        return None
    if getattr(meta, "num_ctas", 1) != 1 or getattr(meta, "launch_cooperative_grid", False):
        return None
    if getattr(meta, "launch_pdl", False) or "gsan" in str(getattr(meta, "instrumentation_mode", "")):
        return None
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        return None
    if getattr(meta, "shared", 0) > 227 * 1024 or getattr(meta, "tensordesc_meta", None):
        return None
    kinds = []
    for ty in signature.values():
        if not isinstance(ty, str):  # a tuple of arguments
            return None
        kind = "p" if ty.startswith("*") else _KINDS.get(ty)
        if kind is None:
            return None
        kinds.append(kind)
    if sum(k != "x" for k in kinds) > _MAX_PARAMS:
        return None
    return "".join(kinds).encode()


def spec_of(compiled: Any, n_args: int) -> tuple[Any, int, int, int, bytes] | None:
    """``(launch, function, threads, shared bytes, kinds)`` for a native launch of ``compiled``, or None.

    ``launch(function, gx, gy, gz, threads, shared, stream, device, kinds, args)`` is the built module's.
    """
    if not enabled():
        return None
    kinds = kinds_of(compiled, n_args)
    function, meta = getattr(compiled, "function", None), getattr(compiled, "metadata", None)
    if kinds is None or not isinstance(function, int) or not function:
        return None
    module = load()
    if module is None:
        return None
    return module.launch, function, 32 * meta.num_warps, meta.shared, kinds
