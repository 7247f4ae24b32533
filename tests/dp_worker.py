"""One rank of the data-parallel equivalence test (tests/test_equivalence.py), launched as
`accelerate launch --num_processes 2 tests/dp_worker.py MODEL OUT MODE [FLAG ...]`: rank r runs one
training iteration on its own two prompts and saves its record, its draws and initial weights."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from harness import PROMPTS, Production, train_args  # noqa: E402


def main(model: str, out: str, mode: str, *flags: str) -> None:
    args = train_args(model, out, ["--train_mode", mode, "--gradient_checkpointing", *flags])
    production = Production(args, float64=True)
    rank = production.run.accelerator.process_index
    record = production.iterate([PROMPTS[2 * rank: 2 * rank + 2]])
    torch.save({"record": record.__dict__, "draws": production.draws,
                "student_state": production.student_state,
                "fake_score_state": production.fake_score_state},
               os.path.join(out, f"rank{rank}.pt"))
    production.run.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
