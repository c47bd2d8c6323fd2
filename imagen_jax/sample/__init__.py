"""imagen_jax.sample: the sampling cascade (imagen-sample's library).

  from imagen_jax.sample import Cascade
  cascade = Cascade.from_config("runs/sample.gin")
  images = cascade(["a red circle"], num_samples=4)   # one uint8 array per stage
"""

from imagen_jax.sample.cascade import Cascade
from imagen_jax.sample.cascade import Edit
from imagen_jax.sample.cascade import LoadedStage
from imagen_jax.sample.cascade import PromptEncoder
from imagen_jax.sample.cascade import Stage
from imagen_jax.sample.cascade import StageSampler
from imagen_jax.sample.cascade import WorkItem
from imagen_jax.sample.cascade import image_seeds
from imagen_jax.sample.cascade import load_cascade
from imagen_jax.sample.cascade import load_edits
from imagen_jax.sample.cascade import load_stage
from imagen_jax.sample.cascade import process_share
from imagen_jax.sample.cascade import sample_to_dir
from imagen_jax.sample.cascade import work_items
from imagen_jax.diffusion.stage import SamplerSettings
from imagen_jax.diffusion.stage import sample_stage
