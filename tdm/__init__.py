"""TDM, Trajectory Distribution Matching: the library behind train_tdm.py (docs/method.md)."""
import logging

# bitsandbytes is not installed by default (GPU only, for --use_8bit_adam). Where it is, diffusers
# imports it at every model load, and its CPU backend warns about optional 4-bit kernels that TDM
# never uses (and, through the `kernels` package, about the hub when offline): not the user's concern.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels"):
    logging.getLogger(_name).setLevel(logging.ERROR)
