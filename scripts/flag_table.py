#!/usr/bin/env python
"""Print the markdown flag reference of train_tdm.py; `--update docs/flags.md` writes it there.

    python scripts/flag_table.py --update docs/flags.md   # replace the part between the flags markers
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tdm.checks import Choice, Number  # noqa: E402
from tdm.config import build_parser  # noqa: E402


def accepts(action) -> str:
    """What the flag's type accepts (tdm.checks): a range, or the names."""
    if isinstance(action.type, Number):
        return f"{'integer' if action.type.kind is int else 'number'} {action.type.bounds()}".strip()
    if isinstance(action.type, Choice):
        return ", ".join(f"`{name}`" for name in action.type.names)
    return "flag" if action.nargs == 0 else ""


def table() -> str:
    lines = []
    parser = build_parser()
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if a.option_strings and a.dest != "help" and a.help != argparse.SUPPRESS]
        if not actions:
            continue
        lines.append(f"\n**{group.title}**\n\n| flag | default | accepts | meaning |\n|---|---|---|---|")
        for a in actions:
            default = "" if a.default is None or a.default is False else f"`{a.default}`"
            if a.dest == "prompts":
                default = "`assets/prompts.txt`"
            names = " ".join(f"`{name}`" for name in a.option_strings)   # a switch: --x `--no_x`
            lines.append(f"| {names} | {default} | {accepts(a)} | "
                         f"{(a.help or '').replace('|', '/')} |")
    return "\n".join(lines).strip()


def main():
    """Print the table, or with --update FILE replace the part between the flags markers."""
    if len(sys.argv) == 3 and sys.argv[1] == "--update":
        text = open(sys.argv[2]).read()
        start, end = "<!-- flags:start -->", "<!-- flags:end -->"
        head, rest = text.split(start)
        _, tail = rest.split(end)
        open(sys.argv[2], "w").write(f"{head}{start}\n{table()}\n{end}{tail}")
    else:
        print(table())


if __name__ == "__main__":
    main()
