"""The trained model as an MLflow pyfunc model, logged as code (MLflow's models-from-code).

``tasks.tracking`` logs this file with ``python_model=<this path>`` and the train stage's
``model/`` folder (``model.safetensors`` + ``config.json``) as the artifact ``model``: MLflow stores the
source and the safetensors, nothing is pickled, and loading rebuilds the network with dataopt's own
loader (:func:`dataopt.train.checkpoint.load_model`), exactly as the evaluate stage does.

``predict`` takes uint8 images ``(n, H, W, 3)``; a head (``config.json``'s ``input.kind ==
"embedding"``) logged with its embedder (the artifact ``embedder``: the embed stage's
``embedder.safetensors``) embeds them first, as the embed stage did, and also takes float embeddings
``(n, d)``. It returns the class probabilities ``(n, n_classes)`` (float32; argmax = predicted label
index). So a champion and a challenger trained on different embeddings (each retrain refits the
embedder) are scored on the same images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

ARTIFACT = "model"  # the key of the model folder in the logged model's artifacts
EMBEDDER = "embedder"  # the key of a head's embedder.safetensors


class DataoptModel(PythonModel):
    def load_context(self, context: Any) -> None:
        import torch

        from dataopt.train.checkpoint import load_model

        self.device = torch.device("cpu")
        self.model, self.config = load_model(context.artifacts[ARTIFACT], self.device)
        self.embedding_input = (self.config.get("input") or {}).get("kind") == "embedding"
        self.embedder = None
        if EMBEDDER in context.artifacts:
            from dataopt.embed.run import load_embedder

            self.embedder = load_embedder(Path(context.artifacts[EMBEDDER]), device="cpu")

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate them
        import torch

        from dataopt.train import loop

        x = np.asarray(model_input)
        if self.embedding_input and x.ndim == 4:
            if self.embedder is None:
                raise ValueError("this head model was logged without its embedder: pass embeddings (n, d)")
            from dataopt.embed.run import embed_new

            x = embed_new(self.embedder, x)
        if self.embedding_input:
            t = torch.from_numpy(np.asarray(x, dtype=np.float32)).to(self.device)
        else:
            t = loop.images_to_tensor(np.asarray(x, dtype=np.uint8), self.device)
        with torch.no_grad():
            logits = loop.predict_logits(self.model, t, int((params or {}).get("batch_size", 1024)))
        return torch.softmax(logits.double(), dim=1).float().numpy()


set_model(DataoptModel())
