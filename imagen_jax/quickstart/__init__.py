"""imagen_jax.quickstart: what only the quickstart (launch/quickstart.sh) needs.

- `text_assets`: the small T5 and BPE tokenizer of the shapes captions
  (`python -m imagen_jax.quickstart.text_assets --out=DIR`).
- `grounding`: pretrains that T5 on the shapes pairs so that its embeddings say which
  object a caption puts where.

A package of its own because it sits above the library: it uses `data.shapes`, `nn` and
`text`, and nothing in the library imports it.
"""
