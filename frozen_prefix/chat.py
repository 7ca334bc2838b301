"""`python -m frozen_prefix.chat --model MODEL_DIR [IMAGE ...] [--message TEXT]`: talk with a model about images.

Interactive by default (`you> ` / `model> `; `/image PATH` shows an image in your next turn, `/reset` starts over,
`/quit` or end of input leaves); with `--message` (repeatable: one turn each) it prints each reply and exits.
Images given on the command line are shown in the first turn.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from PIL import Image

from . import cli
from .captioner import FrozenPrefixCaptioner
from .data.conversations import CHAT_STYLES
from .errors import FrozenPrefixError
from .generate import SESSION_KEYS, ChatSession
from .images import load_image

HELP = "/image PATH: show an image in your next turn   /reset: start over   /quit: leave"


def build_parser() -> argparse.ArgumentParser:
    """The chat command's arguments."""
    parser = argparse.ArgumentParser(prog="python -m frozen_prefix.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved model folder (a run's model/ or best/)")
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="images shown in the first turn")
    parser.add_argument(
        "--message", action="append", metavar="TEXT",
        help="send this message, print the reply and exit (repeatable: one turn each, history kept)",
    )
    parser.add_argument(
        "--style", choices=CHAT_STYLES, default=None,
        help="turn format: the LM's chat template, plain 'User:'/'Assistant:' lines, or auto "
        "(default: the model's data.chat_style, else auto: the template where the tokenizer has one)",
    )
    cli.add_device_arg(parser)
    cli.add_trust_arg(parser)
    cli.add_generation_args(parser)
    cli.add_plugin_arg(parser)
    return parser


def open_images(paths: list[str]) -> list[Image.Image]:
    """Read the images now: a wrong path fails at once, and every turn reuses the decoded pixels."""
    return [load_image(Path(p).expanduser()) for p in paths]


def interact(session: ChatSession, pending: list[Any], stdin: TextIO, stdout: TextIO) -> None:
    """The read-reply loop: one user turn per line, until /quit or the end of input."""
    print(HELP, file=sys.stderr)
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input (Ctrl-D, or the end of a piped script)
            stdout.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            session.reset()
            pending = []
            print("(history cleared)", file=stdout)
            continue
        if text == "/image" or text.startswith("/image "):
            try:
                pending.append(open_images([text[len("/image") :].strip()])[0])
                print(f"(image added to your next turn: {len(pending)} waiting)", file=stdout)
            except FrozenPrefixError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"error: unknown command {text.split()[0]}; {HELP}", file=sys.stderr)
            continue
        try:
            reply = session.send([*pending, text])
        except FrozenPrefixError as e:  # one bad turn does not end the conversation
            print(f"error: {e}", file=sys.stderr)
            continue
        pending = []
        print(f"model> {reply}", file=stdout)
        stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Chat with a saved model: interactively, or one reply per --message."""
    args = build_parser().parse_args(argv)
    cli.setup_logging()

    def command() -> None:
        cli.import_plugins(args.plugin)
        images = open_images(args.images)  # before loading the model: a typo fails in a second, not a minute
        model = FrozenPrefixCaptioner.from_pretrained(
            args.model, device=cli.resolve_device(args.device), trust_remote_code=args.trust_remote_code
        )
        # Only the flags given: the rest default to the model's eval section (greedy, no beams, for a chat).
        options = {key: getattr(args, key) for key in SESSION_KEYS if getattr(args, key, None) is not None}
        session = ChatSession(model, args.style, **options)
        if not args.message:
            interact(session, images, sys.stdin, sys.stdout)
            return
        for i, text in enumerate(args.message):
            print(" ".join(session.send([*images, text] if i == 0 else [text]).split()))  # one line per reply
            sys.stdout.flush()

    return cli.run(command)


if __name__ == "__main__":
    sys.exit(main())
