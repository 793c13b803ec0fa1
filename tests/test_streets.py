"""Street scenes: determinism, thin structures as wide as declared, sub-token objects, sidecars that agree with the
masks, the config switch between generators, and the per-object recall."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regproxy_cli.data.datasets import FolderDataset
from regproxy_cli.data.streets import (
    STREET_CLASSES,
    StreetScenes,
    decode_runs,
    encode_runs,
    object_recall,
    read_sidecar,
    recall_by_width,
    width_bin,
    write_streets_dataset,
)
from regproxy_cli.engine.config import load_config
from regproxy_cli.errors import RegproxyError

SIZE = (96, 96)
POLE, SIGN = STREET_CLASSES.index("pole"), STREET_CLASSES.index("sign")
THINGS = {STREET_CLASSES.index(c) for c in ("building", "vegetation", "pole", "sign")}


@pytest.fixture(scope="module")
def scenes() -> list[tuple]:
    streets = StreetScenes(16, SIZE, seed=3)
    return [streets.render(i) for i in range(len(streets))]


def test_deterministic_by_seed_split_and_index() -> None:
    first, again = StreetScenes(2, SIZE, seed=1), StreetScenes(2, SIZE, seed=1)
    for index in range(2):
        np.testing.assert_array_equal(first[index][0], again[index][0])
        np.testing.assert_array_equal(first[index][1], again[index][1])
        assert first.sidecar(index) == again.sidecar(index)
    assert not np.array_equal(first[0][0], StreetScenes(1, SIZE, seed=2)[0][0])
    assert not np.array_equal(first[0][0], StreetScenes(1, SIZE, seed=1, split="val")[0][0])
    assert not np.array_equal(first[0][0], first[1][0])
    image, label, name = first[1]
    assert image.shape == (*SIZE, 3) and image.dtype == np.uint8 and label.dtype == np.uint8 and name == "train_00001"
    with pytest.raises(IndexError):
        first[2]
    with pytest.raises(RegproxyError, match="at least 32"):
        StreetScenes(1, (16, 64))


def test_every_class_appears_and_no_class_has_one_colour(scenes) -> None:
    seen = set()
    for image, label, *_ in scenes:
        seen |= set(np.unique(label).tolist())
        for c in np.unique(label):
            if (label == c).sum() > 30:
                assert image[label == c].astype(float).std(axis=0).mean() > 3  # texture and noise, not flat colour
    assert seen == set(range(len(STREET_CLASSES)))


def _pca_angle(mask: np.ndarray) -> float:
    """Angle (radians) of a mask's main axis from the vertical, from its pixel coordinates alone."""
    ys, xs = np.nonzero(mask)
    coords = np.stack([ys, xs]).astype(float)
    coords -= coords.mean(axis=1, keepdims=True)
    _, vectors = np.linalg.eigh(coords @ coords.T)
    dy, dx = vectors[:, -1]
    return float(np.arctan2(abs(dx), abs(dy)))


def test_poles_are_as_wide_as_declared(scenes) -> None:
    """Measured from the mask: the rows of an upright pole hold exactly `width` pixels; a slanted one's rows hold
    width / cos(angle) (rounded either way), the angle read off the mask's own principal axis."""
    widths, checked = set(), 0
    for _, label, instance, objects, _ in scenes:
        for obj in objects:
            if obj["kind"] != "pole":
                continue
            mask = instance == obj["id"]
            assert (label[mask] == POLE).all()
            runs = mask.sum(axis=1)
            runs = runs[runs > 0]
            width = obj["width_px"]
            (y0, x0), (y1, x1) = obj["axis"]
            # Measure only poles mostly in view: not hidden behind later poles and signs, nor cut by the frame.
            if len(runs) < 12 or obj["area"] < 0.9 * width * np.hypot(y1 - y0, x1 - x0):
                continue
            widths.add(width)
            angle = _pca_angle(mask)
            expected = width / np.cos(angle)
            values, counts = np.unique(runs, return_counts=True)
            mode = values[counts.argmax()]
            # Ends and occluders only shorten rows, never widen them.
            assert runs.max() <= np.ceil(expected + 0.05), (obj, runs)
            if obj["angle_deg"] == 0:
                assert mode == width and abs(angle) < 0.02
            else:
                assert np.floor(expected - 0.05) <= mode <= np.ceil(expected + 0.05), (obj, runs)
                assert abs(np.degrees(angle) - abs(obj["angle_deg"])) < 3
            checked += 1
    assert checked >= 15
    assert widths == set(range(1, 7))


