"""ProtoSeg as a classifier + loss plugin: Sinkhorn marginals, the momentum update's rules, the losses against their
definitions, the DDP update, and the whole path through train, save, load, eval and predict --prototypes."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from regproxy_cli import RegproxyError, build_model
from regproxy_cli.engine.config import load_config
from regproxy_cli.engine.losses import LossContext, token_labels
from regproxy_cli.hub.zoo import load_model
from regproxy_cli.plugins.protoseg import PROTOSEG_LOSS, PrototypeClassifier, resolve_options, sinkhorn


def _classifier(k=3, m=2, d=16) -> PrototypeClassifier:
    return PrototypeClassifier(d, k, {"prototypes": m})


@pytest.mark.parametrize("n, m", [(50, 2), (200, 10), (7, 3)])
def test_sinkhorn_gives_every_prototype_an_equal_share(n, m):
    """Each token's mass is exactly 1 after any number of iterations; the prototypes' shares reach 1/M within 1e-3
    by 30 iterations. The authors' 3 (the default) stop short on such inputs: up to 0.08 off (the closing note)."""
    embeddings = F.normalize(torch.randn(n, 32), dim=1)
    prototypes = F.normalize(torch.randn(m, 32), dim=1)
    similarities = embeddings @ prototypes.t()
    for iterations in (1, 3, 30):
        torch.testing.assert_close(sinkhorn(similarities, iterations=iterations).sum(1), torch.ones(n))
    shares = sinkhorn(similarities, iterations=30).sum(0) / n
    assert (shares - 1 / m).abs().max() < 1e-3


def test_sinkhorn_balances_where_the_arg_max_would_not():
    """All tokens nearest prototype 0: the plain arg-max leaves prototype 1 empty, the balanced plan does not."""
    similarities = torch.stack([torch.full((10,), 0.5), torch.linspace(0.1, 0.4, 10)], 1)
    assert (similarities.argmax(1) == 0).all()
    assignment = sinkhorn(similarities).argmax(1)
    assert 3 <= int((assignment == 1).sum()) <= 7


def test_class_score_is_the_best_prototype_cosine_then_a_layer_norm():
    classifier = _classifier().requires_grad_(False)
    tokens = torch.randn(5, 16)
    embeddings = F.normalize(classifier.feature_norm(classifier.projection(tokens)), dim=-1)
    naive = torch.tensor([[max(float(e @ p) for p in classifier.prototypes[k]) for k in range(3)] for e in embeddings])
    torch.testing.assert_close(classifier(tokens), F.layer_norm(naive, (3,), classifier.score_norm.weight,
                                                                classifier.score_norm.bias))
    predicted = classifier(tokens).argmax(1)
    for token, k, index in zip(embeddings, predicted.tolist(), classifier.nearest_prototype(tokens).tolist()):
        assert index // 2 == k and index % 2 == int((classifier.prototypes[k] @ token).argmax())


def test_prototypes_stay_unit_and_only_correct_tokens_move_them():
    classifier = _classifier()
    before = classifier.prototypes.clone()
    embeddings = F.normalize(torch.randn(6, 16), dim=1)
    classes = torch.tensor([0, 0, 1, 1, 2, 2])
    assignment = torch.tensor([0, 1, 0, 0, 1, 1])
    classifier.update(embeddings, classes, assignment, torch.zeros(6, dtype=torch.bool))
    assert torch.equal(classifier.prototypes, before)  # nothing predicted right: nothing moves
    correct = torch.tensor([True, False, True, True, False, False])
    classifier.update(embeddings, classes, assignment, correct, momentum=0.9)
    after = classifier.prototypes
    torch.testing.assert_close(after.norm(dim=-1), torch.ones(3, 2))
    expected_00 = F.normalize(0.9 * before[0, 0] + 0.1 * embeddings[0], dim=0)
    expected_10 = F.normalize(0.9 * before[1, 0] + 0.1 * F.normalize(embeddings[2] + embeddings[3], dim=0), dim=0)
    torch.testing.assert_close(after[0, 0], expected_00)
    torch.testing.assert_close(after[1, 0], expected_10)
    for k, m in ((0, 1), (1, 1), (2, 0), (2, 1)):  # wrong (0,1), (2,1) and unassigned (1,1), (2,0): unchanged
        torch.testing.assert_close(after[k, m], before[k, m])


