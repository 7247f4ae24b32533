"""The locked package set, and no library line on the terminal (bad inputs: tests/test_robustness.py)."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, run_script

LOCK = os.path.join(ROOT, "requirements.lock")


def requirement_names(path):
    names = set()
    with open(path) as f:
        for line in f:
            match = re.match(r"^([A-Za-z0-9_.\-]+)", line.split("#")[0].strip())
            if match:
                names.add(re.sub(r"[-_.]+", "-", match[1]).lower())
    return names


def locked_pins():
    pins = {}
    with open(LOCK) as f:
        for line in f:
            if not line.startswith("#") and line.strip():
                name, version = line.strip().split("==")
                pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_the_lock_pins_every_requirement_exactly():
    pins = locked_pins()
    wanted = requirement_names(os.path.join(ROOT, "requirements.txt")) | requirement_names(
        os.path.join(ROOT, "requirements-dev.txt"))
    assert wanted <= set(pins), f"not in requirements.lock: {sorted(wanted - set(pins))}"
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.!]*", v) for v in pins.values()), pins
    assert "bitsandbytes" not in pins   # GPU only, optional (--use_8bit_adam): it prints at import


def test_lock_diff_lists_what_moved(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("# header\nFoo_Bar==1.0\nsame==2.0\ngone==3.0\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "lock_diff.py"), str(lock)],
                          input="foo-bar==1.1\nsame==2.0\nnew==0.1\n", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert rows == [["foo-bar", "1.0", "->", "1.1"], ["gone", "3.0", "->", "-"], ["new", "-", "->", "0.1"]]


@pytest.mark.parametrize("script", ["train_tdm.py", "infer_tdm.py", "eval_tdm.py"])
def test_help_prints_nothing_on_stderr(script):
    proc = run_script([sys.executable, os.path.join(ROOT, script), "--help"])
    assert proc.returncode == 0 and proc.stdout.startswith("usage:") and proc.stderr == "", proc.stderr

