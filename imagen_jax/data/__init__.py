"""imagen_jax.data: sources, preprocessing, the training Pipeline and seqio tasks.

See docs/data.md. `shapes` is the built-in dataset; `sources.get_source(spec)` reads the
`DATASET` spec string (img2dataset tar shards in `webdataset.py`, parquet in `parquet.py`,
seqio Tasks in `seqio_source.py`); `convert.py` does `imagen-data convert` and `stats`;
`pipeline.Pipeline` is the index-addressable, host-sharded stream that training reads;
`tasks.register_task` makes a seqio Task over the same examples.
"""

from imagen_jax.data.pipeline import FeistelPermutation, Pipeline
from imagen_jax.data.sources import get_source, write_records

__all__ = ["FeistelPermutation", "Pipeline", "get_source", "write_records"]
