"""Fisher blocks: one kind per module, one contract (`base.FisherBlock`)."""

from kfac_keras.blocks.base import FisherBlock
from kfac_keras.blocks.dense import DenseBlock
from kfac_keras.blocks.diagonal import DiagonalBlock
from kfac_keras.blocks.kronecker import KroneckerBlock

__all__ = ["DenseBlock", "DiagonalBlock", "FisherBlock", "KroneckerBlock"]
