"""`regproxy data stats` and `regproxy data import`: counts against numpy, problem masks named, every import
format on hand-built fixtures (holes, overlaps, z-order) and on what `predict --format` writes, and imports that
stop leave nothing behind."""

import base64
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from regproxy_cli.cli.app import app
from regproxy_cli.data.class_weights import pixel_counts, suggested_class_weights
from regproxy_cli.data.datasets import FolderDataset
from regproxy_cli.data.formats import AnnotationWriter, import_annotations
from regproxy_cli.data.formats.coco import coco_annotations
from regproxy_cli.data.formats.importer import assign_splits
from regproxy_cli.data.formats.voc import voc_colormap
from regproxy_cli.data.stats import dataset_stats
from regproxy_cli.errors import RegproxyError

pytest.importorskip("pycocotools")  # the `annotations` extra, part of the test extra
pytest.importorskip("cv2")

runner = CliRunner()
H, W = 40, 48
CLASSES = ["bg", "a", "b", "c"]


def _picture(path: Path, size=(H, W), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _scene(shift: int = 0) -> np.ndarray:
    """Blocks with holes: class a around a b block, c around a background hole, a second a block."""
    labels = np.zeros((H, W), dtype=np.int64)
    labels[4:20, 4 + shift:28 + shift] = 1
    labels[8:14, 10 + shift:18 + shift] = 2
    labels[24:36, 30:44] = 3
    labels[28:32, 34:40] = 0
    labels[26:34, 4:12] = 1
    return labels


def _dataset_labels(root: Path) -> dict[str, np.ndarray]:
    found = {}
    for split in ("train", "val"):
        if (root / "images" / split).is_dir():
            dataset = FolderDataset(root, split)
            found.update({name: dataset.load_label(i).astype(np.int64) for i, (_, _, name) in
                          enumerate(dataset.samples)})
    return found


# ---------------------------------------------------------------------------------------------------- stats


def _folder_dataset(root: Path, masks: dict[str, np.ndarray], split: str = "train") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": CLASSES}))
    for name, mask in masks.items():
        _picture(root / "images" / split / f"{name}.png")
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / split / f"{name}.png")


def test_stats_counts_match_numpy_and_the_class_weights_module(tmp_path):
    rng = np.random.default_rng(1)
    masks = {f"m{i}": rng.choice([0, 1, 1, 2, 255], size=(H, W)) for i in range(4)}
    masks["m4"] = np.zeros((H, W), dtype=np.int64)  # only class 0: class 3 never occurs anywhere
    _folder_dataset(tmp_path, masks)
    (split,) = dataset_stats("auto", tmp_path, workers=2)
    stacked = np.stack(list(masks.values()))
    expected = np.array([(stacked == c).sum() for c in range(4)])
    np.testing.assert_array_equal(split.pixels, expected)
    np.testing.assert_array_equal(split.pixels, pixel_counts(FolderDataset(tmp_path, "train")))
    np.testing.assert_array_equal(split.images_with, [5, 4, 4, 0])
    assert split.ignored == (stacked == 255).sum() and split.sizes == {(W, H): 5} and not split.problems
    report = split.to_dict()
    np.testing.assert_allclose([c["weight"] for c in report["classes"]], suggested_class_weights(expected))
    np.testing.assert_allclose(sum(c["pixel_percent"] for c in report["classes"]), 100.0)
    assert report["classes"][3]["weight"] == 0.0 and report["counted_images"] == 5


