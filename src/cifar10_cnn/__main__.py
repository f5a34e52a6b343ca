"""`python -m cifar10_cnn ...` (and `torchrun -m cifar10_cnn ...`) is the same as `cifar10 ...`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
