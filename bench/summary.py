"""The one table `python -m bench` prints last: each bench's headline ratios, read back from its JSON.

A bench that did not run, a peer that is missing and a figure that failed all show as such, with the
reason, never as a silently shorter table.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import common
from bench.kernels import disagrees, short_name


def results_path(name: str, preset: str, custom: bool = False) -> Path:
    """Bench `name`'s results file: the preset's, or that of a run with a shape or selection of one's own."""
    return Path(common.RESULTS_DIR) / f"{name}-{preset}{'-custom' if custom else ''}.json"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def written_since(name: str, preset: str, began: float, custom: bool = False) -> bool:
    """Whether bench `name` wrote its preset's results file (or its -custom one) after `began` (time.time()): a
    bench that failed before writing leaves an earlier run's file."""
    path = results_path(name, preset, custom)
    return path.exists() and path.stat().st_mtime >= began


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def kernel_rows(report: dict) -> list[list[str]]:
    rows = []
    for r in report["results"]:
        reason = common.problem(r)
        # The baseline's own row (1.00x) is left out, unless it failed: then its reason is every '-' below.
        if r["job"] != "spin_head" or (r["method"] == report["baseline"] and not reason):
            continue
        where = f"SPIN head, V={r['vocab']}: {r['method']}"
        rows.append([where, reason] if reason else
                    [where, f"time {_x(r.get('time_vs_baseline'))}, memory {_x(r.get('memory_vs_baseline'))} of "
                     f"{short_name(report['baseline'])}"
                     + (f"; DIFFERS from it (loss {r.get('value_rel_diff', 0):.1e}, gradients "
                        f"{r.get('grad_rel_diff', 0):.1e} relative)" if disagrees(r) else "")])
    return rows


def train_step_rows(report: dict) -> list[list[str]]:
    rows = []
    for r in report["results"]:
        reason = common.problem(r)
        if reason:
            rows.append([f"train step: {r['method']}", reason])
        elif r["method"] == "spin-fast":
            # The run without shared prompts is compared only where it ran (the GPU preset, or on request).
            ablation = (f", {_x(r['speed_vs_whole_sequences'])} without shared prompts"
                        if "speed_vs_whole_sequences" in r else "")
            rows.append(["train step: spin-fast", f"{r['tokens_per_s']:.0f} tokens/s, "
                         f"{_x(r.get('speed_vs_trl_live'))} TRL live, {_x(r.get('speed_vs_trl_precomputed'))} "
                         f"TRL precomputed{ablation}; memory {_x(r.get('memory_vs_trl_live'))} TRL live's peak, "
                         f"{_x(r.get('held_plus_peak_vs_trl_live'))} with what each holds"])
    return rows


def generate_rows(report: dict) -> list[list[str]]:
    rows = []
    for r in report["results"]:
        reason = common.problem(r)
        text = reason or f"{r['tokens_per_s']:.0f} tokens/s, weight swap {r['swap_ms']:.0f} ms"
        if not reason and "restart_ms" in r:
            text += f" (restart from disk {r['restart_ms'] / 1e3:.1f} s: {r['restart_vs_swap']:.0f}x)"
        if not reason and "folder_reload_ms" in r:
            text += f", reload from a checkpoint folder {r['folder_reload_ms']:.0f} ms"
        rows.append([f"generation: {r.get('engine', '?')}", text])
    return rows


def scaling_rows(report: dict) -> list[list[str]]:
    rows = []
    for r in report["results"]:
        reason = common.problem(r)
        where = f"scaling: {r['config']}, {r['processes']} process(es)"
        rows.append([where, reason or f"{r['tokens_per_s']:.0f} tokens/s, {_x(r.get('speed_vs_1_process'))} "
                                      f"1 process, {_x(r.get('speed_vs_plain'))} plain"])
    return rows


def iteration_rows(report: dict) -> list[list[str]]:
    steady = [r for r in report["rows"] if r["share"] is not None]
    where = f"iteration profile ({report['engine']})"
    if steady:
        shares = ", ".join(f"{r['stage']} {100 * r['share']:.0f}%" for r in steady)
        rows = [[where, f"{sum(r['seconds'] for r in steady):.1f} s: {shares}"]]
    else:  # a partial report, cut off before its timed iteration
        rows = [[where, "no timed iteration: see the report's memory figures"]]
    held = report.get("held_pairs")
    if held:
        rows.append(["host memory of the held pairs", f"{held['bytes_per_token']:.1f} bytes a token, "
                     f"{_x(held['memory_vs_int_per_token'])} of an int per token"])
    return rows


ROWS = {"kernels": kernel_rows, "train_step": train_step_rows, "generate": generate_rows,
        "scaling": scaling_rows, "iteration": iteration_rows}


def summary_table(names: list[str], preset: str, failed: frozenset[str] = frozenset(),
                  custom: frozenset[str] = frozenset()) -> str:
    """failed: benches that wrote no results in this run (their files, if any, are older runs', and not shown);
    custom: benches whose figures are in their -custom file (run with a shape or selection of one's own)."""
    rows = []
    paths = {name: results_path(name, preset, name in custom) for name in names}
    reports = {name: None if name in failed else _load(paths[name]) for name in names}
    for name, report in reports.items():
        if name in failed:
            rows.append([name, "no results from this run (its error is above)"])
            continue
        if report is None:
            rows.append([name, f"no results: bench/results/{paths[name].name} was not written (see its output)"])
            continue
        if name in custom:
            rows.append([name, f"a selection of one's own: {' '.join(report.get('custom') or [])}"])
        if "partial" in report:  # stopped by a time limit or a crash: what it measured is below
            rows.append([name, f"partial: {report['partial']}"])
        try:
            rows += ROWS[name](report)
        except (KeyError, TypeError) as error:  # a report from an older layout
            rows.append([name, f"unreadable report ({error!r})"])
    device = next((r["machine"]["device"] for r in reports.values() if r), preset)
    return f"summary ({preset} preset, {device}; ratios from runs side by side)\n" + common.format_table(
        ["bench", "headline"], rows)
