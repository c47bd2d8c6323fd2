"""Class labels of captions, for noise-aware classifiers (classifier guidance, Dhariwal &
Nichol 2021).

A label set names how a caption becomes a class: `data_label(caption)` for training data
(-1: the example has no label and is masked out of the loss) and `prompt_label(prompt)` for
sampling (a UserError when the prompt has no label). A classifier records its label set's
name (`NoisyClassifier.labels`, model.json `labels`), so training and sampling parse
captions the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from imagen_jax.data import shapes
from imagen_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class LabelSet:
  names: tuple[str, ...]                # class i's name
  data_label: Callable[[str], int]      # caption -> class, or NO_LABEL (masked)
  prompt_label: Callable[[str], int]    # prompt -> class; UserError if it has none


NO_LABEL = shapes.NO_LABEL

LABEL_SETS = {
    # The 18 (colour, shape) objects of one-object shapes captions; two-object captions
    # are masked.
    "shapes_object": LabelSet(shapes.object_labels(), shapes.object_label,
                              shapes.prompt_label),
}


def get_label_set(name: str) -> LabelSet:
  if name not in LABEL_SETS:
    raise UserError(f"label set {name!r} is unknown; use one of {sorted(LABEL_SETS)}")
  return LABEL_SETS[name]
