"""Test-only hooks for several processes: run train_tdm.py with a rank that dies (or freezes) in
the middle of an iteration, and/or a record of every rank's forwards of the trained networks.

    TDM_TEST_KILL=RANK:ITERATION[:SIGNAL] python tests/rank_faults.py <train_tdm.py flags>
    TDM_TEST_FORWARDS=FOLDER             python tests/rank_faults.py <train_tdm.py flags>

TDM_TEST_KILL: process RANK sends itself SIGNAL (KILL, or e.g. STOP to hang) in its ITERATION-th
iteration (counted from 1 in this process), after the fake-score update, before the student
update. TDM_TEST_FORWARDS: each process writes FOLDER/forwards_rank{R}.json, the sequence of its
forward calls of the student and fake-score modules ("student", "fake_score"), with "step" after
each iteration: the calls that are collective when those modules are sharded (FSDP). The training
code has no parameter for either (as tests/fault_injection.py).
"""
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_tdm  # noqa: E402
from tdm.method import TDM  # noqa: E402
from tdm.survival import exit_process  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))


def inject_kill(spec: str) -> None:
    rank, iteration, *name = spec.split(":")
    if int(rank) != RANK:
        return
    signum = getattr(signal, f"SIG{name[0] if name else 'KILL'}")
    count = [0]
    start, student_loss = TDM.start, TDM.student_loss

    def counted_start(self, *args, **kwargs):
        count[0] += 1
        return start(self, *args, **kwargs)

    def dying_student_loss(self, *args, **kwargs):
        if count[0] == int(iteration):
            print(f"rank {RANK}: sending itself SIG{name[0] if name else 'KILL'} in iteration "
                  f"{iteration}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signum)
        return student_loss(self, *args, **kwargs)

    TDM.start = counted_start
    TDM.student_loss = dying_student_loss


def record_forwards(folder: str) -> None:
    events = []
    build, iteration = train_tdm.build, train_tdm.tdm_iteration

    def recording_build(args):
        run = build(args)
        for name, denoiser in (("student", run.networks.student_eval),
                               ("fake_score", run.networks.fake_score_eval)):
            denoiser.module.register_forward_pre_hook(lambda *_, name=name: events.append(name))
        return run

    def recording_iteration(*args, **kwargs):
        result = iteration(*args, **kwargs)
        events.append("step")
        return result

    train_tdm.build, train_tdm.tdm_iteration = recording_build, recording_iteration

    def write():
        with open(os.path.join(folder, f"forwards_rank{RANK}.json"), "w") as f:
            json.dump(events, f)

    return write


if __name__ == "__main__":
    if os.environ.get("TDM_TEST_KILL"):
        inject_kill(os.environ["TDM_TEST_KILL"])
    write = record_forwards(os.environ["TDM_TEST_FORWARDS"]) if os.environ.get("TDM_TEST_FORWARDS") else None
    code = train_tdm.cli(sys.argv[1:])
    if write:
        write()
    exit_process(code)   # as train_tdm.py's own entry
