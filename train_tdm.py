#!/usr/bin/env python
"""Trajectory Distribution Matching (TDM): distil a diffusion model into a K-step student.

    accelerate launch train_tdm.py --pretrained_model_name_or_path PixArt-alpha/PixArt-XL-2-512x512 \
        --prompts assets/prompts.txt --cfg 4.5 --total_steps 900 --use_huber --use_separate

Per iteration (docs/method.md §2–5): roll the student θ out on its step grid from pure noise;
update the fake score ψ on points of that trajectory; then update the student with the
teacher-minus-fake-score direction at a freshly drawn point. The maths is in tdm/ (draws, rollout
and losses in tdm/method.py); this file wires it to accelerate, top to bottom: the flags
(tdm/config.py), build, one iteration, the loop, the export. What keeps a run alive on a cluster
(checkpoints, resume, stop signal, non-finite updates, lost peers) is in tdm/survival.py.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration,
                              gather_object, set_seed)
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from tdm.backbones import load_for_training
from tdm.config import (UsageError, check_8bit_adam, check_distributed, check_fsdp_launch,
                        check_output_dir, parse_args)
from tdm.data import load_prompts
from tdm.ema import StudentEMA
from tdm.images import image_grid, to_pil
from tdm.embedding_cache import prompt_encoder
from tdm.method import TDM, TDMConfig, TrainingRNG
from tdm.model_card import write_model_card
from tdm.networks import build_networks, enable_xformers
from tdm.plan import warn_if_over_memory
from tdm.run_folder import plan_start, start_in_folder
from tdm.step_condition import step_tables
from tdm.survival import (Survival, TrainingStopped, all_finite, checkpoint_files, exit_process,
                          load_checkpoint, log_resume, lost_peer, lost_peer_message,
                          register_checkpoint_hooks, resume_position, student_checksums)
from tdm.trajectory import StepGrid
from tdm.validation import log_measures, validation_measures

logger = logging.getLogger("tdm")


class TqdmLogHandler(logging.StreamHandler):
    """Log lines through tqdm.write: on lines of their own above the progress bar, not glued to it."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


