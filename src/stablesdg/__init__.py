"""StableSDG: few-shot steel-defect image generation with an adapted Stable Diffusion prior."""

__version__ = "0.1.0"
