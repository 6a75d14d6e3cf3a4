"""Model packages: one self-contained folder that scores images on any machine, with no run directory.

``python -m anomret.export RUN_DIR OUT`` writes::

    OUT/manifest.json      format, versions, method, encoder identity, and the sha256 of every file below
    OUT/config.yaml        the run's model settings (encoder, model, memory, retrieval, data), paths relative
    OUT/bank.safetensors   the memory bank
    OUT/trained.ckpt       the trained heads/prompts and their identity (methods that train), weights only
    OUT/thresholds.json    the calibrated thresholds and the model identity they are valid with
    OUT/weights/...        the encoder weights, on request (a Hugging Face cache layout, read offline)
    OUT/model.onnx         the encoder and scoring head as one ONNX graph, on request

A package is checked when it is opened: format, every file's digest, then, once built through
:class:`~anomret.assembly.Assembly`, the encoder's and the model's identities against the manifest and the
thresholds. Anything that does not match is refused with what differs. Nothing is unpickled.
:func:`load` returns a :class:`Detector`, the one object the Python API, the scoring service and the
ONNX export use: its :meth:`Detector.predict` runs the model's own ``forward`` on in-memory images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

import anomret
from anomret.config import resolved_dict
from anomret.files import write_text_atomic

log = logging.getLogger(__name__)

FORMAT = "anomret.package/1"
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
BANK = "bank.safetensors"
TRAINED = "trained.ckpt"
THRESHOLDS = "thresholds.json"
WEIGHTS = "weights"
ONNX = "model.onnx"

# The settings of a model; everything else in a run's config (paths, trainer, loggers, data sources) is
# the run's own business.
MODEL_GROUPS = ("encoder", "model", "memory", "retrieval")
_KEPT = (*MODEL_GROUPS, "data", "features", "calibration", "ckpt_path", "seed")


class PackageError(ValueError):
    """A model package that cannot be written or used as it is."""


# ------------------------------------------------------------------------------------------- digests
def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _versions() -> dict[str, str]:
    import torch

    return {"anomret": anomret.__version__, "torch": torch.__version__.split("+")[0]}


# -------------------------------------------------------------------------------------------- export
def _run_files(run_dir: Path) -> tuple[DictConfig, dict[str, Any]]:
    if not run_dir.is_dir():
        raise PackageError(
            f"run directory {run_dir} does not exist. Fix: pass the directory of a train or eval run"
        )
    missing = [name for name in ("config.yaml", "artifacts.json") if not (run_dir / name).is_file()]
    if missing:
        raise PackageError(
            f"{run_dir} is not a finished run directory (no {', '.join(missing)}). Fix: pass the directory "
            "a train or eval run printed at its end (logs/<task>/<train|eval>/<time>)."
        )
    artifacts = json.loads((run_dir / "artifacts.json").read_text())
    if not artifacts.get("thresholds"):
        raise PackageError(
            f"{run_dir} has no thresholds (it ran without calibration=), and a package decides, not only "
            "scores. Fix: evaluate the model again with a calibration, e.g. python -m anomret.eval <the "
            "run's overrides> calibration=normal_folder calibration.folder=GOOD_IMAGES (or train with "
            "calibration=normal_holdout), then export that run."
        )
    for key in ("bank", "checkpoint", "thresholds"):
        if artifacts.get(key) and not Path(artifacts[key]).is_file():
            raise PackageError(f"{run_dir}'s {key} {artifacts[key]} no longer exists; export needs it")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert isinstance(cfg, DictConfig)  # a run's config.yaml is the mapping Hydra composed
    return cfg, artifacts


def _model_config(run_cfg: DictConfig) -> DictConfig:
    kept = {key: run_cfg.get(key) for key in _KEPT if key in run_cfg}
    cfg = OmegaConf.create(resolved_dict(OmegaConf.create(kept)))
    cfg.features = {"enabled": False, "dir": None, "dtype": "fp16"}  # in-memory images: no feature store
    cfg.data.num_workers = 0
    return cfg


def _weights_source(encoder_cfg: DictConfig) -> tuple[str, str, str] | None:
    """``(repo_id, filename, cached path)`` of a tagged encoder's weights in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    tag = str(encoder_cfg.get("pretrained"))
    target = str(encoder_cfg.get("_target_", ""))
    candidates: list[tuple[str, str]] = []
    if target.endswith("CLIPEncoder"):
        import open_clip

        hub = str(open_clip.get_pretrained_cfg(str(encoder_cfg.arch), tag).get("hf_hub", ""))
        repo, _, name = (
            hub.rstrip("/").rpartition("/") if not hub.endswith("/") else (hub.rstrip("/"), "", "")
        )
        names = [name] if name else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        candidates = [(repo, n) for n in names if repo]
    else:
        import timm

        if "/" in tag:
            candidates = [(tag, n) for n in ("model.safetensors", "pytorch_model.bin")]
        else:
            pretrained = timm.models.get_pretrained_cfg(f"{encoder_cfg.model_name}.{tag}")
            if pretrained is not None and pretrained.hf_hub_id:
                names = [pretrained.hf_hub_filename] if pretrained.hf_hub_filename else []
                names = names or ["model.safetensors", "pytorch_model.bin"]
                candidates = [(pretrained.hf_hub_id, n) for n in names]
    cache = encoder_cfg.get("cache_dir")
    for repo, name in candidates:
        found = try_to_load_from_cache(repo, name, cache_dir=cache)
        if isinstance(found, str) and os.path.isfile(found):
            return repo, name, found
    return None


