"""Benchmarks: speed of the encoders, the LM's decode, training steps and data loading.

Run `python bench.py NAME [--key=value ...]`. Each benchmark prints one table and the machine it ran on.
Where a benchmark compares against `transformers`, that package is the reference (as in the tests) and is
imported inside the comparison only; the product never imports it.
"""

import platform
import sys

import torch


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


BENCHMARKS = {}  # name -> function(argv: list[str]); each section below registers itself


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        sys.exit(f"usage: python bench.py {{{','.join(sorted(BENCHMARKS))}}} [--key=value ...]")
    print(f"# machine: {machine()}, torch {torch.__version__}")
    BENCHMARKS[sys.argv[1]](sys.argv[2:])
