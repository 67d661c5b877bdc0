#!/usr/bin/env python3
"""Trains the models shipped in scenarios/models/ and writes their manifest and reference outputs.

Deterministic: fixed seeds, single-threaded training, exact package versions (requirements.txt).
Run from the repository root:

    pip install -r scenarios/models/requirements.txt
    python3 scenarios/models/train.py

vibration-anomaly (versions 1, 2, 3): an anomaly score in [0, 1] (probability that the machine is
faulty) over the nine features of a 10 s window of a 3-axis accelerometer (defined in
twin-core/src/features.rs; computed here from raw readings the same way). The data comes from
the twin itself: `twin run scenarios/training-data.toml --record` (healthy and faulty machines at
two plants), which this script runs. Devices, not windows, are split into training and held-out
sets, so a held-out score is a score on unseen machines.
  v1: a two-unit network trained on plant A's imbalance faults only (misses bearing wear and
      loose mounts).
  v2: a larger network trained on every fault at plant A: better than v1 on held-out data.
  v3: trained on plant B alone (sensors mounted on their side, noisier): shifted data, so it is
      worse at plant A; it exists so that rollbacks can be exercised.
digits (version 1): a classifier of scikit-learn's bundled 8x8 digit images (real data, no
download), pixels scaled to [0, 1]; trained on the first 1500 images, the other 297 held out
(and written to digits-heldout.jsonl for an edge camera to replay).

The ONNX graphs are converted by skl2onnx, then pruned to standard operators (the label path
through ai.onnx.ml's ArrayFeatureExtractor is removed) and given plain outputs:
vibration-anomaly: `score` [N] = P(faulty); digits: `probabilities` [N, 10] and `class` [N].
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime  # noqa: E402
import skl2onnx  # noqa: E402
import sklearn  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402
from skl2onnx import to_onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
RECORDING_DIR = ROOT / "target" / "training-data"
WINDOW_S = 10.0
SEED = 20261127
OPSET = 17


def run_twin() -> Path:
    recording = RECORDING_DIR / "recording.jsonl"
    command = ["cargo", "run", "--release", "-q", "-p", "twin-server", "--", "run", "scenarios/training-data.toml",
               "--record", "--out", str(RECORDING_DIR)]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return recording


def load_windows(recording: Path):
    """Readings grouped by device and 10 s window: {device: {window: [[x, y, z], ...]}}."""
    windows = {}
    with recording.open() as f:
        for line in f:
            row = json.loads(line)
            if row["sensor"] != "accel":
                continue
            window = int(row["timestamp"] // WINDOW_S)
            windows.setdefault(row["device"], {}).setdefault(window, []).append(row["value"])
    return windows


def features(readings) -> np.ndarray:
    """The nine features of twin-core/src/features.rs: mean, population std, max - min per axis."""
    a = np.asarray(readings, dtype=np.float64)
    return np.concatenate([a.mean(axis=0), a.std(axis=0), a.max(axis=0) - a.min(axis=0)]).astype(np.float32)


def dataset(windows, devices):
    xs, ys = [], []
    for device in devices:
        label = 0 if device.startswith("healthy-") else 1
        for window in sorted(windows[device]):
            xs.append(features(windows[device][window]))
            ys.append(label)
    return np.stack(xs), np.asarray(ys)


def held_out(device: str) -> bool:
    return int(device.rsplit("-", 1)[1]) % 4 == 3


def prune_to_probabilities(model: onnx.ModelProto, probabilities: str) -> onnx.ModelProto:
    """Keeps only the nodes the probabilities output needs (drops the label path)."""
    graph = model.graph
    needed, keep = {probabilities}, []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    outputs = [o for o in graph.output if o.name == probabilities]
    del graph.output[:]
    graph.output.extend(outputs)
    return model


def convert(clf, width: int, input_name: str) -> onnx.ModelProto:
    """skl2onnx's conversion with the input renamed, pruned to the probabilities output."""
    model = to_onnx(clf, np.zeros((1, width), dtype=np.float32), options={id(clf): {"zipmap": False}},
                    target_opset={"": OPSET, "ai.onnx.ml": 3})
    graph = model.graph
    graph.input[0].name = input_name
    for node in graph.node:
        node.input[:] = [input_name if i == "X" else i for i in node.input]
    return prune_to_probabilities(model, "probabilities")