def _copy_weights(cfg: DictConfig, staging: Path) -> dict[str, Any]:
    """The encoder's weights file into the package, laid out as a Hugging Face cache (so the encoder is
    built from its tag, with its identity unchanged, offline)."""
    pretrained = cfg.encoder.get("pretrained")
    if pretrained in (None, "", "null"):
        return {"kind": "random", "note": "random weights are rebuilt from their seed; nothing to include"}
    text = str(pretrained)
    if text.endswith((".pth", ".pt", ".bin", ".safetensors")) or text.startswith(("/", "./", "../", "~")):
        raise PackageError(
            f"--weights includes tagged weights (encoder.pretrained=openai, lvd1689m, ...); this model reads "
            f"the file {text}, whose identity is its path, so a copy would be another encoder. Fix: export "
            f"without --weights and keep the file at {text} on the machine that loads the package."
        )
    source = _weights_source(cfg.encoder)
    if source is None:
        raise PackageError(
            f"--weights: the weights of tag '{text}' are not in the Hugging Face cache of this machine. "
            "Fix: run the model once here with the hub reachable (or HF_HOME pointing at a filled cache)."
        )
    repo, name, cached = source
    snapshot = staging / WEIGHTS / f"models--{repo.replace('/', '--')}" / "snapshots" / "package"
    snapshot.mkdir(parents=True)
    shutil.copyfile(cached, snapshot / name)
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("package")
    return {"kind": "tag", "tag": text, "repo": repo, "file": name}


