"""The GPU kit (bench/gpu/) on the CPU: the wheel checker on hand-made wheels, and check.sh end to end in its smoke
mode (tiny preset, a dummy wheel, one stage cut off by its time limit), packing what the GPU session gets back.

No GPU, no network, no timing assertion: the GPU run itself can only be checked on the GPU machine."""

import base64
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from bench.gpu import check_wheels

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "bench" / "gpu"


def make_wheel(folder: Path, name: str, version: str, requires: list[str] = (), tag: str = "py3-none-any") -> Path:
    """A minimal installable wheel: one module, METADATA with Requires-Dist lines, WHEEL and RECORD."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                                       *(f"Requires-Dist: {r}" for r in requires)]) + "\n",
        f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }

    def digest(text: str) -> str:
        raw = hashlib.sha256(text.encode()).digest()
        return "sha256=" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    record = "".join(f"{path},{digest(text)},{len(text.encode())}\n" for path, text in files.items())
    files[f"{info}/RECORD"] = record + f"{info}/RECORD,,\n"
    path = folder / f"{module}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
    return path


def test_scripts_parse():
    for script in ("check.sh", "wheels.sh"):
        subprocess.run(["bash", "-n", str(GPU / script)], check=True)


def test_wheel_pins_are_one_version_each():
    pins = [word for line in (GPU / "wheels.sh").read_text().splitlines() if not line.lstrip().startswith("#")
            for word in line.split("#")[0].split() if "==" in word]
    names = [pin.split("==")[0].split("=")[-1].lstrip("(").lower().replace("_", "-") for pin in pins]
    assert "deepspeed" in names and "datasets" in names and "trl" in names
    assert len(names) == len(set(names)), names


def test_image_list_has_what_the_project_takes_from_the_image():
    image = check_wheels.read_image_list(GPU / "image-packages.txt")
    for name in ("torch", "triton", "transformers", "numpy", "safetensors", "pyyaml", "tqdm", "pytest", "matplotlib"):
        assert name in image, name
    assert str(image["torch"]) == "2.11.0" and str(image["transformers"]) == "5.17.0"
    for name in ("deepspeed", "datasets", "trl", "liger-kernel", "vllm", "flash-attn", "pydantic"):
        assert name not in image, name  # what has to travel (or cannot)


def test_check_wheels_against_the_image(tmp_path):
    image_list = tmp_path / "image.txt"
    image_list.write_text("# the image\ntorch==2.11.0\npyyaml\n")
    wheels = tmp_path / "whl"
    wheels.mkdir()
    make_wheel(wheels, "alpha", "1.0", ["torch>=2.6", "pyyaml>=5", "beta<2", "gpu-only; sys_platform == 'win32'",
                                        "docs-tool; extra == 'docs'"])
    make_wheel(wheels, "beta", "1.5")
    args = [str(wheels), "--image", str(image_list)]
    assert check_wheels.main(args) == 0  # torch and pyyaml from the image, beta carried; markers skip the rest

    make_wheel(wheels, "gamma", "1.0", ["torch>=2.12", "missing-one"], tag="cp311-cp311-manylinux_2_17_x86_64")
    make_wheel(wheels, "beta", "2.0")
    problems, _ = check_wheels.check(wheels, check_wheels.read_image_list(image_list))
    text = "\n".join(problems)
    assert "beta: two wheels" in text
    assert "gamma needs torch>=2.12: image torch is 2.11.0" in text
    assert "gamma needs missing-one: neither carried nor in the image" in text
    assert "not installable by CPython 3.12" in text
    assert check_wheels.main(args) == 1


def _run_check(tmp_path: Path, **settings: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "SPIN_GPU_CHECK_PRESET": "tiny", **settings}
    done = subprocess.run(["bash", str(GPU / "check.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, out


def test_check_sh_smoke_run_packs_every_stage(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    make_wheel(wheels, "spin-kit-dummy", "1.0", ["packaging"])
    tests = "tests/test_gpu.py" if (ROOT / "tests" / "test_gpu.py").exists() else "tests/test_gpu_kit.py"
    done, out = _run_check(
        tmp_path, SPIN_GPU_CHECK_WHEELS=str(wheels), SPIN_GPU_CHECK_TESTS=tests,
        SPIN_GPU_CHECK_STAGES="install facts tests kernels train_step",
        SPIN_GPU_CHECK_ARGS_kernels="--methods 'naive PyTorch' --jobs spin_head",
        SPIN_GPU_CHECK_CAP_train_step="2",  # cut off: the stages after it and the packing must not care
    )
    files = sorted(p.name for p in out.iterdir())
    assert files == ["facts.json", "logs.tar.gz", "results.tar.gz", "stages.tsv", "summary.json", "summary.txt"]

    stages = {s["stage"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert [stages[s]["status"] for s in ("install", "facts", "kernels", "train_step")] == [
        "ok", "ok", "ok", "timed out"], stages
    assert stages["tests"]["status"] in ("ok", "skipped")  # no CUDA: skipped tests, or none marked gpu
    assert "train_step" in done.stdout and "timed out" in (out / "summary.txt").read_text()

    with tarfile.open(out / "results.tar.gz") as results:
        names = results.getnames()
    assert "kernels-tiny-custom.json" in names and "kernels-tiny-custom.png" in names  # --methods: its own file
    summary_text, summary_json = (out / "summary.txt").read_text(), json.loads((out / "summary.json").read_text())
    assert any(line.startswith("kernels ") and "a selection of one's own: --methods" in line  # its figures
               for line in summary_text.splitlines()), summary_text
    assert "kernels-tiny-custom.png" in summary_json["plots"]
    with tarfile.open(out / "logs.tar.gz") as logs:
        names = logs.getnames()
        install_log = logs.extractfile("logs/install.log").read().decode()
    for log in ("install", "facts", "tests", "kernels", "train_step"):
        assert f"logs/{log}.log" in names
    assert "requirements met" in install_log  # the dummy wheel's needs, checked against what is installed

    facts = json.loads((out / "facts.json").read_text())
    site, links = facts["pythonpath"][:2]
    # The project comes from the symlink folder, not from an installed copy; the carried wheel from the site folder.
    assert facts["imports"]["spin_kernels"].startswith("ok") and f"{links}/spin_kernels/" in facts["imports"][
        "spin_kernels"]
    assert (Path(site) / "spin_kit_dummy" / "__init__.py").exists()
    assert facts["torch"]["cuda_available"] is False and facts["python"]


def test_check_sh_packs_even_when_no_stage_has_time(tmp_path):
    # A budget below the packing reserve: every stage is skipped, and the summary still says so.
    _, out = _run_check(tmp_path, SPIN_GPU_CHECK_BUDGET_S="20", SPIN_GPU_CHECK_STAGES="facts kernels")
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert [(s["stage"], s["status"]) for s in stages] == [("facts", "skipped"), ("kernels", "skipped")]
    assert "no time left" in (out / "summary.txt").read_text()
    with tarfile.open(out / "results.tar.gz") as results:
        assert results.getnames() == []


LEAVES_A_PROCESS = """
import os, subprocess, pytest

