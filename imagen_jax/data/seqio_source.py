"""`seqio:TASK?split=S&image=K&text=K`: a registered seqio Task as a random-access source.

t5x users describe data as seqio Tasks, whose datasets are tf.data streams: no random
access, and an order that lives in iterator state. The first time a Task is opened, one
pass over `task.get_dataset(split, shuffle=False)` (its preprocessors included) writes its
(image, caption) examples to ArrayRecord under `$IMAGEN_JAX_CACHE/seqio/` (default
`~/.cache/imagen_jax/seqio/`), in a folder named by the Task, split and keys; later opens
read that folder as a `records:` source, so example i is a pure function of i like every
other source. The folder is written under a temporary name and renamed when complete, so
an interrupted pass leaves nothing half-written. Hosts that share the cache folder may
write it at once: the first rename wins and the others read its folder (a pass is
deterministic, so theirs were the same examples). Delete the folder after changing the
Task's data to write it again.

Features: `image` (default key `image`) is an encoded image (bytes) or uint8 pixels
[H,W,C]; `text` (default `caption`) is a string or a sequence of strings (the first is
used). Module imports of the Task's own code must have run (seqio registers Tasks on
import), e.g. by a gin `import` line or an import in the calling program.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.parse
import uuid

import numpy as np
from etils import epath

from imagen_jax.data import sources
from imagen_jax.errors import UserError

RECORDS_NAME = "examples.array_record"


def parse_spec(body: str) -> dict[str, str]:
  """'TASK[?split=S&image=K&text=K]' -> {task, split, image, text}."""
  name, _, query = body.partition("?")
  options = urllib.parse.parse_qs(query, keep_blank_values=True)
  unknown = set(options) - {"split", "image", "text"}
  if not name or unknown:
    raise UserError(f"DATASET 'seqio:{body}' is not valid: write seqio:TASK?split=S&"
                    f"image=KEY&text=KEY (unknown options: {sorted(unknown)})")
  return {"task": name, "split": options.get("split", ["train"])[0],
          "image": options.get("image", ["image"])[0],
          "text": options.get("text", ["caption"])[0]}


def materialized_dir(task: str, split: str, image: str, text: str) -> epath.Path:
  digest = hashlib.sha256(repr((task, split, image, text)).encode()).hexdigest()[:12]
  safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in task)
  return sources.cache_root() / "seqio" / f"{safe}-{split}-{digest}"


def _get_task(name: str):
  import seqio  # imported on use
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError as e:
    raise UserError(f"no seqio Task or Mixture named {name!r} is registered; import the "
                    "module that registers it first (registered: "
                    f"{sorted(seqio.TaskRegistry.names())[:20]})") from e


def _as_caption(value) -> str:
  value = np.asarray(value).reshape(-1)
  if value.size == 0:
    return ""
  value = value[0]
  return (value.decode("utf-8") if isinstance(value, bytes) else str(value)).strip()


def _examples(task, options):
  """(image, caption) of every example of the split, in the Task's unshuffled order."""
  dataset = task.get_dataset(sequence_length=None, split=options["split"], shuffle=False,
                             num_epochs=1)
  for features in dataset.as_numpy_iterator():
    for key in (options["image"], options["text"]):
      if key not in features:
        raise UserError(f"seqio Task {options['task']!r} has no feature {key!r}; its "
                        f"features are {sorted(features)}; set ?image=KEY&text=KEY")
    image = features[options["image"]]
    if isinstance(image, np.ndarray) and image.dtype == object:
      image = image.item()
    caption = _as_caption(features[options["text"]])
    if caption:
      yield {"image": image, "caption": caption}


def seqio_source(body: str) -> sources.RecordsSource:
  """The Task's examples as a `records:` source, written on first use (see module doc)."""
  options = parse_spec(body)
  folder = materialized_dir(options["task"], options["split"], options["image"],
                            options["text"])
  if not folder.exists():
    task = _get_task(options["task"])
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    count = 0
    def counted():
      nonlocal count
      for example in _examples(task, options):
        count += 1
        yield example
    try:
      sources.write_records(tmp / RECORDS_NAME, counted())
      if not count:
        raise UserError(f"seqio Task {options['task']!r} split {options['split']!r} "
                        "yields no example with an image and a caption")
      try:
        tmp.rename(folder)
      except OSError:
        if not folder.exists():
          raise
        # Another process renamed its complete folder first; its examples are the same.
    finally:
      if tmp.exists():
        shutil.rmtree(os.fspath(tmp), ignore_errors=True)
  return sources.RecordsSource(os.fspath(folder / "*.array_record"))
