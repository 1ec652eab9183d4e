"""SETR: a ViT encoder and the Naive or PUP (progressive upsampling) decoder.

Both return {'logits': [N, H, W, K] at input size, 'features': the input of the classifier},
like DeepLabV2, so the same train step, prototypes and losses apply. PUP's classifier runs
before the last 2x upsampling: a 1x1 convolution commutes with bilinear upsampling, so this is
the same function as SETR-PUP at half the memory, and its features stay below full resolution.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rml_jax.models.resnet import ACTIVATIONS, batch_norm
from rml_jax.models.vit import VisionTransformer


def _upsample(x: jax.Array, factor: int) -> jax.Array:
  n, h, w, c = x.shape
  return jax.image.resize(x, (n, h * factor, w * factor, c), "bilinear")


class SETR(nn.Module):
  """decoder: 'naive' (1x1 conv, BN, ReLU, 1x1 classifier) or 'pup' (4 conv blocks, x2 each)."""

  num_classes: int
  decoder: str = "naive"
  patch_size: int = 16
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  decoder_width: int = 256
  dropout_rate: float = 0.0
  survival_prob: float = 1.0
  dtype: jnp.dtype = jnp.float32
  # The training crop (h, w): position embeddings are sized for it and resampled for other
  # input sizes (whole-image eval). None: sized for the input at init.
  image_size: tuple[int, int] | None = None
  remat: bool = False
  activation: str = "relu"  # the decoder's
  survival_schedule: str = "uniform"

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    pos_grid = (tuple(s // self.patch_size for s in self.image_size) if self.image_size
                else None)
    tokens = VisionTransformer(self.patch_size, self.hidden_size, self.depth, self.num_heads,
                               survival_prob=self.survival_prob, dtype=self.dtype,
                               pos_grid=pos_grid, remat=self.remat,
                               survival_schedule=self.survival_schedule,
                               name="encoder")(images, train)
    # The decoder is freshly initialised, so its batch norm always trains (config.model.frozen_bn
    # keeps a pretrained backbone's statistics; the ViT encoder has no batch norm).
    norm = lambda name: batch_norm(name, train, False, self.dtype)  # noqa: E731
    act = ACTIVATIONS[self.activation]
    x = tokens
    if self.decoder == "naive":
      x = act(norm("decode_bn")(nn.Dense(self.decoder_width, dtype=self.dtype,
                                              name="decode_conv")(x)))
    elif self.decoder == "pup":
      for i in range(4):
        x = nn.Conv(self.decoder_width, (3, 3), padding=1, dtype=self.dtype,
                    name=f"decode_conv{i}")(x)
        x = act(norm(f"decode_bn{i}")(x))
        if i < 3:
          x = _upsample(x, 2)
    else:
      raise ValueError(f"decoder: expected 'naive' or 'pup', got {self.decoder!r}")
    features = x
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
    n, h, w, _ = images.shape
    logits = jax.image.resize(logits.astype(jnp.float32), (n, h, w, self.num_classes),
                              "bilinear")
    return {"logits": logits, "features": features}
