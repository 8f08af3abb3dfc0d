"""Data modules: offline scikit-learn digits, digits on photos (the proxy), ImageNet folders."""

from fimaq.data.base import PTQDataModule
from fimaq.data.digits import DigitsDataModule
from fimaq.data.imagenet import ImageNetDataModule
from fimaq.data.proxy import ProxyDataModule

__all__ = ["DigitsDataModule", "ImageNetDataModule", "PTQDataModule", "ProxyDataModule"]
