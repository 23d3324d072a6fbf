"""One resolver for every model reference a user writes, to a folder on this node.

- a local folder: as it is;
- a URI (`s3://bucket/models/vae`, any fsspec protocol): copied once into this node's cache in
  `DIFFORGE_HOME/cache/models/` (keyed by URI; a partial copy is never used);
- `models:/NAME/VERSION`, `models:/NAME@ALIAS` or `models:/NAME/latest`: a model registered
  in MLflow's registry (difforge registers every model it makes), downloaded into the same
  cache; `pin` fixes an alias or `latest` to its version number (at plan time, for lineage);
- a Hugging Face hub id (`stabilityai/sd-vae-ft-mse`): passed to `from_pretrained`, which
  downloads it; on a machine without the hub (`HF_HUB_OFFLINE=1`) a clear error says how to
  pass a local folder instead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path

from difforge.platform.errors import DifforgeError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?$")
_registry: str | None = None


def set_registry(uri: str | None) -> None:
    """The tracking server whose registry `models:/` references name (a pipeline's own
    `tracking.uri`; by default MLFLOW_TRACKING_URI, else difforge's local store)."""
    global _registry
    _registry = uri


def _client():
    from mlflow import MlflowClient

    from difforge.platform import settings

    tracking = _registry or settings.default_tracking_uri()
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or tracking
    return MlflowClient(tracking_uri=tracking, registry_uri=registry), tracking


def pin(ref: str) -> str:
    """`ref` with nothing left to move: a registry alias or `latest` becomes its version
    number, a hub id its current commit (`id@sha`). Other references are returned as they are
    (a folder's content is pinned by its weights' digest instead)."""
    if ref.startswith("models:/"):
        body = ref.removeprefix("models:/")
        name, _, version = body.partition("/")
        alias = None
        if "@" in name:
            name, _, alias = name.partition("@")
        elif version and version != "latest":
            return ref
        client, _ = _client()
        try:
            if alias:
                version = client.get_model_version_by_alias(name, alias).version
            else:
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise DifforgeError(f"{ref}: no versions of model '{name}' in the registry")
                version = str(max(int(v.version) for v in versions))
        except DifforgeError:
            raise
        except Exception as exc:  # MLflow's own: no such model or alias, no server
            raise DifforgeError(f"{ref}: not found in MLflow's model registry ({exc})") from None
        return f"models:/{name}/{version}"
    if HUB_ID.match(ref) and not os.path.isdir(os.path.expanduser(ref)) and "@" not in ref:
        _offline_error(ref, "model")
        return f"{ref}@{_hub_revision(ref)}"
    return ref


def _hub_revision(ref: str) -> str:
    """The commit of a hub model now; a hub that cannot be reached, or that has no such model,
    is a short error naming the address and what to do."""
    from huggingface_hub import constants, model_info
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return model_info(ref).sha
    except RepositoryNotFoundError:
        raise DifforgeError(
            f"model '{ref}': no such model on the Hugging Face hub ({constants.ENDPOINT}), "
            "or it is private (log in with `hf auth login`)"
        ) from None
    except Exception as exc:  # httpx's connect errors, timeouts, proxies, 5xx
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DifforgeError(
            f"model '{ref}': cannot reach the Hugging Face hub at {constants.ENDPOINT} ({why}). "
            f"Check the network (or HTTPS_PROXY); or download it where there is network "
            f"(`hf download {ref} --local-dir DIR`) and pass DIR, or set HF_HUB_OFFLINE=1 to "
            "use what the hub cache already holds"
        ) from None


def _offline_error(ref: str, what: str) -> None:
    if hub_offline():
        raise DifforgeError(
            f"{what} '{ref}': not a local folder, and the Hugging Face hub is offline "
            f"(HF_HUB_OFFLINE=1). Download it where there is network "
            f"(`hf download {ref} --local-dir DIR`) and pass DIR, or an s3:// copy of it"
        )


def _cache(ref: str) -> Path:
    from difforge.platform import settings

    return settings.home() / "cache" / "models" / hashlib.sha256(ref.encode()).hexdigest()[:16]


def local_copy(uri: str) -> str:
    """A model folder on this node: local paths as they are, remote ones copied once to the
    node's cache (keyed by URI)."""
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://")
    from difforge.platform.datasets import url_to_fs

    dest = _cache(uri)
    if not (dest / ".complete").exists():
        fs, path = url_to_fs(uri)
        if not fs.exists(path):
            raise DifforgeError(f"{uri}: no such model folder")
        dest.mkdir(parents=True, exist_ok=True)
        fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
        (dest / ".complete").touch()
    return str(dest)


def model_folder_in(path: str) -> str:
    """The model folder in what a registered version downloads to: an MLflow model (versions
    registered from this release on) keeps it as its artifact `model`; earlier versions are
    the folder itself."""
    inner = os.path.join(path, "artifacts", "model")
    if os.path.exists(os.path.join(path, "MLmodel")) and os.path.isdir(inner):
        return inner
    return path


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def resolve(ref: str, what: str = "model") -> str:
    """A local folder (or, online, a hub id) for `ref`; a DifforgeError naming `ref` and what to
    do when it cannot be had."""
    if ref.startswith("models:/"):
        ref = pin(ref)
        dest = _cache(ref)
        if not (dest / ".complete").exists():
            from mlflow.artifacts import download_artifacts

            name, _, version = ref.removeprefix("models:/").partition("/")
            dest.mkdir(parents=True, exist_ok=True)
            try:
                client, tracking = _client()
                source = client.get_model_version(name, version).source
                if source.startswith("models:/m-"):  # a logged model's id (MLflow's own
                    # registrations): where its files are, as this store knows it
                    model_id = source.removeprefix("models:/").split("/", 1)[0]
                    source = client.get_logged_model(model_id).artifact_location
                path = download_artifacts(
                    artifact_uri=source, dst_path=str(dest), tracking_uri=tracking
                )
            except Exception as exc:  # MLflow's own errors: no such model or version, no server
                raise DifforgeError(
                    f"{ref}: not found in MLflow's model registry ({exc})"
                ) from None
            (dest / ".complete").write_text(model_folder_in(path))
        return (dest / ".complete").read_text() or str(dest)
    if "://" in ref:
        return local_copy(ref)
    path = os.path.expanduser(ref)
    if os.path.isdir(path):
        return path
    if HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        _offline_error(ref, what)
        return ref
    raise DifforgeError(f"{what} '{ref}': no such folder")


def pinned_identity(ref: str, what: str = "model") -> dict[str, str]:
    """What a user-named model is, fixed at plan time (for a step's fingerprint): a registry
    alias or `latest` pinned to its version, a hub id to its commit, and a folder's (or a
    copied URI's) weights by their digest, so that changed weights recompute."""
    ref = pin(ref)
    local = ref.startswith("models:/") or "://" in ref or os.path.isdir(os.path.expanduser(ref))
    if not local:  # a hub id, pinned to its commit
        return {"model": ref}
    return {"model": ref, "weights_sha256": weights_sha256(resolve(ref, what))}


def weights_sha256(folder: str) -> str:
    """One digest over a folder's weight files (names and bytes, in name order)."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(WEIGHT_SUFFIXES))
    if not names:
        raise DifforgeError(f"{folder}: no weight files")
    stats = tuple(
        (n, os.stat(os.path.join(folder, n)).st_size, os.stat(os.path.join(folder, n)).st_mtime_ns)
        for n in names
    )
    return _digest(folder, stats)


@functools.lru_cache(maxsize=64)
def _digest(folder: str, stats: tuple) -> str:
    h = hashlib.sha256()
    for name, _, _ in stats:
        h.update(name.encode() + b"\0")
        with open(os.path.join(folder, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def model_of(ds) -> dict:
    """The row a model step (`train.*`, `distill.*`) wrote: `model_uri`, `kind` and its figures;
    a clear error for a dataset that is not one."""
    from difforge.platform import columns as C

    if C.MODEL_URI not in ds.manifest.column_names or not ds.num_rows:
        raise DifforgeError(f"{ds.uri}: not a model step's output (it has no {C.MODEL_URI})")
    return ds.to_arrow().slice(0, 1).to_pylist()[0]
