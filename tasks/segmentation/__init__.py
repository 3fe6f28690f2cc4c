"""Semantic segmentation pieces of the ADE20k task: data, backbones, heads, metrics, backends."""