def test_objects_smaller_than_a_token_exist(scenes) -> None:
    """Signs whose whole extent fits inside an 8 x 8 token of ViT-Demo/8, seen in the label map itself."""
    small = 0
    for _, label, instance, objects, _ in scenes:
        for obj in objects:
            if obj["kind"] != "sign":
                continue
            ys, xs = np.nonzero(instance == obj["id"])
            height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
            assert max(height, width) <= obj["width_px"] <= 7  # the declared side bounds what is visible
            assert (label[ys, xs] == SIGN).all()
            small += max(height, width) < 8
    assert small >= 10


def test_written_sidecars_agree_with_the_masks(tmp_path: Path) -> None:
    root = write_streets_dataset(tmp_path / "streets", num_train=2, num_val=2, size=(64, 80), seed=5)
    assert write_streets_dataset(root, num_train=2, num_val=2, size=(64, 80), seed=5) == root  # reused
    with pytest.raises(RegproxyError, match="not empty"):
        write_streets_dataset(root, num_train=3, num_val=2, size=(64, 80), seed=5)
    dataset = FolderDataset(root, "val")
    assert tuple(dataset.classes) == STREET_CLASSES and len(dataset) == 2
    for index in range(len(dataset)):
        _, label, name = dataset[index]
        label = np.asarray(label)
        stored = np.asarray(Image.open(root / "masks" / "val" / f"{name}.png"))
        np.testing.assert_array_equal(label, stored)
        sidecar = read_sidecar(root / "instances" / "val" / f"{name}.json")
        assert sidecar["size"] == [64, 80]
        covered = np.zeros(label.shape, dtype=int)
        for obj in sidecar["objects"]:
            mask = decode_runs(obj["runs"], (64, 80))
            ys, xs = np.nonzero(mask)
            assert obj["class"] in THINGS and obj["class_name"] == STREET_CLASSES[obj["class"]]
            assert (label[mask] == obj["class"]).all()
            assert obj["area"] == mask.sum() > 0
            assert obj["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            covered += mask
        assert covered.max() <= 1  # visible parts never overlap
        # Every pixel of a thing class belongs to exactly one object; stuff pixels to none.
        np.testing.assert_array_equal(covered == 1, np.isin(label, sorted(THINGS)))
    with pytest.raises(RegproxyError, match="no instance sidecar"):
        read_sidecar(root / "instances" / "val" / "missing.json")


def test_runs_round_trip_and_match_a_hand_example() -> None:
    mask = np.array([[0, 1, 1], [1, 0, 0], [0, 0, 1]], dtype=bool)
    assert encode_runs(mask) == [1, 3, 8, 1]  # flat 0 1 1 1 0 0 0 0 1
    rng = np.random.default_rng(0)
    for _ in range(5):
        random = rng.random((7, 9)) < 0.4
        np.testing.assert_array_equal(decode_runs(encode_runs(random), (7, 9)), random)
    assert encode_runs(np.zeros((2, 2), dtype=bool)) == []


def test_config_selects_the_generator(tmp_path: Path) -> None:
    config = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml", [
        "data.synthetic_generator=streets", f"data.root={tmp_path / 'streets'}", "data.synthetic_train=1",
        "data.synthetic_val=1", "data.synthetic_size=48"])
    dataset = config.data.open("val")
    assert tuple(dataset.classes) == STREET_CLASSES
    assert (tmp_path / "streets" / "instances" / "val" / "val_00000.json").is_file()
    assert load_config(None).data.synthetic_generator == "scenes"
    bad = load_config(None, ["data.kind=synthetic", "data.synthetic_generator=forest", f"data.root={tmp_path / 'x'}"])
    with pytest.raises(RegproxyError, match="forest"):
        bad.data.open("val")