def finish(model: onnx.ModelProto, doc: str, name: str, version: int) -> onnx.ModelProto:
    """Symbolic batch dimension, documentation and metadata; checked."""
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.doc_string = doc
    model.producer_name = "twin scenarios/models/train.py"
    helper.set_model_props(model, {"name": name, "version": str(version)})
    onnx.checker.check_model(model)
    return model


def export_anomaly(clf, name: str, version: int, doc: str) -> onnx.ModelProto:
    model = convert(clf, 9, "features")
    graph = model.graph
    graph.initializer.append(helper.make_tensor("faulty_index", TensorProto.INT64, [], [1]))
    graph.node.append(helper.make_node("Gather", ["probabilities", "faulty_index"], ["score"], axis=1, name="score"))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]))
    return finish(model, doc, name, version)


def export_digits(clf) -> onnx.ModelProto:
    model = convert(clf, 64, "pixels")
    graph = model.graph
    graph.node.append(helper.make_node("ArgMax", ["probabilities"], ["class"], axis=1, keepdims=0, name="class"))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10]))
    graph.output.append(helper.make_tensor_value_info("class", TensorProto.INT64, ["N"]))
    return finish(model, "8x8 digit classifier; pixels scaled to [0, 1] (scikit-learn's digits / 16)", "digits", 1)


def metrics_of(y_true, y_pred):
    return {"accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
            "precision": round(float(precision_score(y_true, y_pred, zero_division=0)), 4),
            "recall": round(float(recall_score(y_true, y_pred, zero_division=0)), 4),
            "f1": round(float(f1_score(y_true, y_pred, zero_division=0)), 4)}


def save(model: onnx.ModelProto, filename: str) -> str:
    data = model.SerializeToString()
    (OUT / filename).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def write_fixtures(digits_clf) -> None:
    """Models the twin must refuse, for the tests (tests/models/)."""
    fixtures = ROOT / "tests" / "models"
    fixtures.mkdir(parents=True, exist_ok=True)
    # skl2onnx's own output, unpruned: ZipMap and ArrayFeatureExtractor (ai.onnx.ml), which
    # tract does not implement.
    unpruned = to_onnx(digits_clf, np.zeros((1, 64), dtype=np.float32), target_opset={"": OPSET, "ai.onnx.ml": 3})
    (fixtures / "skl2onnx-zipmap.onnx").write_bytes(unpruned.SerializeToString())
    # An image input [N, 1, 8, 8]: valid ONNX that tract runs, but not a [N, width] matrix.
    weights = helper.make_tensor("w", TensorProto.FLOAT, [64, 10], [0.01 * (i % 7) for i in range(640)])
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "image-input",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="twin train.py fixture")
    model.ir_version = 8
    onnx.checker.check_model(model)
    (fixtures / "image-input.onnx").write_bytes(model.SerializeToString())


