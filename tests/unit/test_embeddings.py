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
from difforge.platform.operator import required_columns
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
    pixels = extractor.processor(
        images=[Image.open(io.BytesIO(images[0])).convert("RGB")], return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    assert np.allclose(raw[0], hidden[0, 0].numpy(), atol=1e-5)


def test_what_is_not_a_vision_model_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DifforgeError, match="not a transformers vision model"):
        Extractor(FeatureSpec("transformers", str(tmp_path / "empty"), mode="RGB"))
    with pytest.raises(DifforgeError, match="image embedding model '.*nope': no such folder"):
        Extractor(FeatureSpec("transformers", str(tmp_path / "nope"), mode="RGB"))


def planted(n: int = 1600, copies: int = 400, dim: int = 32, seed: int = 0):
    """Unit embeddings in 20 loose blobs (members far apart: cosine about 0.1), and `copies`
    near-copies of random rows (cosine about 0.999): ids a* for originals, b* for copies."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    base = centers[rng.integers(0, 20, n)] + rng.normal(scale=0.5, size=(n, dim))
    of = rng.choice(n, copies, replace=False)
    near = base[of] + rng.normal(scale=0.02, size=(copies, dim))
    e = np.concatenate([base, near]).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    ids = [f"a{i:05d}" for i in range(n)] + [f"b{i:05d}" for i in range(copies)]
    return ids, e, {f"b{i:05d}": f"a{j:05d}" for i, j in enumerate(of)}


def cluster_table(ids, e, role="main", score=None):
    import pyarrow as pa

    from difforge.platform.tensors import to_column

    return pa.table(
        {
            "id": ids,
            "key": [0] * len(ids),
            "role": [role] * len(ids),
            "score": pa.array(score if score is not None else np.zeros(len(ids))),
            "e": to_column(e),
        }
    )


def pairs(found) -> dict[str, str]:
    """{dropped id: the id it duplicates} of a `duplicates` table."""
    return dict(zip(found["id"].to_pylist(), found["duplicate_of"].to_pylist(), strict=True))


def test_within_a_cluster_the_lower_ranked_copy_goes():
    from difforge.operators.curate.semantic_dedup import Params, SemanticDedup

    ids, e, copy_of = planted(200, 50)
    found = SemanticDedup(Params(threshold=0.95)).match(cluster_table(ids, e), reference=False)
    assert pairs(found) == copy_of
    assert min(found["similarity"].to_pylist()) >= 0.95
    # ranked by a score instead: the copies score higher, so the originals go
    score = np.r_[np.zeros(200), np.ones(50)]
    op = SemanticDedup(Params(threshold=0.95, score_column="aesthetic"))
    found = op.match(cluster_table(ids, e, score=score), reference=False)
    assert {kept: gone for gone, kept in pairs(found).items()} == copy_of
    # a row without a score ranks below every scored row
    score = np.r_[np.full(200, np.nan), np.zeros(50)]
    found = op.match(cluster_table(ids, e, score=score), reference=False)
    assert {kept: gone for gone, kept in pairs(found).items()} == copy_of


def test_against_a_reference_only_reference_rows_count():
    import pyarrow as pa

    from difforge.operators.curate.semantic_dedup import Decontaminate, DecontaminateParams

    ids, e, copy_of = planted(200, 50)
    train = cluster_table(ids[:200], e[:200])  # originals only: no pair among them
    ref_of = {c: o for c, o in copy_of.items()}
    ref = cluster_table(list(ref_of), e[200:], role="ref")
    found = Decontaminate(DecontaminateParams()).match(pa.concat_tables([train, ref]), True)
    assert pairs(found) == {o: c for c, o in ref_of.items()}
    with pytest.raises(ValueError, match="score_column: decontamination"):
        DecontaminateParams(score_column="aesthetic")


def test_what_is_not_an_embedding_column_is_named():
    import pyarrow as pa

    from difforge.models.features import unit_embeddings

    with pytest.raises(DifforgeError, match="no column `embedding`; embed the images first"):
        unit_embeddings(pa.table({"id": ["a"]}), "embedding", "curate.semantic_dedup")
    with pytest.raises(DifforgeError, match="`label` is not a tensor column"):
        unit_embeddings(pa.table({"id": ["a"], "label": [1]}), "label", "curate.semantic_dedup")


def test_a_heads_linear_layers_are_read_in_order_between_dropouts(tmp_path):
    """The improved aesthetic predictor's layout: Linear layers at 0, 2, 4 of a Sequential
    whose odd entries are dropouts (no weights), no activations between them."""
    from safetensors.torch import save_file

    from difforge.operators.curate.score import load_head

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(16, 8),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(8, 4),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(4, 1),
    ).eval()
    state = {f"layers.{k}": v for k, v in mlp.state_dict().items()}
    save_file(state, tmp_path / "head.safetensors")
    torch.save({"linear.weight": torch.ones(1, 16)}, tmp_path / "linear.pt")  # LAION-5B's form
    e = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    with torch.no_grad():
        want = mlp(torch.from_numpy(e)).squeeze(1).numpy()
    assert np.allclose(load_head(str(tmp_path / "head.safetensors"), "none")(e), want, atol=1e-6)
    assert np.allclose(load_head(str(tmp_path / "linear.pt"), "none")(e), e.sum(1), atol=1e-5)
    with pytest.raises(DifforgeError, match="takes 16-d embeddings, the column has 8"):
        load_head(str(tmp_path / "linear.pt"), "none")(e[:, :8])
    (tmp_path / "junk.pt").write_bytes(b"not weights")
    with pytest.raises(DifforgeError, match="junk.pt is not a safetensors or torch state-dict"):
        load_head(str(tmp_path / "junk.pt"), "none")


def test_zero_shot_scores_are_clips_softmax_over_the_prompts(tmp_path, images):
    from transformers import CLIPModel, CLIPProcessor

    from difforge.operators.curate.score import TextSide

    folder = tiny_clip(tmp_path / "clip")
    e, _ = Extractor(FeatureSpec("transformers", folder, mode="RGB", normalize=True))(images)
    prompts = ["a photo with a watermark", "a clean photo", "a drawing"]
    got = TextSide(folder, prompts)(e)
    model, processor = (
        CLIPModel.from_pretrained(folder).eval(),
        CLIPProcessor.from_pretrained(folder),
    )
    rgb = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    with torch.no_grad():
        out = model(**processor(text=prompts, images=rgb, return_tensors="pt", padding=True))
    assert np.allclose(got, out.logits_per_image.softmax(-1)[:, 0].numpy(), atol=1e-5)


def test_a_caption_prompt_is_filled_from_each_row():
    import pyarrow as pa

    from difforge.operators.caption.vlm import CaptionVLM, Params

    op = CaptionVLM(Params(model="x", prompt="A photo of {class}. Old caption: {caption}"))
    op.classes = ["T-shirt/top", "Trouser"]
    batch = pa.table({"id": ["a", "b"], "label": [1, 0], "caption": ["grey", None]})
    assert op.prompts(batch) == [
        "A photo of Trouser. Old caption: grey",
        "A photo of T-shirt/top. Old caption: ",
    ]
    assert required_columns(op) == {"id", "image", "caption", "label"}
    with pytest.raises(ValueError, match="fields are plain column names"):
        Params(model="x", prompt="{caption.__class__}")


def test_captions_are_greedy_by_default_and_sampled_by_seed(tmp_path, images):
    """Greedy: a row's caption does not depend on its batch. Sampling (temperature > 0): the
    same seed and batch, the same captions; another seed, others. The old caption is kept."""
    import pyarrow as pa

    from difforge.operators.caption.vlm import CaptionVLM, Params, load_captioner
    from tests.tiny_models import CAPTION_WORDS, tiny_captioner

    model, processor = load_captioner(tiny_captioner(tmp_path / "cap"))

    def caption(rows: slice, **params):
        op = CaptionVLM(Params(model="x", max_new_tokens=4, **params))
        op.model, op.processor, op.device = model, processor, "cpu"
        batch = pa.table(
            {
                "id": ["a", "b", "c", "d"],
                "image": images,
                "caption": ["one", "two", "three", "four"],
            }
        )[rows]
        out = op.process(batch)
        assert out.column("original_caption").to_pylist() == batch.column("caption").to_pylist()
        return out.column("caption").to_pylist()

    greedy = caption(slice(0, 4))
    assert caption(slice(2, 4)) == greedy[2:]
    assert all(1 <= len(c.split()) <= 4 and set(c.split()) <= set(CAPTION_WORDS) for c in greedy)
    hot = caption(slice(0, 4), temperature=2.0, seed=0)
    assert caption(slice(0, 4), temperature=2.0, seed=0) == hot
    assert caption(slice(0, 4), temperature=2.0, seed=1) != hot


def test_caption_similarity_is_clip_score(tmp_path, images):
    """The caption scorer on stored embeddings agrees with evaluate.clip_score, torchmetrics'
    CLIPScore computed from the images themselves."""
    from transformers import CLIPModel, CLIPProcessor

    from difforge.operators.curate.score import TextSide
    from difforge.operators.evaluate.clip_score import scores_of

    folder = tiny_clip(tmp_path / "clip")
    e, _ = Extractor(FeatureSpec("transformers", folder, mode="RGB", normalize=True))(images)
    texts = ["a zero", "a one", "a two", "a zero again"]
    got = TextSide(folder).caption_scores(e, texts)
    model, processor = (
        CLIPModel.from_pretrained(folder).eval(),
        CLIPProcessor.from_pretrained(folder),
    )
    assert np.allclose(got, scores_of(model, processor, images, texts), atol=1e-3)


def test_the_models_weights_and_preprocessing_are_part_of_the_steps_identity(tmp_path):
    """Planned (not run): the same folder with other weights, or another image size in its
    processor, gives `encode.image` another fingerprint; the same folder the same one."""
    import json

    import difforge

    folder = tiny_clip(tmp_path / "clip")
    spec = {
        "name": "embed",
        "storage": str(tmp_path / "storage"),
        "steps": [
            {"id": "raw", "op": "ingest.digits", "params": {"limit": 10}},
            {
                "id": "embedded",
                "op": "encode.image",
                "inputs": ["raw"],
                "params": {"model": folder},
            },
        ],
    }

    def fingerprint() -> str:
        return next(s.fingerprint for s in difforge.plan(spec).steps if s.id == "embedded")

    first = fingerprint()
    assert fingerprint() == first
    tiny_clip(tmp_path / "clip", seed=1)  # other weights
    second = fingerprint()
    assert second != first
    (config,) = [
        p for p in (tmp_path / "clip").iterdir() if p.name.endswith("processor_config.json")
    ]
    settings = json.loads(config.read_text())
    settings["image_processor"]["image_mean"] = [0.5, 0.5, 0.5]
    config.write_text(json.dumps(settings))
    assert fingerprint() not in (first, second)
