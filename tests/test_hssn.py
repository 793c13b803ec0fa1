"""HSSN as a classifier + loss plugin: the hierarchy file, the tree-min loss against the paper's equations, path
inference, token region labels, and the whole path through train, save, load, eval and predict."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from regproxy_cli import RegproxyError, build_model
from regproxy_cli.engine.config import load_config
from regproxy_cli.engine.losses import token_label_histogram, token_labels, unpaint
from regproxy_cli.engine.train import train
from regproxy_cli.hub.zoo import load_model
from regproxy_cli.model.ops import paint
from regproxy_cli.plugins.hssn import (
    read_hierarchy,
    resolve_options,
    tree_min_loss,
    tree_min_scores,
    tree_triplet_loss,
    triplet_ramp,
)

CLASSES = ["background", "ellipse", "blob", "line", "ring"]  # the synthetic scenes' 5 classes
TREE = {"stuff": ["background"], "round": ["Ellipse", "RING"], "thin-or-blob": ["line", "blob"]}
PARENT = [0, 1, 2, 2, 1]  # of each class in CLASSES order


def test_hierarchy_is_read_case_insensitively_in_dataset_order(tmp_path):
    path = tmp_path / "hierarchy.yaml"
    path.write_text(yaml.safe_dump(TREE, sort_keys=False))
    options = resolve_options({"hierarchy": str(path)}, CLASSES)
    assert options["hierarchy"] == {"stuff": ["background"], "round": ["ellipse", "ring"],
                                    "thin-or-blob": ["blob", "line"]}
    assert options["parent"] == PARENT and options["inference"] == "path"


@pytest.mark.parametrize("tree, message", [
    ({**TREE, "extra": ["car"]}, r"the hierarchy: car not among the dataset's classes"),
    ({"stuff": ["background"], "round": ["ellipse", "ring"], "thin": ["line"]}, r"the hierarchy: blob under no superclass"),
    ({**TREE, "again": ["line"]}, r"class 'line' is under both 'thin-or-blob' and 'again'"),
    ({"stuff": "background"}, "expected a mapping of superclass names to non-empty lists"),
])
def test_bad_hierarchies_are_one_line_errors(tree, message):
    with pytest.raises(RegproxyError, match=message):
        read_hierarchy(tree, CLASSES)


def test_missing_hierarchy_file_and_bad_inference_are_named(tmp_path):
    with pytest.raises(RegproxyError, match="hierarchy .*nope.yaml: no such file"):
        resolve_options({"hierarchy": str(tmp_path / "nope.yaml")}, CLASSES)
    with pytest.raises(RegproxyError, match="inference 'vote' is not one of path, softmax-sum"):
        resolve_options({"hierarchy": TREE, "inference": "vote"}, CLASSES)


def _naive_tree_min(scores: torch.Tensor, label: int) -> float:
    """Eq. 4-5 for one pixel, node by node: leaves 0..K-1 under PARENT, superclasses K..K+S-1."""
    k = len(PARENT)
    total_leaf = total_super = 0.0
    for v in range(k):
        if v == label:  # positive: min over itself and its ancestors
            p = min(scores[v], scores[k + PARENT[v]])
            total_leaf += -math.log(p + 1e-8)
        else:  # negative: max over itself and its descendants (a leaf has none)
            total_leaf += -math.log(1 - scores[v] + 1e-8)
    for s in range(3):
        if s == PARENT[label]:
            total_super += -math.log(scores[k + s] + 1e-8)
        else:
            children = [scores[v] for v in range(k) if PARENT[v] == s]
            total_super += -math.log(1 - max([scores[k + s], *children]) + 1e-8)
    return total_leaf / k + total_super / 3


def _bce(scores: torch.Tensor, label: int) -> float:
    target = [1.0 if v == label else 0.0 for v in range(5)] + [1.0 if s == PARENT[label] else 0.0 for s in range(3)]
    terms = [-(t * math.log(s + 1e-8) + (1 - t) * math.log(1 - s + 1e-8)) for s, t in zip(scores.tolist(), target)]
    return sum(terms[:5]) / 5 + sum(terms[5:]) / 3


def test_tree_min_loss_is_the_papers_equations_and_never_below_bce():
    parent = torch.tensor(PARENT)
    torch.manual_seed(1)
    logits = torch.randn(2, 8, 3, 4) * 3
    labels = torch.randint(0, 5, (2, 3, 4))
    labels[0, 0, 0] = 255
    scores = torch.sigmoid(logits)
    expected, bce, count = 0.0, 0.0, 0
    for b, y, x in itertools.product(range(2), range(3), range(4)):
        if labels[b, y, x] == 255:
            continue
        pixel = scores[b, :, y, x].double()
        expected += _naive_tree_min(pixel.tolist(), int(labels[b, y, x]))
        bce += _bce(pixel, int(labels[b, y, x]))
        count += 1
    loss = tree_min_loss(logits, labels, parent, 5)
    assert loss.item() == pytest.approx(expected / count, rel=1e-5)
    assert loss.item() > bce / count  # random scores break the tree constraints somewhere


def test_tree_min_equals_bce_exactly_when_the_tree_constraints_hold():
    """Superclass scores above all their leaves: min(leaf, parent) is the leaf, max(super, leaves) the super."""
    parent = torch.tensor(PARENT)
    torch.manual_seed(2)
    leaves = torch.rand(1, 5, 2, 2) * 0.5
    supers = torch.stack([leaves[:, parent == s].amax(1) + 0.1 for s in range(3)], 1)
    scores = torch.cat([leaves, supers], 1)
    positive, negative = tree_min_scores(scores, parent, 5)
    torch.testing.assert_close(positive, scores)
    torch.testing.assert_close(negative, scores)
    labels = torch.randint(0, 5, (1, 2, 2))
    bce = sum(_bce(scores[0, :, y, x].double(), int(labels[0, y, x])) for y in range(2) for x in range(2)) / 4
    assert tree_min_loss(torch.logit(scores), labels, parent, 5).item() == pytest.approx(bce, rel=1e-5)


def test_tree_min_loss_ignores_void_pixels_entirely():
    parent = torch.tensor(PARENT)
    logits = torch.randn(1, 8, 2, 2, requires_grad=True)
    labels = torch.tensor([[[1, 255], [255, 255]]])
    tree_min_loss(logits, labels, parent, 5).backward()
    assert logits.grad[..., 0, 1].abs().sum() == 0 and logits.grad[..., 1, :].abs().sum() == 0
    assert logits.grad[..., 0, 0].abs().sum() > 0


def _hssn_model(inference="path"):
    options = resolve_options({"hierarchy": TREE, "inference": inference}, CLASSES)
    return build_model("tiny-vit", 5, classifier="hssn", classifier_options=options).eval()


@pytest.mark.parametrize("inference", ["path", "softmax-sum"])
def test_inference_picks_the_best_root_to_leaf_path(inference):
    classifier = _hssn_model(inference).token_classifier
    outputs = torch.randn(3, 8, 5, 5) * 2
    scores = classifier.class_scores(outputs)
    s = torch.sigmoid(outputs) if inference == "path" else outputs.softmax(1)
    for b, y, x in itertools.product(range(3), range(5), range(5)):
        paths = {leaf: float(s[b, leaf, y, x] + s[b, 5 + PARENT[leaf], y, x]) for leaf in range(5)}
        best = max(paths, key=paths.get)
        assert int(scores[b, :, y, x].argmax()) == best
    # the category of a prediction is its leaf's parent: path inference cannot contradict the tree


def test_the_model_paints_leaf_and_superclass_channels_and_scores_classes():
    model = _hssn_model()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        out = model.forward_all(x)
        training = model(x, training_output=True)
    assert out.token_outputs.shape[1] == 8 and out.logits.shape == (2, 5, 64, 48)
    torch.testing.assert_close(out.region_logits, model.token_classifier.class_scores(
        paint(out.token_outputs, out.affinity)))
    assert training.outputs.shape == (2, 8, 64, 48)
    torch.testing.assert_close(training.logits, model(x), rtol=1e-4, atol=1e-5)


def test_unpaint_is_the_transpose_of_paint():
    affinity = torch.rand(2, 9, 2, 3, 4, 5).softmax(1)
    tokens = torch.randn(2, 3, 4, 5, requires_grad=True)
    pixels = torch.randn(2, 3, 8, 15)
    (grad,) = torch.autograd.grad(paint(tokens, affinity), tokens, grad_outputs=pixels)
    torch.testing.assert_close(unpaint(pixels, affinity), grad)


def test_token_labels_count_each_pixel_by_its_affinity():
    model = build_model("tiny-vit", 5).eval()
    x = torch.randn(1, 3, 40, 56)  # pads to 48 x 64: a 3 x 4 token grid, the padding unlabelled
    labels = torch.randint(0, 5, (1, 40, 56))
    labels[0, :5] = 255
    with torch.no_grad():
        output = model(x, training_output=True)
    histogram = token_label_histogram(output, labels, 5)
    stride, (h, w) = output.stride, output.region_res
    expected = torch.zeros(5, 3, 4, dtype=torch.float64)
    affinity = output.affinity[0].double()
    for py, px in itertools.product(range(40), range(56)):
        label = int(labels[0, py, px])
        if label == 255:
            continue
        ty, tx, i, j = py // stride, px // stride, (py % stride) // (stride // h), (px % stride) // (stride // w)
        for n in range(9):
            ny, nx = ty + n // 3 - 1, tx + n % 3 - 1
            if 0 <= ny < 3 and 0 <= nx < 4:
                expected[label, ny, nx] += affinity[n, i, j, ty, tx]
    torch.testing.assert_close(histogram[0].double(), expected, rtol=1e-4, atol=1e-4)
    assert histogram.sum().item() == pytest.approx(int((labels != 255).sum()), rel=1e-5)  # affinities sum to 1
    torch.testing.assert_close(token_labels(output, labels, 5)[0], expected.argmax(0))


def test_baseline_tokens_count_their_own_patch():
    model = build_model("tiny-vit", 3, baseline=True).eval()
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[0, :16, :16] = 2
    labels[0, 16:, 16:] = 255
    with torch.no_grad():
        output = model(torch.randn(1, 3, 32, 32), training_output=True)
    histogram = token_label_histogram(output, labels, 3)
    assert histogram[0, 2, 0, 0] == 256 and histogram[0, 0, 0, 1] == 256 and histogram[0, :, 1, 1].sum() == 0
    assert token_labels(output, labels, 3)[0].tolist() == [[2, 0], [0, 255]]


def test_tree_triplet_loss_matches_its_definition():
    parent = torch.tensor(PARENT)
    tokens = torch.randn(1, 4, 2, 3)
    classes = torch.tensor([[[1, 4, 0], [2, 3, 255]]])  # ellipse & ring are siblings, blob & line too
    features = F.normalize(tokens[0].permute(1, 2, 0).reshape(6, 4), dim=1)
    flat = classes.reshape(-1)
    expected = []
    for c in (0, 1, 2, 3, 4):  # background has no sibling: it does not count
        anchors = [i for i in range(6) if flat[i] == c]
        positives = [i for i in range(6) if flat[i] != 255 and flat[i] != c and PARENT[flat[i]] == PARENT[c]]
        negatives = [i for i in range(6) if flat[i] != 255 and PARENT[flat[i]] != PARENT[c]]
        n = min(len(anchors), len(positives), len(negatives))
        if n:
            terms = [max(0.0, float((1 - features[a] @ features[p]) - (1 - features[a] @ features[q]) + 0.6))
                     for a, p, q in zip(anchors[:n], positives[:n], negatives[:n])]
            expected.append(sum(terms) / n)
    assert tree_triplet_loss(tokens, classes, parent).item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert triplet_ramp(0, 100, 0.5) == 0 and triplet_ramp(100, 100, 0.5) == pytest.approx(0.5)
    assert triplet_ramp(50, 100, 0.5) == pytest.approx(0.25)


def _scenes_config(tmp_path, *overrides):
    hierarchy = tmp_path / "hierarchy.yaml"
    hierarchy.write_text(yaml.safe_dump(TREE, sort_keys=False))
    config = {
        "model": {"backbone": "tiny-vit", "pretrained": False, "classifier": "hssn",
                  "classifier_options": {"hierarchy": str(hierarchy)}},
        "data": {"kind": "synthetic", "root": str(tmp_path / "scenes"), "synthetic_train": 4, "synthetic_val": 2,
                 "synthetic_size": 64, "crop_size": 64, "scale": [128, 64], "workers": 0},
        "test": {"inference_mode": "whole", "test_scale": None},
        "optim": {"lr": 1e-3, "batch_size": 2, "iters": 2, "warmup_iters": 1},
        "loss": {"kind": "hssn", "options": {"triplet_weight": 0.5}},
        "run": {"out_dir": str(tmp_path / "run"), "eval_every": 2, "save_every": 2, "log_every": 1, "threads": 1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_hssn_trains_saves_loads_evaluates_and_predicts_through_the_cli(tmp_path, cli):
    config = _scenes_config(tmp_path)
    trained = cli("train", str(config))
    assert trained.returncode == 0, trained.stderr
    saved = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert saved["classifier"] == "hssn" and saved["classifier_options"]["parent"] == PARENT
    model = load_model(str(tmp_path / "run" / "best"))
    assert model.token_classifier.out_channels == 8  # rebuilt from config.json alone
    (tmp_path / "hierarchy.yaml").unlink()  # the model directory does not need the file any more
    evaluated = cli("eval", "--model", str(tmp_path / "run" / "best"), "--data", str(config), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert set(result["levels"]["category"]) >= {"mIoU", "IoU", "classes"}
    assert result["levels"]["category"]["classes"] == ["stuff", "round", "thin-or-blob"]
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    predicted = cli("predict", str(image), "--model", str(tmp_path / "run" / "best"), "--out", str(tmp_path / "out"))
    assert predicted.returncode == 0, predicted.stderr
    labels = np.array(Image.open(tmp_path / "out" / "scene.png"))
    categories = np.array(Image.open(tmp_path / "out" / "scene_category.png"))
    # the category map is the label map through the tree (both written as index PNGs)
    np.testing.assert_array_equal(categories, np.array(PARENT)[labels])


def test_hssn_loss_needs_the_hssn_classifier(tmp_path):
    config = load_config(_scenes_config(tmp_path), ["model.classifier=linear", "model.classifier_options={}"])
    with pytest.raises(RegproxyError, match="loss.kind hssn needs model.classifier: hssn"):
        train(config, progress=False)


def test_bad_hssn_loss_options_are_config_errors(tmp_path):
    with pytest.raises(RegproxyError, match="config key loss.options: hssn takes .* not margin"):
        load_config(_scenes_config(tmp_path), ["loss.options={margin: 1}"])
    with pytest.raises(RegproxyError, match="config key loss.options: hssn triplet_weight must be a number >= 0"):
        load_config(_scenes_config(tmp_path), ["loss.options={triplet_weight: -1}"])


def test_init_from_a_linear_model_loads_the_backbone_and_starts_the_hierarchy_fresh():
    from regproxy_cli.engine.finetune import init_from

    source = build_model("tiny-vit", 5)
    source.config.classes = list(CLASSES)
    target = _hssn_model()
    target.config.classes = list(CLASSES)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = init_from(target, source, "source")
    state, theirs = target.state_dict(), source.state_dict()
    assert torch.equal(state["backbone.vit.pos_embed"], theirs["backbone.vit.pos_embed"])
    assert torch.equal(state["head.affinity.out.weight"], theirs["head.affinity.out.weight"])
    # 5 linear rows cannot fill 8 hierarchical ones: the classifier keeps its initialisation, and says so
    assert torch.equal(state["head.classifier.weight"], fresh["head.classifier.weight"])
    assert ("head.classifier.weight", "shape (5, 32) != (8, 32)") in report.reinitialised
    assert report.kept_classes == []
