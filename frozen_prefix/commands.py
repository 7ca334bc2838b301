"""`frozen-prefix COMMAND ...`: one entry point dispatching to each module's own `main(argv)`."""

from __future__ import annotations

import importlib
import sys

# command -> (module whose main(argv) runs it, one line for the help); `python -m MODULE` keeps working as well.
COMMANDS = {
    "train": ("frozen_prefix.train", "train a captioner from a YAML recipe and dotted overrides"),
    "evaluate": ("frozen_prefix.evaluate", "caption a split or data set with a saved model; write metrics"),
    "caption": ("frozen_prefix.caption", "print one caption per image file, folder or .jsonl entry"),
    "config": ("frozen_prefix.config_doc", "list every config key with its type, default and meaning"),
    "chat": ("frozen_prefix.chat", "talk with a saved model about images, in the terminal or one message at a time"),
    "plot": ("frozen_prefix.training.plots", "draw the training curves of one or several runs into a PNG"),
}


def usage() -> str:
    """The top-level help: the commands, one line each."""
    width = max(map(len, COMMANDS))
    lines = ["usage: frozen-prefix COMMAND [ARGS ...]", "",
             "Frozen-style captioning: a trainable vision prefix for a frozen causal LM.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`frozen-prefix COMMAND --help` describes a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run `frozen-prefix COMMAND [ARGS ...]`; the command's module parses its own arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; use one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])  # on use: only the chosen command is imported
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