# -- build: every check, then accelerator, backbone, networks, TDM, optimisers, data, resume ------
def build(args):
    """Everything a run needs, from flags: accelerator, backbone, the three networks, the TDM
    objective, optimisers, LR schedule and prompt loader, and the checkpoint to resume from,
    loaded. Bad input and a start that would damage the run folder fail before any model load;
    nothing is written to --output_dir until the checkpoint is loaded (the prompt cache after)."""
    prompts = load_prompts(args.prompts, args.caption_column)
    grid = StepGrid(args.timesteps)
    check_output_dir(args.output_dir)
    check_fsdp_launch()
    if args.use_8bit_adam:
        check_8bit_adam()
    accelerator = make_accelerator(args)
    # warnings only until the run starts (main): a refused start prints its one line alone
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING,
                        handlers=[TqdmLogHandler()])
    check_distributed(accelerator.distributed_type.value, args.train_mode, args.use_ema)
    sharded = accelerator.distributed_type.value == "FSDP"
    resume_from, start_step = plan_start(args.output_dir, args.resume_from_checkpoint,
                                         args.overwrite_output_dir,
                                         checkpoint_files(args, accelerator.num_processes, sharded))
    if args.seed is not None:
        set_seed(args.seed, device_specific=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision,
                                                                       torch.float32)
    if len(prompts) < args.train_batch_size * accelerator.num_processes:
        raise UsageError(f"--prompts has {len(prompts)} prompts, fewer than one batch "
                         f"({args.train_batch_size} × {accelerator.num_processes} processes)")

    warn_if_over_memory(args, accelerator)   # one line when its plan exceeds the GPU
    # Backbone: teacher φ, student θ and fake score ψ, each (x_t, t, c) -> (x̂0, ε̂).
    backbone = load_for_training(args, grid)
    networks = build_networks(backbone, args.train_mode, weight_dtype, accelerator, args.lora_rank,
                              args.lora_alpha, args.gradient_checkpointing,
                              step_tables(args.num_steps, args.unify_steps, args.fake_step_condition))
    if args.enable_xformers_memory_efficient_attention:
        enable_xformers(networks.modules(), accelerator)
    if args.torch_compile:
        networks.compile()
    backbone.path = backbone.path.to(accelerator.device)

    # Two AdamW optimisers; LR schedule and clipping on the student only (docs/method.md §4–5).
    fake_score_optimizer = make_optimizer(networks.fake_score_params, args.learning_rate, args)
    student_optimizer = make_optimizer(networks.student_params,
                                         args.learning_rate * args.generator_lr_ratio, args)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=student_optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    dataloader = torch.utils.data.DataLoader(prompts, batch_size=args.train_batch_size, shuffle=True,
                                             drop_last=True, num_workers=args.dataloader_num_workers)
    # order matters under FSDP: optimiser i is saved with model i (student, then fake score)
    student_optimizer, fake_score_optimizer, dataloader, lr_scheduler = accelerator.prepare(
        student_optimizer, fake_score_optimizer, dataloader, lr_scheduler)
    training_rng = TrainingRNG(accelerator.device, (args.seed or 0) + accelerator.process_index,
                                     shared_seed=args.seed or 0)
    states = {"training_rng": (training_rng, True)}   # each process its own noise stream
    ema = None
    if args.use_ema:
        ema = StudentEMA(networks.student_params, args.ema_decay, args.ema_start_step)
        states["ema"] = (ema, False)
    register_checkpoint_hooks(accelerator, networks, states)
    # the objective's settings are the flags of the same names; the run decides the teacher's
    # guidance input (the backbone, from --guidance_embedding) and whether forwards are sharded
    tdm = TDM(backbone.path, grid, TDMConfig.from_flags(args), training_rng,
              guidance_embedding=backbone.guidance_embedding, sharded=networks.sharded)
    if resume_from is not None:   # before the text encoders and VAE load: a refusal comes early
        load_checkpoint(accelerator, resume_from, args.resume_from_checkpoint)
    backbone.load_text_encoders(accelerator.device, weight_dtype)
    backbone.load_vae(accelerator.device, weight_dtype)
    uncond = backbone.encode_prompts([""])   # the empty-prompt branch of the teacher's CFG
    encode = prompt_encoder(args, accelerator, backbone, prompts, weight_dtype)
    return SimpleNamespace(accelerator=accelerator, backbone=backbone, networks=networks, tdm=tdm, ema=ema,
                           encode=encode, uncond=uncond, dataloader=dataloader,
                           fake_score_optimizer=fake_score_optimizer, student_optimizer=student_optimizer,
                           lr_scheduler=lr_scheduler, resumed_from=resume_from, start_step=start_step,
                           latent_shape=backbone.latent_shape(args.resolution, args.num_frames))


def make_accelerator(args):
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in ("none", "") else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed or 0),
        # a collective whose peer died or hangs fails after this long instead of blocking forever
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=args.ddp_timeout))],
    )


def make_optimizer(params, lr, args):
    """AdamW (fused on CUDA: one kernel for all parameters), or bitsandbytes' 8-bit AdamW."""
    if args.use_8bit_adam:
        import bitsandbytes as bnb   # optional, checked in build (check_8bit_adam)

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    fused = {} if args.use_8bit_adam or not all(p.is_cuda for p in params) else {"fused": True}
    return optimizer_class(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **fused)


# -- one iteration (docs/method.md §2–5) ----------------------------------------------------------
def update(accelerator, networks, loss, optimizer, params, max_grad_norm=0.0,
           lr_scheduler=None) -> bool:
    """backward → optimiser step of one update; returns whether the step was applied. Averages
    gradients where DDP does not and clips (accelerate skips the step while accumulating). A
    non-finite loss or gradient skips the step on every process, so no optimiser state is
    poisoned: one fused check of the loss and the gradient norm, one host sync."""
    accelerator.backward(loss)
    applied = True
    if accelerator.sync_gradients:
        networks.reduce_gradients(accelerator, params)
        if max_grad_norm > 0:
            norm = accelerator.clip_grad_norm_(params, max_grad_norm)
        elif accelerator.scaler is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        # with fp16 the grad scaler skips steps with overflowing gradients itself: the loss alone
        values = loss.detach().float().reshape(1) if accelerator.scaler is not None else \
            torch.stack([loss.detach().float(), norm.float()])
        applied = all_finite(accelerator, values)
    if applied:
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return applied


