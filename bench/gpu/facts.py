"""The machine bench/gpu/check.sh runs on, as JSON: GPU, driver, CUDA, the versions that matter, and which of the
project's modules and peers import (a carried wheel that does not work shows here first).

    python -m bench.gpu.facts facts.json
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

PACKAGES = ("torch", "triton", "transformers", "tokenizers", "accelerate", "huggingface-hub", "safetensors", "numpy",
            "pyarrow", "fsspec", "typing-extensions", "deepspeed", "pydantic", "datasets", "trl", "liger-kernel",
            "cut-cross-entropy", "vllm", "flash-attn", "pytest", "matplotlib")
# Imported: what the tests and benches need. Looked up first: the optional ones that cannot travel, imported only
# where present (one built for another torch installs fine and fails to import: spin-fast then does without it).
IMPORTS = ("spin_kernels", "spin_fast.training", "spin_fast.zero", "bench.kernels", "deepspeed", "datasets", "trl",
           "liger_kernel.chunked_loss", "cut_cross_entropy")
LOOKED_UP = ("vllm", "flash_attn")
SMI_FIELDS = ("name", "driver_version", "memory.total", "compute_cap", "clocks.max.sm", "clocks.max.memory",
              "power.limit", "pstate", "temperature.gpu", "utilization.gpu")


def nvidia_smi() -> dict:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return {"error": str(error)}
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[-300:]}
    return {"gpus": [dict(zip(SMI_FIELDS, (v.strip() for v in line.split(","))))
                     for line in out.stdout.strip().splitlines()]}


def torch_facts() -> dict:
    import torch
    import torch.nn.functional as F

    facts = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
             "device_count": torch.cuda.device_count(), "threads": torch.get_num_threads(),
             # What the benches and spin_varlen probe for: present or not in this torch.
             "F.linear_cross_entropy": hasattr(F, "linear_cross_entropy"),
             "LinearCrossEntropyOptions": hasattr(torch.nn, "LinearCrossEntropyOptions")
             or hasattr(F, "LinearCrossEntropyOptions")}
    try:
        from torch.nn.attention.varlen import varlen_attn

        facts["varlen_attn"] = str(inspect.signature(varlen_attn))
    except ImportError as error:
        facts["varlen_attn"] = f"absent ({error})"
    if torch.cuda.is_available():
        facts["cudnn"] = torch.backends.cudnn.version()
        facts["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        facts["bf16_supported"] = torch.cuda.is_bf16_supported()
        facts["devices"] = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            facts["devices"].append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                                     "multiprocessors": props.multi_processor_count,
                                     "memory_gib": round(props.total_memory / 2**30, 1)})
    return facts


def import_state(name: str) -> str:
    """"ok (seconds) file", or "ERROR" and the error's last line."""
    start = time.perf_counter()
    try:
        module = importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - any failure to import is the fact
        return f"ERROR {type(error).__name__}: {(str(error).strip().splitlines() or [''])[-1]}"
    return f"ok ({time.perf_counter() - start:.1f} s) {getattr(module, '__file__', '')}"


def imports() -> dict:
    """module -> "ok (seconds)" with its file, or the error's last line."""
    found = {name: import_state(name) for name in IMPORTS}
    for name in LOOKED_UP:
        found[name] = import_state(name) if importlib.util.find_spec(name) else "absent"
    return found


def facts() -> dict:
    from bench.common import package_version

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "pythonpath": os.environ.get("PYTHONPATH", "").split(os.pathsep),
        "versions": {name: package_version(name) for name in PACKAGES},
        "nvidia_smi": nvidia_smi(),
        "torch": torch_facts(),
        "imports": imports(),
    }


def main(argv: list[str]) -> int:
    found = facts()
    Path(argv[0]).write_text(json.dumps(found, indent=2) + "\n")
    for name, state in found["imports"].items():
        print(f"  import {name}: {state}")
    failed = [name for name, state in found["imports"].items() if state.startswith("ERROR")]
    gpus = found["nvidia_smi"].get("gpus") or [{"name": found["nvidia_smi"].get("error", "no GPU")}]
    print(f"{gpus[0].get('name')}, driver {gpus[0].get('driver_version', '-')}, torch {found['torch']['version']}"
          f" (CUDA {found['torch']['cuda']}), deepspeed {found['versions']['deepspeed']}"
          + (f"; import failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
