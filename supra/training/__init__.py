"""Training building blocks: parallelism and compilation, optimizer groups, schedules, losses,
metric logging and FLOP estimates. Recipes compose them; none of them reads a config."""

from supra.training.parallel import apply_ac, apply_compile, apply_fsdp, init_distributed, parallelize

__all__ = ["apply_ac", "apply_compile", "apply_fsdp", "init_distributed", "parallelize"]
