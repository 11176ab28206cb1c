"""Procedurally rendered multi-skeleton pose datasets (bipeds and quadrupeds) in COCO format.

`generate.generate_synthetic_datasets` writes the datasets; `render.render_sample` draws one
image. Import the module you need (`from data_pipelines.synthetic import generate`).
"""
