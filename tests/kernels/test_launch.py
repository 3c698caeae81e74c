"""The scan backend's kernel launcher: which calls reuse a remembered compiled kernel, and what its C launcher gets.

Triton is replaced by a recording stand-in here (the CPU has no compiled kernels); the GPU tests run every scan
check through the real launcher, and one of them in ``check`` mode, where Triton's own choice is compared.
"""

from __future__ import annotations

import pytest
import torch

# every kernel module imported here, under the interpreter: one imported later, in a test that unsets
# TRITON_INTERPRET, would compile its kernels for a GPU
from medmamba.kernels.backends.triton_scan import backward, conv, forward, launch, norm  # noqa: F401
from medmamba.kernels.backends.triton_scan.launch import Launcher, argument_key


def _kernel(x_ptr, y_ptr, n, stride, SCALE, BLOCK=64, FLAG=False):  # only its signature is read, never run
    raise NotImplementedError


class _Compiled:
    """A compiled kernel as Triton hands it back: ``run`` is its C launcher."""

    def __init__(self):
        self.function, self.packed_metadata, self.runs = object(), object(), []

    def run(self, *call):
        self.runs.append(call)

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid, stream, len(args))


class _Jit:
    """Stands in for a ``triton.JITFunction``: compiles one kernel per specialisation it is called with."""

    fn = staticmethod(_kernel)
    __name__ = "_kernel"

    def __init__(self):
        self.calls, self.by_key = [], {}

    def __getitem__(self, grid):
        def go(*args, **meta):
            self.calls.append((grid, args, meta))
            return self.by_key.setdefault(argument_key(args) + tuple(meta.items()), _Compiled())

        return go


class _Knobs:
    class runtime:  # noqa: N801 (mirrors triton.knobs.runtime)
        launch_enter_hook = None
        launch_exit_hook = None


@pytest.fixture
def direct(monkeypatch):
    """A Launcher in direct mode over a recording stand-in, on device 0 and stream 7."""
    jit = _Jit()
    launcher = Launcher(jit, mode="direct")
    monkeypatch.setattr(launcher, "_runtime", (lambda: 0, lambda device: 7, _Knobs))
    return jit, launcher


def _args(x, y, n=48, stride=16):
    return x, y, n, stride


def test_second_identical_call_runs_the_remembered_kernel_with_every_parameter(direct):
    jit, launcher = direct
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.bfloat16)
    launcher[(3, 2)](*_args(x, y), SCALE=4, FLAG=True, num_warps=2)
    assert len(jit.calls) == 1  # the first call is Triton's own launch
    (compiled,) = jit.by_key.values()
    assert compiled.runs == []
    launcher[(5, 2)](*_args(x, y), SCALE=4, FLAG=True, num_warps=2)
    assert len(jit.calls) == 1
    # grid padded to three axes, the stream, the handles, no metadata or hooks, then the positional arguments
    # and the compile-time ones in signature order with BLOCK's default (num_warps is an option, not a parameter)
    assert compiled.runs == [(5, 2, 1, 7, compiled.function, compiled.packed_metadata, None, None, None,
                              x, y, 48, 16, 4, 64, True)]  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [
        lambda x, y: ((x.double(), y), {}),  # another dtype
        lambda x, y: ((x[1:], y), {}),  # data 4 bytes off a 16-byte boundary
        lambda x, y: ((x, y, 1), {}),  # an integer equal to 1
        lambda x, y: ((x, y, 49), {}),  # another integer
        lambda x, y: ((x, y), {"SCALE": 5}),  # a compile-time argument
        lambda x, y: ((x, y), {"num_warps": 4}),  # a launch option
    ],
    ids=["dtype", "alignment", "one", "value", "constexpr", "option"],
)
def test_a_changed_specialisation_goes_back_to_triton(direct, change):
    jit, launcher = direct
    x, y = torch.zeros(64), torch.zeros(64)
    launcher[(1,)](*_args(x, y), SCALE=4, num_warps=2)
    args, meta = change(x, y)
    launcher[(1,)](*_args(*args), **{"SCALE": 4, "num_warps": 2, **meta})
    assert len(jit.calls) == 2
    assert all(not c.runs for c in jit.by_key.values())


