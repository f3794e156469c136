"""Fisher blocks: one kind per module, one contract (`base.FisherBlock`)."""

from kfac_keras.blocks.base import FisherBlock
from kfac_keras.blocks.conv import ConvBlock, GroupedConvBlock
from kfac_keras.blocks.dense import DenseBlock
from kfac_keras.blocks.depthwise import DepthwiseConvBlock, SeparableConvBlock
from kfac_keras.blocks.diagonal import DiagonalBlock
from kfac_keras.blocks.einsum_dense import EinsumDenseBlock
from kfac_keras.blocks.embedding import EmbeddingBlock
from kfac_keras.blocks.errors import UnsupportedLayerError
from kfac_keras.blocks.grouped_kronecker import GroupedKroneckerBlock
from kfac_keras.blocks.kronecker import KroneckerBlock
from kfac_keras.blocks.scale_shift import ScaleShiftBlock

__all__ = ["ConvBlock", "DenseBlock", "DepthwiseConvBlock", "DiagonalBlock",
           "EinsumDenseBlock", "EmbeddingBlock", "FisherBlock", "GroupedConvBlock",
           "GroupedKroneckerBlock", "KroneckerBlock", "ScaleShiftBlock",
           "SeparableConvBlock", "UnsupportedLayerError"]
