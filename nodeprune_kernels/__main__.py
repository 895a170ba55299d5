"""The ``nodeprune`` command line."""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nodeprune", description="Multi-granular node pruning kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("selfcheck", help="run every op against its reference and report the GPU builds")
    p.add_argument("--no-compile", action="store_true", help="skip compiling the kernels for sm_90 / sm_80")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where the kernels run (default: cuda if available, else the Triton interpreter)")
    args = parser.parse_args(argv)

    import torch

    if args.command == "selfcheck":
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu":
            # must be set before the first kernel module is imported
            os.environ["TRITON_INTERPRET"] = "1"
        elif not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU is visible to torch; drop --device to use the CPU")
        from .selfcheck import run

        return 0 if run(device, compile_kernels=not args.no_compile) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