def test_aligned_views_and_new_tensors_share_the_kernel(direct):
    jit, launcher = direct
    x = torch.zeros(64)
    launcher[(1,)](*_args(x, x), SCALE=1)
    launcher[(1,)](*_args(x[4:], torch.zeros(8)), SCALE=1)  # 16 bytes further: still aligned
    assert len(jit.calls) == 1


def test_launch_hooks_get_the_kernels_metadata(direct, monkeypatch):
    jit, launcher = direct
    enter, leave = object(), object()
    monkeypatch.setattr(_Knobs.runtime, "launch_enter_hook", enter)
    monkeypatch.setattr(_Knobs.runtime, "launch_exit_hook", leave)
    x = torch.zeros(64)
    for _ in range(2):
        launcher[(2, 3, 4)](*_args(x, x), SCALE=1)
    (compiled,) = jit.by_key.values()
    assert compiled.runs[0][:9] == (2, 3, 4, 7, compiled.function, compiled.packed_metadata,
                                    ("metadata", (2, 3, 4), 7, 7), enter, leave)  # fmt: skip


def test_a_run_time_parameter_passed_by_keyword_takes_its_place_in_the_signature(direct):
    jit, launcher = direct
    x = torch.zeros(64)
    for _ in range(2):
        launcher[(1,)](x, x, 48, SCALE=1, stride=16)
    (compiled,) = jit.by_key.values()
    assert len(jit.calls) == 1
    assert compiled.runs[0][9:] == (x, x, 48, 16, 1, 64, False)


def test_what_is_not_a_compiled_kernel_is_not_remembered(direct, monkeypatch):
    jit, launcher = direct
    x = torch.zeros(64)

    def returns_nothing(grid):  # the interpreter, or a Triton whose launch returns no kernel
        def go(*args, **meta):
            jit.calls.append((grid, args, meta))

        return go

    monkeypatch.setattr(_Jit, "__getitem__", lambda self, grid: returns_nothing(grid))
    for _ in range(2):
        launcher[(1,)](*_args(x, x), SCALE=1)
    assert len(jit.calls) == 2


def test_check_mode_asserts_that_triton_picked_the_remembered_kernel(direct):
    jit, launcher = direct
    launcher.mode = "check"
    x = torch.zeros(64)
    launcher[(1,)](*_args(x, x), SCALE=1)
    launcher[(1,)](*_args(x, x), SCALE=1)  # same kernel: passes
    assert len(jit.calls) == 2
    jit.by_key.clear()  # Triton now hands back another kernel for the same arguments
    with pytest.raises(AssertionError, match="not the one Triton picked"):
        launcher[(1,)](*_args(x, x), SCALE=1)


def test_jit_mode_always_launches_through_triton(direct):
    jit, launcher = direct
    launcher.mode = "jit"
    x = torch.zeros(64)
    for _ in range(3):
        launcher[(1,)](*_args(x, x), SCALE=1)
    assert len(jit.calls) == 3
    assert all(not c.runs for c in jit.by_key.values())


