"""Where the data comes from: data sets by name, the decode cache, batched augmentations."""
from data_zoo.augment import Augmenter, list_augmentations, list_ops
from data_zoo.cache import load_images
from data_zoo.loader import DataBundle, Split, iterate_batches, load_bundle
from data_zoo.sources import ImageSet, list_datasets

__all__ = ["Augmenter", "DataBundle", "ImageSet", "Split", "iterate_batches", "list_augmentations", "list_datasets", "list_ops", "load_bundle", "load_images"]
