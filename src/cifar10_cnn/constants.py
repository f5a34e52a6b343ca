"""CIFAR-10's class names and pixel statistics: plain tuples, importable without numpy or torch."""

from __future__ import annotations

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The true per-channel statistics of the 50,000 training images, pixels scaled to [0, 1].
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

# The side of the square images a model takes: CIFAR's 32, or --image-size for a folder of your own images.
# At most MAX_IMAGE_SIZE: the whole training set lives in memory as uint8 (a 256x256 image is 192 KiB, 64x
# a CIFAR image), and the nets' activations grow with the square of the side. At least MIN_IMAGE_SIZE: each
# net halves its input three times or more (models.min_image_size gives a net's own minimum).
IMAGE_SIZE = 32
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 256
