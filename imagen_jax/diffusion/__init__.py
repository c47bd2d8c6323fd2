"""The pure-functional diffusion core (DESIGN.md section 4): schedules, forward process,
losses, samplers and guidance. No Flax; every function is jit-compatible."""

from imagen_jax.diffusion.guidance import classifier_free_guidance
from imagen_jax.diffusion.guidance import classifier_guidance
from imagen_jax.diffusion.guidance import guidance_scale_at
from imagen_jax.diffusion.guidance import inpaint_transform
from imagen_jax.diffusion.guidance import rescale_guided
from imagen_jax.diffusion.guidance import dynamic_threshold
from imagen_jax.diffusion.guidance import static_threshold
from imagen_jax.diffusion.losses import diffusion_loss
from imagen_jax.diffusion.losses import loss_at
from imagen_jax.diffusion.losses import loss_weight
from imagen_jax.diffusion.process import OBJECTIVES
from imagen_jax.diffusion.process import convert
from imagen_jax.diffusion.process import q_sample
from imagen_jax.diffusion.process import target
from imagen_jax.diffusion.process import to_eps
from imagen_jax.diffusion.process import to_x0
from imagen_jax.diffusion.samplers import METHODS
from imagen_jax.diffusion.samplers import sample
from imagen_jax.diffusion.schedules import alpha_sigma
from imagen_jax.diffusion.schedules import cosine_log_snr
from imagen_jax.diffusion.schedules import get_schedule
from imagen_jax.diffusion.schedules import linear_log_snr
from imagen_jax.diffusion.schedules import log_snr_grid
