"""Compile the Triton kernels ahead of time for a GPU that is not here, and report what ptxas says.

Run as a script (never under TRITON_INTERPRET): python tests/aot_compile.py [ARCH [DTYPE]], e.g.
`90 bfloat16` (default: 80 and 90, every dtype); prints one JSON line per kernel with its
registers, spill bytes, tensor-core instruction counts, atomics and GPU-wide barriers, and shared memory.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

from spin_kernels import triton_logprobs as tk

TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _signature(fn, pointer_type: str, constexprs: dict) -> dict:
    ints = {"M", "V", "H", "tiles_per_split"} | {a for a in fn.arg_names if a.startswith("stride")}
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ints:
            sig[name] = "i32" if name in {"M", "V", "H", "tiles_per_split"} else "i64"
        elif name in {"rows_ptr", "targets_ptr"}:
            sig[name] = "*i64"
        elif name in {"hidden_ptr", "weight_ptr", "bias_ptr"}:
            sig[name] = pointer_type
        else:
            sig[name] = "*fp32"
    return sig


def _aligned(fn, signature: dict) -> dict:
    """What Triton's launcher specializes at run time on a realistic model: 16-byte aligned
    pointers, and strides and H that are multiples of 16 (M and V are left free)."""
    aligned = {
        name for name, kind in signature.items()
        if kind.startswith("*") or name.startswith("stride") or name in {"H"}
    }
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}


def compile_kernels(arch: int, dtype: torch.dtype) -> list[dict]:
    target = GPUTarget("cuda", arch, 32)
    forward_cfg, backward_cfg = tk.launch_configs(dtype, arch)
    # With a bias and without one: Llama, Mistral and Qwen heads have none, and take other code.
    jobs = [job for bias in (True, False) for job in (
        (tk._forward_kernel, forward_cfg, dict(HAS_BIAS=bias)),
        (tk._backward_kernel, backward_cfg, dict(HAS_BIAS=bias, NEED_HIDDEN=True, NEED_WEIGHT=True, NEED_BIAS=bias)),
    )]
    results = []
    for fn, cfg, extra in jobs:
        constexprs = dict(extra, UPCAST=False, PRECISION=tk.dot_precision(dtype), BLOCK_N=cfg.block_n,
                          BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k)
        if "GROUP_N" in fn.arg_names:
            constexprs["GROUP_N"] = cfg.group_n
        signature = _signature(fn, "*" + TYPE_NAMES[dtype], constexprs)
        src = triton.compiler.ASTSource(
            fn=fn, signature=signature, constexprs=constexprs, attrs=_aligned(fn, signature)
        )
        compiled = triton.compile(
            src, target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        )
        results.append(dict(kernel=fn.__name__, arch=arch, dtype=str(dtype), bias=extra["HAS_BIAS"],
                            **_inspect(compiled, arch)))
    return results


def _inspect(compiled, arch: int) -> dict:
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin_path = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx_path.write_text(ptx)
        cubin_path.write_bytes(cubin)
        report = subprocess.run(
            [str(NVIDIA_BIN / "ptxas"), "-v", f"-arch={sm}", str(ptx_path), "-o", str(Path(tmp) / "v.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
        sass = subprocess.run(
            [str(NVIDIA_BIN / "cuobjdump"), "--dump-sass", str(cubin_path)],
            capture_output=True, text=True, check=True,
        ).stdout
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return dict(
        registers=int(registers.group(1)),
        spill_stores=int(spills.group(1)),
        spill_loads=int(spills.group(2)),
        hgmma=sass.count("HGMMA"),
        mma=len(re.findall(r"\bHMMA\b", sass)),
        # Gradient accumulation: atomic adds (REDG when the old value is unused), and what an atomic with acquire/
        # release semantics adds around each one, a GPU-wide memory barrier and an L1 invalidation.
        atomics=len(re.findall(r"\b(?:REDG|ATOMG|RED|ATOM)\.", sass)),
        gpu_barriers=len(re.findall(r"\bMEMBAR\.\w+\.GPU\b|\bCCTL\.IVALL\b", sass)),
        shared_bytes=compiled.metadata.shared,
    )


if __name__ == "__main__":
    archs = [int(sys.argv[1])] if len(sys.argv) > 1 else [80, 90]
    dtypes = [getattr(torch, sys.argv[2])] if len(sys.argv) > 2 else list(TYPE_NAMES)
    for arch in archs:
        for dtype in dtypes:
            for row in compile_kernels(arch, dtype):
                print(json.dumps(row), flush=True)
