"""The compressor's stages, in the order a chunk passes through them.

encoder (``ContextEncoder``: chunk + end marker, one bidirectional pass) -> head
(``DensityHead``: log2 factor from the end marker's state) -> selector
(``DiscreteRatioSelector``: snap to the candidate set) -> pooling (``PoolingStage``: windows
or tokens of the chosen size; what the latent store keeps) -> projector (``Projector``: into
the decoder's embedding space) -> placeholder (``expand_placeholders``: one prompt token
becomes the latents) -> decoder (``LatentDecoder``: reads them and answers).
"""

from .decoder import LatentDecoder
from .encoder import ContextEncoder, ContextTooLongError, EncoderOutput
from .head import DensityHead
from .placeholder import PlaceholderCountError, expand_placeholders
from .pooling import LastTokens, MeanPooling, MemoryTokens, PoolingStage, build_pooling
from .projector import Projector
from .selector import DiscreteRatioSelector

__all__ = ["ContextEncoder", "ContextTooLongError", "DensityHead", "DiscreteRatioSelector", "EncoderOutput", "LastTokens", "LatentDecoder",
           "MeanPooling", "MemoryTokens", "PlaceholderCountError", "PoolingStage", "Projector", "build_pooling",
           "expand_placeholders"]
