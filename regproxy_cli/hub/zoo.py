"""The authors' released models, and resolving a ``--model`` spec (directory, file, Hub repo id or zoo name).

A zoo model is looked up, in order: converted weights already in the local cache; the Hugging Face Hub
repo ``regproxy/<name>`` at the entry's pinned revision (through huggingface_hub and its cache); the
authors' original release (Google Drive), downloaded once, checked against its sha256 (pinned, or recorded
at the first download) and converted on the fly into the local cache. Only a Hub that does not have the
model (or is offline with nothing cached) falls back to the authors' release; any other Hub error is
reported. Offline with nothing cached, the error says what to fetch and where to put it.

Building a model needs torch; finding one does not: the modules that build, convert or run models are imported
where a model is built, so :func:`model_config` (a model's classes and protocol) costs no torch import (Ray's
driver plans a run with it while its actors load the model).
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import constants

from regproxy_cli.classes import ADE20K_CLASSES, ADE20K_PALETTE, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
from regproxy_cli.constants import cache_dir  # converted zoo models and the authors' downloads live here
from regproxy_cli.errors import RegproxyError, one_line
from regproxy_cli.hub.remote import HubModelMissing, hub_snapshot
from regproxy_cli.model.config import CONFIG_NAME, ModelConfig, read_model_config

if TYPE_CHECKING:
    from torch import nn

HUB_ORG = "regproxy"
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
AUTHORS_URL = "https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t"
AUTHORS_PAGE = "https://drive.google.com/file/d/{id}/view"
HUB_REVISION = "v1"  # the tag every zoo repo is published under (until a model is re-released)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    backbone: str
    dataset: str
    m: int
    crop: int
    drive_id: str
    miou: float  # single scale, the paper's Tables 4-5
    miou_ms: float  # multi-scale + flip
    hub_revision: str = HUB_REVISION  # the Hub tag (or commit) to load, so a later push cannot change the model
    # sha256 of the authors' .pth; None until someone checks it from a trusted copy (Google Drive has no
    # published hashes), and then the first download's hash is recorded beside the file and trusted
    sha256: str | None = None

    @property
    def hub_repo(self) -> str:
        return f"{HUB_ORG}/{self.name}"

    @property
    def authors_url(self) -> str:
        return AUTHORS_PAGE.format(id=self.drive_id)

    def config(self) -> ModelConfig:
        ade = self.dataset == "ade20k"
        classes = list(ADE20K_CLASSES if ade else CITYSCAPES_CLASSES)
        return ModelConfig(
            backbone=self.backbone, num_classes=len(classes), m=self.m, crop_size=self.crop, classes=classes,
            palette=[list(c) for c in (ADE20K_PALETTE if ade else CITYSCAPES_PALETTE)],
            inference_mode="slide", window_stride=self.crop if ade else 512,
            test_scale=(2048, self.crop) if ade else (2048, 1024), dataset=self.dataset,
            metrics={"mIoU": self.miou, "mIoU (ms+flip)": self.miou_ms},
            source=f"the authors' release ({self.authors_url}), converted",
        )


ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("t16-ade", "t16", "ade20k", 5, 512, "1sq3g3JcQ2NSJch-MvlvvnHFFeN-MU_DE", 42.1, 43.1),
    ZooEntry("s16-ade", "s16", "ade20k", 5, 512, "1pJD4-xRiVj36SplzNhonIuNHd82A05GX", 47.6, 48.5),
    ZooEntry("r26-s32-ade", "r26-s32", "ade20k", 0, 512, "1n51emyE6EWAuoBq_P8cViFtNmf9dDxzV", 47.8, 49.1),
    ZooEntry("b16-ade", "b16", "ade20k", 5, 512, "1PMVQv8cvaZmV16ARdbuQSv6-3DDeLXPy", 49.8, 50.5),
    ZooEntry("r50-l32-ade", "r50-l32", "ade20k", 0, 640, "1Kk0ABYbMOwvomrU4FaDl4Ban2XBhcxjU", 51.0, 51.7),
    ZooEntry("l16-ade", "l16", "ade20k", 10, 640, "1t6Un6m-1xdoir33TG7IAiilaLamgioFZ", 52.9, 53.4),
    ZooEntry("t16-city", "t16", "cityscapes", 3, 768, "1N4Ef8kfMeAGhcI3JLoPGd_XfBBArdF8Y", 76.5, 77.7),
    ZooEntry("s16-city", "s16", "cityscapes", 3, 768, "11GBWhCVAXEAO_iS_MFEecndK_IF2ik4Y", 79.8, 81.5),
    ZooEntry("b16-city", "b16", "cityscapes", 3, 768, "10yTMd5j6xoPYcVSMzhkL5S_Hh9JQ4b64", 81.0, 82.2),
    ZooEntry("l16-city", "l16", "cityscapes", 6, 768, "1EBfO9M8ZYB_Eye4WpHqMs9v2WrRzbORI", 81.4, 82.7),
]}


def _offline() -> bool:
    return constants.is_offline_mode()


def load_model(spec: str | os.PathLike, *, provider: str | None = None) -> nn.Module:
    """A model in eval mode from a local directory or file, a zoo name, or a Hub repo id (``owner/name``).

    The returned model carries its :class:`ModelConfig` (``model.config``: classes, palette,
    normalisation, inference protocol); :func:`regproxy_cli.predict_labels` segments images with it.
    A spec that names a missing path under an existing local folder (``runs/x`` when ``runs/`` exists) is an
    error, not a Hub lookup: a Hub repo id never collides with a folder of yours. An exported ``.onnx`` file runs
    through onnxruntime on ``provider`` (:class:`~regproxy_cli.onnx.runtime.OnnxModel`; cpu, openvino, cuda or
    tensorrt); any other model takes no provider but ``cpu``.
    """
    from regproxy_cli.hub.checkpoint import load_pretrained

    kind, target = _locate(spec, provider)
    if kind == "onnx":
        from regproxy_cli.onnx.runtime import load_onnx_model

        return load_onnx_model(target, provider=provider)
    if kind == "directory":
        return load_pretrained(target)
    if kind == "authors":
        return _load_authors(target)
    if kind == "zoo":
        return _load_zoo(target)
    return load_pretrained(hub_snapshot(target))


def model_config(spec: str | os.PathLike, *, provider: str | None = None) -> ModelConfig | None:
    """The config of the model ``spec`` names, found as :func:`load_model` finds it (and with its errors), read
    without building the model or importing torch: a model directory or its weights file, a Hub repo (downloaded
    into the Hugging Face cache when it is not there), a zoo model already converted or in that cache. None where
    only loading tells: an ``.onnx`` file, an authors' ``.pth``, a zoo model still to be converted from the authors'
    release."""
    kind, target = _locate(spec, provider)
    if kind == "directory":
        return read_model_config(target)
    if kind == "hub":
        return read_model_config(hub_snapshot(target))
    if kind == "zoo":
        directory = _zoo_directory(target)
        return read_model_config(directory) if directory is not None else None
    return None


def _locate(spec: str | os.PathLike, provider: str | None) -> tuple[str, Path | ZooEntry | str]:
    """Where ``spec`` is: ("onnx", file), ("directory", model directory), ("authors", .pth file), ("zoo", entry)
    or ("hub", repo id); one error line for a spec that names nothing."""
    path = Path(spec).expanduser()
    onnx_file = path.suffix.lower() == ".onnx"
    if onnx_file and path.is_file():
        return "onnx", path
    if provider not in (None, "cpu") and not onnx_file:  # a missing .onnx is reported below
        raise RegproxyError(f"provider {provider!r} is for ONNX models (.onnx files); {spec} is a PyTorch model: "
                            "export it with `regproxy export`, or leave the provider out")
    if path.is_dir():
        return "directory", path
    if path.exists():
        if path.suffix != ".safetensors":
            return "authors", path
        if not (path.parent / CONFIG_NAME).is_file():
            raise RegproxyError(f"{path}: a weights file needs its {CONFIG_NAME} beside it")
        return "directory", path.parent
    name = str(spec)
    if name in ZOO:
        return "zoo", ZOO[name]
    looks_local = name.startswith((".", "/", "~")) or path.suffix in (".pth", ".pt", ".safetensors", ".onnx") or (
        len(path.parts) > 1 and Path(path.parts[0]).is_dir())
    if looks_local:
        raise RegproxyError(f"{name}: no such file or directory")
    if _HUB_REPO_ID.fullmatch(name):
        return "hub", name
    raise RegproxyError(
        f"unknown model {name!r}: not an existing file or directory, a zoo name ({', '.join(ZOO)}) "
        f"or a Hugging Face Hub repo id (owner/name)"
    )


def zoo_configs() -> dict[str, ModelConfig]:
    """Every zoo entry's config by name: how an authors' checkpoint without an embedded config is tested."""
    return {name: entry.config() for name, entry in ZOO.items()}


def _load_authors(path: Path) -> nn.Module:
    """An authors' .pth: architecture read off the weights, test protocol from its config or the zoo."""
    from regproxy_cli.hub.convert import UnknownProtocolError, convert_authors_checkpoint

    try:
        return convert_authors_checkpoint(path, known=zoo_configs())
    except UnknownProtocolError as exc:
        raise RegproxyError(
            f"{exc.path}: {exc.reason}: run `regproxy convert {exc.path} DIR {' '.join(exc.options)}` "
            f"(or `--zoo NAME`) and pass --model DIR"
        ) from None


