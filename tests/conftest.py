"""Tiny backbone specs (2 blocks, width 32) so model tests run in seconds on 2 CPU cores."""

import os
import tempfile

# Tests never touch the network. Set before huggingface_hub is imported: it reads this once.
os.environ["HF_HUB_OFFLINE"] = "1"
# What regproxy caches (CPU kernel choices, converted zoo models) goes to a folder of this run, not the user's cache.
os.environ["REGPROXY_CACHE"] = tempfile.mkdtemp(prefix="regproxy-cache-")
os.environ.pop("REGPROXY_CACHE_DIR", None)

from functools import partial

import pytest
import torch

from regproxy_cli import BackboneSpec
from regproxy_cli.model.base import SegmentationModel
from regproxy_cli.model.timm_vit import create_timm_vit

_TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}

TINY_VIT = BackboneSpec(
    name="tiny-vit", title="tiny ViT/16", stride=16, m=1, width=32, depth=2, heads=2, num_prefix_tokens=1,
    pretrained="vit_tiny_patch16_384.augreg_in21k_ft_in1k", crop_size=64,
    factory=partial(create_timm_vit, "vit_tiny_patch16_384", stride=16, **_TINY),
)
TINY_DEIT = BackboneSpec(
    name="tiny-deit", title="tiny DeiT/16", stride=16, m=1, width=32, depth=2, heads=2, num_prefix_tokens=2,
    pretrained="deit_base_distilled_patch16_384.fb_in1k", crop_size=64,
    factory=partial(create_timm_vit, "deit_base_distilled_patch16_384", stride=16, **_TINY),
)
TINY_HYBRID = BackboneSpec(
    name="tiny-hybrid", title="tiny R26+ViT/32", stride=32, m=0, width=32, depth=2, heads=2, num_prefix_tokens=1,
    pretrained="vit_small_r26_s32_384.augreg_in21k_ft_in1k", crop_size=64,
    factory=partial(create_timm_vit, "vit_small_r26_s32_384", stride=32, **_TINY),
)
# the 2025 plain ViTs at the same tiny size: DINOv3 (rotary embeddings, registers, layer scale) and DINOv2 with
# registers at patch 14 (a stride that is not a power of two); crops are multiples of the stride
TINY_DINOV3 = BackboneSpec(
    name="tiny-dinov3", title="tiny DINOv3/16", stride=16, m=1, width=32, depth=2, heads=2, num_prefix_tokens=5,
    pretrained="vit_small_patch16_dinov3.lvd1689m", crop_size=64,
    factory=partial(create_timm_vit, "vit_small_patch16_dinov3", stride=16, **_TINY),
)
TINY_DINOV2 = BackboneSpec(
    name="tiny-dinov2", title="tiny DINOv2/14", stride=14, m=1, width=32, depth=2, heads=2, num_prefix_tokens=5,
    pretrained="vit_small_patch14_reg4_dinov2.lvd142m", crop_size=70,
    factory=partial(create_timm_vit, "vit_small_patch14_reg4_dinov2", stride=14, **_TINY),
)
TINY_SPECS = [TINY_VIT, TINY_DEIT, TINY_HYBRID]
TINY_DINO_SPECS = [TINY_DINOV3, TINY_DINOV2]


class SteepPointwise(SegmentationModel):
    """A stand-in model: a 1x1 conv with large weights, run whole at ``test_scale`` (a 96x128 image is segmented at
    12x16). Logits we control, steep enough that the softmax is far from linear, so softmax-then-resize and
    resize-then-softmax give different labels."""

    def __init__(self, test_scale=(16, 12)) -> None:
        from regproxy_cli.model.config import ModelConfig

        super().__init__()
        self.config = ModelConfig(backbone="stub", num_classes=4, m=0, crop_size=64, inference_mode="whole",
                                  test_scale=test_scale)
        generator = torch.Generator().manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(4, 3, 1, 1, generator=generator) * 2)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# Options a classifier plugin cannot do without (its resolve_options refuses {}); any other installed classifier is
