//! `twin models`: list the registry, inspect a model file, run a model on JSON rows.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};
use twin_core::inference::{CompiledModel, OutputValues, inspect};
use twin_core::models::{Registry, sha256_hex};

/// Default folder of the model registry.
pub const DEFAULT_MODELS_DIR: &str = "scenarios/models";

/// Reads `DIR/manifest.json`.
///
/// # Errors
/// An unreadable or invalid manifest.
pub fn load_registry(dir: &Path) -> Result<Registry> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Registry::from_manifest(&path.display().to_string(), &text)?)
}

fn ports(ports: &[twin_core::models::PortSpec]) -> String {
    ports
        .iter()
        .map(|p| {
            format!(
                "{} {}[{}]",
                p.name,
                p.element_type,
                p.shape
                    .iter()
                    .map(|d| d.to_string().trim_matches('"').to_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `twin models list`: one line per version, its file's checksum verified.
///
/// # Errors
/// An unreadable registry.
pub fn list(dir: &Path) -> Result<String> {
    let registry = load_registry(dir)?;
    let mut out = String::new();
    for (name, versions) in &registry.models {
        for version in versions {
            let file = dir.join(&version.file);
            let checksum = match std::fs::read(&file) {
                Ok(bytes) if sha256_hex(&bytes) == version.sha256 => "sha256 ok".to_owned(),
                Ok(_) => "sha256 MISMATCH".to_owned(),
                Err(err) => format!("file unreadable: {err}"),
            };
            let aliases = registry.aliases_of(name, version.version);
            out.push_str(&format!(
                "{name}@{}{}  {}  {} ({checksum})\n    in: {}\n    out: {}\n",
                version.version,
                if aliases.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", aliases.join(", "))
                },
                version.file,
                version.sha256,
                ports(&version.inputs),
                ports(&version.outputs)
            ));
        }
    }
    Ok(out)
}

/// `twin models inspect FILE`: operators, shapes, metadata, and whether tract runs it.
///
/// # Errors
/// An unreadable file or bytes that are not ONNX.
pub fn inspect_file(file: &Path, as_json: bool) -> Result<(String, bool)> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let info = inspect(&bytes).with_context(|| file.display().to_string())?;
    let runnable = info.runnable.is_ok();
    if as_json {
        let mut value = serde_json::to_value(&info)?;
        value["runnable"] = match &info.runnable {
            Ok(()) => json!({ "ok": true }),
            Err(why) => json!({ "ok": false, "why": why }),
        };
        value["sha256"] = json!(sha256_hex(&bytes));
        return Ok((serde_json::to_string_pretty(&value)? + "\n", runnable));
    }
    let mut out = format!(
        "{}\n  sha256: {}\n  producer: {}\n  ir version: {}\n",
        file.display(),
        sha256_hex(&bytes),
        info.producer,
        info.ir_version
    );
    let opsets: Vec<String> = info
        .opsets
        .iter()
        .map(|(d, v)| format!("{}={v}", if d.is_empty() { "ai.onnx" } else { d }))
        .collect();
    out.push_str(&format!("  opsets: {}\n", opsets.join(", ")));
    if !info.doc.is_empty() {
        out.push_str(&format!("  doc: {}\n", info.doc));
    }
    for (key, value) in &info.metadata {
        out.push_str(&format!("  metadata {key}: {value}\n"));
    }
    let ports = info
        .inputs
        .iter()
        .map(|t| ("input", t))
        .chain(info.outputs.iter().map(|t| ("output", t)));
    for (kind, tensor) in ports {
        out.push_str(&format!(
            "  {kind} {}: {} [{}]\n",
            tensor.name,
            tensor.element_type,
            tensor.shape.join(", ")
        ));
    }
    let operators: Vec<String> = info.operators.iter().map(|(op, n)| format!("{op} x{n}")).collect();
    out.push_str(&format!("  operators: {}\n", operators.join(", ")));
    match &info.runnable {
        Ok(()) => out.push_str("  tract: runs it\n"),
        Err(why) => out.push_str(&format!("  tract: cannot run it: {why}\n")),
    }
    Ok((out, runnable))
}

/// Finds the model file of `MODEL[@VERSION|ALIAS]` or a path to an `.onnx` file.
fn model_file(reference: &str, dir: &Path) -> Result<PathBuf> {
    let as_path = Path::new(reference);
    if reference.ends_with(".onnx") || as_path.is_file() {
        return Ok(as_path.to_path_buf());
    }
    let registry = load_registry(dir)?;
    let version = registry.resolve(reference)?;
    let path = dir.join(&version.file);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    if sha256_hex(&bytes) != version.sha256 {
        bail!(
            "{} does not match its manifest sha256 {}",
            path.display(),
            version.sha256
        );
    }
    Ok(path)
}

/// `twin models run`: a JSON array of input rows in, a JSON array of output rows out.
///
/// # Errors
/// Unknown model, unreadable file, rows that are not arrays of numbers of the model's width.
pub fn run(reference: &str, input: &str, dir: &Path) -> Result<String> {
    let path = model_file(reference, dir)?;
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let model = CompiledModel::load(&bytes).with_context(|| path.display().to_string())?;
    let parsed: Value = serde_json::from_str(input).context("--input is not JSON")?;
    let rows: Vec<Value> = match parsed {
        Value::Array(items) if items.iter().all(Value::is_array) => items,
        Value::Array(items) if items.iter().all(Value::is_number) => vec![Value::Array(items)],
        _ => bail!(
            "--input must be a JSON array of rows (arrays of {} numbers), or one such row",
            model.width()
        ),
    };
    if rows.is_empty() {
        bail!("--input has no rows");
    }
    let mut flat = Vec::with_capacity(rows.len() * model.width());
    for (r, row) in rows.iter().enumerate() {
        let values = row.as_array().map(Vec::as_slice).unwrap_or_default();
        if values.len() != model.width() {
            bail!(
                "row {r} has {} values; `{}` takes {} per row",
                values.len(),
                model.input_name(),
                model.width()
            );
        }
        for (c, value) in values.iter().enumerate() {
            let number = value
                .as_f64()
                .with_context(|| format!("row {r}, column {c}: `{value}` is not a number"))?;
            flat.push(number as f32);
        }
    }
    let outputs = model.run(&flat)?;
    let mut result = Vec::with_capacity(rows.len());
    for r in 0..rows.len() {
        let mut object = Map::new();
        for output in &outputs {
            let range = r * output.width..(r + 1) * output.width;
            let value = match &output.values {
                OutputValues::F32(v) if output.width == 1 => json!(v[r]),
                OutputValues::F32(v) => json!(v[range]),
                OutputValues::I64(v) if output.width == 1 => json!(v[r]),
                OutputValues::I64(v) => json!(v[range]),
            };
            object.insert(output.name.clone(), value);
        }
        result.push(Value::Object(object));
    }
    Ok(serde_json::to_string(&Value::Array(result))? + "\n")
}
