"""The samplers generation can use: the one table that the params check, the search grid and the pipeline read.

Adding a sampler is one row here. Each name maps to a diffusers scheduler class and the config overrides that
make it that sampler. The stochastic ones draw fresh noise at every step from the image's own generator, so they
stay reproducible per image seed. They put back fine texture that a deterministic ODE sampler (DDIM) averages away.
"""

from __future__ import annotations

SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    # explicit: a pipeline's scheduler config is carried from one sampler to the next, so a sampler that shares
    # its class with another states every key that tells them apart
    "dpm": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    # stochastic (ancestral / SDE) samplers
    "ddpm": ("DDPMScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    # DPM++ 2M SDE: diffusers' DPMSolverSDEScheduler would need torchsde, this one needs nothing more
    "dpmpp_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
}


def make_scheduler(name: str, config: dict):
    """The named sampler, built from the base model's scheduler config (its betas and prediction type)."""
    import diffusers  # lazy: slow to import

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler: {name!r} is not allowed; allowed values: {', '.join(SCHEDULERS)}")
    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config({**config, **overrides})
