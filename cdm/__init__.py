"""cdm: compartmentalized diffusion models.

One denoiser per data compartment (shard), composed at sampling time (see docs/design.md §2). The library is plain
Python + torch/diffusers: functions take explicit arguments and read no files, globals or environment variables
of their own. Heavy imports live inside the modules that need them.
"""

__version__ = "0.1.0"
