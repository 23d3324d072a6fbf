"""Image embeddings for curation (`encode.image`), without Ray: what vector a CLIP-like model
and a DINOv2 backbone give each image, through the model's own processor, and the clear errors
for what is not such a model."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from difforge.models.features import Extractor, FeatureSpec
from difforge.platform.errors import DifforgeError
from tests.tiny_models import tiny_clip, tiny_dinov2


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images():
    """Three real digits (8x8 grayscale), and the first again with one pixel changed."""
    from sklearn.datasets import load_digits

    digits = (load_digits().images[:3] * 255 / 16).astype(np.uint8)
    near = digits[0].copy()
    near[0, 0] = 255 - near[0, 0]
    return [png(d) for d in digits] + [png(near)]


def test_a_clip_model_gives_its_projected_image_embedding_normalised(tmp_path, images):
    from transformers import CLIPModel, CLIPProcessor

    folder = tiny_clip(tmp_path / "clip")
    spec = FeatureSpec("transformers", folder, mode="RGB", normalize=True)
    got, predictions = Extractor(spec)(images)
    assert predictions is None and got.shape == (4, 16) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # the space CLIP's text side shares: its own processor, then get_image_features
    model, processor = (
        CLIPModel.from_pretrained(folder).eval(),
        CLIPProcessor.from_pretrained(folder),
    )
    rgb = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    with torch.no_grad():
        out = model.get_image_features(**processor(images=rgb, return_tensors="pt"))
    want = torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1).numpy()
    assert np.allclose(got, want, atol=1e-5)
    cos = got @ got.T
    assert cos[0, 3] > max(cos[0, 1], cos[0, 2])  # one pixel changed: the nearest


def test_a_backbone_gives_its_pooled_class_token(tmp_path, images):
    from transformers import Dinov2Model

    folder = tiny_dinov2(tmp_path / "dino")
    raw, _ = Extractor(FeatureSpec("transformers", folder, mode="RGB"))(images)
    assert raw.shape == (4, 32) and not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    unit, _ = Extractor(FeatureSpec("transformers", folder, mode="RGB", normalize=True))(images)
    assert np.allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    # the class token after the final layer norm: DINOv2's global image descriptor
    model = Dinov2Model.from_pretrained(folder).eval()
    extractor = Extractor(FeatureSpec("transformers", folder, mode="RGB"))
    pixels = extractor.processor(images=[Image.open(io.BytesIO(images[0])).convert("RGB")],
                                 return_tensors="pt")["pixel_values"]  # fmt: skip
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    assert np.allclose(raw[0], hidden[0, 0].numpy(), atol=1e-5)


def test_what_is_not_a_vision_model_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DifforgeError, match="not a transformers vision model"):
        Extractor(FeatureSpec("transformers", str(tmp_path / "empty"), mode="RGB"))
    with pytest.raises(DifforgeError, match="image embedding model '.*nope': no such folder"):
        Extractor(FeatureSpec("transformers", str(tmp_path / "nope"), mode="RGB"))
