"""The Triton kernels compile ahead of time for A100 (sm_80) and H100 (sm_90) without a GPU:
no register spills, tensor-core instructions (HMMA on sm_80, Hopper's HGMMA on sm_90), and gradient atomics
without memory barriers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("aot_compile.py")


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real compiler, not interpreter
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_compiles_for_every_arch_and_dtype(compiled):
    seen = {(row["kernel"], row["arch"], row["dtype"], row["bias"]) for row in compiled}
    assert len(seen) == 2 * 2 * 3 * 2, seen  # kernels, archs, dtypes, with and without a bias


def test_no_register_spills(compiled):
    for row in compiled:
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row


def test_tensor_cores_are_used(compiled):
    for row in compiled:
        if row["arch"] == 90:
            assert row["hgmma"] > 0, row
        else:
            assert row["mma"] > 0, row


def test_gradient_atomics_are_relaxed(compiled):
    """The backward accumulates dhidden and dweight with atomic adds read only after the kernel ends: they need no
    ordering. Triton's default (acquire/release) puts a GPU-wide barrier and an L1 invalidation beside each one,
    inside the loop over the hidden dimension."""
    for row in compiled:
        if row["kernel"] == "_backward_kernel":
            assert row["atomics"] > 0 and row["gpu_barriers"] == 0, row


# A ROCm build of torch calls AMD GPUs "cuda" devices: backend "auto" takes Triton there too. Compiled here for an
# MI250X (gfx90a: 64 KiB of LDS; torch reports its capability as (9, 0), Hopper's number) with the tiles and the dot
# precision the kernels pick on that device.
HIP_SCRIPT = """
import json, torch, triton
from triton.backends.compiler import GPUTarget
import aot_compile as ac
from spin_kernels import triton_logprobs as tk

torch.version.hip = "6.4.0"
torch.cuda.get_device_capability = lambda device=None: (9, 0)
for dtype in (torch.float32, torch.bfloat16):
    configs = tk.launch_configs(dtype, tk.device_arch(torch.device("cuda")))
    for fn, cfg in zip((tk._forward_kernel, tk._backward_kernel), configs):
        constexprs = dict(HAS_BIAS=False, UPCAST=False, PRECISION=tk.dot_precision(dtype), BLOCK_N=cfg.block_n,
                          BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k)
        if fn is tk._backward_kernel:
            constexprs.update(NEED_HIDDEN=True, NEED_WEIGHT=True, NEED_BIAS=False, GROUP_N=cfg.group_n)
        signature = ac._signature(fn, "*" + ac.TYPE_NAMES[dtype], constexprs)
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                        attrs=ac._aligned(fn, signature))
        try:
            compiled = triton.compile(src, target=GPUTarget("hip", "gfx90a", 64),
                                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            row = {"shared_bytes": compiled.metadata.shared}
        except Exception as error:
            row = {"error": str(getattr(error, "__cause__", None) or error).splitlines()[-1][-300:]}
        print(json.dumps(dict(row, kernel=fn.__name__, dtype=str(dtype))), flush=True)
"""


def test_kernels_compile_for_an_amd_gpu_with_what_they_pick_there():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", HIP_SCRIPT], env=env, cwd=SCRIPT.parent, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 4, result.stdout
    for row in rows:
        assert "error" not in row and row["shared_bytes"] <= 64 * 2**10, row
