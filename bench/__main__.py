"""python -m bench [--preset cpu|gpu] [--out DIR] [--only NAME [options of that bench]]: every bench in turn (the GPU
preset when CUDA is present), then one summary table of their headline ratios, and PNG plots, in bench/results/ (or
DIR; SPIN_BENCH_RESULTS=DIR does the same). A bench's own options (python -m bench.NAME --help) go with --only NAME;
those that change its shape or its selection of methods write <NAME>-<preset>-custom.json, not the preset's file."""

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from bench import common, generate, iteration, kernels, plots, scaling, summary, train_step

BENCHES = {"kernels": kernels, "train_step": train_step, "generate": generate, "scaling": scaling,
           "iteration": iteration}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--only", choices=sorted(BENCHES), help="run one bench only, with its own options after it")
    parser.add_argument("--out", type=Path, metavar="DIR", help="write the results (JSON, PNG) into DIR, e.g. to keep "
                        f"a run apart from the committed ones (default: {common.RESULTS_DIR})")
    parser.add_argument("--preset", choices=sorted(kernels.PRESETS), help="cpu, gpu (needs CUDA; the default with it) "
                        "or tiny (seconds; for tests)", default="gpu" if torch.cuda.is_available() else "cpu")
    args, rest = parser.parse_known_args(argv)
    if rest and not args.only:  # each bench has options of its own: passed to all, the second would refuse them
        parser.error(f"{' '.join(rest)}: a bench's own options go with --only NAME (see python -m bench.NAME --help)")
    common.refuse_gpu_preset_without_cuda(parser, args.preset)
    if args.out is not None:  # this process's benches and the workers they start
        common.RESULTS_DIR = args.out
        os.environ["SPIN_BENCH_RESULTS"] = str(args.out)
    names = [args.only] if args.only else list(BENCHES)
    status, failed = 0, set()
    for name in names:  # one bench's failure is reported, and the others still run
        began = time.time()
        try:
            status = max(status, BENCHES[name].main(["--preset", args.preset, *rest]))
        except Exception:  # noqa: BLE001 - the traceback is printed; the summary says the bench failed
            traceback.print_exc()
            print(f"bench {name} failed (traceback above); going on with the others", file=sys.stderr)
            status = 1
        if not summary.written_since(name, args.preset, began):  # a file there is an earlier run's: not shown
            failed.add(name)
    try:  # matplotlib comes with the bench extras, as the peers do: without it the summary still comes
        for path in plots.plot_all(benches=names):
            print(f"plot: {path}")
    except ImportError as error:
        print(f"no plots: {error} (pip install -e '.[bench]' installs matplotlib)", file=sys.stderr)
    except ValueError as error:  # a stray or cut-short .json in the results folder: named, and the summary comes
        print(f"plots stopped: {error}", file=sys.stderr)
    # Told by the file the bench wrote, not by the flags given: a default given by name (--baseline 'naive
    # PyTorch') is the preset's run, and a run of one's own that failed has no table above to point to.
    own = args.only in failed and summary.written_since(args.only, args.preset, began, custom=True)
    if own:
        print("\n(no summary: a shape or config of your own is not the preset's; the bench's table above has its "
              "figures)")
    else:
        print("\n" + summary.summary_table(names, args.preset, frozenset(failed)))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
