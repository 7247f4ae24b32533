"""Kohya-style LoRA files for UNet students (SD1.x, SDXL), as A1111, ComfyUI and diffusers'
`load_lora_weights` read them.

Each LoRA'd UNet module `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` becomes
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q` with `.lora_down.weight`
(peft's lora_A), `.lora_up.weight` (lora_B) and `.alpha` (the update is up·down·alpha/rank, as
peft's lora_alpha/r). Module names are the diffusers UNet's, for SDXL too; diffusers' converter
(`_convert_non_diffusers_lora_to_diffusers`) maps them back unchanged.

    python -m tdm.kohya OUTPUT_DIR        # OUTPUT_DIR/pytorch_lora_weights.safetensors → …_kohya.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .lora import LORA_WEIGHT_NAME

KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
PREFIX = "lora_unet_"

# (module name, lora_A weight, lora_B weight, alpha)
Entry = Tuple[str, torch.Tensor, torch.Tensor, float]


def kohya_state_dict(entries: Iterable[Entry]) -> dict:
    """Kohya keys for (module, down, up, alpha) entries of the UNet."""
    state = {}
    for module, down, up, alpha in entries:
        name = PREFIX + module.replace(".", "_")
        state[f"{name}.lora_down.weight"] = down.detach().float().contiguous().cpu()
        state[f"{name}.lora_up.weight"] = up.detach().float().contiguous().cpu()
        state[f"{name}.alpha"] = torch.tensor(float(alpha))
    if not state:
        raise ValueError("no LoRA layers found")
    return state


def _write(state: dict, path: str) -> str:
    ranks = sorted({v.shape[0] for k, v in state.items() if k.endswith("lora_down.weight")})
    alphas = sorted({v.item() for k, v in state.items() if k.endswith(".alpha")})
    metadata = {"ss_network_module": "networks.lora",
                "ss_network_dim": ",".join(str(r) for r in ranks),
                "ss_network_alpha": ",".join(f"{a:g}" for a in alphas)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(state, path, metadata=metadata)
    return path


def _single_adapter(unet: torch.nn.Module) -> str:
    from peft.tuners.lora import LoraLayer

    names = {a for m in unet.modules() if isinstance(m, LoraLayer) for a in m.lora_A}
    if len(names) != 1:
        raise ValueError(f"pass adapter_name: the UNet carries adapters {sorted(names)}")
    return names.pop()


def peft_entries(unet: torch.nn.Module, adapter_name: Optional[str] = None):
    """(module, down, up, alpha) of every peft LoRA layer of `adapter_name` in `unet`."""
    from peft.tuners.lora import LoraLayer

    adapter = adapter_name or _single_adapter(unet)
    for module_name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            yield (module_name, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                   module.lora_alpha[adapter])


def save_kohya_lora(unet: torch.nn.Module, path: str, adapter_name: Optional[str] = None) -> str:
    """Write the UNet's peft LoRA (the trained student, or a pipeline's loaded adapter) as a
    kohya .safetensors file; returns `path`."""
    return _write(kohya_state_dict(peft_entries(unet, adapter_name)), path)


def diffusers_entries(path: str, prefix: str = "unet"):
    """(module, down, up, alpha) from a diffusers LoRA file written by tdm.lora.save_lora: alpha
    from the adapter config in its header (lora_alpha, alpha_pattern), else alpha = rank."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    with safe_open(path, framework="pt") as f:
        header = json.loads((f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY, "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = {k[len(prefix) + 1:]: v for k, v in header.items() if k.startswith(prefix + ".")}
    lead = prefix + "."
    for key in sorted(tensors):
        if not (key.startswith(lead) and key.endswith(".lora_A.weight")):
            continue
        module = key[len(lead):-len(".lora_A.weight")]
        down, up = tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")]
        yield module, down, up, _alpha(config, module, down.shape[0])


def _alpha(config: dict, module: str, rank: int) -> float:
    """peft's rule: an alpha_pattern entry whose key ends the module name, else lora_alpha."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            return float(alpha)
    return float(config.get("lora_alpha", rank))


def convert_diffusers_file(src: str, dst: Optional[str] = None) -> str:
    """A diffusers LoRA file (or a training output folder holding one) → a kohya file beside it."""
    if os.path.isdir(src):
        src = os.path.join(src, LORA_WEIGHT_NAME)
    dst = dst or os.path.join(os.path.dirname(os.path.abspath(src)), KOHYA_WEIGHT_NAME)
    return _write(kohya_state_dict(diffusers_entries(src)), dst)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Convert a TDM UNet LoRA (SD1.x/SDXL) from the diffusers "
                                "format to a kohya-style file.")
    p.add_argument("source", help=f"Training output folder (with {LORA_WEIGHT_NAME}) or the file.")
    p.add_argument("--output", default=None, help=f"Default: {KOHYA_WEIGHT_NAME} beside the source.")
    args = p.parse_args(argv)
    try:
        print(convert_diffusers_file(args.source, args.output))
    except (OSError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
