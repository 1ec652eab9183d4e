"""PASCAL VOC 2012 with the SBD augmented labels (10582 train_aug images, 1449 val)."""

from rml_jax.datasets.voc_aug.voc_aug import CLASS_NAMES, VocAug, expected_layout

__all__ = ["CLASS_NAMES", "VocAug", "expected_layout"]
