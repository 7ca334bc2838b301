"""`python -m frozen_prefix.train --config X.yaml [section.key=value ...]`: train a captioner (training/loop.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import cli
from .training.loop import fit

__all__ = ["fit", "main"]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m frozen_prefix.train", description=__doc__)
    parser.add_argument("--config", required=True, help="a YAML recipe, e.g. configs/shapes.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 model.prefix_length=4")
    cli.add_plugin_arg(parser)
    args = parser.parse_args(argv)
    cli.setup_logging(logging.INFO)

    def command() -> None:
        cli.import_plugins(args.plugin)  # before the config is read: it may name what they register
        model = fit(args.config, args.overrides)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 saved it
            print(f"model saved to {Path(model.config.train.output_dir) / 'model'}")

    return cli.run(command)


if __name__ == "__main__":
    sys.exit(main())
