"""skltransfer.export: one ONNX file, pixels in, the estimator's answers out, scored without torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from torch import nn

from _support import TINY, encode, make_image
from skltransfer import ExportError, FineTuneClassifier, ImageLoadError, PretrainedFeatures, export
from skltransfer.cli import main
from skltransfer.exporting import _preprocessing_graph
from skltransfer.preprocessing import Preprocessing
from skltransfer.serving import OnnxModel

ort = pytest.importorskip("onnxruntime")

LITE0 = Preprocessing((224, 224), 0.875, "center", "bicubic", (0.5,) * 3, (0.5,) * 3)
SIZES = [(375, 500), (500, 375), (32, 32), (8, 8), (224, 224), (256, 256), (300, 301), (1, 2000), (2100, 3),
         (100, 2500), (230, 100)]
CONFIGS = {
    "auto": LITE0.with_crop("auto"),
    "center": LITE0,
    "none": LITE0.with_crop("none"),
    "pad": LITE0.with_crop("pad"),
    "squash": Preprocessing((224, 224), 0.9, "squash", "bicubic", (0.5,) * 3, (0.5,) * 3),
    "border": Preprocessing((224, 224), 0.95, "border", "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "non-square": Preprocessing((192, 256), 0.9, "center", "bicubic", (0.5,) * 3, (0.5,) * 3),
    "bilinear": Preprocessing((224, 224), 224 / 232, "center", "bilinear", (0.485, 0.456, 0.406),
                              (0.229, 0.224, 0.225)),
}


def _images(n=6, size=(40, 50), seed=0):
    return np.stack([make_image(seed + i, size=size) for i in range(n)])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_graph_preprocesses_as_the_library_does(name):
    """Every crop policy, crop mode and interpolation, at sizes from 1 x 2000 to 8 x 8: the model sees the same input."""
    p = CONFIGS[name]
    session = ort.InferenceSession(_preprocessing_graph(p, 18).SerializeToString())
    for seed, (height, width) in enumerate(SIZES):
        pixels = make_image(seed, size=(height, width))
        expected = p.normalize(p.resize_crop(torch.from_numpy(pixels).permute(2, 0, 1))[None]).numpy()
        got = session.run(None, {"image": pixels[None]})[0]
        assert got.shape == expected.shape == (1, 3, *p.input_size), (name, height, width)
        # the resize is torch's own fixed-point arithmetic: the same pixels, bit for bit
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=f"{name} {height}x{width}")


def test_the_resize_multiplies_gathered_unsigned_bytes_only():
    """u8 x s8 integer products saturate in ONNX Runtime on CPUs without VNNI (AVX2's VPMADDUBSW): the
    graph must not depend on the CPU it runs on, so every MatMulInteger takes uint8 on both sides; and
    it multiplies each output pixel's gathered taps, not every input pixel (a dense product)."""
    from onnx import TensorProto, shape_inference

    graph = shape_inference.infer_shapes(_preprocessing_graph(CONFIGS["auto"], 18)).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    made_by = {out: node for node in graph.node for out in node.output}
    products = [node for node in graph.node if node.op_type == "MatMulInteger"]
    assert len(products) == 2  # one per axis
    for node in products:
        assert [types.get(name) for name in node.input] == [TensorProto.UINT8] * 2, node.input
        assert made_by[node.input[1]].op_type == "Gather"


@pytest.mark.parametrize("options", [{}, {"tta": "flip"}, {"layers": [-2, -1], "pooling": "gem"}, {"crop": "pad"},
                                     {"input_size": 64}],
                         ids=["default", "flip", "layers-gem", "pad", "input-size"])
def test_an_exported_pipeline_gives_the_pipelines_answers(tmp_path, options):
    X, y = _images(8), np.array(["ant", "bee"] * 4)
    clf = make_pipeline(PretrainedFeatures(TINY, weights=None, cache=None, **options), StandardScaler(),
                        LogisticRegression(C=0.1)).fit(X, y)
    path = export(clf, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["label", "probabilities"]
    import onnx

    model = onnx.load(str(path))  # the oldest IR version opset 18 allows, so that older runtimes load it
    assert model.ir_version == 8 and [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    at_input_size = np.stack([make_image(i, size=(160, 160)) for i in range(3)])
    if options.get("crop") != "pad":  # with nothing to resize, the same numbers
        clf.set_params(pretrainedfeatures__crop="none")
        session = ort.InferenceSession(str(export(clf, tmp_path / "none.onnx")))
        np.testing.assert_allclose(session.run(None, {"image": at_input_size})[1], clf.predict_proba(at_input_size),
                                   atol=1e-5)
        clf.set_params(pretrainedfeatures__crop=options.get("crop", "auto"))
        session = ort.InferenceSession(str(path))
    # resized in the graph: the library's pixels, so its numbers too
    for pixels in (X[:3], make_image(7, size=(300, 200))[None], make_image(8, size=(17, 900))[None]):
        label, probabilities = session.run(None, {"image": pixels})
        np.testing.assert_allclose(probabilities, clf.predict_proba(pixels), atol=1e-5)
        assert label.tolist() == clf.predict(pixels).tolist()


def test_multiclass_integer_labels_and_an_mlp_head(tmp_path):
    X, y = _images(9), np.array([3, 5, 7] * 3)
    clf = make_pipeline(PretrainedFeatures(TINY, weights=None, cache=None),
                        MLPClassifier((16,), max_iter=50, random_state=0)).fit(X, y)
    model = OnnxModel(export(clf, tmp_path / "model.onnx"))
    assert model.classes_.tolist() == [3, 5, 7]
    np.testing.assert_allclose(model.predict_proba(list(X)), clf.predict_proba(X), atol=1e-5)
    assert model.predict(list(X)).tolist() == clf.predict(X).tolist()


def test_an_exported_finetuned_classifier_gives_its_answers(tmp_path):
    X, y = _images(8), np.array(["a", "b"] * 4)
    clf = FineTuneClassifier(TINY, weights=None, epochs=1, tta="flip", random_state=0).fit(X, y)
    model = OnnxModel(export(clf, tmp_path / "model.onnx"))
    np.testing.assert_allclose(model.predict_proba(list(X)), clf.predict_proba(X), atol=1e-5)
    assert model.predict(list(X)).tolist() == clf.predict(X).tolist()
    assert model.metadata["skltransfer.estimator"] == "FineTuneClassifier"


def test_features_export_to_a_features_file(tmp_path):
    X = _images(3)
    features = PretrainedFeatures(TINY, weights=None, cache=None).fit(X)
    model = OnnxModel(export(features, tmp_path / "features.onnx"))
    assert model.kind == "features" and model.classes_ is None
    np.testing.assert_allclose(model.transform(list(X)), features.transform(X), atol=1e-5)
    with pytest.raises(AttributeError, match="holds features"):
        model.predict_proba(list(X))


def test_the_file_carries_classes_and_preprocessing(tmp_path):
    X, y = _images(4), np.array(["a", "b"] * 2)
    clf = make_pipeline(PretrainedFeatures(TINY, weights=None, cache=None), LogisticRegression()).fit(X, y)
    model = OnnxModel(export(clf, tmp_path / "model.onnx"))
    assert model.preprocessing == clf[0].preprocessing_
    assert "uint8 RGB pixels" in model.metadata["skltransfer.input"]
    assert model.metadata["skltransfer.backbone"] == TINY


def test_scoring_names_unreadable_images_and_keeps_the_rest(tmp_path):
    X, y = _images(4), np.array(["a", "b"] * 2)
    clf = make_pipeline(PretrainedFeatures(TINY, weights=None, cache=None), LogisticRegression()).fit(X, y)
    model = OnnxModel(export(clf, tmp_path / "model.onnx"))
    good = tmp_path / "good.jpg"
    good.write_bytes(encode(make_image(1, size=(90, 120))))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ImageLoadError, match="broken.jpg: not an image file") as caught:
        model.predict_proba([str(good), str(broken)])
    assert [f.index for f in caught.value.failures] == [1]
    np.testing.assert_allclose(caught.value.rows[0], model.predict_proba([str(good)])[0])
    with pytest.raises(ImageLoadError, match="too many pixels"):
        OnnxModel(model.path, max_image_pixels=100).predict([str(good)])


def test_refusals_say_why(tmp_path):
    X, y = _images(4), np.array(["a", "b"] * 2)
    with pytest.raises(NotFittedError):
        export(make_pipeline(PretrainedFeatures(TINY, weights=None), LogisticRegression()), tmp_path / "a.onnx")
    with pytest.raises(NotFittedError):
        export(FineTuneClassifier(TINY, weights=None), tmp_path / "b.onnx")
    odd = make_pipeline(PretrainedFeatures(TINY, weights=None, cache=None),
                        FunctionTransformer(np.sort), LogisticRegression()).fit(X, y)
    with pytest.raises(ExportError, match="skl2onnx cannot convert the step 'functiontransformer'"):
        export(odd, tmp_path / "c.onnx")
    with pytest.raises(ExportError, match="cannot export a LogisticRegression"):
        export(LogisticRegression().fit(np.eye(2), [0, 1]), tmp_path / "d.onnx")
    assert not list(tmp_path.glob("*.onnx"))


class _BranchesOnValues(nn.Module):
    """A module whose forward branches on its input's values: it runs, but has no single graph."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        out = self.conv(x).mean((2, 3))
        return out if out.sum().item() > 0 else -out


def test_a_module_backbone_that_does_not_trace_is_refused_by_name(tmp_path):
    X, y = _images(4), np.array(["a", "b"] * 2)
    clf = make_pipeline(PretrainedFeatures(_BranchesOnValues(), cache=None), LogisticRegression()).fit(X, y)
    with pytest.raises(ExportError, match="the module _BranchesOnValues .*(does not export|computes something else)"):
        export(clf, tmp_path / "model.onnx")


def test_openvino_reads_the_same_file(tmp_path):
    """OpenVINO reads and runs the file and gives the library's numbers, images resized in the graph included."""
    ov = pytest.importorskip("openvino")
    X, y = _images(4, size=(300, 200)), np.array(["a", "b"] * 2)
    clf = make_pipeline(PretrainedFeatures(TINY, weights=None, cache=None), LogisticRegression()).fit(X, y)
    path = export(clf, tmp_path / "model.onnx")
    compiled = ov.Core().compile_model(ov.Core().read_model(str(path)), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    for pixels in (X, make_image(8, size=(17, 900))[None]):
        probabilities = compiled({"image": pixels})[compiled.output("probabilities")]
        np.testing.assert_allclose(probabilities, clf.predict_proba(pixels), atol=1e-4)


# The lean environment, in miniature: a process in which the training stack cannot be imported.
_WITHOUT_TORCH = textwrap.dedent("""
    import sys
    BLOCKED = {"torch", "torchvision", "timm", "openvino", "sklearn", "skops", "joblib", "tqdm", "scipy",
               "onnx", "skl2onnx"}

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is not installed here")

    sys.meta_path.insert(0, Block())
    from skltransfer.cli import main
    code = main(sys.argv[1:])
    assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
    sys.exit(code)
""")


def test_predict_scores_an_onnx_file_where_torch_cannot_be_imported(tmp_path, image_folder):
    from skltransfer import load_image_folder

    paths, y = load_image_folder(image_folder)
    clf = make_pipeline(PretrainedFeatures(TINY, weights=None, cache=None), LogisticRegression()).fit(paths, y)
    model = tmp_path / "model.onnx"
    export(clf, model)
    (image_folder / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    out = tmp_path / "predictions.csv"
    run = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, "predict", str(model), str(image_folder),
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr  # finished, one image unreadable
    lines = out.read_text().splitlines()
    assert lines[0] == "path,prediction,probability,error" and len(lines) == len(paths) + 2
    rows = {line.split(",")[0]: line.split(",") for line in lines[1:]}
    assert "broken.jpg" in [Path(p).name for p in rows if rows[p][3]]
    expected = dict(zip(paths, clf.predict(paths)))
    assert all(rows[p][1] == expected[p] for p in paths)


def test_the_export_command(tmp_path, image_folder, capsys):
    import skltransfer
    from skltransfer import load_image_folder

    paths, y = load_image_folder(image_folder)
    clf = make_pipeline(PretrainedFeatures(TINY, weights=None, cache=None), LogisticRegression()).fit(paths, y)
    saved = tmp_path / "model.skops"
    skltransfer.save(clf, saved)
    assert main(["export", str(saved), "--out", str(tmp_path / "model.onnx")]) == 0
    assert "model.onnx" in capsys.readouterr().err
    assert OnnxModel(tmp_path / "model.onnx").predict(paths[:2]).tolist() == clf.predict(paths[:2]).tolist()
