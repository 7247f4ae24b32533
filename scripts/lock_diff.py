#!/usr/bin/env python
"""The packages whose version differs between a lock file and `pip freeze` on stdin, one line
each (`name  locked -> installed`), for scripts/check_latest.sh."""
import re
import sys


def pins(lines) -> dict:
    found = {}
    for line in lines:
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if match:
            found[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return found


def main(lock_path: str) -> None:
    with open(lock_path) as f:
        locked = pins(f)
    installed = pins(sys.stdin)
    rows = [(name, locked.get(name, "-"), installed.get(name, "-"))
            for name in sorted(set(locked) | set(installed)) if locked.get(name) != installed.get(name)]
    for name, old, new in rows:
        print(f"  {name:28s} {old} -> {new}")
    if not rows:
        print("  none")


if __name__ == "__main__":
    main(sys.argv[1])
