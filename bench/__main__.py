"""python -m bench [--preset cpu|gpu] [--only kernels|train_step|generate|scaling]: every bench in turn (the GPU preset
when CUDA is present)."""

import argparse
import sys

from bench import generate, kernels, scaling, train_step

BENCHES = {"kernels": kernels, "train_step": train_step, "generate": generate, "scaling": scaling}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=sorted(BENCHES), help="run one bench only")
    args, rest = parser.parse_known_args(argv)
    names = [args.only] if args.only else list(BENCHES)
    return max(BENCHES[name].main(rest) for name in names)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
