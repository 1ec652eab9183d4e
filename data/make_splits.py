"""Writes the seeded labeled splits shipped in data/splits (run from the repository root):

  python data/make_splits.py

Inputs, next to the outputs: cityscapes/train_ids.txt (the 2975 fine train images),
voc_aug/train_ids.txt (the 1464 VOC 2012 train images) and voc_aug/train_aug_ids.txt (the 10582
VOC + SBD images). Labeled sizes are the paper's: Cityscapes 1/30, 1/8, 1/4 = 100, 372, 744 of
2975; VOC 1/100, 1/50, 1/20, 1/8 of the 1464 = 15, 29, 73, 183; and UniMatch V2's for the DINOv2
configs: Cityscapes 1/16 and 1/2 = 186 and 1488, VOC 1/16, 1/4, 1/2 and all = 92, 366, 732 and
1464 (its 183 is 1_8). Every split draws with seed 0 from the sorted ids, so a smaller split of a
dataset is a subset of every larger one. The unlabeled images are all other train images
(Cityscapes train, VOC train_aug), which is what rml_jax uses when a split has no unlabeled.txt.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rml_jax.datasets import splits  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "splits")
SEED = 0
CITYSCAPES = {"1_30": 100, "1_16": 186, "1_8": 372, "1_4": 744, "1_2": 1488}
VOC = {"1_100": 15, "1_50": 29, "1_20": 73, "1_16": 92, "1_8": 183, "1_4": 366, "1_2": 732,
       "1_1": 1464}


def main() -> None:
  for dataset, sizes in (("cityscapes", CITYSCAPES), ("voc_aug", VOC)):
    candidates = splits.read_ids(os.path.join(HERE, dataset, "train_ids.txt"))
    for name, count in sizes.items():
      labeled, _ = splits.make_split(candidates, count, SEED)
      path = os.path.join(HERE, dataset, name, "labeled.txt")
      splits.write_ids(path, labeled)
      print(f"{path}: {len(labeled)} labeled of {len(candidates)}")


if __name__ == "__main__":
  main()
