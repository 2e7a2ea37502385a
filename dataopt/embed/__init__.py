"""embed: images -> L2-normalised features (``EMBEDDERS`` backends: pixels, proxy in :mod:`.backends`,
open_clip in :mod:`.openclip`) and a kNN graph (faiss, :mod:`.knn`)."""