# built with {} and its defaults, so a new plugin is tested without being named here.
REQUIRED_CLASSIFIER_OPTIONS = {"hssn": {"hierarchy": {"up": ["sky", "tree"], "down": ["road"]}}}
PLUGIN_CLASSES = ["sky", "tree", "road"]


def tiny_model_with(classifier: str, *, baseline: bool = False):
    """A tiny-vit model (3 classes, seed 0) with the installed ``classifier``, its options resolved as training does."""
    from regproxy_cli import build_model
    from regproxy_cli.model.classifiers import get_classifier

    options = get_classifier(classifier).resolve_options(dict(REQUIRED_CLASSIFIER_OPTIONS.get(classifier, {})),
                                                         PLUGIN_CLASSES)
    torch.manual_seed(0)
    model = build_model("tiny-vit", len(PLUGIN_CLASSES), classifier=classifier, classifier_options=options,
                        baseline=baseline)
    model.config.classes = list(PLUGIN_CLASSES)
    return model


@pytest.fixture(scope="module")
def model_classes() -> list[str]:
    """The class names of ``model_dir``'s tiny model; a test module overrides this fixture for other classes."""
    return ["sky", "tree", "road", "car", "person"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model_classes):
    """A saved tiny-vit RegProxy (seed 0, random weights) with ``model_classes``, shared by a test module."""
    from regproxy_cli import build_model, save_pretrained

    torch.manual_seed(0)
    model = build_model("tiny-vit", len(model_classes))
    model.config.classes = list(model_classes)
    directory = tmp_path_factory.mktemp("model") / "tiny"
    save_pretrained(model, directory)
    return directory


@pytest.fixture(scope="module")
def model(model_dir):
    """``model_dir`` loaded as ``--model`` loads it (eval mode), shared by a test module."""
    from regproxy_cli import load_model

    return load_model(model_dir)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache for this test (HF_HUB_OFFLINE=1 is set for the whole suite)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def hub_snapshot(cache, repo_id: str, revision: str = "0123456789abcdef0123456789abcdef01234567"):
    """What `hf download` leaves in the cache: refs/main naming a snapshot folder, returned for the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture
def cli():
    """Run `python -m regproxy_cli ARGS` in a fresh process, as a user would."""
    import os
    import subprocess
    import sys

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "regproxy_cli", *args], check=False, capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=300)

    return run


@pytest.fixture(scope="session", autouse=True)
def tiny_backbones_installed(tmp_path_factory):
    """Install the tiny specs as a plugin distribution, so saved tiny models reload by backbone name,
    in this process and in `regproxy` subprocesses alike."""
    import sys

    from regproxy_cli import refresh_backbones
    from regproxy_cli.model.plugins import ENTRY_POINT_GROUP

    site = tmp_path_factory.mktemp("tiny-plugins")
    info = site / "regproxy_test_tiny-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: regproxy-test-tiny\nVersion: 0.1\n")
    names = {"tiny-vit": "TINY_VIT", "tiny-deit": "TINY_DEIT", "tiny-hybrid": "TINY_HYBRID",
             "tiny-dinov3": "TINY_DINOV3", "tiny-dinov2": "TINY_DINOV2"}
    lines = "\n".join(f"{name} = conftest:{attr}" for name, attr in names.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}\n")
    tests_dir = os.path.dirname(__file__)
    sys.path.insert(0, str(site))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), tests_dir] + ([old] if old else []))
    refresh_backbones()
    yield
    sys.path.remove(str(site))
    if old is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = old
    refresh_backbones()


@pytest.fixture
def fake_cuda(monkeypatch):
    """``fake_cuda(gpus=N)``: CUDA as if N GPUs were present, with CPU tensors behind them (tests/fake_cuda.py)."""
    from fake_cuda import FakeCuda

    installed = []

    def install(gpus: int = 1) -> FakeCuda:
        fake = FakeCuda(gpus)
        fake.install(monkeypatch)
        installed.append(fake)
        return fake

    yield install
    for fake in reversed(installed):
        fake.uninstall()
