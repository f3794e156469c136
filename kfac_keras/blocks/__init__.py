"""Fisher blocks: one kind per module, one contract (`base.FisherBlock`)."""

from kfac_keras.blocks.base import FisherBlock, StatisticsSource
from kfac_keras.blocks.conv import ConvBlock, GroupedConvBlock
from kfac_keras.blocks.dense import DenseBlock
from kfac_keras.blocks.depthwise import DepthwiseConvBlock, SeparableConvBlock
from kfac_keras.blocks.diagonal import DiagonalBlock
from kfac_keras.blocks.einsum_dense import EinsumDenseBlock
from kfac_keras.blocks.embedding import EmbeddingBlock
from kfac_keras.blocks.errors import UnsupportedLayerError
from kfac_keras.blocks.factors import DenseFactor, DiagonalFactor
from kfac_keras.blocks.identity import IdentityBlock
from kfac_keras.blocks.kronecker import KroneckerBlock
from kfac_keras.blocks.scale_shift import ScaleShiftBlock

__all__ = ["ConvBlock", "DenseBlock", "DenseFactor", "DepthwiseConvBlock", "DiagonalBlock",
           "DiagonalFactor", "EinsumDenseBlock", "EmbeddingBlock", "FisherBlock",
           "GroupedConvBlock", "IdentityBlock", "KroneckerBlock", "ScaleShiftBlock",
           "SeparableConvBlock", "StatisticsSource", "UnsupportedLayerError"]
