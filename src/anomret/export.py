"""``python -m anomret.export RUN_DIR OUT``: a run's model as one self-contained package folder.

The package holds the settings, the memory bank, the trained parts, the calibrated thresholds and a
manifest of digests; ``python -m anomret.predict package=OUT input=DIR``, ``anomret.load(OUT)`` and
``python -m anomret.serve OUT`` use it on any machine (see :mod:`anomret.package`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from anomret.cli import user_errors


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m anomret.export",
        description="Write the model of a train or eval run (made with calibration=) into one package folder.",
    )
    parser.add_argument(
        "run_dir", help="the run directory (it holds config.yaml, artifacts.json, thresholds.json)"
    )
    parser.add_argument("out", help="the package folder to write (must not exist, unless --force)")
    parser.add_argument(
        "--weights",
        action="store_true",
        help="include the encoder's weights (tagged weights, from this machine's Hugging Face cache)",
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also export the encoder and scoring head as model.onnx (methods where that is sound)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing package folder")
    parser.add_argument("-v", "--verbose", action="store_true", help="everything the libraries print too")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    with user_errors(hydra=False):
        from anomret.output import configure_output  # the heavy imports, only once it runs
        from anomret.package import export_package

        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        configure_output(verbose=args.verbose)
        out = export_package(args.run_dir, args.out, weights=args.weights, onnx=args.onnx, force=args.force)
        print(f"model package written to {out}")
        print(f"use it with: python -m anomret.predict package={out} input=DIR")
        print(f"         or: python -m anomret.serve {out} --port 8000")


if __name__ == "__main__":
    main()