def _sidecar(size: tuple[int, int], objects: list[tuple[int, str, int, np.ndarray]]) -> dict:
    return {"size": list(size), "objects": [
        {"id": i + 1, "class": cls, "kind": kind, "width_px": width, "runs": encode_runs(mask)}
        for i, (cls, kind, width, mask) in enumerate(objects)]}


def test_object_recall_on_a_constructed_prediction() -> None:
    size = (6, 8)
    pole1 = np.zeros(size, dtype=bool)
    pole1[:, 1] = True  # 6 px, width 1
    pole3 = np.zeros(size, dtype=bool)
    pole3[1:5, 4:7] = True  # 12 px, width 3
    sign = np.zeros(size, dtype=bool)
    sign[0:2, 6:8] = True
    sign &= ~pole3  # 3 px visible, width 2
    building = np.zeros(size, dtype=bool)
    building[4:6, 2:4] = True  # 4 px, width 9 (declared)
    sidecar = _sidecar(size, [(POLE, "pole", 1, pole1), (POLE, "pole", 3, pole3), (SIGN, "sign", 2, sign),
                              (1, "building", 9, building)])
    prediction = np.zeros(size, dtype=np.int64)
    prediction[0:2, 1] = POLE  # 2 of pole1's 6
    prediction[1:5, 4:6] = POLE  # 8 of pole3's 12
    prediction[1, 7] = SIGN  # 1 of the sign's 3
    prediction[4:6, 2:4] = 1  # all of the building
    prediction[0, 0] = SIGN  # a false positive touches no object's recall

    # Independent count: walk every pixel.
    expected = {}
    for obj, mask in zip(sidecar["objects"], (pole1, pole3, sign, building)):
        hits = area = 0
        for y in range(size[0]):
            for x in range(size[1]):
                if mask[y, x]:
                    area += 1
                    hits += int(prediction[y, x] == obj["class"])
        expected[obj["id"]] = (area, hits)
    records = object_recall(prediction, sidecar)
    assert [(r["area"], r["hits"]) for r in records] == [expected[i] for i in (1, 2, 3, 4)]
    assert [r["area"] for r in records] == [6, 12, 3, 4] and [r["hits"] for r in records] == [2, 8, 1, 4]
    assert records[0]["recall"] == pytest.approx(2 / 6) and records[1]["recall"] == pytest.approx(8 / 12)

    table = recall_by_width(records)
    assert list(table) == ["1", "2", "3", "8+"]
    assert table["1"] == {"objects": 1, "mean_recall": pytest.approx(1 / 3), "pixel_recall": pytest.approx(1 / 3),
                          "detected": 0.0}
    assert table["3"]["detected"] == 1.0 and table["8+"]["mean_recall"] == 1.0
    pooled = recall_by_width(records, edges=(1, 4))  # 1-3 px pooled: objects weigh alike, pixels by area
    assert pooled["1-3"]["mean_recall"] == pytest.approx((2 / 6 + 8 / 12 + 1 / 3) / 3)
    assert pooled["1-3"]["pixel_recall"] == pytest.approx(11 / 21)
    assert [width_bin(w) for w in (0, 1, 4, 5, 6, 7, 8, 30)] == ["<1", "1", "4-5", "4-5", "6-7", "6-7", "8+", "8+"]
    with pytest.raises(RegproxyError, match="prediction shape"):
        object_recall(prediction[:5], sidecar)


def test_sidecar_json_is_plain(tmp_path: Path) -> None:
    """The sidecar is ordinary JSON a script in any language can read (no NumPy types slipped in)."""
    record = StreetScenes(1, (48, 48), seed=0).sidecar(0)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(record))
    assert read_sidecar(path) == record
