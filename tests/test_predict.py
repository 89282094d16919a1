"""An exported model is complete: on the raw test images, through its stored preprocessing and
flip averaging, it reproduces the accuracy `retrain` reported and the engine's logits; `ltcache
predict` classifies image files with it."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import datagen
import ltcache
from ltcache.cache import extract, load
from ltcache.cli import cli
from ltcache.data import DatasetSpec, build_dataset
from ltcache.stage1 import Stage1Options, train_stage1
from ltcache.stage2.evaluate import layer_logits

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    folder = datagen.make_imagefolder(root / "imgs", num_classes=3, per_class_train=20, per_class_test=6, size=32)
    # small batches (enough steps for BatchNorm's running statistics to settle): moderate logits, and a
    # model that is right on most test images but not all, so the comparison below means something
    ckpt = train_stage1(Stage1Options(dataset=f"imagefolder:{folder}", data_root=str(root), imb_ratio=2,
                                      val_per_class=2, epochs=2, batch_size=4, lr=0.01, warmup_epochs=0,
                                      workers=2, out=str(root / "run"), quiet=True, device="cpu"))
    cache = extract(ckpt, protocol="clean", cache=root / "cache", dtype="float32", batch_size=16, data_root=str(root),
                    device="cpu", quiet=True, workers=2)
    res = CliRunner().invoke(cli, ["retrain", "--cache", str(cache), "--method", "ce", "--seeds", "0", "--epochs", "2",
                                   "--batch-size", "8", "--lr", "0.01", "--device", "cpu", "--quiet", "--threads", "1",
                                   "--out", str(root / "results.json"), "--export", str(root / "model.pt")])
    assert res.exit_code == 0, res.output
    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    ds = build_dataset(DatasetSpec.from_dict(ck["dataset"]), str(root), quiet=True, workers=2)
    return root, folder, cache, ds, json.loads((root / "results.json").read_text())


def test_export_reproduces_the_reported_accuracy_and_logits(exported):
    root, folder, cache_dir, ds, results = exported
    test = ds.splits["test"]
    images, labels = test.images(), test.labels                    # raw uint8 [N, 3, 32, 32], source order
    model = ltcache.load_model(root / "model.pt")
    assert model.flip and model.views == ("center", "hflip")
    pre = model.preprocessing
    assert (pre["image_size"], pre["mean"], pre["std"]) == (ds.image_size, list(ds.mean), list(ds.std))
    with torch.no_grad():
        logits = model(images)
    top1 = float((logits.argmax(1) == labels).double().mean() * 100)
    reported = results["runs"][0]["metrics"]["all"]
    assert torch.bincount(labels).unique().numel() == 1            # balanced: class-balanced All = top-1
    print(f"export top-1 {top1!r} reported All {reported!r}")
    assert top1 == pytest.approx(reported, rel=1e-6)
    # the engine's logits: the same head on the cached (center, hflip) test features, views averaged
    cache = load(cache_dir, splits=("test",))
    doc = torch.load(root / "model.pt", weights_only=False)
    engine = layer_logits(doc["head"], cache.splits["test"].features.float())
    rows = cache.splits["test"].index
    assert torch.equal(cache.splits["test"].labels, labels[rows])
    diff, scale = float((logits[rows] - engine).abs().max()), float(engine.abs().max())
    print(f"max |logit difference| {diff:.3g} (max |logit| {scale:.3g})")
    assert diff <= 1e-5 * scale + 1e-5
    # without flip averaging the centre view alone: the engine's --test-views center
    with torch.no_grad():
        center = ltcache.load_model(root / "model.pt", flip=False)(images)
    engine_center = layer_logits(doc["head"], cache.splits["test"].features[:, :1].float())
    assert float((center[rows] - engine_center).abs().max()) <= 1e-5 * scale + 1e-5
    assert not torch.allclose(center, logits, atol=1e-3)
    print(f"centre view only: top-1 {float((center.argmax(1) == labels).double().mean() * 100)!r}")


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_cli_writes_the_models_predictions(exported, tmp_path):
    root, folder, cache_dir, ds, results = exported
    out = tmp_path / "preds.csv"
    res = CliRunner().invoke(cli, ["predict", str(root / "model.pt"), str(folder / "test"), "--out", str(out),
                                   "--batch-size", "5", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert f"predictions: {out} (18 images)" in res.output
    rows = _read(out)
    assert list(rows[0]) == ["path", "class_index", "class_name", "probability"]
    model = ltcache.load_model(root / "model.pt")
    with torch.no_grad():
        prob = model(ds.splits["test"].images()).softmax(1)
    # the folder is searched in sorted order: the dataset's test order (class folders, then file names)
    assert [r["path"] for r in rows] == sorted(str(p) for p in (folder / "test").rglob("*.png"))
    assert [int(r["class_index"]) for r in rows] == prob.argmax(1).tolist()
    assert [r["class_name"] for r in rows] == [ds.class_names[k] for k in prob.argmax(1).tolist()]
    assert [float(r["probability"]) for r in rows] == pytest.approx(prob.max(1).values.tolist(), abs=2e-6)
    # one file, printed to stdout; --no-flip: the centre view only
    one = sorted((folder / "test" / "class1").glob("*.png"))[0]
    res = CliRunner().invoke(cli, ["predict", str(root / "model.pt"), str(one), "--no-flip", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    printed = list(csv.DictReader(res.output.splitlines()))
    with torch.no_grad():
        z = ltcache.load_model(root / "model.pt", flip=False)(Image.open(one)).softmax(1)
    assert printed[0]["path"] == str(one) and int(printed[0]["class_index"]) == int(z.argmax())
    assert float(printed[0]["probability"]) == pytest.approx(float(z.max()), abs=2e-6)


def test_predict_cli_errors(exported, tmp_path):
    root, folder, cache_dir, ds, results = exported
    model, img = str(root / "model.pt"), str(sorted((folder / "test" / "class0").glob("*.png"))[0])
    (tmp_path / "exists.csv").write_text("keep")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.png").write_text("not an image")
    cases = [
        ([model, img, "--out", str(tmp_path / "exists.csv")], "already exists"),
        ([model, str(tmp_path / "gone.png")], "does not exist"),
        ([model, str(tmp_path / "empty")], "holds no images"),
        ([model, str(tmp_path / "notes.png")], "cannot decode image"),
        ([str(tmp_path / "exists.csv"), img], "cannot read model file"),
        ([str(root / "results.json"), img], "cannot read model file"),
        ([str(root / "run" / "stage1.pt"), img], "not an ltcache exported model"),
        ([str(tmp_path / "nomodel.pt"), img], "does not exist"),
        ([model, img, "--batch-size", "0"], "batch-size"),
    ]
    for args, needle in cases:
        res = CliRunner().invoke(cli, ["predict"] + args)
        assert res.exit_code == 2, (args, res.output)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (args, res.output)
    assert (tmp_path / "exists.csv").read_text() == "keep"
    res = CliRunner().invoke(cli, ["predict", model, img, "--out", str(tmp_path / "exists.csv"), "--force"])
    assert res.exit_code == 0, res.output
    assert len(_read(tmp_path / "exists.csv")) == 1