def tdm_iteration(accelerator, tdm, networks, cond, uncond, latent_shape, fake_score_optimizer,
                  student_optimizer, lr_scheduler, max_grad_norm, fake_score_updates):
    """One TDM iteration on a batch of prompt conditions (docs/method.md §2–5): ψ's update(s)
    (`fake_score_updates`, §4: each on a fresh rollout and draw), then θ's against teacher minus
    the updated ψ on the last one's rollout. Returns the last ψ loss, θ's loss, updates skipped.

    Roles: θ rolls out without gradient, ψ takes its loss, then θ its own, with φ and the updated ψ
    read without gradient. `student`/`fake_score` train (full mode: DDP-wrapped, the backward
    averages gradients); `*_eval` are the same weights unwrapped, for no-grad forwards, which ranks
    may run unequally often (lazy rollout). With LoRA (gradients averaged by hand) and FSDP (every
    forward collective: wrapped) the two handles are one module. Each handle is a `Denoiser` of
    one role: the role, not the module, selects the LoRA adapter and the step embedding (K, k from
    the conditions TDM builds) for that call only (Denoiser.__call__).
    Each update's forward gets its own autocast region: autocast caches the low-precision copy
    of every trainable weight until its region ends, so one region around both updates would
    let the student update read the fake score ψ from before its optimiser step."""
    skipped = 0
    with accelerator.accumulate(*networks.wrapped):
        for extra in range(fake_score_updates):
            last = extra == fake_score_updates - 1   # the iteration the student update reads
            with accelerator.autocast():
                iteration = tdm.start(networks.student_eval, cond, uncond, latent_shape,
                                      accelerator.device, student_update=last)
                fake_score_loss = tdm.fake_score_loss(iteration, networks.fake_score)
            skipped += not update(accelerator, networks, fake_score_loss, fake_score_optimizer,
                                  networks.fake_score_params)
        with accelerator.autocast():
            student_loss = tdm.student_loss(iteration, networks.student, networks.teacher,
                                            networks.fake_score_eval)
        skipped += not update(accelerator, networks, student_loss, student_optimizer,
                              networks.student_params, max_grad_norm, lr_scheduler)
    return fake_score_loss, student_loss, skipped


@torch.no_grad()
def log_validation(accelerator, args, run, global_step, measures):
    """A grid of the K-step student on fixed prompts and fixed noise, one row per trained K, and its
    `measures` (tdm.validation). Every rank samples (a sharded student needs all ranks in each
    forward; a DDP student is called unwrapped, the others would only wait); the main one writes."""
    backbone, tdm, student = run.backbone, run.tdm, run.networks.student_eval
    prompts = args.validation_prompts
    cond = run.encode(prompts)
    rng = torch.Generator().manual_seed(args.validation_seed)
    shape = (len(prompts), *backbone.latent_shape(args.resolution, args.num_frames))
    noise = torch.randn(shape, generator=rng).to(accelerator.device)
    with accelerator.autocast():
        samples = {K: tdm.rollout(student, noise, cond, num_steps=K).sample for K in tdm.step_counts}
        scores = measures(samples, noise, cond, lambda z, c: tdm.rollout(student, z, c).sample)
    latents = torch.cat(list(samples.values()))
    if not accelerator.is_main_process:
        return
    log_measures(accelerator, os.path.join(args.output_dir, "train_log.jsonl"), global_step, scores)
    counts = tdm.step_counts
    grid = image_grid(to_pil(backbone.decode(latents)), rows=len(counts),
                      row_labels=[f"{K} steps" for K in counts] if len(counts) > 1 else None)
    folder = os.path.join(args.output_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    grid.save(os.path.join(folder, f"step-{global_step:06d}.png"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"validation": np.asarray(grid)[None]}, global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid, caption=" | ".join(prompts))]}, step=global_step)


