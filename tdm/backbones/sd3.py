"""Stable Diffusion 3: SD3Transformer2DModel, rectified flow with the teacher's shifted sigmas,
three text encoders (two CLIP with pooled projections, one T5) (docs/method.md §1).

Time convention (tdm/backbones/flow.py). `FlowMatchEulerDiscreteScheduler(shift=s)` holds, right
after construction, the training sigmas of the timesteps 1000, 999, …, 1: σ(u) = s·u / (1 + (s − 1)·u)
with u = timestep/1000. The path index t ∈ {0, …, 999} is the timestep t + 1, i.e. `sigmas` read
backwards (`flow_path`): σ_t = σ((t + 1)/1000), α_t = 1 − σ_t, σ_999 = 1. The network reads the
scheduler's timestep σ_t · 1000, and the stock FlowMatch Euler scheduler on the grid's sigmas
replays the training rollout (docs/method.md §7, `FlowMatchingBackbone.use_training_grid`).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .flow import FlowMatchingBackbone, flow_path  # noqa: F401  (flow_path: SD3's path, re-exported)

# The scheduler of the upstream TDM-SD3 snippet: DPMSolverMultistepScheduler loaded from
# Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers (subfolder "scheduler"), which is not
# reachable here; this is that scheduler_config.json rebuilt by hand (DPM-Solver++ order 2,
# flow sigmas, flow-prediction, final sigma 0). The snippet then sets flow_shift (1–6; 6 in it).
UPSTREAM_DPM_SOLVER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, solver_order=2, prediction_type="flow_prediction", thresholding=False,
    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, algorithm_type="dpmsolver++",
    solver_type="midpoint", lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
    use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
    use_flow_sigmas=True, flow_shift=3.0, final_sigmas_type="zero",
    lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace",
    steps_offset=0, rescale_betas_zero_snr=False)
UPSTREAM_FLOW_SHIFT = 6.0   # the value the upstream snippet sets for the TDM student


class SD3Backbone(FlowMatchingBackbone):
    name = "sd3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    denoiser_class_name = "SD3Transformer2DModel"
    # CLIP-L, CLIP-G and T5, all three read by StableDiffusion3Pipeline.encode_prompt
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    # The joint blocks' attention projections (image and context streams), as in diffusers'
    # SD3 LoRA examples; StableDiffusion3Pipeline.load_lora_weights reads them back.
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0",
                           "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    max_sequence_length = 256   # T5 tokens, StableDiffusion3Pipeline's default
    step_embedding_site = "time_text_embed"     # timestep + pooled-text embedding

    def __init__(self, model_path: str, revision: Optional[str] = None,
                 variant: Optional[str] = None, options: Optional[dict] = None,
                 resolution: Optional[int] = None):
        super().__init__(model_path, revision, variant, options, resolution)
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            model_path, subfolder="scheduler", revision=revision)
        self.path = flow_path(self.scheduler)
        self.read_configs(SD3Transformer2DModel, AutoencoderKL)
        self.text_pipeline = None
        self.vae = None

    # Models, text encoders, VAE, decode (z / scaling_factor + shift_factor, as
    # StableDiffusion3Pipeline), the stock pipeline with the student and the training grid on
    # FlowMatch Euler (docs/method.md §7): FlowMatchingBackbone's. The 2-D latent geometry
    # (VAE factor × patch size) is Backbone's.

    # -- data -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: List[str]) -> dict:
        """{encoder_hidden_states: [B, 77 + L, D] (CLIP-L ‖ CLIP-G padded, then T5),
        pooled_projections: [B, P] (the two CLIP pooled projections side by side)}."""
        pipe = self.text_pipeline
        embeds, _, pooled, _ = pipe.encode_prompt(
            list(prompts), None, None, device=pipe.text_encoder.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    # -- network call ---------------------------------------------------------------------
    def network_output(self, module, x_t, t, cond) -> torch.Tensor:
        """The velocity v = ε − x0 (path.x0_eps 'flow': x̂0 = x_t − σ v, ε̂ = x_t + α v)."""
        dtype = next(module.parameters()).dtype
        return module(hidden_states=x_t.to(dtype), timestep=self.timestep(t),
                      encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                      pooled_projections=cond["pooled_projections"].to(dtype),
                      return_dict=False)[0]

    # -- inference ------------------------------------------------------------------------
    def use_upstream_sampler(self, pipe, num_inference_steps: int, flow_shift: Optional[float] = None) -> dict:
        """The upstream TDM-SD3 sampler: DPM-Solver++(2M) with flow sigmas and `flow_shift`
        (default 6, the snippet's value), on UPSTREAM_DPM_SOLVER_CONFIG (the Sana scheduler
        config the snippet downloads, rebuilt locally)."""
        from diffusers import DPMSolverMultistepScheduler

        shift = UPSTREAM_FLOW_SHIFT if flow_shift is None else flow_shift
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            {**UPSTREAM_DPM_SOLVER_CONFIG, "flow_shift": shift})
        return {"num_inference_steps": num_inference_steps}
