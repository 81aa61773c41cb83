"""The end of bench/gpu/check.sh: plots, then one summary of the run (printed, and as JSON): each stage's outcome,
the machine in a line, and the benches' headline figures. It reads whatever the stages left, finished or not.

    python -m bench.gpu.report --preset gpu --stages STAGES.tsv --facts FACTS.json --json SUMMARY.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import common, plots, summary

BENCHES = ("kernels", "train_step", "iteration", "generate", "scaling")
STAGE_FIELDS = ("stage", "status", "seconds", "limit_s", "note")


def read_stages(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [dict(zip(STAGE_FIELDS, line.split("\t"))) for line in path.read_text().splitlines() if line]


def machine_line(facts_path: Path) -> str:
    if not facts_path.exists():
        return "machine: no facts (the facts stage did not run or failed)"
    facts = json.loads(facts_path.read_text())
    smi = facts.get("nvidia_smi", {})
    gpus = smi.get("gpus") or []
    gpu = f"{len(gpus)} x {gpus[0].get('name')}" if gpus else f"no GPU ({smi.get('error', 'nvidia-smi found none')})"
    torch_facts, versions = facts.get("torch", {}), facts.get("versions", {})
    return (f"machine: {gpu}, driver {gpus[0].get('driver_version') if gpus else '-'}, torch "
            f"{torch_facts.get('version')} (CUDA "
            f"{torch_facts.get('cuda')}), triton {versions.get('triton')}, transformers {versions.get('transformers')}"
            f", python {facts.get('python')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--stages", type=Path, required=True)
    parser.add_argument("--facts", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)

    stages = read_stages(args.stages)
    try:
        drawn = [str(p.name) for p in plots.plot_all()
                 if p.name.endswith((f"-{args.preset}.png", f"-{args.preset}-custom.png"))]
    except Exception as error:  # noqa: BLE001 - a plot must not cost the summary
        drawn = [f"plots failed: {error!r}"]
    ran = [s["stage"] for s in stages if s["stage"] in BENCHES]
    # A stage given options of its own (SPIN_GPU_CHECK_ARGS_<stage>) may write <bench>-<preset>-custom.json
    # instead: the check's results folder is its own, so what is there is this run's.
    custom = frozenset(name for name in ran if not summary.results_path(name, args.preset).exists()
                       and summary.results_path(name, args.preset, custom=True).exists())
    table = summary.summary_table(ran, args.preset, custom=custom) if ran else "no bench ran"
    text = "\n".join([
        machine_line(args.facts),
        "",
        common.format_table(["stage", "status", "seconds", "limit s", "note"],
                            [[s.get(f, "") for f in STAGE_FIELDS] for s in stages]),
        "",
        table,
        "",
        f"plots: {', '.join(drawn) or 'none'}",
    ])
    print(text)
    args.json.write_text(json.dumps({"preset": args.preset, "stages": stages, "plots": drawn, "summary": text},
                                    indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
