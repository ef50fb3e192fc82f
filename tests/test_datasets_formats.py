"""The file-backed dataset plugins (datasets/voc2007.py, coco2014.py, nuswide.py, folder.py).

Every test writes a tiny dataset in its genuine on-disk format into ``tmp_path`` and compares
``targets`` / ``ignore`` element by element with arrays written out here by hand.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.api.dataset import UnreadableImage
from bench.api.registry import build_dataset, dataset_class
from bench.config.grid import load_grid
from bench.core.errors import DataError, UsageError
from bench.data import image_cache

VOC = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (16, 12)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (16, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(seed, size))
    return path


def module(name: str):
    return sys.modules[dataset_class(name).__module__]


def bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


# ------------------------------------------------------------------------------------------------
# VOC2007

VOC_IDS = ["000005", "000007", "000009", "000012"]
# per image: {class: label-file value}; absent classes are -1
VOC_LABELS = {
    "000005": {"dog": 1, "person": 0},  # person only as difficult objects
    "000007": {"cat": 1, "person": 1, "sofa": 0},
    "000009": {"person": 0, "dog": 0},
    "000012": {},
}
# the XML objects that produce exactly those labels: (class, difficult)
VOC_OBJECTS = {
    "000005": [("dog", 0), ("person", 1), ("person", 1)],  # all person instances difficult
    "000007": [("cat", 0), ("person", 1), ("person", 0), ("sofa", 1)],  # mixed person -> positive
    "000009": [("person", 1), ("dog", 1)],
    "000012": [],
}
C = {name: k for k, name in enumerate(VOC)}


def voc_expected(policy: str) -> tuple[np.ndarray, np.ndarray]:
    targets = np.zeros((4, 20), dtype=np.uint8)
    ignore = np.zeros((4, 20), dtype=bool)
    # positives: 000005 dog; 000007 cat, person
    targets[0, C["dog"]] = targets[1, C["cat"]] = targets[1, C["person"]] = 1
    difficult = [(0, C["person"]), (1, C["sofa"]), (2, C["person"]), (2, C["dog"])]
    for i, c in difficult:
        if policy in ("ignore", "train_positive"):
            ignore[i, c] = True
        if policy in ("positive", "train_positive"):
            targets[i, c] = 1
    return targets, ignore


def write_annotation(path: Path, objects: list[tuple[str, int]]) -> None:
    parts = []
    for name, difficult in objects:
        part = "<part><name>head</name></part>" if name == "person" else ""
        parts.append(f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
                     f"<difficult>{difficult}</difficult>{part}<bndbox><xmin>1</xmin><ymin>1</ymin>"
                     f"<xmax>5</xmax><ymax>5</ymax></bndbox></object>")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><folder>VOC2007</folder><filename>{path.stem}.jpg</filename>"
                    f"<size><width>16</width><height>12</height><depth>3</depth></size>{''.join(parts)}</annotation>")  # fmt: skip


def make_voc(base: Path, *, label_files: bool = True, xml: bool = False, split: str = "trainval") -> Path:
    """A VOCdevkit under ``base``; returns ``base`` (the folder holding VOCdevkit/)."""
    voc = base / "VOCdevkit" / "VOC2007"
    main = voc / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in VOC_IDS))
    for k, image_id in enumerate(VOC_IDS):
        write_jpeg(voc / "JPEGImages" / f"{image_id}.jpg", seed=k)
        if xml:
            write_annotation(voc / "Annotations" / f"{image_id}.xml", VOC_OBJECTS[image_id])
    if label_files:
        for name in VOC:
            lines = [f"{i} {VOC_LABELS[i].get(name, -1):2d}\n" for i in VOC_IDS]  # genuine format: "000005 -1"
            (main / f"{name}_{split}.txt").write_text("".join(lines))
    return base


@pytest.mark.parametrize("policy", ["ignore", "positive", "negative", "train_positive"])
@pytest.mark.parametrize("variant", ["label_files", "xml_only"])
def test_voc_targets_and_ignore_element_by_element(tmp_path: Path, policy: str, variant: str) -> None:
    root = make_voc(tmp_path, label_files=variant == "label_files", xml=variant == "xml_only")
    ds = build_dataset("voc2007", root, "trainval", difficult=policy)
    assert ds.classes == VOC == sorted(VOC)
    assert [ds.image_id(i) for i in range(len(ds))] == VOC_IDS
    assert ds.label_source == ("files" if variant == "label_files" else "xml")
    targets, ignore = voc_expected(policy)
    assert ds.targets.dtype == np.uint8 and ds.ignore.dtype == bool
    np.testing.assert_array_equal(ds.targets, targets)
    np.testing.assert_array_equal(ds.ignore, ignore)
    image, target, ign = ds[1]
    assert tuple(image.shape) == (3, 12, 16) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    np.testing.assert_array_equal(target.numpy(), targets[1].astype(np.float32))
    np.testing.assert_array_equal(ign.numpy(), ignore[1])


def test_voc_xml_and_label_files_agree_and_roots_are_found(tmp_path: Path) -> None:
    root = make_voc(tmp_path, label_files=True, xml=True)
    voc = root / "VOCdevkit" / "VOC2007"
    from_files = build_dataset("voc2007", voc, "trainval", label_source="files")
    from_xml = build_dataset("voc2007", root / "VOCdevkit", "trainval", label_source="xml")
    assert from_xml.label_source == "xml" and from_files.label_source == "files"
    np.testing.assert_array_equal(from_files.targets, from_xml.targets)
    np.testing.assert_array_equal(from_files.ignore, from_xml.ignore)
    assert build_dataset("voc2007", root, "trainval").label_source == "files"  # auto: the label files win


def test_voc_errors_name_the_file(tmp_path: Path) -> None:
    root = make_voc(tmp_path)
    main = root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    with pytest.raises(DataError, match=r"test\.txt|test"):
        build_dataset("voc2007", root, "test")  # no file of that split at all
    with pytest.raises(UsageError, match=r"datasets/voc2007\.py.*difficult = 'maybe'.*'ignore', 'positive', 'negative'"):
        build_dataset("voc2007", root, "trainval", difficult="maybe")
    with pytest.raises(UsageError, match=r"voc2007\.py.*no data root given.*JPEGImages"):
        build_dataset("voc2007", None, "trainval")
    with pytest.raises(DataError, match=r"is not a VOC2007 folder"):
        build_dataset("voc2007", tmp_path / "nowhere", "trainval")

    (root / "VOCdevkit/VOC2007/JPEGImages/000009.jpg").unlink()
    with pytest.raises(DataError, match=r"1 image file\(s\) listed in .*trainval\.txt are missing from .*JPEGImages: 000009\.jpg"):
        build_dataset("voc2007", root, "trainval")
    write_jpeg(root / "VOCdevkit/VOC2007/JPEGImages/000009.jpg")

    bad = main / "dog_trainval.txt"
    text = bad.read_text()
    bad.write_text(text.replace("000009  0", "000009  2"))
    with pytest.raises(DataError, match=r"dog_trainval\.txt, line 3: expected '<image id> <1\|-1\|0>'"):
        build_dataset("voc2007", root, "trainval")
    bad.write_text(text.replace("000009  0\n", ""))
    with pytest.raises(DataError, match=r"dog_trainval\.txt: image id '000009' .* has no label"):
        build_dataset("voc2007", root, "trainval")
    bad.write_text(text + "000099 -1\n")
    with pytest.raises(DataError, match=r"dog_trainval\.txt, line 5: image id '000099' is not in .*trainval\.txt"):
        build_dataset("voc2007", root, "trainval")
    bad.unlink()
    with pytest.raises(DataError, match=r"label file .*dog_trainval\.txt is missing"):
        build_dataset("voc2007", root, "trainval")


def test_voc_xml_errors(tmp_path: Path) -> None:
    root = make_voc(tmp_path, label_files=False, xml=True)
    voc = root / "VOCdevkit" / "VOC2007"
    write_annotation(voc / "Annotations" / "000012.xml", [("unicorn", 0)])
    with pytest.raises(DataError, match=r"000012\.xml: object class 'unicorn' is not one of the 20 VOC classes"):
        build_dataset("voc2007", root, "trainval")
    (voc / "Annotations" / "000012.xml").unlink()
    with pytest.raises(DataError, match=r"annotation file\(s\) .* missing .*000012\.xml"):
        build_dataset("voc2007", root, "trainval")
    (voc / "ImageSets/Main/trainval.txt").write_text("\n")
    with pytest.raises(DataError, match=r"split 'trainval' is empty: .*trainval\.txt"):
        build_dataset("voc2007", root, "trainval")
    (voc / "ImageSets/Main/trainval.txt").unlink()
    with pytest.raises(DataError, match=r"split list .*trainval\.txt is missing"):
        build_dataset("voc2007", root, "trainval")


# ------------------------------------------------------------------------------------------------
# COCO2014

COCO_CATEGORIES = [  # ids deliberately not in name order
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 2, "name": "bicycle", "supercategory": "vehicle"},
    {"id": 53, "name": "apple", "supercategory": "food"},
]
COCO_CLASSES = ["apple", "bicycle", "car", "dog", "person"]


def coco_file(split: str, k: int) -> str:
    return f"COCO_{split}2014_{k:012d}.jpg"


def make_coco(root: Path) -> Path:
    for split, ids in (("train", [9, 25, 30, 34]), ("val", [42, 73])):
        images = [{"id": i, "file_name": coco_file(split, i), "width": 16, "height": 12} for i in ids]
        if split == "train":
            annotations = [  # image 9: person x2 + dog; 25: none; 30: crowd person only; 34: apple, car
                {"id": 1, "image_id": 9, "category_id": 1, "iscrowd": 0},
                {"id": 2, "image_id": 9, "category_id": 1, "iscrowd": 0},
                {"id": 3, "image_id": 9, "category_id": 18, "iscrowd": 0},
                {"id": 4, "image_id": 30, "category_id": 1, "iscrowd": 1},
                {"id": 5, "image_id": 34, "category_id": 53, "iscrowd": 0},
                {"id": 6, "image_id": 34, "category_id": 3, "iscrowd": 0},
            ]
        else:
            annotations = [{"id": 7, "image_id": 73, "category_id": 2, "iscrowd": 0}]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        data = {"info": {}, "images": images, "annotations": annotations, "categories": COCO_CATEGORIES}
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
        for i in ids:
            write_jpeg(root / f"{split}2014" / coco_file(split, i), seed=i)
    return root


def test_coco_classes_by_name_and_unlabeled_images(tmp_path: Path) -> None:
    root = make_coco(tmp_path / "coco")
    ds = build_dataset("coco2014", root, "train")
    assert ds.classes == COCO_CLASSES
    assert [ds.image_id(i) for i in range(len(ds))] == [coco_file("train", i) for i in (9, 30, 34)]
    np.testing.assert_array_equal(ds.targets, np.array([
        [0, 0, 0, 1, 1],  # 9: dog, person
        [0, 0, 0, 0, 1],  # 30: crowd person
        [1, 0, 1, 0, 0],  # 34: apple, car
    ], dtype=np.uint8))  # fmt: skip
    np.testing.assert_array_equal(ds.ignore, np.zeros((3, 5), dtype=bool))

    kept = build_dataset("coco2014", root, "train", keep_unlabeled=True)
    assert [kept.image_id(i) for i in range(len(kept))] == [coco_file("train", i) for i in (9, 25, 30, 34)]
    np.testing.assert_array_equal(kept.targets[1], np.zeros(5, dtype=np.uint8))
    no_crowd = build_dataset("coco2014", root, "train", include_crowd=False)
    assert [no_crowd.image_id(i) for i in range(len(no_crowd))] == [coco_file("train", i) for i in (9, 34)]

    val = build_dataset("coco2014", root, "val")
    assert val.classes == COCO_CLASSES and len(val) == 1
    np.testing.assert_array_equal(val.targets, np.array([[0, 1, 0, 0, 0]], dtype=np.uint8))
    assert val.load_image(0).size == (16, 12)


def test_coco_label_cache_is_used_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_coco(tmp_path / "coco")
    first = build_dataset("coco2014", root, "train")
    mod = module("coco2014")
    original = mod.parse_instances
    monkeypatch.setattr(mod, "parse_instances", lambda path: pytest.fail(f"re-parsed {path}"))
    again = build_dataset("coco2014", root, "train")  # from the cache: no parse
    np.testing.assert_array_equal(first.targets, again.targets)
    path = root / "annotations" / "instances_train2014.json"
    data = json.loads(path.read_text())
    data["annotations"].append({"id": 8, "image_id": 25, "category_id": 2, "iscrowd": 0})
    path.write_text(json.dumps(data))
    bump_mtime(path)
    calls = []
    monkeypatch.setattr(mod, "parse_instances", lambda p: calls.append(p) or original(p))
    changed = build_dataset("coco2014", root, "train")
    assert calls == [path] and len(changed) == 4
    assert changed.fingerprint() != first.fingerprint()


def test_coco_errors(tmp_path: Path) -> None:
    root = make_coco(tmp_path / "coco")
    (root / "val2014" / coco_file("val", 73)).unlink()
    with pytest.raises(DataError, match=r"instances_val2014\.json are missing from .*val2014: COCO_val2014_000000000073\.jpg"):
        build_dataset("coco2014", root, "val")
    path = root / "annotations" / "instances_val2014.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"instances_val2014\.json: annotation 7 names category id 99"):
        build_dataset("coco2014", root, "val")
    data["annotations"] = []
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"split 'val' is empty: .*instances_val2014\.json has no labelled images"):
        build_dataset("coco2014", root, "val")
    path.unlink()
    with pytest.raises(DataError, match=r"annotation file .*instances_val2014\.json is missing"):
        build_dataset("coco2014", root, "val")


# ------------------------------------------------------------------------------------------------
# NUS-WIDE (seed 002 format)

NUS_LABELS = ["sky", "clouds", "house", "birds"]  # file order, not alphabetical
NUS_TRAIN = [
    {"image_name": "51353_2739084573_16e9be31f5_m.jpg", "image_labels": ["clouds", "sky"]},
    {"image_name": "0001_house.jpg", "image_labels": ["house"]},
    {"image_name": "0002_none.jpg", "image_labels": []},
    {"image_name": "sub/0003_birds.jpg", "image_labels": ["birds", "sky"]},
]
NUS_TEST = [{"image_name": "0100_test.jpg", "image_labels": ["clouds"]}]


def make_nuswide(root: Path, *, tutorial_layout: bool = False) -> Path:
    images = root / "images"
    json_dir = images if tutorial_layout else root
    json_dir.mkdir(parents=True, exist_ok=True)
    prefix = "small_" if tutorial_layout else ""
    for split, samples in (("train", NUS_TRAIN), ("test", NUS_TEST)):
        text = json.dumps({"samples": samples, "labels": NUS_LABELS}, indent=1)
        (json_dir / f"{prefix}{split}.json").write_text(text)
        for k, sample in enumerate(samples):
            write_jpeg(images / sample["image_name"], seed=k)
    return root


@pytest.mark.parametrize("tutorial_layout", [False, True])
def test_nuswide_seed_format(tmp_path: Path, tutorial_layout: bool) -> None:
    root = make_nuswide(tmp_path / "nus", tutorial_layout=tutorial_layout)
    ds = build_dataset("nuswide", root, "train")
    assert ds.classes == NUS_LABELS
    assert ds.annotation_file.name == ("small_train.json" if tutorial_layout else "train.json")
    assert [ds.image_id(i) for i in range(len(ds))] == [s["image_name"] for s in NUS_TRAIN]
    np.testing.assert_array_equal(ds.targets, np.array([
        [1, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 0],
        [1, 0, 0, 1],
    ], dtype=np.uint8))  # fmt: skip
    assert not ds.ignore.any() and ds.ignore.shape == (4, 4)
    dropped = build_dataset("nuswide", root, "train", keep_unlabeled=False)
    assert [dropped.image_id(i) for i in range(len(dropped))] == [NUS_TRAIN[i]["image_name"] for i in (0, 1, 3)]
    test = build_dataset("nuswide", root, "test")
    np.testing.assert_array_equal(test.targets, np.array([[0, 1, 0, 0]], dtype=np.uint8))


def test_nuswide_errors(tmp_path: Path) -> None:
    root = make_nuswide(tmp_path / "nus")
    train = root / "train.json"
    good = train.read_text()
    bad = json.loads(good)
    bad["samples"][3]["image_labels"] = ["sky", "unicorn"]
    train.write_text(json.dumps(bad, indent=1))
    with pytest.raises(DataError, match=r"train\.json, sample 4 \(line \d+\): label 'unicorn' of 'sub/0003_birds\.jpg' is not in"):
        build_dataset("nuswide", root, "train")
    bad = json.loads(good)
    bad["samples"][1]["image_name"] = "../escape.jpg"
    train.write_text(json.dumps(bad, indent=1))
    with pytest.raises(DataError, match=r"train\.json, sample 2 .*'\.\./escape\.jpg' escapes"):
        build_dataset("nuswide", root, "train")
    bad = json.loads(good)
    bad["labels"] = ["clouds", "sky", "house", "birds"]
    train.write_text(json.dumps(bad, indent=1))
    with pytest.raises(DataError, match=r"'labels' lists of .*test\.json and .*train\.json differ"):
        build_dataset("nuswide", root, "test")
    train.write_text(good)
    (root / "images" / "0001_house.jpg").unlink()
    with pytest.raises(DataError, match=r"1 image file\(s\) are missing from .*images: .*train\.json, sample 2 \(line \d+\): 0001_house\.jpg"):
        build_dataset("nuswide", root, "train")
    (root / "test.json").write_text(json.dumps({"samples": [], "labels": NUS_LABELS}))
    with pytest.raises(DataError, match=r"split 'test' is empty: .*test\.json"):
        build_dataset("nuswide", root, "test")
    (root / "test.json").unlink()
    with pytest.raises(DataError, match=r"split 'test': no annotation file; looked for .*test\.json.*small_test\.json"):
        build_dataset("nuswide", root, "test")


# ------------------------------------------------------------------------------------------------
# folder: your own data

FOLDER_TRAIN_CSV = """path,labels
cats/a.jpg,cat;sofa
dogs/b.jpg,dog
c.jpg,

