"""What sampling (tdm/sampling.py, infer_tdm.py) and the model card (tdm/model_card.py) call on a
backbone: the stock pipeline with the student applied, the samplers, the loading snippet."""
from __future__ import annotations

from typing import List, Optional


class Inference:
    """Mixed into Backbone: the family's stock diffusers pipeline and how a student samples in it."""

    def sampling_guidance(self) -> float:
        """The guidance_scale the stock pipeline is called with for the student: 1 (no CFG:
        the teacher's guidance is distilled into it, docs/method.md §7)."""
        return 1.0

    def stock_pipeline_class(self):
        """The diffusers class of `pipeline_class_names[0]`, the family's stock pipeline."""
        import diffusers

        return getattr(diffusers, self.pipeline_class_names[0])

    def load_pipeline(self, dtype, weights: Optional[str] = None, lora_scale: float = 1.0):
        """A stock diffusers pipeline of the teacher with the student applied."""
        raise NotImplementedError

    def use_training_grid(self, pipe, timesteps: List[int]) -> dict:
        """Give `pipe` a stock scheduler that reproduces the training rollout on `timesteps`
        (docs/method.md §7) and return the pipeline-call arguments that select the grid. DDPM family:
        first-order DPM-Solver++, which is the DDIM update of §2."""
        from ..sampling import exact_grid_scheduler

        pipe.scheduler = exact_grid_scheduler(pipe.scheduler.config)
        return {"timesteps": list(timesteps)}

    def use_upstream_sampler(self, pipe, num_inference_steps: int, flow_shift: Optional[float] = None) -> dict:
        """The sampler of the family's published TDM snippet (DDPM family: DPM-Solver++ multistep
        with the model's scheduler config); returns the pipeline-call arguments."""
        from diffusers import DPMSolverMultistepScheduler

        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        return {"num_inference_steps": num_inference_steps}

    def pipeline_kwargs(self, num_frames: Optional[int] = None) -> dict:
        """Extra arguments for the pipeline's __call__ (switches of one family, video frames)."""
        return {}

    def loading_snippet(self, weights_kind: str, student_location: str, timesteps: List[int],
                        num_frames: Optional[int] = None) -> str:
        """Python for the model card that loads the student ("lora" file or "full" model folder at
        `student_location`) in plain diffusers and samples it on `timesteps` (`num_frames`: the
        run's, video families). Default: built from `pipeline_class_names[0]` and the scheduler
        `use_training_grid` sets (tdm.model_card); override where the family's pipeline loads a
        student differently."""
        from ..model_card import diffusers_snippet

        return diffusers_snippet(self, weights_kind, student_location, timesteps, num_frames=num_frames)