def _scenes_output(model, size=64):
    x = torch.randn(2, 3, size, size)
    labels = torch.randint(0, 3, (2, size, size))
    labels[:, :8] = 255
    return model(x, training_output=True), labels


def test_the_loss_is_ce_plus_weighted_contrast_and_distance_then_a_momentum_step():
    torch.manual_seed(0)
    model = build_model("tiny-vit", 3, classifier="protoseg", classifier_options={"prototypes": 2}).train()
    classifier = model.token_classifier
    output, labels = _scenes_output(model)
    before = classifier.prototypes.clone()
    loss_fn = PROTOSEG_LOSS.factory(LossContext(model, options=PROTOSEG_LOSS.resolve_options({})))
    loss = loss_fn(output, labels, 0)
    # independently, with the prototypes the loss saw
    ce = F.cross_entropy(output.logits, labels, ignore_index=255, reduction="none").sum() / labels.numel()
    classes = token_labels(output, labels, 3).reshape(-1)
    keep = classes != 255
    tokens = output.tokens.permute(0, 2, 3, 1).reshape(-1, 32)[keep]
    embeddings = F.normalize(classifier.feature_norm(classifier.projection(tokens)), dim=-1)
    cosines = torch.einsum("nd,kmd->nkm", embeddings, before)
    targets = []
    for i, k in enumerate(classes[keep].tolist()):
        members = (classes[keep] == k).nonzero().flatten()
        plan = sinkhorn(cosines[members, k])
        targets.append(k * 2 + int(plan[members.tolist().index(i)].argmax()))
    targets = torch.tensor(targets)
    flat = cosines.reshape(len(targets), 6)
    contrast = F.cross_entropy(flat, targets)
    distance = ((1 - flat.gather(1, targets[:, None])) ** 2).mean()
    torch.testing.assert_close(loss, ce + 0.01 * contrast + 0.001 * distance)
    torch.testing.assert_close(classifier.prototypes.norm(dim=-1), torch.ones(3, 2))
    loss.backward()
    assert classifier.prototypes.grad is None and not classifier.prototypes.requires_grad
    assert all(p.grad is not None for p in classifier.projection.parameters())


