"""Test-only hooks: run train_tdm.py with both losses made non-finite at given iterations, and/or
with every checkpoint save held between accelerate's files and the manifest.

    python tests/fault_injection.py 1,2,3 <train_tdm.py flags>
    TDM_TEST_SAVE_DELAY=SECONDS python tests/fault_injection.py "" <train_tdm.py flags>

Iterations are counted from 1 per process (= the global step without gradient accumulation,
counting from the start of this process). The save delay leaves `checkpoint-N.incomplete` with
its files written and no manifest for SECONDS: long enough for a test to kill the save mid-way.
The training code has no parameter for either.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_tdm  # noqa: E402
from tdm import checkpoint  # noqa: E402
from tdm.method import TDM  # noqa: E402
from tdm.survival import exit_process  # noqa: E402


def inject(steps) -> None:
    """Wrap TDM.start to count iterations and the two losses to return NaN on `steps`."""
    count = [0]
    start, fake_score_loss, student_loss = TDM.start, TDM.fake_score_loss, TDM.student_loss

    def counted_start(self, *args, **kwargs):
        count[0] += 1
        return start(self, *args, **kwargs)

    def poisoned(loss):
        def wrapper(self, *args, **kwargs):
            value = loss(self, *args, **kwargs)
            return value * float("nan") if count[0] in steps else value
        return wrapper

    TDM.start = counted_start
    TDM.fake_score_loss = poisoned(fake_score_loss)
    TDM.student_loss = poisoned(student_loss)


def delay_saves(seconds: float) -> None:
    """Sleep before save_atomically writes the manifest (after accelerate wrote every file)."""
    write_manifest = checkpoint.write_manifest

    def delayed(*args, **kwargs):
        time.sleep(seconds)
        return write_manifest(*args, **kwargs)

    checkpoint.write_manifest = delayed


if __name__ == "__main__":
    inject({int(s) for s in sys.argv[1].split(",") if s})
    if os.environ.get("TDM_TEST_SAVE_DELAY"):
        delay_saves(float(os.environ["TDM_TEST_SAVE_DELAY"]))
    exit_process(train_tdm.cli(sys.argv[2:]))   # as train_tdm.py's own entry