# -- the loop, then the export --------------------------------------------------------------------
def main(args) -> int:
    run = build(args)   # every check passed, the checkpoint to resume from is loaded: the run starts
    logging.getLogger().setLevel(logging.INFO)
    accelerator, backbone, networks, tdm = run.accelerator, run.backbone, run.networks, run.tdm
    survival = Survival(accelerator, args)   # from here a stop signal ends the run at a step's end
    start_in_folder(accelerator, args)

    if args.validation_steps:   # the teacher's samples once: the student's agreement at each validation
        measures = validation_measures(args, backbone, tdm, networks.teacher, run.uncond)
    global_step = run.start_step
    log_resume(args, run.resumed_from, global_step)
    first_epoch, skip_batches = resume_position(global_step, len(run.dataloader),
                                                args.gradient_accumulation_steps)
    log_path = os.path.join(args.output_dir, "train_log.jsonl")

    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="TDM",
                    disable=not accelerator.is_local_main_process)
    for epoch in range(first_epoch, sys.maxsize):
        if global_step >= args.max_train_steps:
            break
        run.dataloader.set_epoch(epoch)
        batches = (accelerator.skip_first_batches(run.dataloader, skip_batches) if skip_batches
                   else run.dataloader)
        skip_batches = 0
        for batch_prompts in batches:
            fake_score_loss, student_loss, skipped = tdm_iteration(
                accelerator, tdm, networks, run.encode(batch_prompts), run.uncond, run.latent_shape,
                run.fake_score_optimizer, run.student_optimizer, run.lr_scheduler, args.max_grad_norm,
                args.fake_score_updates)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if run.ema is not None:
                run.ema.update(global_step)
            losses = torch.stack([fake_score_loss.detach(), student_loss.detach()]).tolist()  # one sync
            logs = {"step": global_step, "loss_fake_score": losses[0], "loss_student": losses[1],
                    "lr": run.lr_scheduler.get_last_lr()[0],
                    "nonfinite_skipped": survival.count_nonfinite(skipped)}
            if args.log_prompts:
                logs["prompts_per_rank"] = gather_object([list(batch_prompts)])
            progress.update(1)
            progress.set_postfix(fake_score=f"{losses[0]:.4g}", student=f"{losses[1]:.4g}")
            accelerator.log({k: v for k, v in logs.items() if isinstance(v, (int, float))}, step=global_step)
            if accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(logs) + "\n")
            survival.after_step(global_step, progress)   # non-finite policy, --checkpointing_steps
            if args.validation_steps and global_step % args.validation_steps == 0:
                with run.ema.applied() if run.ema is not None else contextlib.nullcontext():
                    log_validation(accelerator, args, run, global_step, measures)
            if survival.stop_requested(global_step, progress):   # saved: exit 0, resumable
                return 0
            if global_step >= args.max_train_steps:
                break
    progress.close()   # what follows is printed on lines of its own

    accelerator.wait_for_everyone()
    full_state = networks.gather_student(accelerator)   # sharded: the whole student on rank 0
    checksums = student_checksums(accelerator, networks, full_state)
    if accelerator.is_main_process:
        with open(log_path, "a") as f:   # ranks must agree: a cheap check of data parallelism
            f.write(json.dumps({"step": global_step, "student_checksum_per_rank": checksums}) + "\n")
        with run.ema.applied() if args.export_ema else contextlib.nullcontext():
            logger.info("exported the %sstudent to %s", "EMA of the " if args.export_ema else "",
                        networks.export(args.output_dir, backbone, args.export_format, full_state))
        write_model_card(args.output_dir, backbone, args)   # README.md beside the export
    accelerator.end_training()
    return 0


def cli(argv=None) -> int:
    try:
        return main(parse_args(argv))
    except (UsageError, TrainingStopped) as error:   # bad input: 2; stopped on non-finite values: 1
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    except Exception as error:
        if not lost_peer(error):
            raise
        tqdm.write(lost_peer_message(error), file=sys.stderr)   # a line of its own, not after the bar
        return 1


if __name__ == "__main__":
    exit_process(cli())
