"""The onnxruntime backend: the graph `dskd export` writes, scored like `Scorer` scores.

Only the network changes hands: decoding, chunking, rows and maps stay those of
`scoring.BatchScorer`, so `dskd score --backend onnxruntime` writes the rows PyTorch writes.
"""

from __future__ import annotations

import json

import numpy as np

from dskd_ray.config import DSKDConfig
from dskd_ray.inference.scoring import BatchScorer
from dskd_ray.model.inputs import to_unit_nchw
from dskd_ray.onnx.graph import INPUT_NAME, ExportError, read_metadata, session_for


class OnnxScorer(BatchScorer):
    """An exported graph loaded once; threshold, model id and size from its metadata."""

    def __init__(
        self, graph: bytes | str, batch_size: int = 16, threads: int | None = None
    ) -> None:
        metadata = read_metadata(graph)
        if "model_id" not in metadata:
            raise ExportError("not a dskd_ray graph: its metadata has no dskd_ray.model_id")
        self.session = session_for(graph, threads)
        self.metadata = metadata
        self.model_id = metadata["model_id"]
        # The checkpoint's config travels in the metadata: tiling and the score rule with it.
        self.config = DSKDConfig.from_dict(json.loads(metadata["config"]))
        self.image_size = int(metadata["image_size"])
        self.threshold = json.loads(metadata["threshold"])
        self.batch_size = batch_size

    def _score_chunk(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.session.run(None, {INPUT_NAME: to_unit_nchw(images)})
        return maps.astype(np.float32, copy=False), scores.astype(np.float32, copy=False)
