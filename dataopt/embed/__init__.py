"""embed: images -> L2-normalised features (``EMBEDDERS`` backends: pixels, proxy, open_clip) and a kNN
graph (faiss)."""
from dataopt.embed.backends import PixelsEmbedder, ProxyEmbedder
from dataopt.embed.base import Embedder, check_finite, l2_normalise
from dataopt.embed.knn import knn_search
from dataopt.embed.openclip import OpenClipEmbedder

__all__ = [
    "Embedder", "OpenClipEmbedder", "PixelsEmbedder", "ProxyEmbedder", "check_finite", "knn_search",
    "l2_normalise",
]
