"""embed: images -> L2-normalised features (``EMBEDDERS`` backends) and an exact kNN graph (faiss)."""
from dataopt.embed.backends import PixelsEmbedder, ProxyEmbedder
from dataopt.embed.base import Embedder, check_finite, l2_normalise
from dataopt.embed.knn import knn_search

__all__ = ["Embedder", "PixelsEmbedder", "ProxyEmbedder", "check_finite", "knn_search", "l2_normalise"]
