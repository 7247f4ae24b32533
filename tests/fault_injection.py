"""Test-only hook: run train_tdm.py with both losses made non-finite at given iterations.

    python tests/fault_injection.py 1,2,3 <train_tdm.py flags>

Iterations are counted from 1 per process (= the global step without gradient accumulation,
counting from the start of this process). The training code has no parameter for this.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_tdm  # noqa: E402
from tdm.method import TDM, Iteration  # noqa: E402


def inject(steps) -> None:
    """Wrap TDM.start to count iterations and the two losses to return NaN on `steps`."""
    count = [0]
    start, fake_score_loss, student_loss = TDM.start, Iteration.fake_score_loss, Iteration.student_loss

    def counted_start(self, *args, **kwargs):
        count[0] += 1
        return start(self, *args, **kwargs)

    def poisoned(loss):
        def wrapper(self, *args, **kwargs):
            value = loss(self, *args, **kwargs)
            return value * float("nan") if count[0] in steps else value
        return wrapper

    TDM.start = counted_start
    Iteration.fake_score_loss = poisoned(fake_score_loss)
    Iteration.student_loss = poisoned(student_loss)


if __name__ == "__main__":
    inject({int(s) for s in sys.argv[1].split(",") if s})
    sys.exit(train_tdm.cli(sys.argv[2:]))
