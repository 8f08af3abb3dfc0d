"""Data modules: offline scikit-learn digits and ImageNet in ImageFolder layout."""

from fimaq.data.base import PTQDataModule
from fimaq.data.digits import DigitsDataModule
from fimaq.data.imagenet import ImageNetDataModule

__all__ = ["DigitsDataModule", "ImageNetDataModule", "PTQDataModule"]
