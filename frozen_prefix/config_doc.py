"""The configuration reference, generated from config.py, and `frozen-prefix config [--markdown | --write FILE]`.

Each key's meaning is the `# comment` that ends its line in config.py (or, when none does, the comment block just
above it): the one place it is written, so the table in docs/config.md and `frozen-prefix config` cannot drift from
the code. `frozen-prefix config --write docs/config.md` refreshes the table; a test fails when it is stale.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import sys
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from . import cli, config
from .errors import FrozenPrefixError

REFERENCE_START = "<!-- config-reference:start -->"  # the generated table sits between these two lines
REFERENCE_END = "<!-- config-reference:end -->"
REFERENCE_PAGE = "docs/config.md"  # where the repository keeps it
SOURCE_PREFIX = "SOURCE"  # how the fields of a data source given as a mapping are listed


@dataclass(frozen=True)
class KeyDoc:
    """One configuration key: its dotted name, type, default and meaning."""

    key: str
    type: str
    default: str
    meaning: str


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """{(class name, field name): meaning} for every annotated class field of a module's source."""
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, whether the line holds nothing but the comment)
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = (token.string.lstrip("#").strip(), token.start[0] not in code_lines)
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(token.start[0], token.end[0] + 1))
    found = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
                continue
            trailing = [comments[n][0] for n in range(item.lineno, item.end_lineno + 1) if n in comments]
            above, line = [], item.lineno - 1
            while line in comments and comments[line][1]:  # the comment block directly above, if nothing trails
                above.insert(0, comments[line][0])
                line -= 1
            found[(node.name, item.target.id)] = " ".join(trailing or above)
    return found


def type_name(tp: Any) -> str:
    """A short, readable type: 'int', 'float | null', 'linear | mlp | spatial', 'list[int]'."""
    origin = get_origin(tp)
    if tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(t) for t in get_args(tp))
    if origin is Literal:
        return " | ".join(str(v) for v in get_args(tp))
    if origin is list:
        return f"list[{type_name(get_args(tp)[0])}]"
    if origin is dict:
        return f"mapping of {type_name(get_args(tp)[1])}"
    if tp is config.SourceConfig:
        return "source"
    return getattr(tp, "__name__", str(tp))


def default_text(field: dataclasses.Field) -> str:
    """The field's default as it would be written in YAML (flow style, one line)."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def _is_section(tp: Any) -> bool:
    """A nested config section (documented key by key), as opposed to a data source or a plain value."""
    return dataclasses.is_dataclass(tp) and tp is not config.SourceConfig


def config_keys(cls: type = config.Config, prefix: str = "") -> list[KeyDoc]:
    """Every configuration key under cls, in declaration order, then the fields of a data source."""
    comments = field_comments(Path(config.__file__).read_text(encoding="utf-8"))
    docs = _walk(cls, prefix, comments)
    if cls is config.Config:
        docs += _walk(config.SourceConfig, SOURCE_PREFIX, comments)
    return docs


def _walk(cls: type, prefix: str, comments: dict[tuple[str, str], str]) -> list[KeyDoc]:
    hints = typing.get_type_hints(cls)
    docs = []
    for field in dataclasses.fields(cls):
        key = f"{prefix}.{field.name}" if prefix else field.name
        tp = hints[field.name]
        if _is_section(tp):
            docs += _walk(tp, key, comments)
        else:
            meaning = comments.get((cls.__name__, field.name), "")
            docs.append(KeyDoc(key, type_name(tp), default_text(field), meaning))
    return docs


def undocumented_keys() -> list[str]:
    """Keys whose field in config.py has no comment: each must get one (a test keeps it so)."""
    return [doc.key for doc in config_keys() if not doc.meaning]


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """The configuration reference as a Markdown table (what docs/config.md holds between its markers)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for doc in config_keys():
        lines.append(f"| `{doc.key}` | {_cell(doc.type)} | `{_cell(doc.default)}` | {_cell(doc.meaning)} |")
    lines.append("")
    lines.append(
        f"`{SOURCE_PREFIX}.*`: the fields of a data source given as a mapping (`data.train`, `data.val`, `data.test`, "
        "`data.extra.NAME`, `eval.vqa.demo_source`); the short forms (`shapes:test`, `my.jsonl`, ...) are in the "
        "README, under \"Data\"."
    )
    return "\n".join(lines) + "\n"


def plain_text() -> str:
    """The configuration reference for a terminal: key = default  (type), then the meaning, indented."""
    out: list[str] = []
    section = None
    for doc in config_keys():
        if section is not None and doc.key.split(".")[0] != section:
            out.append("")  # a blank line between sections
        section = doc.key.split(".")[0]
        out += [f"{doc.key} = {doc.default}    ({doc.type})", f"    {doc.meaning}"]
    out += ["", f"{SOURCE_PREFIX}.*: the fields of a data source given as a mapping (data.train, data.val, data.test,",
            "data.extra.NAME, eval.vqa.demo_source)."]
    return "\n".join(out) + "\n"


def reference_block(text: str, name: str = REFERENCE_PAGE) -> str:
    """What a page (docs/config.md) holds between the config-reference markers (without the marker lines)."""
    start, end = text.find(REFERENCE_START), text.find(REFERENCE_END)
    if start < 0 or end < start:
        raise FrozenPrefixError(f"{name} lacks the {REFERENCE_START} and {REFERENCE_END} markers; add them around it")
    return text[start + len(REFERENCE_START) : end].strip("\n") + "\n"


def write_reference(path: str | Path) -> bool:
    """Put the generated table between the page's markers (docs/config.md); return whether the file changed."""
    path = Path(path)
    if not path.is_file():
        raise FrozenPrefixError(f"{path} not found; give the page that holds the reference ({REFERENCE_PAGE})")
    text = path.read_text(encoding="utf-8")
    reference_block(text, str(path))  # checks the markers
    start, end = text.find(REFERENCE_START) + len(REFERENCE_START), text.find(REFERENCE_END)
    updated = text[:start] + "\n" + markdown_table() + text[end:]
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    return updated != text


def main(argv: list[str] | None = None) -> int:
    """Print every configuration key with its type, default and meaning."""
    parser = argparse.ArgumentParser(prog="frozen-prefix config", description=main.__doc__)
    parser.add_argument("--markdown", action="store_true", help=f"print a Markdown table (as in {REFERENCE_PAGE})")
    parser.add_argument(
        "--write", metavar="FILE",
        help=f"replace the table between FILE's config-reference markers (the repository's: {REFERENCE_PAGE})",
    )
    args = parser.parse_args(argv)

    def command() -> None:
        if args.write:
            changed = write_reference(args.write)
            print(f"{args.write}: {'configuration reference updated' if changed else 'already up to date'}")
            return
        sys.stdout.write(markdown_table() if args.markdown else plain_text())

    return cli.run(command)


if __name__ == "__main__":
    sys.exit(main())