def test_stats_names_every_problem_mask_and_leaves_it_out(tmp_path):
    good = np.ones((H, W), dtype=np.int64)
    out_of_range = good.copy()
    out_of_range[0, :3] = [7, 9, 9]
    _folder_dataset(tmp_path, {"good": good, "range": out_of_range, "small": np.ones((H - 2, W)), "broken": good})
    (tmp_path / "masks" / "train" / "broken.png").write_bytes(b"not a png")
    _picture(tmp_path / "images" / "val" / "v.png")  # a second split, clean
    (tmp_path / "masks" / "val").mkdir()
    Image.fromarray(np.full((H, W), 2, dtype=np.uint8)).save(tmp_path / "masks" / "val" / "v.png")
    train, val = dataset_stats("auto", tmp_path)
    kinds = {Path(p.path).name: (p.kind, p.message) for p in train.problems}
    assert set(kinds) == {"range.png", "small.png", "broken.png"}
    assert kinds["range.png"][0] == "out-of-range" and "7, 9" in kinds["range.png"][1]
    assert kinds["small.png"][0] == "off-size" and f"{W}x{H - 2}" in kinds["small.png"][1]
    assert kinds["broken.png"][0] == "unreadable"
    assert train.counted == 1 and train.pixels.tolist() == [0, H * W, 0, 0]
    assert val.split == "val" and val.pixels.tolist() == [0, 0, H * W, 0] and not val.problems

    result = runner.invoke(app, ["data", "stats", str(tmp_path), "--json"])
    assert result.exit_code == 1 and "3 problem(s) in 3 file(s)" in str(result.exception)
    document = json.loads(result.stdout)
    assert [s["split"] for s in document["splits"]] == ["train", "val"] and "median" in document["weight_formula"]
    assert {Path(p["path"]).name for p in document["splits"][0]["problems"]} == set(kinds)