def test_mode_from_the_environment(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("MEDMAMBA_TRITON_LAUNCH", "check")
    assert launch.launch_mode() == "check"
    monkeypatch.delenv("MEDMAMBA_TRITON_LAUNCH")
    assert launch.launch_mode() == "direct"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter has no compiled kernels
    assert launch.launch_mode() == "jit"
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("MEDMAMBA_TRITON_LAUNCH", "fast")
    with pytest.raises(ValueError, match="MEDMAMBA_TRITON_LAUNCH"):
        launch.launch_mode()


def test_use_mode_sets_and_restores_every_launcher(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    before = forward._fwd_launch.mode
    with launch.use_mode("check"):
        assert forward._fwd_launch.mode == "check"
    assert forward._fwd_launch.mode == before
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with launch.use_mode("direct"):  # the interpreter keeps Triton's own launch
        assert forward._fwd_launch.mode == "jit"


def test_a_memo_hit_launches_without_reading_the_arguments(direct, monkeypatch):
    # Launcher.at: the call site's memo (kept per call signature by forward.py and backward.py) spares the
    # argument key; the first launch finds the kernel by that key and fills the memo
    jit, launcher = direct
    memo = {}
    x, y = torch.zeros(64), torch.zeros(64)
    launcher.at(memo, "main", (2,))(*_args(x, x), SCALE=3)
    (compiled,) = jit.by_key.values()
    assert memo["main"][0] is compiled and memo["main"][3] == 0  # the kernel, and the device it is for
    monkeypatch.setattr(launch, "argument_key", lambda args: pytest.fail("a memo hit must not build the key"))
    launcher.at(memo, "main", (4,))(*_args(y, y, 64), SCALE=3)
    assert len(jit.calls) == 1
    assert compiled.runs == [(4, 1, 1, 7, compiled.function, compiled.packed_metadata, None, None, None,
                              y, y, 64, 16, 3, 64, False)]  # fmt: skip


def test_a_memo_of_another_device_or_in_keyed_mode_is_not_used(direct):
    jit, launcher = direct
    x = torch.zeros(64)
    memo = {"main": (object(), (), None, 1)}  # remembered on device 1; the current device is 0
    launcher.at(memo, "main", (1,))(*_args(x, x), SCALE=1)
    (compiled,) = jit.by_key.values()
    assert memo["main"] == (compiled, (1, 64, False), None, 0)  # None: not a kernel the native launcher takes
    launcher.mode = "keyed"  # direct launches found by the argument key alone
    other = {}
    for _ in range(2):
        launcher.at(other, "main", (1,))(*_args(x, x), SCALE=1)
    assert other == {} and len(jit.calls) == 1 and len(compiled.runs) == 2


def test_check_mode_asserts_that_triton_picked_the_memos_kernel(direct):
    jit, launcher = direct
    launcher.mode = "check"
    x = torch.zeros(64)
    memo = {}
    for _ in range(2):
        launcher.at(memo, "main", (1,))(*_args(x, x), SCALE=1)
    assert len(jit.calls) == 2 and not any(c.runs for c in jit.by_key.values())
    memo["main"] = (object(), *memo["main"][1:])  # a memo filled by a signature that missed a specialisation
    with pytest.raises(AssertionError, match="memo slot 'main'"):
        launcher.at(memo, "main", (1,))(*_args(x, x), SCALE=1)


def test_scan_launch_settings_are_keyed_on_what_the_memos_need():
    # under the interpreter (conftest): the launch settings, and with them the memos of Launcher.at, are one per
    # signature; A, D or delta_bias 4 bytes off a 16-byte boundary, or another dtype of A (dA's), is another
    from medmamba.kernels import selective_scan
    from tests.kernels.scan_checks import make_inputs

    low, _ = make_inputs((16,), 1, channels=4, N=4, seed=3)

    def keys_after(args):
        forward._LAUNCHES.clear()
        backward._LAUNCHES.clear()
        out = selective_scan(*args, backend="triton").out
        out.sum().backward()
        return next(iter(forward._LAUNCHES)), next(iter(backward._LAUNCHES))

    base = keys_after(low)
    assert keys_after(low) == base
    for i in (2, 5, 7):  # A, D, delta_bias
        flat = torch.zeros(low[i].numel() + 1)
        moved = list(low)
        moved[i] = flat[1:].view(low[i].shape).copy_(low[i].detach()).requires_grad_()
        f, b = keys_after(moved)
        assert f != base[0] and b != base[1], i
    as_bf16 = list(low)
    as_bf16[2] = low[2].detach().bfloat16().requires_grad_()
    assert keys_after(as_bf16)[1] != base[1]


def test_a_first_call_under_cuda_graph_capture_says_to_warm_up(monkeypatch):
    # a shape's order table is copied to the device on its first call, which a CUDA graph cannot capture
    from medmamba.kernels import RASTER, SLICE
    from medmamba.kernels.backends.triton_scan import layout

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"spatial shape \(3, 5, 7\).*run one call of that shape before capturing"):
        layout.order_table((RASTER, SLICE), (3, 5, 7), torch.device("cuda"))
    assert layout.order_table((RASTER, SLICE), (3, 5, 7), torch.device("cpu")).shape[0] == 2  # not capturing: fine
