#!/usr/bin/env python
"""Print the markdown flag reference of train_tdm.py (pasted into the README)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tdm.config import build_parser  # noqa: E402


def main():
    parser = build_parser()
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        print(f"\n**{group.title}**\n\n| flag | default | meaning |\n|---|---|---|")
        for a in actions:
            default = "" if a.default is None or a.default is False else f"`{a.default}`"
            if a.dest == "prompts":
                default = "`assets/prompts.txt`"
            print(f"| `{a.option_strings[0]}` | {default} | {(a.help or '').replace('|', '/')} |")


if __name__ == "__main__":
    main()
