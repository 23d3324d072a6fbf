"""Small networks that difforge trains itself (so nothing has to be downloaded)."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from difforge.platform import columns as C


class SmallCNN(nn.Module):
    """A small CNN classifier. Its penultimate features serve for Fréchet distance where
    Inception weights are absent (FACTS.md: such features grow monotonically with noise/blur)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)
        self.feature_dim = 4 * w

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional block's map, before pooling: [B, 4w, H/4, W/4]."""
        return self.body[:-2](x)

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """`features` from `feature_map`'s output."""
        return self.body[-2:](fmap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_images(
    files: list[str], mode: str | None = None, with_labels: bool = True
) -> tuple[np.ndarray, np.ndarray | None, list]:
    """Decode a dataset's images to uint8 [N, C, H, W], with labels (when asked) and ids."""
    import numpy as np
    import pyarrow.parquet as pq

    from difforge.platform.datasets import url_to_fs
    from difforge.platform.imaging import to_array

    images, labels, ids = [], [], []
    for uri in files:
        fs, path = url_to_fs(uri)
        cols = [C.ID, C.IMAGE, *([C.LABEL] if with_labels else [])]
        t = pq.read_table(path, filesystem=fs, columns=cols)
        ids += t.column(C.ID).to_pylist()
        if with_labels:
            labels += t.column(C.LABEL).to_pylist()
        images += [to_array(b, mode) for b in t.column(C.IMAGE).to_pylist()]
    return _nchw(images), (np.asarray(labels, np.int64) if with_labels else None), ids


def first_images(dataset, n: int, mode: str | None = None) -> np.ndarray:
    """A dataset's first `n` images as uint8 [N, C, H, W], reading only the batches they are
    in (a check on a few hundred images never loads whole shards)."""
    from difforge.platform.imaging import to_array

    images: list = []
    for batch in dataset.iter_batches(columns=[C.IMAGE], batch_size=min(n, 1024)):
        images += [to_array(b, mode) for b in batch.column(C.IMAGE).to_pylist()[: n - len(images)]]
        if len(images) >= n:
            break
    return _nchw(images)


def _nchw(images: list) -> np.ndarray:
    """Decoded images (H, W or H, W, C arrays) stacked as uint8 [N, C, H, W]."""
    import numpy as np

    arr = np.stack(images) if images else np.zeros((0, 1, 1), np.uint8)
    return arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)


def load_classifier(model_uri: str, device: str = "cpu"):
    """The trained network and its config, from a `train.classifier` model folder."""
    import torch

    from difforge.models.classifier import SmallCNN
    from difforge.platform.datasets import url_to_fs

    fs, path = url_to_fs(model_uri)
    config = json.loads(fs.cat_file(f"{path}/config.json"))
    if fs.exists(f"{path}/model.safetensors"):
        from safetensors.torch import load

        state = load(fs.cat_file(f"{path}/model.safetensors"))
    else:  # folders written before safetensors
        with fs.open(f"{path}/model.pt", "rb") as f:
            state = torch.load(f, map_location=device, weights_only=True)
    net = SmallCNN(config["in_channels"], config["num_classes"], config["width"])
    net.load_state_dict(state)
    return net.eval().to(device), config


def classifier_features(net, images: np.ndarray, batch: int = 512):
    import numpy as np
    import torch

    feats, preds = [], []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            x = torch.from_numpy(images[s : s + batch]).float().div(127.5).sub(1.0)
            f = net.features(x)
            feats.append(f.numpy())
            preds.append(net.head(f).argmax(1).numpy())
    return np.concatenate(feats).astype(np.float64), np.concatenate(preds)
