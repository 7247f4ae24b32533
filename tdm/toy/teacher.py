"""The toy's teacher: pre-training by denoising score matching, and the teacher folder it is cached in.

A teacher folder holds `denoiser/` (a ToyDenoiser), `scheduler/` (PixArt's DDPM table) and
`toy2d.json`, the settings it was trained with (the `mixture`, `network` and `teacher` entries of
the toy2d backbone options). tdm/backbones/toy2d.py only loads such a folder; create it with

    python -m tdm.toy.teacher --config configs/toy2d.yaml
    python -m tdm.toy.teacher --pretrained_model_name_or_path DIR [--backbone_options JSON]

(the keys of a train_tdm.py config or the same flags; the command line wins), or from Python with
`ensure_teacher(folder, options)`: pre-trains unless the folder holds a teacher for these settings.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from typing import Optional

import torch

from ..checks import Parser
from ..config import UsageError, yaml_mapping
from ..path import GaussianPath
from .mixture import GaussianMixture
from .network import ToyDenoiser

SPEC_FILE = "toy2d.json"
DENOISER_SUBFOLDER = "denoiser"
SPEC_KEYS = ("mixture", "network", "teacher")


def ddpm_scheduler():
    """PixArt's training table: 1000 steps, betas linear 1e-4 → 0.02."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                         beta_schedule="linear", prediction_type="epsilon")


def pretrain_teacher(net: ToyDenoiser, mixture: GaussianMixture, path: GaussianPath,
                     steps: int = 4000, batch_size: int = 2048, lr: float = 2e-3,
                     label_dropout: float = 0.1, ema: float = 0.995, seed: int = 0) -> ToyDenoiser:
    """Denoising score matching (ε-prediction): E‖ε_φ(α_t x0 + σ_t ε, t, c) − ε‖², t ~ U{0..N-1}.

    A conditional mixture drops the label to the empty condition with prob. `label_dropout`, so
    that the teacher has the unconditional branch CFG needs (docs/method.md §5). Returns the EMA copy.
    """
    rng = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    average = copy.deepcopy(net).requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    null = mixture.num_classes
    from tqdm.auto import tqdm

    progress = tqdm(range(steps), desc="toy teacher", unit="step", mininterval=1.0)
    for step in progress:
        x0, component = mixture.sample(batch_size, rng)
        label = component if mixture.num_classes else torch.full_like(component, null)
        drop = torch.rand(batch_size, generator=rng) < label_dropout
        label = torch.where(drop, torch.full_like(label, null), label)
        t = torch.randint(0, path.num_timesteps, (batch_size,), generator=rng)
        eps = torch.randn(x0.shape, generator=rng)
        loss = (net(path.ddim_move(x0, eps, t), t, label) - eps).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for avg, param in zip(average.parameters(), net.parameters()):
                avg.lerp_(param, 1 - ema)
        if step % 100 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    progress.close()
    return average


# -- the teacher folder -------------------------------------------------------------------------
def teacher_spec(options: Optional[dict]) -> dict:
    """The settings a teacher is trained with (what its folder's toy2d.json records)."""
    options = options or {}
    return {key: options.get(key, {}) for key in SPEC_KEYS}


def read_spec(folder: str) -> Optional[dict]:
    """The settings of the teacher cached in `folder`; None if it holds none."""
    spec_path = os.path.join(folder, SPEC_FILE)
    if not os.path.isfile(spec_path):
        return None
    with open(spec_path) as f:
        return json.load(f)


def pretrain_command(folder: str, options: Optional[dict]) -> str:
    """The shell command that pre-trains the teacher of these options into `folder`."""
    spec = {key: value for key, value in teacher_spec(options).items() if value}
    command = f"python -m tdm.toy.teacher --pretrained_model_name_or_path {shlex.quote(folder)}"
    if spec:
        command += f" --backbone_options {shlex.quote(json.dumps(spec, separators=(',', ':')))}"
    return command


