"""WebDataset shards (local and on S3), caption corruption and text encoding."""

from __future__ import annotations

import io
import json
import tarfile
import uuid

import numpy as np
import s3fs
from PIL import Image

import difforge
from difforge.platform.tensors import to_numpy

CAPTIONS = [
    f"a photo of a small {c} on a {s}"
    for c in ("cat", "dog", "red car", "boat")
    for s in ("table", "lawn", "road", "beach", "sofa")
]


def write_shards(folder, n_shards: int = 2, per_shard: int = 10):
    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in range(n_shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for _ in range(per_shard):
                buf = io.BytesIO()
                Image.new("RGB", (12, 10), (k * 10 % 255, 0, 0)).save(buf, format="PNG")
                files = {
                    f"{k:05d}.png": buf.getvalue(),
                    f"{k:05d}.cls": str(k % 3).encode(),
                    f"{k:05d}.txt": CAPTIONS[k % len(CAPTIONS)].encode(),
                }
                if k % 5 == 0:
                    files[f"{k:05d}.json"] = json.dumps({"source": "test"}).encode()
                for name, data in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                k += 1
    return k


def test_webdataset_shards_local_and_on_s3(ray_session, s3_server, tmp_path):
    n = write_shards(tmp_path / "wds")
    remote = f"s3://datasets/wds-{uuid.uuid4().hex[:6]}"
    s3fs.S3FileSystem(skip_instance_cache=True).put(
        str(tmp_path / "wds") + "/", remote, recursive=True
    )
    for path in (str(tmp_path / "wds"), remote):
        spec = {
            "name": "wds",
            "storage": str(tmp_path / "s"),
            "steps": [{"id": "raw", "op": "ingest.webdataset", "params": {"path": path}}],
        }
        summary = difforge.run(spec)
        rows = difforge.open_dataset(summary.step("raw").uri).to_arrow().to_pylist()
        assert len(rows) == n
        by_id = {r["id"]: r for r in rows}
        r = by_id["shard-001.tar/00012"]
        assert (r["label"], r["caption"], r["width"], r["format"]) == (0, CAPTIONS[12], 12, "png")


def test_images_folder_on_s3(ray_session, s3_server, tmp_path):
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    remote = f"s3://datasets/imgs-{uuid.uuid4().hex[:6]}"
    for cls in ("a", "b"):
        buf = io.BytesIO()
        Image.new("L", (5, 5), 9).save(buf, format="PNG")
        fs.pipe(f"{remote}/{cls}/x.png", buf.getvalue())
    spec = {
        "name": "s3imgs",
        "storage": str(tmp_path / "s"),
        "steps": [
            {"id": "raw", "op": "ingest.images", "params": {"path": remote, "labels": "folders"}}
        ],
    }
    summary = difforge.run(spec)
    rows = difforge.open_dataset(summary.step("raw").uri).to_arrow().to_pylist()
    assert sorted((r["id"], r["label"]) for r in rows) == [("a/x.png", 0), ("b/x.png", 1)]
    assert rows[0]["source"].startswith("s3://")


def caption_spec(tmp_path, rows_per_batch, mode="swap", eta=0.3):
    return {
        "name": "cap",
        "storage": str(tmp_path / f"s{rows_per_batch}"),
        "steps": [
            {
                "id": "raw",
                "op": "ingest.webdataset",
                "params": {"path": str(tmp_path / "wds"), "rows_per_batch": rows_per_batch},
            },
            {
                "id": "noisy",
                "op": "corrupt.captions",
                "inputs": ["raw"],
                "params": {"corruption_ratio": eta, "mode": mode, "buckets": 4},
                "resources": {"batch_size": rows_per_batch + 3},
            },
        ],
    }


def test_caption_swaps_are_deterministic_and_pairwise(ray_session, tmp_path, monkeypatch):
    from difforge.platform import parallel

    write_shards(tmp_path / "wds", n_shards=4, per_shard=50)
    a = difforge.open_dataset(difforge.run(caption_spec(tmp_path, 50)).step("noisy").uri)
    b = difforge.open_dataset(difforge.run(caption_spec(tmp_path, 7)).step("noisy").uri)
    assert len(a.manifest.files) != len(b.manifest.files)  # other blocks, other batches
    monkeypatch.setattr(parallel, "SINGLE_TASK_ROWS", 0)  # paired by a shuffle, as large inputs
    c = difforge.open_dataset(difforge.run(caption_spec(tmp_path, 13)).step("noisy").uri)
    ra = {r["id"]: r for r in a.to_arrow().to_pylist()}
    for other in (b, c):
        rb = {r["id"]: r for r in other.to_arrow().to_pylist()}
        assert {k: r["caption"] for k, r in ra.items()} == {k: r["caption"] for k, r in rb.items()}
    swapped = [r for r in ra.values() if r["caption"] != r["caption_clean"]]
    assert 0.15 < len(swapped) / 200 < 0.45  # eta 0.3, less odd rows out and equal captions
    clean_to_id = {}
    for k, r in ra.items():
        clean_to_id.setdefault(r["caption_clean"], set()).add(k)
    for r in swapped:  # each corrupted caption is another row's clean caption
        assert r["caption"] in clean_to_id


def test_word_replacement(ray_session, tmp_path):
    write_shards(tmp_path / "wds", n_shards=2, per_shard=20)
    summary = difforge.run(caption_spec(tmp_path, 20, mode="words", eta=0.5))
    rows = difforge.open_dataset(summary.step("noisy").uri).to_arrow().to_pylist()
    changed = [r for r in rows if r["corrupted"]]
    assert len(changed) >= 30
    for r in changed:
        assert len(r["caption"].split()) == len(r["caption_clean"].split())


def tiny_text_encoder(folder) -> str:
    """A real (tiny, untrained) BERT encoder and WordPiece tokenizer, saved locally."""
    from transformers import BertConfig, BertModel, BertTokenizer

    words = sorted({w for c in CAPTIONS for w in c.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer.from_pretrained(str(folder)).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    BertModel(config).save_pretrained(folder)
    return str(folder)


def test_encode_text_to_cond_embedding(ray_session, tmp_path):
    write_shards(tmp_path / "wds", n_shards=1, per_shard=12)
    model = tiny_text_encoder(tmp_path / "bert")
    spec = {
        "name": "txt",
        "storage": str(tmp_path / "s"),
        "steps": [
            {"id": "raw", "op": "ingest.webdataset", "params": {"path": str(tmp_path / "wds")}},
            {
                "id": "emb",
                "op": "encode.text",
                "inputs": ["raw"],
                "params": {"model": model, "max_length": 12},
            },
            {
                "id": "pooled",
                "op": "encode.text",
                "inputs": ["raw"],
                "params": {"model": model, "pooling": "mean"},
            },
        ],
    }
    summary = difforge.run(spec)
    seq = difforge.open_dataset(summary.step("emb").uri).to_arrow()
    z = to_numpy(seq.column("cond_embedding"))
    assert z.shape == (12, 12, 16)
    caps = seq.column("caption").to_pylist()
    same = [i for i in range(12) if caps[i] == caps[0]]
    diff = [i for i in range(12) if caps[i] != caps[0]]
    assert np.allclose(z[same[0]], z[same[-1]], atol=1e-5) and len(same) >= 1
    assert not np.allclose(z[0], z[diff[0]])
    pooled = to_numpy(
        difforge.open_dataset(summary.step("pooled").uri).to_arrow().column("cond_embedding")
    )
    assert pooled.shape == (12, 16)