def test_stats_cli_reads_a_config_and_prints_tables(tmp_path):
    _folder_dataset(tmp_path / "ds", {"x": _scene()})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"kind": "folder", "root": str(tmp_path / "ds")}}))
    result = runner.invoke(app, ["data", "stats", str(config), "--split", "train"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "train: 1 images" in result.output and f"{W}x{H} (1)" in result.output
    share = 100 * (_scene() == 2).sum() / (H * W)
    assert f"b{' ' * 8}" in result.output and f"{share:.2f}" in result.output
    bad = runner.invoke(app, ["data", "stats", str(tmp_path / "nothing")])
    assert bad.exit_code == 1 and "not a config file or a dataset folder" in str(bad.exception)


# ---------------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("source_format", ["coco", "labelme", "cvat"])
def test_what_predict_writes_imports_back_to_the_same_labels(tmp_path, source_format):
    pictures = tmp_path / "pictures"
    scenes = {f"img{i}": _scene(shift=i) for i in range(5)}
    out = tmp_path / "out"
    out.mkdir()
    palette = [(10, 10, 10), (200, 0, 0), (0, 200, 0), (0, 0, 200)]
    with AnnotationWriter(out, [source_format], CLASSES, palette, polygon_tolerance=0.0) as writer:
        for i, (name, labels) in enumerate(scenes.items()):
            writer.add(name, labels, _picture(pictures / f"{name}.png", seed=i))
    source = {"coco": out / "predictions.json", "labelme": out, "cvat": out / "cvat.zip"}[source_format]
    # labelme's imagePath climbs out of OUT ('../pictures/x.png'): pictures are looked up under --images by name
    extra = ["--images", str(pictures)] + (["--classes", ",".join(CLASSES)] if source_format == "labelme" else [])
    result = runner.invoke(app, ["data", "import", "--from", source_format, str(source), str(tmp_path / "ds"),
                                 *extra, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(result.stdout)
    assert report["classes"] == CLASSES and report["images"] == {"train": 4, "val": 1}
    imported = _dataset_labels(tmp_path / "ds")
    assert sorted(imported) == sorted(scenes)
    for name, labels in scenes.items():
        np.testing.assert_array_equal(imported[name], labels, err_msg=name)
    spec = yaml.safe_load((tmp_path / "ds" / "classes.yaml").read_text())
    assert spec["classes"] == CLASSES and len(spec["palette"]) == 4
    if source_format == "cvat":  # CVAT carries the colours
        assert [tuple(c) for c in spec["palette"]] == palette


# ---------------------------------------------------------------------------------------------------- COCO


def _coco(tmp_path: Path, annotations: list[dict], categories=None) -> Path:
    _picture(tmp_path / "photos" / "p1.jpg")
    _picture(tmp_path / "photos" / "sub" / "p2.png", size=(20, 30))
    document = {
        "images": [{"id": 7, "file_name": "p1.jpg", "height": H, "width": W},
                   {"id": 8, "file_name": "sub/p2.png", "height": 20, "width": 30}],
        "annotations": annotations,
        "categories": categories or [{"id": 1, "name": "road"}, {"id": 3, "name": "car"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(document))
    return path


def test_coco_holes_unions_crowd_rles_and_overlaps(tmp_path):
    keyhole = [1, 1, 30, 1, 30, 30, 1, 30, 1, 1, 10, 10, 10, 20, 20, 20, 20, 10, 10, 10, 1, 1]
    crowd = np.zeros((H, W), dtype=np.uint8)
    crowd[20:38, 32:46] = 1
    crowd[25:30, 36:40] = 0  # a hole in the crowd region
    counts = []  # uncompressed RLE: column-major runs, zeros first
    flat = crowd.flatten(order="F")
    run_value, run = 0, 0
    for value in flat:
        if value == run_value:
            run += 1
        else:
            counts.append(run)
            run_value, run = value, 1
    counts.append(run)
    annotations = [
        {"id": 1, "image_id": 7, "category_id": 1, "segmentation": [keyhole], "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 3, "iscrowd": 1,
         "segmentation": {"size": [H, W], "counts": counts}},
        # two polygons, one annotation: united; the first overlaps the keyhole and is painted over it
        {"id": 3, "image_id": 7, "category_id": 3, "iscrowd": 0,
         "segmentation": [[25, 2, 35, 2, 35, 8, 25, 8], [2, 34, 6, 34, 6, 38, 2, 38]]},
        {"id": 4, "image_id": 7, "category_id": 1, "bbox": [0, 0, 2, 2]},  # no segmentation: nothing to paint
    ]
    source = _coco(tmp_path, annotations)
    result = import_annotations("coco", source, tmp_path / "ds", images=tmp_path / "photos", val_fraction=0)
    assert result.classes == ["road", "car"] and result.images == {"train": 2} and result.unlabelled == ["p2"]
    expected = np.full((H, W), 255)
    expected[1:30, 1:30] = 0
    expected[10:20, 10:20] = 255  # the keyhole's hole (even-odd within one polygon)
    expected[crowd == 1] = 1
    expected[2:8, 25:35] = 1
    expected[34:38, 2:6] = 1
    labels = _dataset_labels(tmp_path / "ds")
    np.testing.assert_array_equal(labels["p1"], expected)
    assert (labels["p2"] == 255).all() and (tmp_path / "ds" / "images" / "train" / "p1.jpg").is_file()
    # the compressed RLE pycocotools writes reads the same as the uncompressed one
    compressed = coco_annotations(crowd.astype(np.int64), image_id=7)[1]
    source = _coco(tmp_path, [{**compressed, "category_id": 3}])
    import_annotations("coco", source, tmp_path / "ds2", images=tmp_path / "photos", val_fraction=0)
    np.testing.assert_array_equal(_dataset_labels(tmp_path / "ds2")["p1"], np.where(crowd == 1, 1, 255))


@pytest.mark.parametrize("segmentation, message", [
    ([[1, 1, 5, 5]], "needs at least 3 points, it has 2"),
    ([[1, 1, 5, "x", 5, 1]], "'x' is not a number"),
    ([[1, 1, 5, 5, 9]], "odd count"),
    ({"size": [H, W], "counts": [5, 5]}, f"adding up to {H * W}"),
    ({"size": [H + 1, W], "counts": "abc"}, "is not the image's"),
])
def test_coco_broken_segmentations_name_the_file_and_annotation(tmp_path, segmentation, message):
    source = _coco(tmp_path, [{"id": 12, "image_id": 7, "category_id": 1, "segmentation": segmentation}])
    with pytest.raises(RegproxyError, match=message) as caught:
        import_annotations("coco", source, tmp_path / "ds", images=tmp_path / "photos")
    assert str(source) in str(caught.value) and "annotation 12" in str(caught.value)
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds*"))


def test_coco_category_outside_classes_and_background(tmp_path):
    square = [[0, 0, 10, 0, 10, 10, 0, 10]]
    source = _coco(tmp_path, [{"id": 1, "image_id": 7, "category_id": 3, "segmentation": square}])
    with pytest.raises(RegproxyError, match=r"label 'car' is not one of --classes"):
        import_annotations("coco", source, tmp_path / "ds", images=tmp_path / "photos", classes="road,person")
    result = import_annotations("coco", source, tmp_path / "ds", images=tmp_path / "photos", classes="bg,car",
                                background="bg", val_fraction=0)
    labels = _dataset_labels(tmp_path / "ds")["p1"]
    assert result.classes == ["bg", "car"] and (labels[:10, :10] == 1).all() and (labels[10:] == 0).all()


# ---------------------------------------------------------------------------------------------------- labelme


def _labelme(folder: Path, name: str, shapes: list[dict], *, picture: bool = True, data: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if picture:
        _picture(folder / f"{name}.jpg")
    document = {"version": "5.5.0", "flags": {}, "shapes": shapes, "imagePath": f"{name}.jpg",
                "imageData": base64.b64encode(data).decode() if data else None, "imageHeight": H, "imageWidth": W}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(document))
    return path


def _shape(label, points, kind="polygon", **extra):
    return {"label": label, "points": points, "shape_type": kind, "group_id": None, "flags": {}, **extra}


def test_labelme_file_order_holes_ignore_masks_and_embedded_pictures(tmp_path):
    mask = np.zeros((4, 5), dtype=np.uint8)
    mask[1:3, 1:4] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    shapes = [
        _shape("road", [[2, 2], [30, 2], [30, 20], [2, 20]]),
        _shape("car", [[10, 5], [20, 5], [20, 12], [10, 12]]),  # over road: a car-shaped hole in it
        _shape("road", [[12, 7], [14, 7], [14, 9], [12, 9]]),  # and road again inside the car
        _shape("__ignore__", [[0, 30], [5, 35]], "rectangle"),
        _shape("car", [[42, 30], [46, 33]], "mask", mask=base64.b64encode(buffer.getvalue()).decode()),
        _shape("road", [[1, 1], [5, 5]], "line"),  # no area: left out
        _shape("car", [[30, 30], [40, 38], [30, 38], [40, 30]]),  # a self-intersecting bow tie is allowed
    ]
    _labelme(tmp_path / "src", "one", shapes)
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    _labelme(tmp_path / "src", "two", [_shape("car", [[0, 0], [3, 0], [0, 3]])], picture=False,
             data=jpeg.getvalue())
    result = import_annotations("labelme", tmp_path / "src", tmp_path / "ds", val_fraction=0.5, seed=3)
    assert result.classes == ["car", "road"] and result.skipped == {"line": 1}
    assert sum(result.images.values()) == 2 and set(result.images) == {"train", "val"}
    labels = _dataset_labels(tmp_path / "ds")
    one = labels["one"]
    # PIL fills polygons with their outline: integer vertices cover both end pixels
    assert (one[2:21, 2:10] == 1).all() and (one[2:5, 2:31] == 1).all()
    assert (one[5:13, 10:12] == 0).all() and (one[7:10, 12:15] == 1).all()
    assert (one[30:36, 0:6] == 255).all()
    expected_mask = np.full((4, 5), 255)
    expected_mask[1:3, 1:4] = 0
    np.testing.assert_array_equal(one[30:34, 42:47], expected_mask)
    assert one[31, 35] == 0 and one[37, 35] == 0 and one[34, 31] == 255  # the bow tie: lobes, not sides
    assert len(list((tmp_path / "ds" / "images").rglob("two.jpg"))) == 1 and labels["two"][0, 0] == 0


@pytest.mark.parametrize("shape, message", [
    (_shape("road", [[1, 1], [5, 5]]), "a polygon needs at least 3 points, it has 2"),
    (_shape("road", [[1, 1], [5, "five"], [1, 5]]), "'five' is not a number"),
    (_shape("road", [[1, 1], [5, 5], [1, 5]], "spline"), "unknown shape type"),
    (_shape("person", [[1, 1], [5, 5], [1, 5]]), "label 'person' is not one of --classes"),
])
def test_labelme_bad_shapes_name_the_file(tmp_path, shape, message):
    path = _labelme(tmp_path / "src", "bad", [shape])
    (tmp_path / "ds").mkdir()  # an empty destination is fine, and is still empty after the failure
    with pytest.raises(RegproxyError, match=message) as caught:
        import_annotations("labelme", tmp_path / "src", tmp_path / "ds", classes=["road", "car"])
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert not any((tmp_path / "ds").iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["ds", "src"]


def test_labelme_missing_picture_and_destinations(tmp_path):
    _labelme(tmp_path / "src", "lonely", [_shape("road", [[1, 1], [5, 1], [5, 5]])], picture=False)
    with pytest.raises(RegproxyError, match=r"lonely.json: its image 'lonely.jpg' is not in .*--images"):
        import_annotations("labelme", tmp_path / "src", tmp_path / "ds")
    _picture(tmp_path / "elsewhere" / "lonely.jpg")
    import_annotations("labelme", tmp_path / "src", tmp_path / "ds", images=tmp_path / "elsewhere")
    first = sorted(p.relative_to(tmp_path / "ds") for p in (tmp_path / "ds").rglob("*"))
    with pytest.raises(RegproxyError, match="exists and is not empty; --force replaces it"):
        import_annotations("labelme", tmp_path / "src", tmp_path / "ds", images=tmp_path / "elsewhere")
    (tmp_path / "ds" / "stale.txt").write_text("old")
    import_annotations("labelme", tmp_path / "src", tmp_path / "ds", images=tmp_path / "elsewhere", force=True)
    assert sorted(p.relative_to(tmp_path / "ds") for p in (tmp_path / "ds").rglob("*")) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "elsewhere", "src"]  # no temporary folders left
    with pytest.raises(RegproxyError, match="holds the source"):
        import_annotations("labelme", tmp_path / "src", tmp_path, force=True)


def test_a_bad_import_is_one_error_line_from_the_command(tmp_path, cli):
    _labelme(tmp_path / "src", "bad", [_shape("road", [[1, 1], [5, 5]])])
    result = cli("data", "import", "--from", "labelme", str(tmp_path / "src"), str(tmp_path / "ds"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "bad.json" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "ds").exists()


# ---------------------------------------------------------------------------------------------------- CVAT


CVAT_XML = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta><task><name>t</name><labels>
    <label><name>road</name><color>#804080</color><type>any</type><attributes/></label>
    <label><name>car</name><color>#00008e</color><type>any</type><attributes/></label>
  </labels></task></meta>
  <image id="0" name="frames/f1.png" width="48" height="40">
    <polygon label="car" source="manual" occluded="0" points="5.00,5.00;15.00,5.00;15.00,15.00;5.00,15.00" z_order="1">
    </polygon>
    <box label="road" source="manual" occluded="0" xtl="0.00" ytl="0.00" xbr="20.00" ybr="20.00" z_order="0"/>
    <mask label="car" source="manual" occluded="0" rle="1, 2, 1, 4, 1, 2, 1" left="30" top="3" width="4" height="3"
     z_order="0"/>
    <polyline label="road" source="manual" occluded="0" points="0,0;10,10" z_order="3"/>
    <points label="car" source="manual" occluded="0" points="1,1" z_order="0"/>
  </image>
  <image id="1" name="frames/f2.png" width="48" height="40">
  </image>
</annotations>
"""


def test_cvat_xml_z_order_boxes_masks_and_a_zip_with_its_pictures(tmp_path):
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "annotations.xml").write_text(CVAT_XML)
    _picture(tmp_path / "task" / "images" / "frames" / "f1.png")
    _picture(tmp_path / "task" / "images" / "frames" / "f2.png")
    result = import_annotations("cvat", tmp_path / "task", tmp_path / "ds", val_fraction=0)
    assert result.classes == ["road", "car"] and result.palette == [(128, 64, 128), (0, 0, 142)]
    assert result.skipped == {"polyline": 1, "points": 1} and result.unlabelled == ["f2"]
    expected = np.full((H, W), 255)
    expected[0:21, 0:21] = 0  # the box, painted first: z_order 0 although it comes second in the file
    expected[5:16, 5:16] = 1  # the polygon, z_order 1, on top
    expected[3:6, 30:34] = np.where([[0, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 0]], 1, 255)
    np.testing.assert_array_equal(_dataset_labels(tmp_path / "ds")["f1"], expected)

    archive = tmp_path / "export.zip"  # CVAT's "CVAT for images 1.1" export with images
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(tmp_path / "task" / "annotations.xml", "annotations.xml")
        for name in ("f1", "f2"):
            zipped.write(tmp_path / "task" / "images" / "frames" / f"{name}.png", f"images/frames/{name}.png")
    import_annotations("cvat", archive, tmp_path / "ds2", val_fraction=0)
    np.testing.assert_array_equal(_dataset_labels(tmp_path / "ds2")["f1"], expected)


@pytest.mark.parametrize("old, new, message", [
    ('points="5.00,5.00;15.00,5.00;15.00,15.00;5.00,15.00"', 'points="5.00,5.00;15.00,5.00"',
     "a polygon needs at least 3 points, it has 2"),
    ('points="5.00,5.00;15.00,5.00;15.00,15.00;5.00,15.00"', 'points="5,5;a,b;1,1"', "'a' is not a number"),
    ('rle="1, 2, 1, 4, 1, 2, 1"', 'rle="1, 2, 1"', "add up to 4, not width x height = 12"),
    ('<box label="road"', '<box label="tree"', "label 'tree' is not one of --classes"),
])
def test_cvat_bad_shapes_name_the_file_and_image(tmp_path, old, new, message):
    xml = tmp_path / "annotations.xml"
    xml.write_text(CVAT_XML.replace(old, new))
    with pytest.raises(RegproxyError, match=message) as caught:
        import_annotations("cvat", xml, tmp_path / "ds", classes="road,car")
    assert f"{xml}: image 'frames/f1.png'" in str(caught.value) and not (tmp_path / "ds").exists()


# ---------------------------------------------------------------------------------------------------- VOC


def _voc(tmp_path: Path, values: dict[str, int]) -> Path:
    base = tmp_path / "VOCdevkit" / "VOC2012"
    colours = voc_colormap(256)
    for name, value in values.items():
        _picture(base / "JPEGImages" / f"{name}.jpg")
        mask = np.zeros((H, W), dtype=np.uint8)
        mask[10:30, 10:30] = 255  # the object border
        mask[12:28, 12:28] = value
        picture = Image.fromarray(mask, mode="L")
        picture.putpalette(colours.tobytes())  # P mode, as VOC ships them
        (base / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        picture.save(base / "SegmentationClass" / f"{name}.png")
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("c\n")
    return base


def test_voc_keeps_ids_borders_and_its_splits(tmp_path):
    _voc(tmp_path, {"a": 15, "b": 7, "c": 20})
    result = import_annotations("voc", tmp_path, tmp_path / "ds", val_fraction=0.9)  # the lists win
    assert result.images == {"train": 2, "val": 1} and len(result.classes) == 21 and result.classes[15] == "person"
    assert result.palette[15] == tuple(int(v) for v in voc_colormap(16)[15])
    labels = _dataset_labels(tmp_path / "ds")
    for name, value in {"a": 15, "b": 7, "c": 20}.items():
        expected = np.zeros((H, W), dtype=np.int64)
        expected[10:30, 10:30] = 255
        expected[12:28, 12:28] = value
        np.testing.assert_array_equal(labels[name], expected)
    assert (tmp_path / "ds" / "images" / "val" / "c.jpg").is_file()


def test_voc_value_outside_the_classes_is_named(tmp_path):
    base = _voc(tmp_path, {"a": 15, "b": 30, "c": 1})
    with pytest.raises(RegproxyError, match=r"b\.png: value\(s\) 30 are not class ids 0..20") as caught:
        import_annotations("voc", tmp_path, tmp_path / "ds")
    assert str(base / "SegmentationClass" / "b.png") in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["VOCdevkit"]


# ---------------------------------------------------------------------------------------------------- splits


def test_seeded_split_is_reproducible_and_sized():
    names = [f"n{i:02d}" for i in range(20)]
    first = assign_splits(names, 0.2, seed=0)
    assert first == assign_splits(list(reversed(names)), 0.2, seed=0)  # the order given does not matter
    assert sum(split == "val" for split in first.values()) == 4
    assert first != assign_splits(names, 0.2, seed=1)
    assert list(assign_splits(["x", "y"], 0.01, 0).values()).count("val") == 1  # at least one
    assert set(assign_splits(["x", "y"], 0.0, 0).values()) == {"train"}
    with pytest.raises(RegproxyError, match="--val-fraction"):
        import_annotations("voc", ".", "unused", val_fraction=1.0)
