"""FID and CLIP score of EMA samples while a stage trains (`train.eval_every`).

Every `eval_every` steps the trainer samples the first `num_images` examples of the
validation data (else the training data) with the EMA parameters, through the same
stage-sampling path as `imagen-sample`, and this module scores the images:
FID against given reference statistics (a pytorch-fid `.npz` of real images at the
stage's resolution, e.g. from `imagen-eval reference`) and the CLIP score of each image
against its caption. Both figures go to TensorBoard next to the loss as `eval/fid` and
`eval/clip_score`. Either metric is off when its file is not given.

The networks are loaded once, at the first evaluation, and each compiles one program for
its fixed batch size.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import gin
import numpy as np

from imagen_jax.errors import UserError


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainingEval:
  """What `train.eval_every` measures (gin: `TrainingEval.NAME`).

  Attributes:
    reference_stats: pytorch-fid statistics (`mu`, `sigma`) of real images; None = no FID.
    inception_weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or the same
      keys in safetensors); needed with reference_stats.
    clip_dir: a Hugging Face CLIP directory; None = no CLIP score.
    num_images: images sampled per evaluation, for the first num_images examples of the
      validation data (else the training data): the same captions and seeds every time.
      FID is biased upwards at small counts: compare runs at the same count.
    batch_size: images per Inception/CLIP batch.
  """
  reference_stats: str | None = None
  inception_weights: str | None = None
  clip_dir: str | None = None
  num_images: int = 256
  batch_size: int = 50

  def __post_init__(self):
    if self.reference_stats and not self.inception_weights:
      raise UserError("TrainingEval.reference_stats is set but inception_weights is not: "
                      "pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth too")
    if self.num_images < 2:
      raise UserError(f"TrainingEval.num_images={self.num_images}: FID needs at least 2")
    if not (self.reference_stats or self.clip_dir):
      raise UserError("train.eval_every is set but TrainingEval has neither reference_stats "
                      "(FID) nor clip_dir (CLIP score); set one, or eval_every=0")

  def evaluator(self, mesh=None) -> "TrainingEvaluator":
    """Loads the networks (outside any mesh context: each is placed by its own
    shardings)."""
    return TrainingEvaluator(self, mesh=mesh)


class TrainingEvaluator:
  """`evaluator(images, captions) -> {"eval/fid": ..., "eval/clip_score": ...}`."""

  def __init__(self, config: TrainingEval, mesh=None):
    self.config = config
    self._mesh = mesh
    self._extractor = None
    self._reference = None
    self._scorer = None
    self._load()

  def _load(self) -> None:
    from imagen_jax.eval import clip_score, fid, inception
    if self.config.reference_stats:
      self._reference = fid.load_statistics(self.config.reference_stats)
      model = inception.load_inception(self.config.inception_weights)
      self._extractor = fid.FeatureExtractor(model, self.config.batch_size, mesh=self._mesh)
    if self.config.clip_dir:
      self._scorer = clip_score.ClipScorer(self.config.clip_dir,
                                           batch_size=self.config.batch_size,
                                           mesh=self._mesh, progress=False)

  def __call__(self, images: Sequence[np.ndarray], captions: Sequence[str]) -> dict:
    from imagen_jax.eval import fid
    metrics = {}
    if self._extractor is not None:
      features = self._extractor(images, progress=False)
      metrics["eval/fid"] = fid.frechet_distance(*fid.feature_statistics(features),
                                                 *self._reference)
    if self._scorer is not None:
      metrics["eval/clip_score"] = float(np.mean(self._scorer.pair_scores(images, captions)))
    return metrics
