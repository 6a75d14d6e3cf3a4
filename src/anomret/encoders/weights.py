"""Where an encoder's weights come from: a registry tag, a local file, or (loudly) nowhere.

``pretrained`` in every encoder config is one of

- a **registry tag** (``openai`` for open_clip, ``lvd1689m`` for timm, ...), fetched from the Hugging
  Face hub on a machine with internet, or read from the hub cache (``HF_HOME`` / ``encoder.cache_dir``);
- a **local file** (``.pth``, ``.pt``, ``.bin``, ``.safetensors``); torch files are read with
  ``weights_only=True``, so nothing is ever unpickled;
- ``null``: random weights, for tests and speed measurements only, announced with a WARNING.

A tag that cannot be fetched is an error raised within seconds, never a silent random model: the hub
client's own retries take tens of seconds per file when the network is down, so the cache is checked
first and the network is probed once with a short timeout before any download starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_FINGERPRINT_CHUNK = 1 << 20  # hash the first and last MiB: cheap, and catches any re-export
_PROBE_TIMEOUT_S = 5.0


class WeightsUnavailableError(RuntimeError):
    """Requested pretrained weights cannot be loaded (offline, missing file, unknown tag)."""


@dataclass(frozen=True)
class WeightsSource:
    """A resolved ``pretrained`` value.

    Attributes:
        kind: ``"random"``, ``"tag"`` or ``"file"``.
        value: the tag or the absolute file path; ``None`` for random weights.
        seed: the seed random initialisation runs under (also used for random parts of pretrained
            models, e.g. heads that the checkpoint does not cover).
    """

    kind: str
    value: str | None
    seed: int = 0

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    def identity(self) -> dict[str, Any]:
        """JSON-able identity of the weights, for encoder fingerprints."""
        if self.kind == "random":
            return {"kind": "random", "seed": self.seed}
        if self.kind == "tag":
            return {"kind": "tag", "tag": self.value}
        return {"kind": "file", **file_identity(Path(str(self.value)))}


def resolve_weights(
    pretrained: str | os.PathLike[str] | None, *, encoder_name: str, seed: int = 0
) -> WeightsSource:
    """Classify ``pretrained`` as random, a local file or a registry tag.

    Raises:
        WeightsUnavailableError: ``pretrained`` names a file that does not exist or is not a weights file.
    """
    if pretrained is None or str(pretrained).strip().lower() in ("", "null", "none"):
        log.warning(
            "encoder %s uses RANDOM weights (pretrained: null) — results are meaningless except for tests "
            "and speed measurements",
            encoder_name,
        )
        return WeightsSource("random", None, seed)
    text = str(pretrained).strip()
    # Hub repo ids (``timm/vit_...``) contain a slash too: only a weights suffix or an explicit
    # absolute/relative/home path makes a file, so a tag is never mistaken for one (or vice versa).
    is_path = text.endswith(WEIGHT_FILE_SUFFIXES) or text.startswith(("/", "./", "../", "~"))
    if is_path:
        path = Path(os.path.expanduser(text)).resolve()
        if not path.is_file():
            raise WeightsUnavailableError(f"encoder {encoder_name}: weights file {path} does not exist")
        if not path.name.endswith(WEIGHT_FILE_SUFFIXES):
            raise WeightsUnavailableError(
                f"encoder {encoder_name}: {path} is not a weights file (expected one of {WEIGHT_FILE_SUFFIXES})"
            )
        return WeightsSource("file", str(path), seed)
    return WeightsSource("tag", text, seed)


def file_identity(path: Path) -> dict[str, Any]:
    """Path, size and a sha256 over the first and last MiB of a weights file."""
    size = path.stat().st_size
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        sha.update(handle.read(_FINGERPRINT_CHUNK))
        if size > _FINGERPRINT_CHUNK:
            handle.seek(max(size - _FINGERPRINT_CHUNK, _FINGERPRINT_CHUNK))
            sha.update(handle.read())
    return {"path": str(path), "size": size, "sha256_head_tail": sha.hexdigest()}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (model construction) under a fixed seed without touching the global RNG state."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _offline_hint(tag: str, encoder_name: str) -> str:
    return (
        f"encoder {encoder_name}: pretrained weights '{tag}' cannot be fetched. Either pass a local file "
        f"(encoder.pretrained=/path/to/weights.safetensors) or point to a Hugging Face cache that holds them "
        f"(HF_HOME=/path/to/hf_home or encoder.cache_dir=/path/to/hub_cache)."
    )


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off by the environment (``HF_HUB_OFFLINE``)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def probe_hub(timeout_s: float = _PROBE_TIMEOUT_S) -> str | None:
    """One request to the hub endpoint without retries; the reason it failed, or ``None`` if it answered."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)
    except Exception as error:  # any transport error means "no hub": DNS, refused, timeout, proxy
        return f"{type(error).__name__}: {error}"
    return None


def fetch_hub_file(
    repo_id: str,
    filenames: Sequence[str],
    *,
    tag: str,
    encoder_name: str,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Local path of the first of ``filenames`` in ``repo_id``: from the cache, else downloaded.

    Raises:
        WeightsUnavailableError: within seconds when the hub is offline or unreachable and the cache
            does not hold the file; the message names the tag and how to pass weights offline.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cache = str(cache_dir) if cache_dir is not None else None
    for filename in filenames:
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache)
        if isinstance(cached, str) and os.path.isfile(cached):
            log.info("encoder %s: weights '%s' from the hub cache (%s)", encoder_name, tag, cached)
            return Path(cached)
    hint = _offline_hint(tag, encoder_name)
    where = f"hub repo {repo_id}, files {list(filenames)}"
    if hub_offline():
        raise WeightsUnavailableError(
            f"{hint} HF_HUB_OFFLINE is set and the cache does not hold them ({where})."
        )
    reason = probe_hub()
    if reason is not None:
        raise WeightsUnavailableError(f"{hint} The hub is unreachable ({reason}); tried {where}.")
    errors = []
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, cache_dir=cache))
        except Exception as error:  # missing file variant: try the next name, report all if none works
            errors.append(f"{filename}: {type(error).__name__}: {error}")
    raise WeightsUnavailableError(f"{hint} Download failed from {where}: {'; '.join(errors)}")


def fetch_url_file(
    url: str, *, tag: str, encoder_name: str, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Download a plain-URL checkpoint through torch's hub cache, failing fast when offline."""
    from urllib.parse import urlparse

    filename = os.path.basename(urlparse(url).path)
    directory = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    target = directory / filename
    if target.is_file():
        return target
    hint = _offline_hint(tag, encoder_name)
    if hub_offline():
        raise WeightsUnavailableError(f"{hint} HF_HUB_OFFLINE is set and {target} is not cached (url {url}).")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except Exception as error:
        raise WeightsUnavailableError(
            f"{hint} Download of {url} failed: {type(error).__name__}: {error}"
        ) from error
    return target