def export_package(
    run_dir: str | Path,
    out: str | Path,
    *,
    weights: bool = False,
    onnx: bool = False,
    force: bool = False,
) -> Path:
    """Write the model of ``run_dir`` (bank, trained parts, thresholds, settings) into the folder ``out``."""
    run_dir, out = Path(run_dir).expanduser().resolve(), Path(out).expanduser().resolve()
    if out.exists() and not force:
        raise PackageError(f"{out} already exists. Fix: choose another folder, or pass --force to replace it")
    if out == run_dir or run_dir in out.parents:
        raise PackageError(f"write the package outside the run directory {run_dir}")
    run_cfg, artifacts = _run_files(run_dir)
    cfg = _model_config(run_cfg)
    cfg.memory.path = artifacts["bank"]
    cfg.ckpt_path = artifacts.get("checkpoint")
    cfg.calibration = {"thresholds": artifacts["thresholds"]}

    # The model is built and checked as it will be loaded: bank, checkpoint and thresholds must fit it.
    detector = Detector.build(cfg, where=f"the run {run_dir}", device="cpu")
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        shutil.copyfile(artifacts["bank"], staging / BANK)
        if cfg.ckpt_path:
            _write_trained(Path(cfg.ckpt_path), staging / TRAINED)
        detector.thresholds.save(staging / THRESHOLDS)
        package_cfg = cfg.copy()
        package_cfg.memory.path = BANK
        package_cfg.ckpt_path = TRAINED if cfg.ckpt_path else None
        package_cfg.calibration = {"thresholds": THRESHOLDS}
        weights_info = _copy_weights(cfg, staging) if weights else None
        if weights_info and weights_info["kind"] == "tag":
            package_cfg.encoder.cache_dir = WEIGHTS
        write_text_atomic(staging / CONFIG, OmegaConf.to_yaml(package_cfg))
        onnx_info = None
        if onnx:
            from anomret.onnx_export import export_onnx

            onnx_info = export_onnx(detector, staging / ONNX)
        manifest = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": _versions(),
            "method": detector.model.method,
            "encoder": detector.model.encoder.fingerprint(),
            "model": detector.identity,
            "source_run": str(run_dir),
            "weights": weights_info,
            "onnx": onnx_info,
            "files": {
                path.relative_to(staging).as_posix(): {
                    "sha256": file_sha256(path),
                    "bytes": path.stat().st_size,
                }
                for path in sorted(staging.rglob("*"))
                if path.is_file()
            },
        }
        write_text_atomic(staging / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("model package written to %s", out)
    return out


def _write_trained(checkpoint: Path, target: Path) -> None:
    """The trained state and its identity only (no optimiser state), read and written without pickle."""
    import torch

    from anomret.models.base import CHECKPOINT_KEY

    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    torch.save({CHECKPOINT_KEY: raw[CHECKPOINT_KEY], "state_dict": raw["state_dict"]}, target)


# ---------------------------------------------------------------------------------------------- open
@dataclass
class PackageContents:
    root: Path
    manifest: dict[str, Any]
    cfg: DictConfig  # the model settings, with the package's files as absolute paths


def open_package(path: str | Path) -> PackageContents:
    """Read and verify a package folder (format and every file's digest); nothing is built yet."""
    root = Path(path).expanduser().resolve()
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        hint = (
            " (it is a run directory: export it first with python -m anomret.export RUN OUT)"
            if (root / "artifacts.json").is_file()
            else ""
        )
        raise PackageError(f"{root} is not a model package: no {MANIFEST}{hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as error:
        raise PackageError(
            f"{manifest_path} is not readable JSON ({error}): the package is damaged"
        ) from None
    if manifest.get("format") != FORMAT:
        raise PackageError(
            f"{root} is a package of format {manifest.get('format')!r}; this anomret "
            f"({anomret.__version__}) reads {FORMAT}. Fix: load it with the anomret version that wrote it "
            f"({manifest.get('versions', {}).get('anomret', '?')}), or export the run again."
        )
    files = manifest.get("files") or {}
    for required in (CONFIG, BANK, THRESHOLDS):
        if required not in files:
            raise PackageError(f"{root}'s manifest lists no {required}: the package is incomplete")
    for name, entry in files.items():
        target = root / name
        if not target.is_file():
            raise PackageError(f"{root} lacks {name}, which its manifest lists: the package is incomplete")
        if target.stat().st_size != entry.get("bytes") or file_sha256(target) != entry.get("sha256"):
            raise PackageError(
                f"{target} does not match the package's manifest (its digest differs): the file was changed "
                "or damaged after export. Fix: copy the package again, or export the run again."
            )
    versions, ours = manifest.get("versions") or {}, _versions()
    changed = {key: (versions.get(key), value) for key, value in ours.items() if versions.get(key) != value}
    if changed:
        log.warning(
            "package %s was written with %s; scores can differ in the last digits",
            root,
            ", ".join(f"{key} {old} (here {new})" for key, (old, new) in changed.items()),
        )
    cfg = OmegaConf.load(root / CONFIG)
    assert isinstance(cfg, DictConfig)  # written by export as a mapping, and its digest checked above
    cfg.memory.path = str(root / BANK)
    cfg.ckpt_path = str(root / TRAINED) if cfg.get("ckpt_path") else None
    cfg.calibration = {"thresholds": str(root / THRESHOLDS)}
    if cfg.encoder.get("cache_dir") == WEIGHTS:
        cfg.encoder.cache_dir = str(root / WEIGHTS)
    return PackageContents(root, manifest, cfg)


def with_package(cfg: DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """A prediction config whose model is the package's (``package=DIR``): its model groups, checkpoint
    and thresholds replace the composed ones; model settings given on the command line are refused."""
    contents = open_package(cfg.package)
    fixed = [
        o for o in overrides if o.lstrip("+~").split("=", 1)[0].split(".")[0] in (*MODEL_GROUPS, "ckpt_path")
    ]
    fixed += [o for o in overrides if o.lstrip("+~").startswith(("experiment=", "method=", "calibration"))]
    if fixed:
        raise PackageError(
            f"package= fixes the model, its bank and its thresholds; {' '.join(fixed)} would change them. "
            "Fix: drop those settings (or export a package of the model you want)."
        )
    merged = cfg.copy()
    with_model = OmegaConf.masked_copy(contents.cfg, [*MODEL_GROUPS, "ckpt_path", "calibration"])
    for key in with_model:
        merged[key] = with_model[key]
    merged.data.mask_size = contents.cfg.data.get("mask_size")
    return merged


# -------------------------------------------------------------------------------------------- detect
@dataclass
class Prediction:
    """The decision on one image.

    Attributes:
        score: the image score.
        label: ``anomalous`` or ``normal`` (``score >= threshold``).
        threshold: the image threshold.
        anomaly_map: float32 ``[H, W]`` on the map's grid (the encoder's view of the image).
        mask: bool ``[H, W]``, the predicted defect pixels (``None`` without a pixel threshold).
        pixel_threshold: the map threshold of ``mask``.
        normalized_score: anomalib's normalised score (threshold at 0.5), when the thresholds normalise.
    """

    score: float
    label: str
    threshold: float
    anomaly_map: np.ndarray
    mask: np.ndarray | None
    pixel_threshold: float | None
    normalized_score: float | None = None

    @property
    def is_anomalous(self) -> bool:
        return self.label == "anomalous"


class Detector:
    """A loaded model with its thresholds: :meth:`predict` decides on in-memory images.

    Built from a package by :func:`load`, or from a run by the export (which checks it the same way).
    Images go through the encoder's preprocessing (the transforms of the datasets) into an unlabelled
    :class:`~anomret.data.batch.Batch` and the model's own ``forward``.
    """

    def __init__(self, parts: Any, thresholds: Any, identity: dict[str, str], device: str) -> None:
        from anomret.data.transforms import ImageTransform

        self.parts = parts
        self.model = parts.model
        self.thresholds = thresholds
        self.identity = identity
        self.device = device
        self.transform = ImageTransform(parts.encoder.preprocess)
        self.batch_size = int(parts.cfg.data.get("eval_batch_size") or parts.cfg.data.get("batch_size") or 8)
        self.package: PackageContents | None = None

    @classmethod
    def build(cls, cfg: DictConfig, *, where: str, device: str | None = None) -> Detector:
        import torch

        from anomret.assembly import Assembly
        from anomret.contracts import Purpose
        from anomret.decisions.calibration import model_identity
        from anomret.decisions.record import Thresholds

        parts = Assembly.build(cfg, Purpose.SERVE)
        parts.attach_memory()
        parts.fit_or_restore()
        identity = model_identity(cfg, parts.model)
        thresholds = Thresholds.load(cfg.calibration.thresholds)
        thresholds.check_model(identity, f"the thresholds of {where}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        parts.model.to(device)
        parts.model.eval()
        parts.model.on_predict_start()  # the bank follows the model to its device
        return cls(parts, thresholds, identity, device)

    def preprocess(self, image: Any) -> Any:
        """One image (PIL, or a uint8 array ``[H, W]`` / ``[H, W, 3|4]``) → the encoder's input tensor."""
        return self.transform(as_rgb(image))

    def predict_tensors(self, inputs: Sequence[Any]) -> list[Prediction]:
        """Decisions on preprocessed images (:meth:`preprocess`), in one forward pass."""
        import torch

        from anomret.data.batch import Batch

        batch = Batch.unlabelled(torch.arange(len(inputs)), image=torch.stack(list(inputs)))
        batch = self.model.transfer_batch_to_device(batch, torch.device(self.device), 0)
        with torch.inference_mode():
            scored = self.model(batch)
        maps = scored.anomaly_map.detach().float().cpu().numpy()
        scores = scored.image_score.detach().double().cpu().tolist()
        thresholds = self.thresholds
        return [
            Prediction(
                score=score,
                label=thresholds.label(score),
                threshold=thresholds.image,
                anomaly_map=anomaly_map,
                mask=thresholds.mask(anomaly_map),
                pixel_threshold=thresholds.pixel,
                normalized_score=thresholds.normalized_score(score) if thresholds.normalize else None,
            )
            for score, anomaly_map in zip(scores, maps, strict=True)
        ]

    def predict(self, images: Any, batch_size: int | None = None) -> list[Prediction]:
        """Decisions on one image or a sequence of images (PIL images or uint8 arrays), in order."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        size = batch_size or self.batch_size
        results: list[Prediction] = []
        for start in range(0, len(items), size):
            results += self.predict_tensors([self.preprocess(image) for image in items[start : start + size]])
        return results


def as_rgb(image: Any) -> np.ndarray:
    """A PIL image or array as uint8 ``[H, W, 3]`` RGB, by the rules image files are read with."""
    from PIL import Image

    from anomret.data.io import _to_rgb_uint8

    if isinstance(image, Image.Image):
        image.load()
        return _to_rgb_uint8(image)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(
            f"image arrays must be uint8 (0-255), got {array.dtype}; convert or pass a PIL image"
        )
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=-1)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return np.ascontiguousarray(array[..., :3])
    raise ValueError(f"image arrays must be [H, W], [H, W, 3] or [H, W, 4], got shape {array.shape}")


def load(path: str | Path, device: str | None = None) -> Detector:
    """Open, verify and build the model package at ``path`` (see the module docstring)."""
    contents = open_package(path)
    detector = Detector.build(contents.cfg, where=f"package {contents.root}", device=device)
    built = json.loads(json.dumps(detector.model.encoder.fingerprint(), default=str))
    recorded = contents.manifest.get("encoder") or {}
    if built != recorded:
        differs = sorted(k for k in set(built) | set(recorded) if built.get(k) != recorded.get(k))
        raise PackageError(
            f"package {contents.root} was made with another encoder than the one built here (differs in "
            f"{', '.join(differs)}). Fix: provide the same weights (a package exported with --weights "
            "carries tagged weights)."
        )
    if detector.identity != contents.manifest.get("model"):
        raise PackageError(f"package {contents.root}: the model built here differs from the one exported")
    detector.package = contents
    return detector
