"""SANA: SanaTransformer2DModel (linear-attention DiT), flow matching with the scheduler's shift,
a decoder-only text encoder (Gemma-2) behind an instruction prefix, 32× DC-AE latents
(docs/method.md §1).

Path. SANA's scheduler is DPM-Solver++ on flow sigmas (`use_flow_sigmas`, shift `flow_shift`,
flow prediction v = ε − x0): the same rectified flow as SD3, σ(u) = s·u / (1 + (s − 1)·u). The
path is therefore SD3's (tdm/backbones/flow.py, `flow_path`), built from a
FlowMatchEulerDiscreteScheduler with the teacher's shift: σ_t = σ((t + 1)/1000), α_t = 1 − σ_t.
The network reads σ_t·1000 times the transformer's `timestep_scale`, as SanaPipeline feeds it, and
the stock pipeline reproduces the rollout with FlowMatch Euler on the grid's sigmas
(`FlowMatchingBackbone.use_training_grid`, docs/method.md §7).

Text. SanaPipeline puts its complex human instruction (a fixed prompt-rewriting preamble) in front
of every prompt, encodes the lot with Gemma and keeps the first token and the last
`max_sequence_length − 1`; the negative prompt is encoded without the preamble. Training embeds
prompts through the same encode_prompt, so the student sees at training what it gets at inference,
and the teacher's unconditional branch (the empty prompt, docs/method.md §5) is the pipeline's
negative-prompt embedding.
"""
from __future__ import annotations

import inspect
from typing import List, Optional

import torch

from .flow import FlowMatchingBackbone, flow_path

SANA_PATTERN_FACTOR = 32   # SanaPipeline.check_inputs: height and width divisible by 32


def pipeline_instruction() -> list:
    """SanaPipeline's default complex human instruction (its __call__ default, read, not copied)."""
    from diffusers import SanaPipeline

    return inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


def flow_shift_of(config: dict) -> float:
    """The teacher scheduler's shift: DPM-Solver's `flow_shift` (use_flow_sigmas) or
    FlowMatchEuler's `shift`."""
    if "use_flow_sigmas" in config:
        if not config["use_flow_sigmas"]:
            raise ValueError("the SANA adapter needs a flow scheduler (use_flow_sigmas=True)")
        return float(config["flow_shift"])
    return float(config.get("shift", 1.0))