def _zoo_directory(entry: ZooEntry) -> Path | None:
    """A zoo model's directory: converted in the local cache, else from the Hub (its cache, or downloaded); None
    when the Hub does not have it (or is offline or unreachable with nothing cached): the authors' release has it."""
    converted = _converted_path(entry)
    if (converted / CONFIG_NAME).is_file():
        return converted
    try:
        return hub_snapshot(entry.hub_repo, revision=entry.hub_revision)
    except HubModelMissing:
        return None


def _load_zoo(entry: ZooEntry) -> nn.Module:
    from regproxy_cli.hub.checkpoint import load_pretrained, save_pretrained
    from regproxy_cli.hub.convert import convert_authors_checkpoint

    directory = _zoo_directory(entry)
    if directory is not None:
        return load_pretrained(directory)
    original = _authors_checkpoint(entry)
    model = convert_authors_checkpoint(original, entry.config())
    save_pretrained(model, _converted_path(entry))
    return model


def _converted_path(entry: ZooEntry) -> Path:
    """Where a zoo entry converted from the authors' release is kept in the local cache."""
    return cache_dir() / "converted" / entry.name


def authors_checkpoint_path(entry: ZooEntry) -> Path:
    """Where a zoo entry's authors' ``.pth`` is kept in the local cache: downloaded there, or put there by hand."""
    return cache_dir() / "authors" / f"{entry.name}.pth"