def main() -> None:
    recording = run_twin()
    windows = load_windows(recording)
    plant_a = sorted(d for d in windows if "-a-" in d)
    plant_b = sorted(d for d in windows if "-b-" in d)
    train_a = [d for d in plant_a if not held_out(d)]
    test_a = [d for d in plant_a if held_out(d)]
    x_test, y_test = dataset(windows, test_a)

    versions = {}
    # v1: imbalance faults only, a two-unit network.
    v1_devices = [d for d in train_a if d.startswith(("healthy-", "imbalance-"))]
    x1, y1 = dataset(windows, v1_devices)
    v1 = MLPClassifier(hidden_layer_sizes=(2,), max_iter=2000, random_state=SEED).fit(x1, y1)
    versions[1] = (v1, "plant A, healthy and imbalance machines only", v1_devices,
                   "v1: two-unit network trained on imbalance faults only; misses bearing wear and loose mounts")
    # v2: every fault at plant A.
    x2, y2 = dataset(windows, train_a)
    v2 = MLPClassifier(hidden_layer_sizes=(16, 8), max_iter=2000, random_state=SEED).fit(x2, y2)
    versions[2] = (v2, "plant A, every fault kind", train_a, "v2: trained on every fault kind at plant A")
    # v3: plant B only (shifted: other mounting, more noise).
    x3, y3 = dataset(windows, plant_b)
    v3 = MLPClassifier(hidden_layer_sizes=(16, 8), max_iter=2000, random_state=SEED).fit(x3, y3)
    versions[3] = (v3, "plant B only (sensors mounted on their side, noisier): shifted data", plant_b,
                   "v3: trained on plant B's shifted data; worse at plant A")

    manifest = {"generated_by": "scenarios/models/train.py", "training_seed": SEED,
                "packages": {"numpy": np.__version__, "scikit-learn": sklearn.__version__,
                             "skl2onnx": skl2onnx.__version__, "onnx": onnx.__version__,
                             "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0]},
                "models": []}
    reference = {"tolerance": 1e-4, "models": [], "feature_windows": []}
    reference_rows = x_test[:: max(1, len(x_test) // 8)][:8]
    for version, (clf, data, devices, doc) in versions.items():
        model = export_anomaly(clf, "vibration-anomaly", version, doc)
        filename = f"vibration-anomaly-v{version}.onnx"
        sha = save(model, filename)
        held = metrics_of(y_test, clf.predict(x_test))
        manifest["models"].append({
            "name": "vibration-anomaly", "version": version, "file": filename, "sha256": sha,
            "inputs": [{"name": "features", "shape": ["N", 9], "type": "float32",
                        "meaning": "vibration window features (twin-core/src/features.rs): mean x/y/z, std x/y/z, peak-to-peak x/y/z over a 10 s window"}],
            "outputs": [{"name": "score", "shape": ["N"], "type": "float32",
                         "meaning": "anomaly score: probability that the machine is faulty; alarm at >= 0.5"}],
            "output_kind": {"score": {"threshold": 0.5}},
            "training_data": f"scenarios/training-data.toml (seed 20261127), {data}: {len(devices)} devices",
            "held_out": {"data": f"plant A held-out devices (index % 4 == 3): {len(test_a)} devices, {len(x_test)} windows",
                         **held},
            "description": doc,
        })
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs = session.run(None, {"features": reference_rows})
        reference["models"].append({"name": "vibration-anomaly", "version": version, "file": filename,
                                    "inputs": {"features": reference_rows.tolist()},
                                    "outputs": {"score": outputs[0].tolist()}})

    digits = load_digits()
    pixels = (digits.data / 16.0).astype(np.float32)
    labels = digits.target
    clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=1000, random_state=SEED).fit(pixels[:1500], labels[:1500])
    model = export_digits(clf)
    sha = save(model, "digits-v1.onnx")
    accuracy = round(float(accuracy_score(labels[1500:], clf.predict(pixels[1500:]))), 4)
    manifest["models"].append({
        "name": "digits", "version": 1, "file": "digits-v1.onnx", "sha256": sha,
        "inputs": [{"name": "pixels", "shape": ["N", 64], "type": "float32",
                    "meaning": "an 8x8 grey image, row by row, scaled to [0, 1]"}],
        "outputs": [{"name": "probabilities", "shape": ["N", 10], "type": "float32", "meaning": "class probabilities"},
                    {"name": "class", "shape": ["N"], "type": "int64", "meaning": "the predicted digit"}],
        "output_kind": {"class": {"classes": [str(d) for d in range(10)]}},
        "training_data": "scikit-learn's bundled digits (load_digits), images 0..1500",
        "held_out": {"data": "images 1500..1797 (297), in digits-heldout.jsonl", "accuracy": accuracy},
        "description": "MLP (32 hidden units) digit classifier",
    })
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = pixels[1500:1508]
    probabilities, classes = session.run(None, {"pixels": rows})
    reference["models"].append({"name": "digits", "version": 1, "file": "digits-v1.onnx",
                                "inputs": {"pixels": rows.tolist()},
                                "outputs": {"probabilities": probabilities.tolist(), "class": classes.tolist()}})
    with (OUT / "digits-heldout.jsonl").open("w") as f:
        for i in range(1500, len(labels)):
            f.write(json.dumps({"timestamp": float(i - 1500), "label": int(labels[i]),
                                "pixels": [float(v) for v in pixels[i]]}) + "\n")

    # Raw windows and their features as computed here, for the Rust feature extraction test.
    for device in test_a[:3]:
        window = sorted(windows[device])[1]
        readings = windows[device][window]
        reference["feature_windows"].append({"device": device, "window": window, "readings": readings,
                                             "features": features(readings).tolist()})

    manifest["aliases"] = {"vibration-anomaly": {"champion": 2, "challenger": 3}, "digits": {"champion": 1}}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    write_fixtures(clf)
    (OUT / "reference.json").write_text(json.dumps(reference) + "\n")
    for entry in manifest["models"]:
        print(entry["name"], entry["version"], entry["held_out"])


if __name__ == "__main__":
    main()