d.jpg, zebra ; cat
"""
FOLDER_TEST_CSV = """path,labels
t1.jpg,bird
"""
FOLDER_FILES = ["cats/a.jpg", "dogs/b.jpg", "c.jpg", "d.jpg", "t1.jpg"]


def make_folder(root: Path) -> Path:
    (root).mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text(FOLDER_TRAIN_CSV)
    (root / "test.csv").write_text(FOLDER_TEST_CSV)
    for k, name in enumerate(FOLDER_FILES):
        write_jpeg(root / name, seed=k)
    return root


def test_folder_csv_long_form_with_inferred_classes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "mine")
    ds = build_dataset("folder", root, "train")
    # sorted union over BOTH splits' manifests: 'bird' only occurs in test.csv
    assert ds.classes == ["bird", "cat", "dog", "sofa", "zebra"]
    assert [ds.image_id(i) for i in range(len(ds))] == ["cats/a.jpg", "dogs/b.jpg", "c.jpg", "d.jpg"]
    np.testing.assert_array_equal(ds.targets, np.array([
        [0, 1, 0, 1, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 1, 0, 0, 1],
    ], dtype=np.uint8))  # fmt: skip
    assert not ds.ignore.any()
    test = build_dataset("folder", root, "test")
    assert test.classes == ds.classes
    np.testing.assert_array_equal(test.targets, np.array([[1, 0, 0, 0, 0]], dtype=np.uint8))


def test_folder_given_classes_wide_csv_and_json(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "mine")
    order = ["zebra", "sofa", "dog", "cat", "bird"]
    for given in (order, ",".join(order)):
        ds = build_dataset("folder", root, "train", classes=given)
        assert ds.classes == order
        np.testing.assert_array_equal(ds.targets[0], [0, 1, 0, 1, 0])
        np.testing.assert_array_equal(ds.targets[3], [1, 0, 0, 1, 0])
    (root / "classes.txt").write_text("# my order\ndog\ncat\nsofa\nzebra\nbird\n")
    assert build_dataset("folder", root, "train").classes == ["dog", "cat", "sofa", "zebra", "bird"]
    (root / "classes.txt").unlink()

    wide = root / "wide"
    wide.mkdir()
    (wide / "train.csv").write_text("file,dog,cat\nimg/x.jpg,1,0\nimg/y.jpg,,1\nimg/z.jpg,1,1\n")
    for k, name in enumerate(["x", "y", "z"]):
        write_jpeg(wide / "img" / f"{name}.jpg", seed=k)
    ds = build_dataset("folder", wide, "train")
    assert ds.classes == ["cat", "dog"]
    np.testing.assert_array_equal(ds.targets, np.array([[0, 1], [1, 0], [1, 1]], dtype=np.uint8))

    js = root / "js"
    (js / "pics").mkdir(parents=True)
    samples = [{"path": "p1.jpg", "labels": ["b", "a"]}, {"image_name": "p2.jpg", "image_labels": []}]
    (js / "pics" / "train.json").write_text(json.dumps(samples, indent=2))
    for k, name in enumerate(["p1.jpg", "p2.jpg"]):
        write_jpeg(js / "pics" / name, seed=k)
    ds = build_dataset("folder", js, "train", manifest="pics/{split}.json", image_dir="pics")
    assert ds.classes == ["a", "b"]
    np.testing.assert_array_equal(ds.targets, np.array([[1, 1], [0, 0]], dtype=np.uint8))
    (js / "pics" / "train.json").write_text(json.dumps({"samples": samples, "labels": ["b", "a", "c"]}))
    ds = build_dataset("folder", js, "train", manifest="pics/{split}", image_dir="pics")
    assert ds.classes == ["b", "a", "c"]
    np.testing.assert_array_equal(ds.targets, np.array([[1, 1, 0], [0, 0, 0]], dtype=np.uint8))


def test_folder_unknown_label_empty_split_and_missing_manifest(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "mine")
    with pytest.raises(DataError, match=r"train\.csv, line 6: label 'zebra' is not in the class list \(option classes\)"):
        build_dataset("folder", root, "train", classes=["cat", "dog", "sofa", "bird"])
    (root / "test.csv").write_text("path,labels\n")
    with pytest.raises(DataError, match=r"split 'test' is empty: .*test\.csv lists no image"):
        build_dataset("folder", root, "test")
    with pytest.raises(DataError, match=r"split 'val': manifest .*val\.csv or .*val\.json is missing"):
        build_dataset("folder", root, "val")
    (root / "train.csv").write_text("path,labels\na.jpg,cat,extra\n")
    with pytest.raises(DataError, match=r"train\.csv, line 2: 3 field\(s\), the header has 2"):
        build_dataset("folder", root, "train")
    with pytest.raises(UsageError, match=r"folder\.py.*manifest = 'train\.csv' must contain '\{split\}'"):
        build_dataset("folder", root, "train", manifest="train.csv")


def test_folder_missing_image_names_manifest_and_line(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "mine")
    (root / "d.jpg").unlink()
    with pytest.raises(DataError, match=r"1 image file\(s\) are missing from .*mine: .*train\.csv, line 6: d\.jpg"):
        build_dataset("folder", root, "train")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "file_symlink", "folder_symlink"])
def test_folder_manifest_paths_escaping_the_root_are_errors(tmp_path: Path, kind: str) -> None:
    root = make_folder(tmp_path / "mine")
    outside = write_jpeg(tmp_path / "outside" / "secret.jpg")
    if kind == "dotdot":
        path, message = "cats/../../outside/secret.jpg", r"escapes .*mine \('\.\.' leads outside it\)"
    elif kind == "absolute":
        path, message = str(outside), r"is absolute"
    elif kind == "file_symlink":
        (root / "link.jpg").symlink_to(outside)
        path, message = "link.jpg", r"is a symlink resolving outside"
    else:
        (root / "linked").symlink_to(outside.parent, target_is_directory=True)
        path, message = "linked/secret.jpg", r"folder 'linked' resolves to .*outside"
    (root / "train.csv").write_text(f"path,labels\ncats/a.jpg,cat\n{path},dog\n")
    with pytest.raises(DataError, match=r"train\.csv, line 3: image path .*" + message):
        build_dataset("folder", root, "train")


def test_folder_symlinks_inside_the_root_are_fine(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "mine")
    (root / "again.jpg").symlink_to(root / "c.jpg")
    (root / "train.csv").write_text("path,labels\nagain.jpg,cat\ncats/../c.jpg,dog\n")
    ds = build_dataset("folder", root, "train")
    assert [ds.image_id(i) for i in range(len(ds))] == ["again.jpg", "c.jpg"]


# ------------------------------------------------------------------------------------------------
# unreadable images, fingerprints, grids


def test_truncated_and_corrupt_images_are_skipped_and_counted(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "mine")
    whole = jpeg_bytes(seed=7, size=(64, 48))
    (root / "dogs" / "b.jpg").write_bytes(whole[: len(whole) // 2])  # truncated JPEG
    (root / "c.jpg").write_bytes(b"this is not an image at all")
    ds = build_dataset("folder", root, "train")
    with pytest.raises(UnreadableImage, match=r"(?i)b\.jpg.*truncated"):
        ds.load_image(1)
    with pytest.warns(image_cache.SkippedImageWarning) as caught:
        cached = image_cache.load_or_build(ds, 16, tmp_path / "cache")
    assert cached.skipped == ["dogs/b.jpg", "c.jpg"]
    assert any("dogs/b.jpg" in str(w.message) for w in caught)
    assert cached.image_ids == ["cats/a.jpg", "d.jpg"]
    assert cached.images.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(cached.targets, ds.targets[[0, 3]])


def _builders(tmp_path: Path):
    voc = make_voc(tmp_path / "voc")
    coco = make_coco(tmp_path / "coco")
    nus = make_nuswide(tmp_path / "nus")
    mine = make_folder(tmp_path / "mine")
    return [
        ("voc2007", voc, "trainval", voc / "VOCdevkit/VOC2007/ImageSets/Main/cat_trainval.txt", voc / "VOCdevkit/VOC2007/JPEGImages/000007.jpg"),
        ("coco2014", coco, "train", coco / "annotations/instances_train2014.json", coco / "train2014" / coco_file("train", 34)),
        ("nuswide", nus, "train", nus / "train.json", nus / "images/sub/0003_birds.jpg"),
        ("folder", mine, "train", mine / "train.csv", mine / "dogs/b.jpg"),
    ]


def test_fingerprint_changes_when_a_label_file_or_an_image_changes(tmp_path: Path) -> None:
    for name, root, split, label_file, image in _builders(tmp_path):
        first = build_dataset(name, root, split).fingerprint()
        assert build_dataset(name, root, split).fingerprint() == first, name
        bump_mtime(image)
        touched_image = build_dataset(name, root, split).fingerprint()
        assert touched_image != first, name
        bump_mtime(label_file)
        assert build_dataset(name, root, split).fingerprint() != touched_image, name


# grid files can name every file-backed dataset with a root

GRID = """
seeds = [0]
[recipe]
preset = "embedded_cpu"
epochs = 1
[[datasets]]
name = "{name}"
{root}
[[backbones]]
name = "tiny_cnn"
[[heads]]
name = "baseline"
pool = ["avg", "max"]
"""


def test_grids_name_each_dataset_with_a_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, root, split, _, _ in _builders(tmp_path):
        monkeypatch.delenv(f"HEADBENCH_ROOT_{name.upper()}", raising=False)
        path = tmp_path / f"{name}.toml"
        path.write_text(GRID.format(name=name, root=f"root = {json.dumps(str(root))}"))
        grid = load_grid(str(path))
        assert len(grid.cells) == 2 and grid.skipped == []
        cls = dataset_class(name)
        for cell in grid.cells:
            assert (cell.dataset, cell.root, cell.train_split) == (name, str(root), split)
            assert cell.test_split == cls.test_split
        cell = grid.cells[0]
        assert len(build_dataset(name, cell.root, cell.train_split, **cell.dataset_options)) > 0

        path.write_text(GRID.format(name=name, root=""))
        grid = load_grid(str(path))
        assert grid.cells == []
        assert len(grid.skipped) == 1
        assert grid.skipped[0].startswith(f"{name}: skipped, no data root given")
        assert cls.expected_layout in grid.skipped[0]


def test_grid_records_the_difficult_policy_in_the_run_identity(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc")
    ids = []
    for policy in ("ignore", "positive"):
        path = tmp_path / f"{policy}.toml"
        path.write_text(GRID.format(name="voc2007", root=f'root = {json.dumps(str(root))}\ndifficult = "{policy}"'))
        grid = load_grid(str(path))
        assert grid.cells[0].dataset_options == {"difficult": policy, "label_source": "auto"}
        ids.append(grid.cells[0].run_id)
    assert ids[0] != ids[1]
