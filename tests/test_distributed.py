"""Two gloo processes on the CPU: the same collective forwards on every rank where sharding needs
them, and a rank that dies or hangs in the middle of an iteration.

The ranks are started here as torchrun would start them (RANK, WORLD_SIZE, MASTER_ADDR/PORT),
without its agent, which would terminate the surviving rank itself: what is tested is that the
survivor stops on its own. The hooks are in tests/rank_faults.py.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, free_port

FAULTS = os.path.join(ROOT, "tests", "rank_faults.py")
MESSAGE = "lost contact with the others in a collective operation"


def start_ranks(argv, env_extra=None, world=2):
    """train_tdm.py (through tests/rank_faults.py) as `world` gloo ranks; the Popen objects."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, PYTHONPATH=ROOT, ACCELERATE_USE_CPU="true", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   RANK=str(rank), LOCAL_RANK=str(rank), **(env_extra or {}))
        procs.append(subprocess.Popen([sys.executable, FAULTS, *argv], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def finish(procs, timeout=300):
    """(return codes, stderr texts); every process still alive after `timeout` is killed."""
    deadline, results = time.time() + timeout, []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        results.append((proc.returncode, err))
    return [r for r, _ in results], [e for _, e in results]


def run_ranks(argv, env_extra=None):
    codes, errors = finish(start_ranks(argv, env_extra))
    assert codes == [0, 0], "\n".join(e[-3000:] for e in errors)


def flags(model, out, steps, *extra):
    return ["--pretrained_model_name_or_path", model, "--output_dir", str(out), "--resolution", "32",
            "--max_train_steps", str(steps), "--seed", "0", "--report_to", "none", "--lora_rank", "4",
            "--train_mode", "full", "--mixed_precision", "no", "--learning_rate", "1e-3",
            "--lr_scheduler", "constant", *extra]


def log_lines(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def losses(out):
    return {l["step"]: (l["loss_fake_score"], l["loss_student"]) for l in log_lines(out)
            if "loss_fake_score" in l}


def error_line(stderr: str) -> str:
    """The one `error: ` line of a process's stderr (tqdm may still print after it)."""
    found = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(found) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return found[0]


def forwards(folder, world=2):
    return [json.loads((folder / f"forwards_rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.slow
def test_every_rank_runs_the_same_forwards_under_the_sharded_settings(tiny_pixart, tmp_path):
    """The settings that once deadlocked FSDP (ranks running different numbers of collective
    forwards): full rollout, validation on every rank, TDM-unify's K drawn per iteration. Each
    rank records its forwards of the student and the fake score (collective when sharded); the
    sequences must be the same, and each step must draw one K for all ranks. (FSDP itself does
    not run on CPU processes here: accelerate keeps them plain data parallel; docs/flags.md.)"""
    out = tmp_path / "run"
    run_ranks(flags(tiny_pixart, out, 4, "--full_rollout", "--unify_steps", "1,2,4",
                    "--validation_steps", "2", "--checkpointing_steps", "0"),
              {"TDM_TEST_FORWARDS": str(tmp_path)})
    rank0, rank1 = forwards(tmp_path)
    assert rank0.count("step") == 4 and rank0 == rank1
    per_step = [len(s.split()) for s in " ".join(rank0).split("step")[:4]]
    assert len(set(per_step)) > 1   # K varied between steps (1, 2 or 4 rollout forwards), in step
    assert (out / "samples" / "step-000004.png").is_file()


@pytest.mark.slow
def test_killed_rank_stops_the_other_and_resume_continues_exactly(tiny_pixart, tmp_path):
    """SIGKILL of rank 1 in the middle of iteration 3 (after the fake-score update): rank 0 stops
    by itself within seconds with one clear line, and a restart with --resume_from_checkpoint
    latest gives the losses and the student of an uninterrupted run. The uninterrupted run, with
    the default lazy rollout, is also the control of the test above: its ranks do run different
    numbers of forwards (why sharded runs turn the lazy rollout off)."""
    # a dead peer is noticed at once (its connection closes), long before this timeout
    common = ["--checkpointing_steps", "2", "--validation_steps", "0", "--ddp_timeout", "120"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_ranks(flags(tiny_pixart, straight, 4, *common), {"TDM_TEST_FORWARDS": str(tmp_path)})
    rank0, rank1 = forwards(tmp_path)
    assert rank0.count("step") == rank1.count("step") == 4 and rank0 != rank1   # lazy: per-rank depths

    procs = start_ranks(flags(tiny_pixart, split, 4, *common), {"TDM_TEST_KILL": "1:3"})
    deadline = time.time() + 300
    while procs[1].poll() is None:
        assert time.time() < deadline, "rank 1 never reached iteration 3"
        time.sleep(0.1)
    killed_at = time.time()
    codes, errors = finish(procs, timeout=60)
    stopped_after = time.time() - killed_at
    print(f"rank 0 stopped {stopped_after:.1f} s after rank 1 was killed")
    assert codes[1] == -signal.SIGKILL, errors[1][-2000:]
    line = error_line(errors[0])
    assert codes[0] == 1 and line.startswith("error: process 0 of 2 " + MESSAGE)
    assert "--resume_from_checkpoint latest" in line
    assert stopped_after < 30, f"rank 0 took {stopped_after:.1f} s to stop"
    assert sorted(losses(split)) == [1, 2]

    run_ranks(flags(tiny_pixart, split, 4, *common, "--resume_from_checkpoint", "latest"))
    expected, actual = losses(straight), losses(split)
    assert sorted(actual) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), step
    checksum = log_lines(straight)[-1]["student_checksum_per_rank"]
    assert log_lines(split)[-1]["student_checksum_per_rank"] == pytest.approx(checksum, rel=1e-6)


def stopped(proc) -> bool:
    with open(f"/proc/{proc.pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.slow
def test_hung_rank_stops_the_other_after_ddp_timeout(tiny_pixart, tmp_path):
    """A rank that hangs (SIGSTOP) mid-iteration closes no socket for the other to notice: rank 0
    stops after --ddp_timeout with the same one-line error (gloo's default wait is 30 minutes)."""
    timeout = 8
    procs = start_ranks(flags(tiny_pixart, tmp_path / "run", 4, "--checkpointing_steps", "0",
                              "--validation_steps", "0", "--ddp_timeout", str(timeout)),
                        {"TDM_TEST_KILL": "1:2:STOP"})
    try:
        deadline = time.time() + 300
        while not stopped(procs[1]):
            assert procs[0].poll() is None and time.time() < deadline, "rank 1 never hung"
            time.sleep(0.1)
        hung_at = time.time()
        code, err = finish(procs[:1], timeout=120)
        waited = time.time() - hung_at
        print(f"rank 0 stopped {waited:.1f} s after rank 1 hung (--ddp_timeout {timeout})")
    finally:
        procs[1].kill()
        procs[1].communicate()
    line = error_line(err[0])
    assert code == [1] and line.startswith("error: process 0 of 2 " + MESSAGE) and "Timed out" in line
    assert timeout - 1 <= waited <= timeout + 30, f"rank 0 stopped {waited:.1f} s after the hang"


def test_ddp_timeout_flag_is_checked_and_only_collective_failures_are_caught():
    from tdm.config import UsageError, parse_args
    from tdm.survival import lost_peer

    assert parse_args(["--ddp_timeout", "45"]).ddp_timeout == 45
    assert parse_args([]).ddp_timeout == 1800
    with pytest.raises(UsageError, match="--ddp_timeout must be > 0"):
        parse_args(["--ddp_timeout", "0"])
    # without a process group nothing is a lost peer: ordinary errors keep their traceback
    assert not lost_peer(RuntimeError("[gloo] Connection closed by peer"))


@pytest.mark.slow
def test_a_rank_exits_with_its_code_and_its_output_flushed():
    """tdm.survival.exit_process: one process alone exits through SystemExit; a rank of a
    multi-process launch skips the interpreter's C++ teardown (which aborted finished ranks) but
    keeps its code and everything it printed or logged."""
    script = ("import logging, sys\nfrom tdm.survival import exit_process\n"
              "logging.basicConfig(stream=sys.stderr, level=logging.INFO)\n"
              "print('to stdout', end='')\nlogging.getLogger('tdm').info('logged')\nexit_process(3)\n")
    for world in ("1", "2"):
        env = dict(os.environ, PYTHONPATH=ROOT, WORLD_SIZE=world)
        done = subprocess.run([sys.executable, "-c", script], env=env, text=True, capture_output=True)
        assert (done.returncode, done.stdout) == (3, "to stdout"), world
        assert done.stderr.strip() == "INFO:tdm:logged", world
