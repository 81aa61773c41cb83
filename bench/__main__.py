"""python -m bench [--preset cpu|gpu]: every bench in turn (the GPU preset when CUDA is present)."""

import sys

from bench import kernels

if __name__ == "__main__":
    sys.exit(kernels.main(sys.argv[1:]))
