//! The shipped models: tract's outputs match onnxruntime's reference outputs within 1e-4, the
//! Rust feature extraction matches the training script's, checksums match the manifest, and
//! broken or unsupported models are refused with a clear reason.

mod common;

use common::workspace;
use serde_json::Value;
use twin_core::features::vibration_features_from_readings;
use twin_core::inference::{CompiledModel, ModelError, OutputValues, inspect};
use twin_core::models::{Registry, sha256_hex};

fn models_dir() -> std::path::PathBuf {
    workspace().join("scenarios/models")
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(models_dir().join("reference.json")).expect("reference.json"))
        .expect("json")
}

fn floats(value: &Value) -> Vec<f32> {
    match value {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().expect("number") as f32],
        other => panic!("not numeric: {other}"),
    }
}

#[test]
fn tract_matches_onnxruntime_on_every_shipped_model() {
    let reference = reference();
    let tolerance = reference["tolerance"].as_f64().expect("tolerance") as f32;
    assert!(tolerance <= 1e-4);
    let cases = reference["models"].as_array().expect("models");
    assert_eq!(cases.len(), 4, "vibration-anomaly v1..v3 and digits v1");
    for case in cases {
        let file = case["file"].as_str().expect("file");
        let bytes = std::fs::read(models_dir().join(file)).expect("model file");
        let model = CompiledModel::load(&bytes).unwrap_or_else(|err| panic!("{file}: {err}"));
        let (input_name, rows) = case["inputs"]
            .as_object()
            .expect("inputs")
            .iter()
            .next()
            .expect("one input");
        assert_eq!(input_name, model.input_name());
        let outputs = model.run(&floats(rows)).expect("runs");
        for (name, expected) in case["outputs"].as_object().expect("outputs") {
            let output = outputs
                .iter()
                .find(|o| &o.name == name)
                .unwrap_or_else(|| panic!("{file}: no output `{name}`"));
            match &output.values {
                OutputValues::F32(values) => {
                    let expected = floats(expected);
                    assert_eq!(values.len(), expected.len(), "{file} {name}");
                    for (i, (got, want)) in values.iter().zip(&expected).enumerate() {
                        assert!(
                            (got - want).abs() <= tolerance,
                            "{file} {name}[{i}]: tract {got}, onnxruntime {want}"
                        );
                    }
                }
                OutputValues::I64(values) => {
                    let expected: Vec<i64> = expected
                        .as_array()
                        .expect("array")
                        .iter()
                        .map(|v| v.as_i64().expect("int"))
                        .collect();
                    assert_eq!(values, &expected, "{file} {name}");
                }
            }
        }
    }
}

#[test]
fn rust_features_match_the_training_script() {
    let reference = reference();
    let windows = reference["feature_windows"].as_array().expect("feature windows");
    assert!(!windows.is_empty());
    for window in windows {
        let readings: Vec<[f64; 3]> = window["readings"]
            .as_array()
            .expect("readings")
            .iter()
            .map(|r| {
                let v = r.as_array().expect("reading");
                [
                    v[0].as_f64().expect("x"),
                    v[1].as_f64().expect("y"),
                    v[2].as_f64().expect("z"),
                ]
            })
            .collect();
        let ours = vibration_features_from_readings(&readings).expect("features");
        let theirs = floats(&window["features"]);
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{} feature {i}: rust {a}, python {b}",
                window["device"]
            );
        }
    }
}

#[test]
fn manifest_checksums_match_the_files_and_models_are_small() {
    let text = std::fs::read_to_string(models_dir().join("manifest.json")).expect("manifest");
    let registry = Registry::from_manifest("manifest.json", &text).expect("valid manifest");
    let mut total = 0;
    for versions in registry.models.values() {
        for version in versions {
            let bytes = std::fs::read(models_dir().join(&version.file)).expect("file");
            total += bytes.len();
            assert_eq!(sha256_hex(&bytes), version.sha256, "{}", version.file);
        }
    }
    assert!(total < 1 << 20, "models take {total} bytes");
    assert_eq!(
        registry
            .resolve("vibration-anomaly@champion")
            .expect("champion")
            .version,
        2
    );
    let v2 = registry.resolve("vibration-anomaly@2").expect("v2");
    let v1 = registry.resolve("vibration-anomaly@1").expect("v1");
    let f1 = |v: &twin_core::models::ModelVersion| v.held_out["f1"].as_f64().expect("f1");
    assert!(f1(v2) > f1(v1), "v2 must beat v1 on held-out data");
}

