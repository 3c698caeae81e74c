"""The native kernel launcher (``native_launch.c``): it builds here, packs parameters as the compiled kernel declares
them, refuses kernels whose layout it cannot be sure of, and the scan's launcher uses it only where it may.

The GPU tests launch every scan kernel through it (the default) and compare with Triton's own launcher
(``test_gpu_direct_launches_run_the_kernels_triton_picks``).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from medmamba.kernels.backends.triton_scan import launch, native

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def module():
    built = native.load()
    assert built is not None, "native_launch.c did not build with Triton's helper"
    return built


def test_parameters_are_packed_eight_bytes_each_with_two_scratch_pointers(module):
    x = torch.zeros(8)
    packed = module.pack(b"pxilfpp", (x, 123, -7, 2**40 + 5, 1.5, None, 4096))
    # the compile-time argument takes no slot; ints and floats sit in the low bytes of theirs
    slots = [packed[i : i + 8] for i in range(0, len(packed), 8)]
    assert len(slots) == 6 + 2
    assert struct.unpack("<Q", slots[0]) == (x.data_ptr(),)
    assert struct.unpack("<i", slots[1][:4]) == (-7,)
    assert struct.unpack("<q", slots[2]) == (2**40 + 5,)
    assert struct.unpack("<f", slots[3][:4]) == (1.5,)
    assert struct.unpack("<Q", slots[4]) == (0,)  # None: a null pointer
    assert struct.unpack("<Q", slots[5]) == (4096,)  # an int: the address itself
    assert slots[6:] == [bytes(8), bytes(8)]  # global and profile scratch


@pytest.mark.parametrize(
    "kinds, args, error",
    [
        (b"pi", (torch.zeros(1),), ValueError),  # fewer arguments than kinds
        (b"i", (2**31,), OverflowError),  # past a 32-bit parameter
        (b"p", ("not a tensor",), AttributeError),
        (b"q", (1,), ValueError),  # an unknown kind
    ],
)
def test_bad_arguments_raise_instead_of_launching(module, kinds, args, error):
    with pytest.raises(error):
        module.pack(kinds, args)


def _compiled(signature, **meta):
    defaults = {"num_ctas": 1, "num_warps": 4, "shared": 0, "global_scratch_size": 0, "profile_scratch_size": 0}
    return SimpleNamespace(src=SimpleNamespace(signature=signature), metadata=SimpleNamespace(**(defaults | meta)))


def test_kinds_follow_the_signature():
    sig = {"x_ptr": "*bf16", "n": "i32", "big": "i64", "scale": "fp32", "one": "constexpr", "BLOCK": "constexpr"}
    assert native.kinds_of(_compiled(sig), 6) == b"pilfxx"


@pytest.mark.parametrize(
    "signature, meta, n_args",
    [
        ({"x_ptr": "*fp32"}, {}, 2),  # not every argument of the launch
        ({"flag": "i1"}, {}, 1),  # a bool: its size differs between Triton versions
        ({"h": "fp16"}, {}, 1),
        ({"t": ("*fp32", "i32")}, {}, 1),  # a tuple
        ({"d": "tensordesc<fp32[16, 16]>"}, {}, 1),
        ({"x_ptr": "*fp32"}, {"global_scratch_size": 64}, 1),
        ({"x_ptr": "*fp32"}, {"profile_scratch_size": 64}, 1),
        ({"x_ptr": "*fp32"}, {"num_ctas": 2}, 1),
        ({"x_ptr": "*fp32"}, {"launch_cooperative_grid": True}, 1),
        ({"x_ptr": "*fp32"}, {"launch_pdl": True}, 1),
    ],
    ids=["count", "i1", "fp16", "tuple", "tensordesc", "scratch", "profile", "ctas", "cooperative", "pdl"],
)
def test_kernels_of_uncertain_layout_keep_tritons_launcher(signature, meta, n_args):
    assert native.kinds_of(_compiled(signature, **meta), n_args) is None


def test_disabled_by_the_environment(monkeypatch):
    sig = {"x_ptr": "*fp32"}
    compiled = _compiled(sig)
    compiled.function = 1234
    monkeypatch.setenv("MEDMAMBA_NATIVE_LAUNCH", "0")
    assert native.spec_of(compiled, 1) is None
    monkeypatch.setenv("MEDMAMBA_NATIVE_LAUNCH", "1")
    launch, *rest = native.spec_of(compiled, 1)
    assert launch is native.load().launch and rest == [1234, 128, 0, b"p"]


_PTX_SCRIPT = r"""
import re, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from medmamba.kernels.backends.triton_scan import forward, native

@triton.jit
def probe(x_ptr, n, big, scale, one, y_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + i + big, mask=i < n) * scale + one
    tl.store(y_ptr + i, v, mask=i < n)

