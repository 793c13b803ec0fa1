"""The model directory format (also a Hub repo): ``config.json`` + ``model.safetensors`` + a generated ``README.md``.

``config.json`` (:class:`~regproxy_cli.model.config.ModelConfig`) carries everything needed to rebuild the model
and to use it: backbone, M, region resolution, classes and palette, normalisation, crop size, inference mode and
window, test scale, dataset and the paper's metrics. Files are written atomically (temporary file + ``os.replace``),
so an interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from regproxy_cli.constants import VERSION
from regproxy_cli.errors import RegproxyError, listed
from regproxy_cli.files import write_atomic, write_text_atomic
from regproxy_cli.model.config import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, ModelConfig, read_model_config
from regproxy_cli.model.regproxy import build_from_config


def save_pretrained(model: nn.Module, directory: str | os.PathLike, config: ModelConfig | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and a model card into ``directory``."""
    config = config or getattr(model, "config", None)  # a bare nn.Module may be saved with config=
    if config is None:
        raise RegproxyError("save_pretrained needs a ModelConfig: pass config= or set model.config")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(directory / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    write_text_atomic(directory / CONFIG_NAME, json.dumps(config.to_dict(), indent=2) + "\n")
    write_text_atomic(directory / CARD_NAME, model_card(config))
    return directory


def load_pretrained(directory: str | os.PathLike, *, map_location: str = "cpu") -> nn.Module:
    """Rebuild a model from a directory written by :func:`save_pretrained`; returned in eval mode."""
    directory = Path(directory)
    config, weights_path = read_model_config(directory), directory / WEIGHTS_NAME
    with torch.device("meta"):
        model = build_from_config(config)
    try:
        state = load_file(str(weights_path), device=map_location)
    except (SafetensorError, OSError) as exc:
        raise RegproxyError(f"{weights_path}: cannot read weights ({exc})") from None
    load_state_dict_checked(model, state, str(weights_path))
    model.config = config
    return model.eval()


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` strictly, naming missing/unexpected keys and shape mismatches in one line."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    found = [("missing keys", missing, ", ", 5), ("unexpected keys", unexpected, ", ", 5),
             ("shape mismatch", wrong, "; ", 3)]
    problems = [f"{what}: {listed(items, limit, sep)}" for what, items, sep, limit in found if items]
    if problems:
        raise RegproxyError(f"{where}: weights do not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True, assign=True)
    _materialise_non_persistent_buffers(model, next(iter(state.values())).device if state else torch.device("cpu"))


def _materialise_non_persistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Rebuild the buffers a state dict does not carry (left on the meta device by the meta build).

    A model is built on the meta device and its weights assigned; a non-persistent buffer (DINOv3's rotary periods
    in timm's ``RotaryEmbeddingDinoV3``) is not in the file and would stay meta, failing at the first ``.to()``. timm
    modules that own such buffers recompute them in ``init_non_persistent_buffers``.
    """
    for name, module in model.named_modules():
        meta = [key for key in module._non_persistent_buffers_set
                if module._buffers.get(key) is not None and module._buffers[key].is_meta]
        if not meta:
            continue
        rebuild = getattr(module, "init_non_persistent_buffers", None)
        if rebuild is None:
            raise RegproxyError(f"cannot load a model whose {name or 'model'} has buffers that are not saved "
                                f"({', '.join(meta)}) and no init_non_persistent_buffers() to recompute them")
        for key in meta:
            module._buffers[key] = torch.empty_like(module._buffers[key], device=device)
        rebuild()


CITATION = """@inproceedings{zhang2022regproxy,
  title     = {Semantic Segmentation by Early Region Proxy},
  author    = {Yifan Zhang and Bo Pang and Cewu Lu},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022}
}"""
DATASET_NAMES = {"ade20k": "ADE20K", "cityscapes": "Cityscapes", "pascal-context": "Pascal Context"}
CARD_METRICS = ("mIoU", "mAcc", "aAcc")  # metric types the model index states (with variants, "mIoU (ms+flip)")


def card_data(config: ModelConfig) -> ModelCardData:
    """The Hub metadata of a model card (its YAML front matter), the ``model-index`` holding the config's metrics.

    Metrics named ``mIoU``, ``mAcc``, ``aAcc`` or a variant (``mIoU (ms+flip)``) go into the model index, typed
    by the part before the bracket; others (the training iteration) only into the card's table. The index needs
    the dataset the metrics were measured on, so a config without one has none.
    """
    results = [EvalResult(task_type="image-segmentation", task_name="Semantic Segmentation",
                          dataset_type=config.dataset, dataset_name=DATASET_NAMES.get(config.dataset, config.dataset),
                          metric_type=key.split(" (")[0], metric_value=float(value), metric_name=key)
               for key, value in config.metrics.items()
               if key.split(" (")[0] in CARD_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)]
    indexed = bool(config.dataset and results)
    return ModelCardData(library_name="regproxy", license="apache-2.0", pipeline_tag="image-segmentation",
                         tags=["regproxy", "semantic-segmentation", "vision-transformer"],
                         datasets=[config.dataset] if config.dataset else None,
                         model_name=_card_title(config) if indexed else None, eval_results=results if indexed else None)


def _card_title(config: ModelConfig) -> str:
    kind = "linear baseline" if config.baseline else f"RegProxy (h×w = {config.region_res[0]}×{config.region_res[1]})"
    return f"{kind} on {config.backbone}"


def model_card(config: ModelConfig, training_config: str | None = None) -> str:
    """A Hub model card (README.md): YAML front matter (:func:`card_data`), then the model, its metrics, the
    training config (``training_config``, the YAML a training run wrote, when given) and the paper's citation.

    huggingface_hub's ``ModelCard`` writes the front matter and checks the model index as the Hub reads it."""
    metrics = "".join(f"| {k} | {v} |\n" for k, v in config.metrics.items()) or "| - | - |\n"
    training = f"\n## Training config\n\n```yaml\n{training_config.rstrip()}\n```\n" if training_config else ""
    return str(ModelCard(
        f"---\n{card_data(config).to_yaml()}\n---\n\n"
        f"# {_card_title(config)}\n\n"
        "Semantic Segmentation by Early Region Proxy (Zhang, Pang, Lu; CVPR 2022), loaded with "
        f"[regproxy](https://pypi.org/project/regproxy/) {VERSION}.\n\n"
        "```bash\npip install regproxy regproxy-backbones\nregproxy predict image.jpg --model <this repo id>\n```\n\n"
        f"- backbone: `{config.backbone}`, token-head depth M = {config.m}\n"
        f"- classes: {config.num_classes}" + (f" ({config.dataset})" if config.dataset else "") + "\n"
        f"- crop {config.crop_size}², inference `{config.inference_mode}`"
        + (f" (window {config.crop_size}, stride {config.stride})" if config.inference_mode == "slide" else "")
        + (f", test scale {config.test_scale[0]}×{config.test_scale[1]} (keep ratio)" if config.test_scale else "")
        + "\n"
        f"- normalisation: mean {list(config.mean)}, std {list(config.std)} on RGB 0-255\n"
        + (f"- weights: {config.source}\n" if config.source else "")
        + f"\n## Metrics\n\n| metric | value |\n|---|---|\n{metrics}"
        + training
        + f"\n## Citation\n\n```bibtex\n{CITATION}\n```\n"
    ))