def convert_cached_releases(directory: str | os.PathLike) -> dict[str, Path | None]:
    """Convert every zoo entry whose authors' ``.pth`` is in the local cache into ``directory/<name>/``.

    For maintainers mirroring the zoo: each file is checked as ``--model NAME`` checks it (sha256, pinned or
    recorded at first use) and converted with the entry's config. Returns every entry's model directory by
    name, None where its ``.pth`` is not in the cache (:func:`authors_checkpoint_path` says where it goes).
    """
    from regproxy_cli.hub.checkpoint import save_pretrained
    from regproxy_cli.hub.convert import convert_authors_checkpoint

    directory = Path(directory)
    written: dict[str, Path | None] = {}
    for name, entry in ZOO.items():
        if not authors_checkpoint_path(entry).is_file():
            written[name] = None
            continue
        model = convert_authors_checkpoint(_authors_checkpoint(entry), entry.config())
        written[name] = save_pretrained(model, directory / name)
        del model  # one full-size model in memory at a time
    return written


def _authors_checkpoint(entry: ZooEntry) -> Path:
    """The authors' .pth of a zoo entry in the local cache: downloaded once, then checked before every use.

    Its sha256 must be the entry's pinned one, or else the one recorded beside it (``<name>.pth.sha256``) at
    the first download (trust on first use): a changed file is removed and reported, never converted.
    """
    original = authors_checkpoint_path(entry)
    record = original.with_name(original.name + ".sha256")
    expected = entry.sha256 or _recorded_sha256(record)
    if original.is_file():
        digest = sha256_of(original)
        if expected is not None and digest != expected:
            original.unlink()
            # the record stays: the next download must match the first one (delete it if the authors re-released)
            raise RegproxyError(
                f"{original} has sha256 {digest}, not the {'pinned' if entry.sha256 else 'recorded'} {expected}: "
                f"removed it; download it again from {entry.authors_url}"
            )
    else:
        if _offline():
            raise RegproxyError(
                f"{entry.name} is not cached and the network is off (HF_HUB_OFFLINE): download the authors' "
                f"checkpoint from {entry.authors_url} to {original} (or run `hf download {entry.hub_repo} --revision "
                f"{entry.hub_revision}` on a connected machine and copy {constants.HF_HUB_CACHE})"
            )
        download(AUTHORS_URL.format(id=entry.drive_id), original, sha256=expected,
                 what=f"{entry.name} (authors' release)", page=entry.authors_url)
        digest = sha256_of(original)
    from regproxy_cli.hub.convert import read_authors_checkpoint

    try:
        read_authors_checkpoint(original)
    except RegproxyError as exc:  # e.g. Google Drive answered with a web page instead of the file
        original.unlink()
        raise RegproxyError(f"{exc}; download {entry.authors_url} by hand and save it as {original}") from None
    if expected is None:  # first use (downloaded now, or put there by hand): trust it and remember it
        record.write_text(f"{digest}  {original.name}\n")  # the `sha256sum -c` format
    return original


def _recorded_sha256(record: Path) -> str | None:
    words = record.read_text().split() if record.is_file() else []
    return words[0] if words else None


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, destination: Path, *, sha256: str | None, what: str, page: str | None = None) -> Path:
    """Download ``url`` to ``destination`` atomically with a progress bar; refuse it unless its sha256 is ``sha256``."""
    import torch.hub

    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(destination), hash_prefix=sha256, progress=True)
    except RuntimeError as exc:  # torch's 'invalid hash value': the partial file is already gone
        raise RegproxyError(
            f"{what} from {url} failed its sha256 check ({one_line(exc)}): not kept; fetch {page or url} by hand and "
            f"check it before saving it as {destination}"
        ) from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise RegproxyError(
            f"cannot download {what} ({getattr(exc, 'reason', exc)}): fetch {page or url} by hand and save it as "
            f"{destination}"
        ) from None
    return destination
