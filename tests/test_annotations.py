"""Predictions for annotation tools: COCO RLE, labelme polygons and CVAT's Segmentation mask 1.1 zip, each read back
by an independent decoder (pycocotools, cv2.fillPoly, zipfile + PIL) and compared with the label map."""

import io
import json
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from regproxy_cli import RegproxyError
from regproxy_cli.classes import ADE20K_CLASSES, ADE20K_PALETTE
from regproxy_cli.data.formats import AnnotationWriter, check_formats
from regproxy_cli.data.formats.coco import read_coco
from regproxy_cli.data.formats.cvat import cvat_labelmap, read_cvat_zip
from regproxy_cli.data.formats.labelme import labelme_document, read_labelme
from regproxy_cli.hub.zoo import load_model
from regproxy_cli.images import load_image
from regproxy_cli.inference.predictor import predict_labels

CLASSES = ["background", "ring", "disk", "box", "bar"]
PALETTE = [(10, 20, 30), (200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]
MISSING = "needs the 'annotations' extra: pip install 'regproxy[annotations]'"


def _scene() -> np.ndarray:
    """Five classes: a ring (its hole holds a disk, which holds an island of the ring's class), two touching boxes
    (one with an island of the other), a one-pixel region and a one-pixel-wide line."""
    yy, xx = np.mgrid[:320, :440]
    labels = np.zeros((320, 440), dtype=np.int64)
    radius = np.hypot(yy - 160, xx - 160)
    labels[(radius >= 80) & (radius < 150)] = 1
    labels[radius < 80] = 2
    labels[radius < 8] = 1
    labels[20:170, 330:420] = 3
    labels[170:300, 330:420] = 4
    labels[60:75, 350:380] = 4
    labels[315, 5] = 2  # one pixel
    labels[3, 5:100] = 3  # one pixel wide
    return labels


def _small() -> np.ndarray:
    labels = np.full((30, 40), 4, dtype=np.int64)
    labels[5:12, 3:9] = 0
    return labels


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def _fill_shapes(document: dict) -> np.ndarray:
    """labelme shapes painted in file order with OpenCV, later over earlier: independent of read_labelme (PIL)."""
    out = np.full((document["imageHeight"], document["imageWidth"]), 255, dtype=np.uint8)
    for shape in document["shapes"]:
        points = np.round(np.array(shape["points"])).astype(np.int32)
        cv2.fillPoly(out, [points], CLASSES.index(shape["label"]))
    return out


def test_coco_rle_decodes_to_the_label_map(tmp_path):
    maps = {"scene": _scene(), "small": _small()}
    with AnnotationWriter(tmp_path, ["coco"], CLASSES, PALETTE) as writer:
        for stem, labels in maps.items():
            assert writer.add(stem, labels, tmp_path / f"{stem}.jpg") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.json"]  # nothing else, no spool left

    coco = COCO(str(tmp_path / "predictions.json"))  # pycocotools' own reader and decoder
    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == list(enumerate(CLASSES))
    for image in coco.loadImgs(coco.getImgIds()):
        labels = maps[image["file_name"].removesuffix(".jpg")]
        assert (image["height"], image["width"]) == labels.shape
        decoded = np.full(labels.shape, 255, dtype=np.int64)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert sorted(a["category_id"] for a in annotations) == np.unique(labels).tolist()  # one RLE per class
        for annotation in annotations:
            mask = coco.annToMask(annotation).astype(bool)
            assert not (decoded[mask] != 255).any()  # the classes do not overlap
            decoded[mask] = annotation["category_id"]
            ys, xs = np.nonzero(labels == annotation["category_id"])
            assert annotation["area"] == len(ys) and annotation["iscrowd"] == 1
            assert annotation["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert isinstance(annotation["segmentation"]["counts"], str)
        np.testing.assert_array_equal(decoded, labels)  # every class, pixel for pixel
    assert [a["id"] for a in coco.dataset["annotations"]] == list(range(1, len(coco.dataset["annotations"]) + 1))

    read = read_coco(tmp_path / "predictions.json")
    assert read.classes == CLASSES
    for stem, labels in maps.items():
        np.testing.assert_array_equal(read.labels[f"{stem}.jpg"], labels)


def test_labelme_polygons_give_the_label_map_back(tmp_path):
    labels = _scene()
    image = tmp_path / "images" / "scene.jpg"
    out = tmp_path / "out"
    out.mkdir()
    with AnnotationWriter(out, ["labelme"], CLASSES, PALETTE, polygon_tolerance=1.0) as writer:
        assert writer.add("scene", labels, image) == [out / "scene.json"]
    document = json.loads((out / "scene.json").read_text())
    assert set(document) == {"version", "flags", "shapes", "imagePath", "imageData", "imageHeight", "imageWidth"}
    assert document["imagePath"] == "../images/scene.jpg" and document["imageData"] is None
    assert (document["imageHeight"], document["imageWidth"]) == labels.shape
    for shape in document["shapes"]:
        assert shape["shape_type"] == "polygon" and shape["group_id"] is None and shape["flags"] == {}
        assert len(shape["points"]) >= 3
    # one polygon per connected region, holes painted by the regions inside them
    assert sorted(s["label"] for s in document["shapes"]) == sorted(
        ["background", "ring", "ring", "disk", "disk", "box", "box", "bar", "bar"])

    for name, painted in (("cv2.fillPoly", _fill_shapes(document)), ("read_labelme", read_labelme(document, CLASSES))):
        for class_id, class_name in enumerate(CLASSES):
            iou = _iou(painted == class_id, labels == class_id)
            assert iou >= 0.99, (name, class_name, iou)

    exact = labelme_document(labels, CLASSES, "scene.jpg", tolerance=0)
    np.testing.assert_array_equal(_fill_shapes(exact), labels)
    np.testing.assert_array_equal(read_labelme(exact, CLASSES), labels)
    assert sum(len(s["points"]) for s in exact["shapes"]) > 3 * sum(len(s["points"]) for s in document["shapes"])


def test_labelme_exact_polygon_of_a_simple_shape():
    labels = np.zeros((20, 30), dtype=np.int64)
    labels[4:11, 6:25] = 1  # rows 4..10, columns 6..24
    labels[15, 2] = 1  # one pixel: a polygon of three equal points
    shapes = labelme_document(labels, ["a", "b"], "x.png", tolerance=0)["shapes"]
    assert [s["label"] for s in shapes] == ["a", "b", "b"]
    assert sorted(map(tuple, shapes[1]["points"])) == [(6, 4), (6, 10), (24, 4), (24, 10)]
    assert shapes[2]["points"] == [[2, 15]] * 3
    painted = np.zeros_like(labels, dtype=np.uint8)
    for shape in shapes[1:]:
        cv2.fillPoly(painted, [np.array(shape["points"], dtype=np.int32)], 1)
    np.testing.assert_array_equal(painted, labels)


def _read_zip_independently(path):
    """labelmap.txt, default.txt and the masks of a CVAT zip, with zipfile and PIL only."""
    with zipfile.ZipFile(path) as archive:
        labelmap = archive.read("labelmap.txt").decode().splitlines()
        stems = archive.read("ImageSets/Segmentation/default.txt").decode().split()
        masks = {stem: (np.asarray(Image.open(io.BytesIO(archive.read(f"SegmentationClass/{stem}.png")))),
                        np.asarray(Image.open(io.BytesIO(archive.read(f"SegmentationObject/{stem}.png")))))
                 for stem in stems}
    return labelmap, stems, masks


def test_cvat_zip_reads_back_as_the_label_map(tmp_path):
    maps = {f"img{i}": np.roll(_scene()[::2, ::2], 7 * i, axis=1) for i in range(6)} | {"small": _small()}
    writer = AnnotationWriter(tmp_path, ["cvat"], CLASSES, PALETTE, cvat_name="task")
    with ThreadPoolExecutor(3) as pool:  # as predict's writer threads would call it
        list(pool.map(lambda item: writer.add(item[0], item[1], tmp_path / f"{item[0]}.png"), maps.items()))
    assert writer.close() == [tmp_path / "task.zip"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.zip"]

    labelmap, stems, masks = _read_zip_independently(tmp_path / "task.zip")
    assert labelmap[0] == "# label:color_rgb:parts:actions"
    assert labelmap[1:] == ["background:10,20,30::", "ring:200,0,0::", "disk:0,200,0::", "box:0,0,200::",
                            "bar:200,200,0::"]  # a class is named background: CVAT adds none of its own
    colour_to_id = {}
    for class_id, line in enumerate(labelmap[1:]):
        _name, colour, _parts, _actions = line.split(":")
        colour_to_id[tuple(int(c) for c in colour.split(","))] = class_id
    assert stems == sorted(maps)
    voc = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128)]  # VOC object colours
    for stem, (class_mask, object_mask) in masks.items():
        labels = maps[stem]
        assert class_mask.shape == object_mask.shape == labels.shape + (3,)
        decoded = np.array([colour_to_id[tuple(c)] for c in class_mask.reshape(-1, 3)]).reshape(labels.shape)
        np.testing.assert_array_equal(decoded, labels)
        objects = [tuple(c) for c in np.unique(object_mask.reshape(-1, 3), axis=0)]
        assert sorted(objects) == sorted(voc[1: len(np.unique(labels)) + 1])  # one object per class present
        for colour in objects:  # each object is exactly one class's pixels
            inside = (object_mask == colour).all(-1)
            assert len(np.unique(labels[inside])) == 1 and (labels == labels[inside][0]).sum() == inside.sum()

    read = read_cvat_zip(tmp_path / "task.zip", CLASSES)
    assert sorted(read.labels) == sorted(maps)
    for stem, labels in maps.items():
        np.testing.assert_array_equal(read.labels[stem], labels)


def test_cvat_labelmap_adds_background_and_keeps_colours_apart():
    lines = cvat_labelmap(ADE20K_CLASSES, ADE20K_PALETTE)
    assert lines[0] == ("background", (0, 0, 0)) and len(lines) == 151
    colours = [rgb for _, rgb in lines]
    assert len(set(colours)) == 151  # ADE20K gives road and skyscraper the same grey
    changed = [i for i, (rgb, given) in enumerate(zip(colours[1:], ADE20K_PALETTE)) if rgb != given]
    assert changed == [48] and ADE20K_CLASSES[48] == "skyscraper" and colours[49] == (140, 140, 141)
    assert cvat_labelmap(["a:b", "c"], [(0, 0, 0), (5, 5, 5)]) == [
        ("background", (0, 0, 0)), ("a_b", (0, 0, 1)), ("c", (5, 5, 5))]  # black is the background's


@pytest.mark.parametrize("fmt, modules", [("coco", ["pycocotools", "pycocotools.mask"]), ("labelme", ["cv2"])])
def test_a_missing_extra_is_one_line(monkeypatch, fmt, modules):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import` then raises ImportError
    with pytest.raises(RegproxyError) as error:
        check_formats(["png", fmt])
    assert str(error.value) == f"--format {fmt} {MISSING}"
    assert check_formats(["png", "cvat"]) == ["png", "cvat"]  # CVAT needs PIL only


@pytest.fixture(scope="module")
def model_classes():
    return list(CLASSES)


def test_predict_cli_writes_every_annotation_format(tmp_path, model_dir, cli):
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for name, size in (("a.png", (40, 56)), ("b.jpg", (64, 48))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(tmp_path / "in" / name)
    out = tmp_path / "out"
    result = cli("predict", str(tmp_path / "in"), "--model", str(model_dir), "--out", str(out), "--format", "coco",
                 "--format", "labelme", "--format", "cvat", "--polygon-tolerance", "0")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.json", "cvat.zip", "predictions.json"]  # no PNG

    model = load_model(model_dir)
    expected = {stem: predict_labels(model, load_image(tmp_path / "in" / name))
                for stem, name in (("a", "a.png"), ("b", "b.jpg"))}
    coco = COCO(str(out / "predictions.json"))
    assert [image["file_name"] for image in coco.loadImgs(coco.getImgIds())] == ["a.png", "b.jpg"]
    for image in coco.loadImgs(coco.getImgIds()):
        decoded = np.full((image["height"], image["width"]), 255)
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            decoded[coco.annToMask(annotation).astype(bool)] = annotation["category_id"]
        np.testing.assert_array_equal(decoded, expected[image["file_name"].rsplit(".", 1)[0]])
    _, stems, masks = _read_zip_independently(out / "cvat.zip")
    assert stems == ["a", "b"]
    for stem, labels in expected.items():
        assert masks[stem][0].shape == labels.shape + (3,)
        np.testing.assert_array_equal(read_cvat_zip(out / "cvat.zip", CLASSES).labels[stem], labels)
        document = json.loads((out / f"{stem}.json").read_text())
        assert (out / document["imagePath"]).resolve() == next((tmp_path / "in").glob(f"{stem}.*")).resolve()
        # exact, but for pixels where two regions of a random model cross diagonally
        assert (_fill_shapes(document) == labels).mean() > 0.99


def test_predict_cli_missing_extra_is_one_line_before_the_model_loads(tmp_path, cli):
    shadow = tmp_path / "shadow" / "pycocotools"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    result = cli("predict", str(tmp_path / "a.png"), "--model", str(tmp_path / "no-model"), "--format", "coco",
                 env={"PYTHONPATH": str(tmp_path / "shadow")})
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    # the message is printed as text, not rich markup: "[annotations]" survives
    assert result.stderr.strip() == f"error: --format coco {MISSING}"


# A COCO file written by hand (not by regproxy): a 6 x 10 image (non-square, so a transposed decode cannot pass),
# categories with ids 5 and 9 (not 0..K-1), a polygon and an uncompressed RLE that overlaps it, painted in file order.
HAND_COCO = {
    "images": [{"id": 3, "file_name": "wide.png", "height": 6, "width": 10}],
    "categories": [{"id": 9, "name": "boat"}, {"id": 5, "name": "water"}],
    "annotations": [
        # pixel centres (x + 0.5, y + 0.5) strictly inside the rectangle x 0.5..5.5, y 0.5..3.5: columns 1-5, rows 1-3
        {"id": 1, "image_id": 3, "category_id": 5, "iscrowd": 0,
         "segmentation": [[0.5, 0.5, 5.5, 0.5, 5.5, 3.5, 0.5, 3.5]]},
        # column-major runs: 28 off, then rows 4-5 of column 4 and rows 0-5 of column 5 on (8), then the rest off
        {"id": 2, "image_id": 3, "category_id": 9, "iscrowd": 1,
         "segmentation": {"size": [6, 10], "counts": [28, 8, 24]}},
    ],
}


def _hand_drawn() -> np.ndarray:
    expected = np.full((6, 10), 255, dtype=np.int64)
    expected[1:4, 1:6] = 0  # water: the categories sorted by id (5, 9) give ["water", "boat"]
    expected[4:6, 4] = 1  # boat
    expected[:, 5] = 1  # boat, over the water of column 5
    return expected


def test_read_coco_hand_written_polygons_and_uncompressed_rle_on_a_wide_image(tmp_path):
    path = tmp_path / "hand.json"
    path.write_text(json.dumps(HAND_COCO))
    maps = read_coco(path)
    assert maps.classes == ["water", "boat"]
    np.testing.assert_array_equal(maps.labels["wide.png"], _hand_drawn())
    by_name = read_coco(path, classes=["boat", "sky", "water"])  # matched by name
    np.testing.assert_array_equal(by_name.labels["wide.png"], np.select(
        [_hand_drawn() == 0, _hand_drawn() == 1], [2, 0], 255))


def test_data_import_reads_the_same_hand_written_coco_file(tmp_path):
    from regproxy_cli.data.formats import import_annotations

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "hand.json").write_text(json.dumps(HAND_COCO))
    Image.new("RGB", (10, 6)).save(tmp_path / "src" / "wide.png")
    import_annotations("coco", tmp_path / "src" / "hand.json", tmp_path / "ds", val_fraction=0)
    imported = np.asarray(Image.open(tmp_path / "ds" / "masks" / "train" / "wide.png")).astype(np.int64)
    np.testing.assert_array_equal(imported, _hand_drawn())