#[test]
fn batches_give_the_same_rows_as_single_runs() {
    let bytes = std::fs::read(models_dir().join("digits-v1.onnx")).expect("model");
    let model = CompiledModel::load(&bytes).expect("loads");
    let rows = floats(&reference()["models"][3]["inputs"]["pixels"]);
    let batch = model.run(&rows).expect("batch");
    for r in 0..rows.len() / 64 {
        let single = model.run(&rows[r * 64..(r + 1) * 64]).expect("single");
        let (OutputValues::F32(b), OutputValues::F32(s)) = (&batch[0].values, &single[0].values) else {
            panic!("probabilities are f32")
        };
        for c in 0..10 {
            assert!((b[r * 10 + c] - s[c]).abs() < 1e-6);
        }
    }
}

#[test]
fn broken_and_unsupported_models_are_refused_with_a_reason() {
    let good = std::fs::read(models_dir().join("vibration-anomaly-v2.onnx")).expect("model");
    // Not ONNX at all, and truncated ONNX.
    for (what, bytes) in [
        ("garbage", b"this is not a model".to_vec()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("empty", Vec::new()),
    ] {
        let err = CompiledModel::load(&bytes).expect_err(what);
        assert!(matches!(err, ModelError::Decode(_)), "{what}: {err}");
        assert!(err.to_string().starts_with("not a valid ONNX model"), "{what}: {err}");
    }
    // skl2onnx's unpruned output uses ai.onnx.ml operators tract does not implement.
    let zipmap = std::fs::read(workspace().join("tests/models/skl2onnx-zipmap.onnx")).expect("fixture");
    let err = CompiledModel::load(&zipmap).expect_err("unsupported");
    assert!(matches!(err, ModelError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("ZipMap (ai.onnx.ml"), "{err}");
    let info = inspect(&zipmap).expect("still inspectable");
    assert!(info.runnable.is_err() && info.operators.contains_key("ai.onnx.ml:ZipMap"));
    // An image input is not the [N, width] matrix the twin feeds.
    let image = std::fs::read(workspace().join("tests/models/image-input.onnx")).expect("fixture");
    let err = CompiledModel::load(&image).expect_err("image input");
    assert_eq!(
        err.to_string(),
        "input `image` has shape [N, 1, 8, 8]; the twin feeds a [N, width] matrix"
    );
    // Rows that are not whole rows.
    let model = CompiledModel::load(&good).expect("loads");
    assert_eq!(
        model.run(&[1.0; 10]).expect_err("10 values").to_string(),
        "10 values are not whole rows of 9"
    );
}

/// The counted cost of each shipped model matches its architecture (train.py): multiply-
/// accumulates of the dense layers, parameters, family. Projections rest on these numbers.
#[test]
fn model_costs_are_counted_from_the_plan() {
    use twin_core::inference::ModelFamily;
    // (file, hidden layers, input width, outputs of the last layer)
    let cases = [
        ("vibration-anomaly-v1.onnx", vec![9, 2, 1]),
        ("vibration-anomaly-v2.onnx", vec![9, 16, 8, 1]),
        ("digits-v1.onnx", vec![64, 32, 10]),
    ];
    for (file, layers) in cases {
        let bytes = std::fs::read(models_dir().join(file)).expect("model file");
        let cost = CompiledModel::load(&bytes).expect("loads").cost();
        let macs: u64 = layers.windows(2).map(|w| w[0] * w[1]).sum();
        let parameters: u64 = layers.windows(2).map(|w| w[0] * w[1] + w[1]).sum();
        eprintln!("{file}: {cost:?}");
        assert_eq!(cost.family, ModelFamily::Dense, "{file}");
        assert_eq!(cost.macs_per_row, macs, "{file}: multiply-accumulates per row");
        // The graph also holds a few float constants besides the layers' weights (the
        // converter's sigmoid/softmax helpers).
        assert!(
            (parameters..parameters + 4).contains(&cost.parameters),
            "{file}: {} parameters, layers have {parameters}",
            cost.parameters
        );
        assert!(cost.memory_bytes() >= 4 * parameters, "{file}");
    }
}
