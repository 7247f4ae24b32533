"""TDM, Trajectory Distribution Matching: the library behind train_tdm.py (docs/method.md)."""
import logging

# bitsandbytes' CPU backend warns at import about optional 4-bit kernels that TDM never uses
# (it is imported by diffusers/peft whether or not --use_8bit_adam is set).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
