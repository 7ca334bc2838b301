"""Command-line plumbing shared by the entry points: logging, exit codes, device and decoding flags."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .config import Config, validate
from .errors import FrozenPrefixError
from .generate import DECODING_KEYS

DEBUG_ENV = "FROZEN_PREFIX_DEBUG"  # set to 1: errors keep their full traceback and cause, for developers
NOISY_LIBRARIES = ("transformers", "httpx", "huggingface_hub", "timm")


class Stopped(FrozenPrefixError):
    """A run stopped early on purpose (a signal, a non-finite streak); carries the exit code to use."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def setup_logging(level: int = logging.WARNING) -> None:
    """Our messages as plain lines on stderr; the libraries' chatter off."""
    logging.basicConfig(level=level, format="%(message)s")
    for noisy in NOISY_LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.ERROR)


def debugging() -> bool:
    """Whether FROZEN_PREFIX_DEBUG asks for full tracebacks."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run(command: Callable[[], int | None]) -> int:
    """Run a command body: a user error is one line on stderr and exit code 2 (or the Stopped code).

    With FROZEN_PREFIX_DEBUG=1 the error is re-raised instead, so its traceback and cause are shown.
    """
    try:
        return command() or 0
    except FrozenPrefixError as e:
        if debugging():
            raise
        if isinstance(e, Stopped) and os.environ.get("RANK", "0") != "0":
            # Under torchrun every rank stops at the same step and rank 0 reports it (the line, the exit code):
            # a failing exit here would make torchrun kill rank 0 before it could.
            return 0
        label = "stopped" if isinstance(e, Stopped) else "error"
        hint = "" if e.__cause__ is None else f" (set {DEBUG_ENV}=1 for the full cause)"
        print(f"{label}: {e}{hint}", file=sys.stderr)
        return e.exit_code if isinstance(e, Stopped) else 2


def add_plugin_arg(parser: argparse.ArgumentParser) -> None:
    """--plugin FILE_OR_MODULE (repeatable): import code of the caller's that registers variants or projections."""
    parser.add_argument(
        "--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
        help="a .py file or module name to import first, e.g. one that registers a variant (repeatable)",
    )


def import_plugins(names: list[str]) -> None:
    """Import each plugin the caller named (a .py file or a module name): the only way outside code runs here."""
    for name in names:
        path = Path(name).expanduser()
        if name.endswith(".py"):
            if not path.is_file():
                raise FrozenPrefixError(f"--plugin {name}: no such file; give a .py file or an importable module name")
            spec = importlib.util.spec_from_file_location(f"frozen_prefix_plugin_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
            spec.loader.exec_module(module)
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise FrozenPrefixError(
                f"--plugin {name}: cannot import it ({e}); give a .py file or a module on sys.path"
            ) from e


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """--device auto|cpu|cuda|mps."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])


def add_trust_arg(parser: argparse.ArgumentParser) -> None:
    """--trust-remote-code: the only way a saved model's LM may run code of its own."""
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="allow the model's LM to run modeling code shipped with it (off: a folder cannot ask for it)",
    )


def resolve_device(name: str = "auto", flag: str = "--device") -> torch.device:
    """'auto' -> CUDA when present, else the CPU; a device that is not there is a one-line error naming `flag`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FrozenPrefixError(f"{flag} cuda but no CUDA device is visible; use {flag} auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise FrozenPrefixError(f"{flag} mps but MPS is not available; use {flag} auto or cpu")
    return torch.device(name)


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """The decoding flags shared by the caption and evaluate commands; unset flags keep the config's eval values."""
    g = parser.add_argument_group("decoding (defaults: the config's eval section)")
    g.add_argument("--prompt", help='text after the image prefix, e.g. "A picture of" (not part of the caption)')
    g.add_argument("--batch-size", type=int, help="images per generate call")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-new-tokens", type=int)
    g.add_argument("--num-beams", type=int, help="> 1: beam search")
    g.add_argument("--length-penalty", type=float, help="beam search: > 0 favours longer captions")
    g.add_argument("--sample", dest="do_sample", action="store_true", default=None, help="sample instead of greedy")
    g.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy or beam search (no sampling)")
    g.add_argument("--temperature", type=float, help="sampling temperature")
    g.add_argument("--top-k", type=int, help="sampling: keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, help="sampling: nucleus probability mass (1 = off)")
    g.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeated tokens")
    g.add_argument(
        "--stop-at", action="append", metavar="STOP",
        help="also stop at 'newline', 'period' or a literal string (repeatable; EOS always stops)",
    )
    g.add_argument("--seed", type=int, help="sampling seed")


def apply_generation_args(config: Config, args: argparse.Namespace) -> Config:
    """The config with the decoding flags that were given written into its eval section, validated."""
    changes = {key: getattr(args, key) for key in DECODING_KEYS if getattr(args, key, None) is not None}
    config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, **changes))
    validate(config)
    return config
