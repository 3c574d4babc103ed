"""Data sets, augmentations and the pretraining loader."""

from stoptool.data.datasets import ArrayDataset, FolderDataset, ImageDataset, digits, open_dataset

__all__ = ["ArrayDataset", "FolderDataset", "ImageDataset", "digits", "open_dataset"]
