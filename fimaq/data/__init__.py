"""Data modules: offline scikit-learn digits and ImageNet in ImageFolder layout."""

from fimaq.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