def test_prototypes_move_identically_on_every_process_with_the_batch_summed(tmp_path):
    """Two gloo processes, each with half of the tokens, end with the prototypes one process gets from all."""
    script = tmp_path / "update.py"
    script.write_text(textwrap.dedent("""
        import os, sys, torch, torch.distributed as dist, torch.nn.functional as F
        from regproxy_cli.plugins.protoseg import PrototypeClassifier
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
        torch.manual_seed(0)
        classifier = PrototypeClassifier(8, 2, {"prototypes": 2})
        embeddings = F.normalize(torch.randn(8, 8), dim=1)
        classes = torch.tensor([0, 1, 0, 1, 0, 0, 1, 1])
        assignment = torch.tensor([0, 1, 1, 0, 0, 1, 1, 1])
        correct = torch.tensor([True, True, False, True, True, True, False, True])
        half = slice(rank * 4, rank * 4 + 4)
        classifier.update(embeddings[half], classes[half], assignment[half], correct[half], momentum=0.5)
        torch.save(classifier.prototypes, sys.argv[3] + f"/rank{rank}.pt")
        dist.destroy_process_group()
        if rank == 0:  # the same update in one process, on all eight tokens
            torch.manual_seed(0)
            single = PrototypeClassifier(8, 2, {"prototypes": 2})
            single.update(embeddings, classes, assignment, correct, momentum=0.5)
            torch.save(single.prototypes, sys.argv[3] + "/single.pt")
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "rendezvous"),
                                   str(tmp_path)], env=env) for rank in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in processes)
    rank0, rank1, single = (torch.load(tmp_path / f"{name}.pt") for name in ("rank0", "rank1", "single"))
    assert torch.equal(rank0, rank1)
    torch.testing.assert_close(rank0, single)


def test_bad_protoseg_options_are_one_line_errors(tmp_path):
    with pytest.raises(RegproxyError, match="prototypes must be an integer 1..64, got 0"):
        resolve_options({"prototypes": 0}, ["a"])
    with pytest.raises(RegproxyError, match="protoseg takes prototypes, not count"):
        resolve_options({"count": 2}, ["a"])
    with pytest.raises(RegproxyError, match="protoseg momentum must be in"):
        PROTOSEG_LOSS.resolve_options({"momentum": 2})


def _config(tmp_path) -> str:
    config = {
        "model": {"backbone": "tiny-vit", "pretrained": False, "classifier": "protoseg",
                  "classifier_options": {"prototypes": 2}},
        "data": {"kind": "synthetic", "root": str(tmp_path / "scenes"), "synthetic_train": 4, "synthetic_val": 2,
                 "synthetic_size": 64, "crop_size": 64, "scale": [128, 64], "workers": 0},
        "test": {"inference_mode": "whole", "test_scale": None},
        "optim": {"lr": 1e-3, "batch_size": 2, "iters": 2, "warmup_iters": 1},
        "loss": {"kind": "protoseg"},
        "run": {"out_dir": str(tmp_path / "run"), "eval_every": 2, "save_every": 2, "log_every": 1, "threads": 1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_protoseg_trains_saves_loads_evaluates_and_draws_prototype_regions(tmp_path, cli):
    config = _config(tmp_path)
    trained = cli("train", config)
    assert trained.returncode == 0, trained.stderr
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert saved["classifier"] == "protoseg" and saved["classifier_options"] == {"prototypes": 2}
    model = load_model(str(tmp_path / "run" / "final"))
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    key = "head.classifier.prototypes"
    assert torch.equal(model.state_dict()[key], checkpoint[key])  # the momentum-updated prototypes, saved
    torch.testing.assert_close(checkpoint[key].norm(dim=-1), torch.ones(5, 2))
    evaluated = cli("eval", "--model", str(tmp_path / "run" / "final"), "--data", config, "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert 0 <= json.loads(evaluated.stdout)["mIoU"] <= 100
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    predicted = cli("predict", str(image), "--model", str(tmp_path / "run" / "final"), "--out", str(out),
                    "--regions", "--prototypes")
    assert predicted.returncode == 0, predicted.stderr
    picture = np.array(Image.open(out / "scene_regions.png"))
    assert picture.shape == (64, 64, 3)
    # the tints are prototype shades: more distinct colours than the classes the tokens predict would give
    palette = model.token_classifier.prototype_palette(model.config.palette)
    assert len({tuple(c) for c in palette}) == 10


def test_prototype_regions_need_a_prototype_model(tmp_path, cli):
    model = build_model("tiny-vit", 2)
    model.config.classes = ["a", "b"]
    from regproxy_cli.hub.checkpoint import save_pretrained

    save_pretrained(model, tmp_path / "linear")
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    result = cli("predict", str(image), "--model", str(tmp_path / "linear"), "--out", str(tmp_path / "o"),
                 "--prototypes")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "regions by prototype needs a model with prototypes (model.classifier: protoseg)" in result.stderr


def test_protoseg_loss_needs_the_protoseg_classifier(tmp_path):
    from regproxy_cli.engine.train import train

    config = load_config(_config(tmp_path), ["model.classifier=linear", "model.classifier_options={}"])
    with pytest.raises(RegproxyError, match="loss.kind protoseg needs model.classifier: protoseg"):
        train(config, progress=False)