def check_teacher(folder: str, options: Optional[dict]) -> None:
    """UsageError (one line) unless `folder` holds a teacher trained with these options."""
    cached = read_spec(folder)
    if cached is None:
        raise UsageError(f"{folder} holds no toy2d teacher ({SPEC_FILE} missing); pre-train it "
                         f"first: {pretrain_command(folder, options)}")
    if cached != json.loads(json.dumps(teacher_spec(options))):
        raise UsageError(f"{folder} holds a toy2d teacher for other settings ({cached}); delete "
                         "it or pick another folder")


def train_teacher(options: Optional[dict]) -> ToyDenoiser:
    """A fresh teacher for these options: initial weights and training both follow the teacher
    seed (the global torch RNG is left at that seed's stream, as pretrain_teacher leaves it)."""
    spec = teacher_spec(options)
    mixture = GaussianMixture.from_options(spec["mixture"])
    path = GaussianPath.from_scheduler(ddpm_scheduler())
    with torch.random.fork_rng(devices=[]):   # the initial weights follow the teacher seed too
        torch.manual_seed(spec["teacher"].get("seed", 0))
        net = ToyDenoiser(num_classes=mixture.num_classes, **spec["network"])
    return pretrain_teacher(net, mixture, path, **spec["teacher"])


def save_teacher(teacher: ToyDenoiser, folder: str, options: Optional[dict]) -> None:
    """Write the teacher folder to a sibling temporary folder, then move it into place (atomic
    for readers: a folder with toy2d.json is complete). If another process got there first,
    its folder is kept."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".toy2d-teacher-")
    teacher.save_pretrained(os.path.join(tmp, DENOISER_SUBFOLDER))
    ddpm_scheduler().save_pretrained(os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, SPEC_FILE), "w") as f:
        json.dump(teacher_spec(options), f, indent=2)
    if os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)
    try:
        os.rename(tmp, folder)
    except OSError:          # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_teacher(folder: str, options: Optional[dict]) -> str:
    """`folder`, holding the teacher of these (toy2d backbone) options: pre-trained and saved
    there if it holds none, reused if its settings match; UsageError if it holds a teacher for
    other settings, or other files."""
    if read_spec(folder) is None and os.path.isdir(folder) and os.listdir(folder):
        raise UsageError(f"{folder} is not empty and holds no toy2d teacher ({SPEC_FILE} "
                         "missing); delete it or pick another folder")
    if read_spec(folder) is None:
        save_teacher(train_teacher(options), folder, options)
    check_teacher(folder, options)
    return folder


# -- command line ---------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description="Pre-train the toy2d teacher into its folder (reused if it holds one "
               "for the same settings).")
    p.add_argument("--config", default=None, help="A train_tdm.py YAML config (configs/toy2d.yaml): "
                   "its pretrained_model_name_or_path and backbone_options.")
    p.add_argument("--pretrained_model_name_or_path", default=None, help="The teacher folder.")
    p.add_argument("--backbone_options", type=yaml_mapping, default=None,
                   help="The toy2d backbone options (YAML/JSON mapping): mixture, network, teacher.")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest for this MLP (as scripts/toy_benchmark.py).")
    args = p.parse_args(argv)
    if args.config:
        import yaml

        if not os.path.isfile(args.config):
            raise UsageError(f"--config {args.config}: no such file")
        with open(args.config) as f:
            values = yaml.safe_load(f) or {}
        if values.get("backbone", "toy2d") != "toy2d":
            raise UsageError(f"--config {args.config} is for backbone {values['backbone']!r}, not toy2d")
        for key in ("pretrained_model_name_or_path", "backbone_options"):
            if getattr(args, key) is None:
                setattr(args, key, values.get(key))
    if not args.pretrained_model_name_or_path:
        raise UsageError("give the teacher folder: --config or --pretrained_model_name_or_path")
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        folder = args.pretrained_model_name_or_path
        torch.set_num_threads(args.threads)
        cached = read_spec(folder) is not None
        start = time.time()
        ensure_teacher(folder, args.backbone_options)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    state = "reused (same settings)" if cached else f"pre-trained in {time.time() - start:.1f} s"
    print(f"toy2d teacher: {folder}, {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