class SanaBackbone(FlowMatchingBackbone):
    name = "sana"
    pipeline_class_names = ("SanaPipeline",)
    denoiser_class_name = "SanaTransformer2DModel"
    vae_class_name = "AutoencoderDC"
    text_encoder_names = ("text_encoder",)   # Gemma-2
    # Self-attention (linear) and cross-attention projections, as diffusers' SANA LoRA examples
    # (to_q/to_k/to_v) plus the output projections; SanaPipeline.load_lora_weights reads them back.
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    max_sequence_length = 300        # SanaPipeline's default, SANA's training length
    step_embedding_site = "time_embed.emb"   # AdaLayerNormSingle's timestep embedding

    def __init__(self, model_path: str, revision: Optional[str] = None,
                 variant: Optional[str] = None, options: Optional[dict] = None,
                 resolution: Optional[int] = None):
        super().__init__(model_path, revision, variant, options, resolution)
        from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel

        kw = self._load_kwargs()
        self.teacher_scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(
            model_path, subfolder="scheduler", **kw)
        self.scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=self.teacher_scheduler_config["num_train_timesteps"],
            shift=flow_shift_of(self.teacher_scheduler_config))
        self.path = flow_path(self.scheduler)
        self.read_configs(SanaTransformer2DModel, AutoencoderDC)
        # --backbone_options '{"complex_human_instruction": false}': prompts without the preamble
        self.instruction = (pipeline_instruction()
                            if self.options.get("complex_human_instruction", True) else None)
        self.text_pipeline = None
        self.vae = None

    def read_configs(self, denoiser_class, vae_class) -> dict:
        """As Backbone.read_configs; the DC-AE's factor is 2^(stages − 1), as SanaPipeline's."""
        kw = self._load_kwargs()
        self.denoiser_config = denoiser_class.load_config(self.model_path,
                                                          subfolder=self.denoiser_subfolder, **kw)
        vae_config = vae_class.load_config(self.model_path, subfolder="vae", **kw)
        self.vae_scale_factor = 2 ** (len(vae_config["encoder_block_out_channels"]) - 1)
        return vae_config

    # Models: FlowMatchingBackbone's (the denoiser, SanaPipeline with only its tokenizer and
    # Gemma encoder, so that its own encode_prompt embeds prompts, and the DC-AE).

    # -- fit ------------------------------------------------------------------------------
    def check_resolution(self, resolution: int, flag: str = "--resolution") -> None:
        """The DC-AE factor × patch size (Backbone), and SanaPipeline's own multiple of 32."""
        super().check_resolution(resolution, flag)
        if resolution % SANA_PATTERN_FACTOR:
            raise ValueError(f"{flag} {resolution} must be a multiple of {SANA_PATTERN_FACTOR} "
                             "(SanaPipeline refuses other sizes)")

    def condition_key(self) -> str:
        return f"{super().condition_key()}|instruction={self.instruction is not None}"

    def instruction_tokens(self, tokenizer) -> int:
        """Tokens of the instruction preamble (0 without it), as SanaPipeline counts them."""
        return len(tokenizer.encode("\n".join(self.instruction))) if self.instruction else 0

    def check_fit(self, args) -> None:
        """Resolution (above), then the text: preamble + prompt tokens (SanaPipeline encodes
        instruction tokens + max_sequence_length − 2) must fit Gemma's positions."""
        super().check_fit(args)
        from transformers import AutoConfig, AutoTokenizer

        kw = self._load_kwargs()
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_path, subfolder="tokenizer", **kw)
            config = AutoConfig.from_pretrained(self.model_path, subfolder="text_encoder", **kw)
        except OSError:   # not reachable before the weights are: nothing to check here
            return
        positions = getattr(config, "max_position_embeddings", None)
        preamble = self.instruction_tokens(tokenizer)
        limit = positions - max(preamble - 2, 0) if positions else None
        length = args.max_sequence_length or self.max_sequence_length
        if length < 1 or (limit is not None and length > limit):
            raise ValueError(f"--max_sequence_length {length}: SANA's text encoder takes "
                             f"{positions} positions, {max(preamble - 2, 0)} of them for the "
                             f"instruction preamble; pass --max_sequence_length {limit} or less")

    # -- data -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: List[str]) -> dict:
        """{encoder_hidden_states: [B, L, D], encoder_attention_mask: [B, L]} from SanaPipeline's
        encode_prompt: prompts with its instruction preamble, the empty prompt as its negative
        prompt (no preamble)."""
        pipe = self.text_pipeline
        device = pipe.text_encoder.device

        def encode(texts, instruction):
            embeds, mask, _, _ = pipe.encode_prompt(
                texts, do_classifier_free_guidance=False, device=device, clean_caption=False,
                max_sequence_length=self.max_sequence_length, complex_human_instruction=instruction)
            return embeds, mask

        prompts = list(prompts)
        embeds, mask = encode(prompts, self.instruction)
        if self.instruction and "" in prompts:
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            negative, negative_mask = encode([""], None)
            embeds = torch.where(empty[:, None, None], negative, embeds)
            mask = torch.where(empty[:, None], negative_mask, mask)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """As SanaPipeline: z / scaling_factor, then the DC-AE decoder."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return (self.vae.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1)

    # -- network call ---------------------------------------------------------------------
    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """SD3's σ_t·1000 times the transformer's timestep_scale (SanaPipeline's input)."""
        return super().timestep(t) * self.denoiser_config.get("timestep_scale", 1.0)

    def network_output(self, module, x_t, t, cond) -> torch.Tensor:
        """The velocity v = ε − x0 (path.x0_eps 'flow')."""
        dtype = next(module.parameters()).dtype
        return module(x_t.to(dtype), encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                      encoder_attention_mask=cond["encoder_attention_mask"],
                      timestep=self.timestep(t), return_dict=False)[0]

    # -- inference ------------------------------------------------------------------------
    # The stock SanaPipeline with the student (its SanaLoraLoaderMixin's load_lora_weights /
    # set_adapters, or a full transformer), and FlowMatch Euler on the grid's sigmas
    # (u = (τ + 1)/1000, shifted by the scheduler to σ_τ), the DDIM move of docs/method.md §2:
    # FlowMatchingBackbone's load_pipeline and use_training_grid.

    def use_upstream_sampler(self, pipe, num_inference_steps: int, flow_shift: Optional[float] = None) -> dict:
        """SANA's own scheduler (DPM-Solver++ 2M on flow sigmas), with `flow_shift` if given."""
        import diffusers

        config = dict(self.teacher_scheduler_config)
        if flow_shift is not None:
            config["flow_shift" if "use_flow_sigmas" in config else "shift"] = flow_shift
        pipe.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
        return {"num_inference_steps": num_inference_steps}

    def pipeline_kwargs(self, num_frames=None) -> dict:
        """Square sizes as asked (no aspect-ratio binning); the instruction is the pipeline's
        default, passed only when switched off."""
        kwargs = {"use_resolution_binning": False, "clean_caption": False,
                  "max_sequence_length": self.max_sequence_length}
        if self.instruction is None:
            kwargs["complex_human_instruction"] = None
        return kwargs