SIZES = {"u64": 8, "b64": 8, "s64": 8, "u32": 4, "b32": 4, "s32": 4, "f32": 4}
WANT = {"p": (8,), "l": (8,), "i": (4,), "f": (4,)}

def check(fn, sig, const, warps=1):
    names = fn.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*")}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    kinds = native.kinds_of(compiled, len(names))
    assert kinds is not None, fn
    entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", compiled.asm["ptx"], re.S).group(1)
    params = re.findall(r"\.param\s+\.(\w+)", entry)
    got = [SIZES[p] for p in params]
    want = [WANT[k][0] for k in kinds.decode() if k != "x"] + [8, 8]  # + global and profile scratch
    assert got == want, (fn, kinds, params)
    floats = [p for p, k in zip(params, [k for k in kinds.decode() if k != "x"]) if k == "f"]
    assert all(p == "f32" for p in floats), params
    print(fn.__name__ if hasattr(fn, "__name__") else fn, kinds.decode(), len(params))

# the JIT types an int past 2**31 i64 and one equal to 1 a compile-time constant
check(probe, {"x_ptr": "*fp32", "n": "i32", "big": "i64", "scale": "fp32", "one": "constexpr", "y_ptr": "*bf16",
              "BLOCK": "constexpr"}, {"one": 1, "BLOCK": 64})
names = forward._fwd_carry_kernel.arg_names
const = {"SAVE_STATES": True, "BLOCK_N": 16, "BLOCK_C": 16, "BLOCK_S": 64}
check(forward._fwd_carry_kernel, {n: "constexpr" if n in const else ("*fp32" if n.endswith("_ptr") else "i32")
                                  for n in names}, const, warps=8)
print("ok")
"""


def test_kinds_match_the_parameters_of_kernels_compiled_for_sm90(tmp_path):
    """What ``kinds_of`` reads from a compiled kernel is what its PTX entry declares, scratch pointers included."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "ptx_params.py"  # @triton.jit reads its source from a file
    script.write_text(_PTX_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
    assert "pilfxpx" in done.stdout


class _Compiled:
    """A compiled kernel whose layout the native launcher takes; ``run`` (Triton's launcher) records."""

    def __init__(self):
        self.function, self.packed_metadata, self.runs = 99, object(), []
        self.src = SimpleNamespace(signature={"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"})
        self.metadata = SimpleNamespace(num_ctas=1, num_warps=2, shared=512, global_scratch_size=0,
                                        profile_scratch_size=0)  # fmt: skip

    def run(self, *call):
        self.runs.append(call)


def _kernel(x_ptr, n, BLOCK=64):  # only its signature is read
    raise NotImplementedError


class _Jit:
    fn = staticmethod(_kernel)
    __name__ = "_kernel"

    def __init__(self):
        self.compiled = _Compiled()

    def __getitem__(self, grid):
        return lambda *args, **meta: self.compiled


class _Knobs:
    class runtime:  # noqa: N801 (mirrors triton.knobs.runtime)
        launch_enter_hook = None
        launch_exit_hook = None


@pytest.mark.parametrize("mode", ["direct", "direct-triton"])
def test_direct_launches_go_native_unless_asked_for_tritons_launcher(monkeypatch, mode):
    calls = []
    monkeypatch.setattr(native, "load", lambda: SimpleNamespace(launch=lambda *a: calls.append(a)))
    jit = _Jit()
    launcher = launch.Launcher(jit, mode=mode)
    monkeypatch.setattr(launcher, "_runtime", (lambda: 0, lambda device: 7, _Knobs))
    x = torch.zeros(4)
    memo: dict = {}
    for _ in range(3):
        launcher.at(memo, "site", (5, 2))(x, 48)
    # the first launch is Triton's own; then the memo's kernel, through the native launcher unless told not to
    if mode == "direct":
        assert calls == [(99, 5, 2, 1, 64, 512, 7, 0, b"pix", (x, 48, 64))] * 2
        assert jit.compiled.runs == []
    else:
        assert calls == [] and len(jit.compiled.runs) == 2


def test_launch_hooks_keep_tritons_launcher(monkeypatch):
    calls = []
    monkeypatch.setattr(native, "load", lambda: SimpleNamespace(launch=lambda *a: calls.append(a)))
    jit = _Jit()
    jit.compiled.launch_metadata = lambda *a: None
    launcher = launch.Launcher(jit, mode="direct")
    monkeypatch.setattr(_Knobs.runtime, "launch_enter_hook", lambda *a: None)
    monkeypatch.setattr(launcher, "_runtime", (lambda: 0, lambda device: 7, _Knobs))
    x = torch.zeros(4)
    for _ in range(2):
        launcher[(1,)](x, 48)
    assert calls == [] and len(jit.compiled.runs) == 1