@pytest.mark.gpu
def test_leaves_a_process():  # in a session of its own, as torchrun starts its ranks: out of timeout's reach
    left = subprocess.Popen(["sleep", "300"], start_new_session=True)
    with open(os.environ["LEFT_PID_FILE"], "w") as out:
        out.write(str(left.pid))
"""


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_check_sh_ends_what_a_stage_leaves_and_when_stopped_brings_back_what_ran(tmp_path):
    """A process a stage leaves running is killed before the next stage starts; a TERM to check.sh midway (the
    device's own limit) stops the running stage with its processes and still packs what the finished stages left:
    after each stage, it is in $OUT already."""
    (tmp_path / "test_leaves.py").write_text(LEAVES_A_PROCESS)
    out, left_pid = tmp_path / "out", tmp_path / "left.pid"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "SPIN_GPU_CHECK_PRESET": "tiny",
           "SPIN_GPU_CHECK_STAGES": "tests kernels", "SPIN_GPU_CHECK_TESTS": str(tmp_path / "test_leaves.py"),
           "LEFT_PID_FILE": str(left_pid)}
    check = subprocess.Popen(["bash", str(GPU / "check.sh")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        first_line = check.stdout.readline()
        work = Path(first_line.split("work folder ", 1)[1].split()[0])
        deadline = time.monotonic() + 300
        while not ((out / "stages.tsv").exists() and "tests\t" in (out / "stages.tsv").read_text()):
            assert check.poll() is None and time.monotonic() < deadline, "the tests stage did not end"
            time.sleep(0.5)
        assert not running(int(left_pid.read_text()))  # killed as its stage ended
        with tarfile.open(out / "logs.tar.gz") as logs:  # the snapshot after the first stage
            assert "logs/tests.log" in logs.getnames()
        kernels_log = work / "logs" / "kernels.log"
        while not (kernels_log.exists() and kernels_log.stat().st_size):  # the kernels bench is under way
            assert check.poll() is None and time.monotonic() < deadline, "the kernels bench printed nothing"
            time.sleep(0.2)
        assert "kernels\t" not in (work / "stages.tsv").read_text(), "the kernels bench ended before the TERM"
        check.send_signal(signal.SIGTERM)
        output, _ = check.communicate(timeout=120)
        output = first_line + output
    finally:
        check.kill()
    assert check.returncode == 1, output
    stages = {s["stage"]: s["status"] for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert stages == {"tests": "ok", "kernels": "stopped"}, output
    marker = f"SPIN_GPU_CHECK_RUN={work}".encode()
    left = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if marker in environ.read_bytes().split(b"\0") and running(int(environ.parent.name)):
                left.append(environ.parent.name)
    assert not left, f"the kernels stage's processes outlived the stop: {left}"


def test_check_sh_names_an_unknown_stage(tmp_path):
    done, out = _run_check(tmp_path, SPIN_GPU_CHECK_STAGES="bogus")
    assert "unknown stage" in done.stdout
    assert json.loads((out / "summary.json").read_text())["stages"][0]["status"] == "failed"


# ------------------------------------------------------------------ the benches' GPU-only paths, run on the CPU
@pytest.mark.parametrize("module,args", [
    ("bench.kernels", ["--vocab", "1000", "--job", "spin_head", "--method", "spin-fast torch"]),
    ("bench.train_step", ["--method", "spin-fast"]),
    ("bench.generate", ["--engine", "transformers"]),
    ("bench.iteration", ["--engine", "transformers"]),
], ids=lambda x: x if isinstance(x, str) else None)
def test_one_worker_measures_memory_then_time(module, args, tmp_path, monkeypatch):
    # One worker process per measurement on the CPU and on CUDA alike (bench.common.run_worker).
    from bench import common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)  # where a worker saves its progress, too
    result = common.run_worker(module, ["--preset", "tiny", *args], timeout=300)
    assert "error" not in result, result
    if module == "bench.iteration":
        from bench import iteration

        stages = {"generate", "score", "train", "weight_transfer"}
        assert set(result["memory"]) == {f"iter-{t}/{s}" for t in iteration.MEMORY_ITERATIONS
                                         for s in stages | {"engine_rss"}} | {"iter-0/engine_start"}
        timed = range(iteration.FIRST_TIMED_ITERATION,
                      iteration.FIRST_TIMED_ITERATION + iteration.PRESETS["tiny"].timed_iterations)
        assert set(result["time"]) == {f"iter-{t}/{s}" for t in timed for s in stages} | {"iter-0/engine_start"}
        # Saved after each stage, so that a time limit that cuts the run keeps what it measured: the last save has
        # every stage's figures, and the report's layout.
        partial = json.loads((tmp_path / "iteration-tiny-custom.json").read_text())  # --engine: its own file
        assert "partial" in partial and partial["time"] == result["time"] and partial["memory"] == result["memory"]
        assert [r["stage"] for r in partial["rows"]] == ["engine_start", *iteration.STAGES[1:]]
    else:
        assert result["median_ms"] > 0 and result["peak_extra_mib"] >= 0


def test_vllm_absent_is_reported_missing(tmp_path, monkeypatch):
    from bench import common, generate

    blocker = tmp_path / "blocker" / "vllm"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no vLLM on this machine')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    assert generate.main(["--preset", "tiny", "--engines", "vLLM"]) == 0
    (result,) = json.loads((tmp_path / "generate-tiny-custom.json").read_text())["results"]  # one engine
    assert "no vLLM on this machine" in result["missing"]


def test_linear_cross_entropy_without_its_options_is_missing(monkeypatch):
    import torch
    import torch.nn.functional as F

    from bench import kernels

    for owner in (torch.nn, F):
        monkeypatch.delattr(owner, "LinearCrossEntropyOptions", raising=False)
    with pytest.raises(kernels.Missing, match="no LinearCrossEntropyOptions"):
        kernels._torch_linear_cross_entropy()
    monkeypatch.delattr(F, "linear_cross_entropy", raising=False)
    with pytest.raises(kernels.Missing, match="has no F.linear_cross_entropy"):
        kernels._torch_linear_cross_entropy()


def test_scaling_on_one_gpu_runs_one_process_and_skips_two(tmp_path, monkeypatch):
    import torch

    from bench import common, scaling

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the GPU preset's check
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(scaling, "machine_info", lambda device: {"device": str(device), "versions": {}})
    ran = []

    def fake_run(preset, stage, processes):
        ran.append((stage, processes))
        return {"median_ms": 100.0, "min_ms": 90.0, "max_ms": 110.0, "tokens": 1000, "tokens_per_s": 10000.0,
                "tokens_per_s_per_process": 10000.0, "threads_per_process": [16], "first_loss": 0.693,
                "losses": [0.693, 0.69], "processes": processes, "other_work_cores": 0.0}

    monkeypatch.setattr(scaling, "run_one", fake_run)
    preset = scaling.PRESETS["gpu"]
    assert scaling.default_world_sizes(preset) == [1, 2]
    assert scaling.main(["--preset", "gpu"]) == 0  # skipped is not a failure
    assert ran == [(None, 1), (2, 1), (3, 1)]
    report = json.loads((tmp_path / "scaling-gpu.json").read_text())
    skipped = [r for r in report["results"] if "skipped" in r]
    assert [(r["config"], r["processes"]) for r in skipped] == [("ZeRO-2", 2), ("ZeRO-3", 2)]
    assert "NCCL runs one process per GPU" in skipped[0]["skipped"] and "partial" not in report
    assert "skipped:" in report["table"] and any("more GPUs" in line for line in report["notes"])


def test_facts_import_an_optional_module_where_it_is_present(tmp_path, monkeypatch):
    """flash_attn built for another torch installs fine and fails to import: the facts say so, not "present"."""
    from bench.gpu import facts

    (tmp_path / "spin_broken_extension.py").write_text("raise ImportError('undefined symbol: _ZN3c10')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(facts, "IMPORTS", ())
    monkeypatch.setattr(facts, "LOOKED_UP", ("spin_broken_extension", "spin_surely_absent"))
    assert facts.imports() == {"spin_broken_extension": "ERROR ImportError: undefined symbol: _ZN3c10",
                               "spin_surely_absent": "absent"}
