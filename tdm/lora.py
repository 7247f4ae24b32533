"""LoRA: attach to a network for training, export in the diffusers LoRA format."""
from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from peft import LoraConfig

# peft is imported where it is used: the checks before a run (file names, LoRA shapes) need none

ADAPTER = "default"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def attach_lora(module: torch.nn.Module, rank: int, alpha: float, target_modules,
                adapter_name: str = ADAPTER) -> LoraConfig:
    """Freeze `module`'s own weights and inject a trainable LoRA adapter (ΔW = 0 at start).
    Called again with another name, it adds a second adapter to the same layers."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                        target_modules=list(target_modules))
    with warnings.catch_warnings():   # a second adapter on the same model is what we want here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, module, adapter_name=adapter_name)
    for name, param in module.named_parameters():
        is_lora = "lora_" in name
        param.requires_grad_(is_lora)
        if is_lora:
            param.data = param.data.float()   # trainable weights stay in fp32
    if not hasattr(module, "tdm_lora_configs"):
        module.tdm_lora_configs = {}
    module.tdm_lora_configs[adapter_name] = config
    return config


def save_lora(module: torch.nn.Module, save_directory: str, prefix: str,
              adapter_name: str = ADAPTER) -> str:
    """Write `pytorch_lora_weights.safetensors` with keys `<prefix>.<module>.lora_A.weight` and the
    adapter config (rank, alpha, targets) in the header, as diffusers' loaders read it."""
    from diffusers.loaders.lora_base import LoraBaseMixin
    from peft import get_peft_model_state_dict

    layers = get_peft_model_state_dict(module, adapter_name=adapter_name)
    metadata = module.tdm_lora_configs[adapter_name].to_dict()
    LoraBaseMixin._save_lora_weights(save_directory=save_directory,
                                     lora_layers={prefix: layers},
                                     lora_metadata={prefix: metadata},
                                     weight_name=LORA_WEIGHT_NAME)
    return os.path.join(save_directory, LORA_WEIGHT_NAME)


def check_lora_file(path: str, module: torch.nn.Module, prefix: str) -> None:
    """Refuse a LoRA file written for another model, or not whole: every `<prefix>.<layer>.lora_A/B`
    key must name a Linear/Conv layer of `module` with matching feature sizes, and each layer's
    A and B must have the same rank. Raises ValueError."""
    from safetensors import safe_open

    layers = dict(module.named_modules())
    problems, ranks = [], {}
    with safe_open(path, framework="pt") as f:
        keys = [k for k in f.keys() if ".lora_A." in k or ".lora_B." in k]
        if not keys:
            raise ValueError(f"{path} holds no LoRA weights")
        for key in keys:
            name = key[len(prefix) + 1:] if key.startswith(prefix + ".") else key
            layer_name, kind = name.split(".lora_")[0], name.split(".lora_")[1][0]
            layer = layers.get(layer_name)
            shape = f.get_slice(key).get_shape()
            ranks.setdefault(layer_name, {})[kind] = shape[0] if kind == "A" else shape[1]
            if layer is None or not hasattr(layer, "weight"):
                problems.append(f"{layer_name} is not a layer of this model")
            elif kind == "A" and shape[1] != layer.weight.shape[1]:
                problems.append(f"{layer_name} takes {layer.weight.shape[1]} features, the LoRA {shape[1]}")
            elif kind == "B" and shape[0] != layer.weight.shape[0]:
                problems.append(f"{layer_name} gives {layer.weight.shape[0]} features, the LoRA {shape[0]}")
    uneven = [f"{layer_name}: lora_A has rank {rank['A']}, lora_B rank {rank['B']}"
              for layer_name, rank in ranks.items() if len(rank) == 2 and rank["A"] != rank["B"]]
    if uneven:
        raise ValueError(f"{path} is not a consistent LoRA: in {len(uneven)} of {len(ranks)} layers "
                         f"A and B have different ranks, e.g. {uneven[0]}")
    if problems:
        raise ValueError(f"{path} does not match this model: {len(problems)} of {len(keys)} LoRA "
                         f"tensors disagree, e.g. {problems[0]}")
