"""Procedurally rendered multi-skeleton pose datasets (bipeds and quadrupeds) in COCO format.

`generate.generate_synthetic_datasets` writes the datasets; `render.render_sample` draws one
image. Both are re-exported here, imported on first use so that `python -m
data_pipelines.synthetic.generate` does not import its own module twice.
"""

from typing import Any

__all__ = ["generate_synthetic_datasets", "render_sample", "RenderedSample"]


def __getattr__(name: str) -> Any:
  if name == "generate_synthetic_datasets":
    from data_pipelines.synthetic.generate import generate_synthetic_datasets
    return generate_synthetic_datasets
  if name in ("render_sample", "RenderedSample"):
    from data_pipelines.synthetic import render
    return getattr(render, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
