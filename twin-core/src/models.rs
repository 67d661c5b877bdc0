//! The model registry: which versions of which models exist, their files and checksums, what
//! they take and give, and aliases (`champion`, `challenger`). Read from a manifest
//! (`scenarios/models/manifest.json`, written by `train.py`); pure, the caller reads the files.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A registry problem.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RegistryError {
    /// The manifest is not valid JSON of the expected shape.
    #[error("{file}: {reason}")]
    Manifest {
        /// Manifest file as named by the caller.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// A reference names no model.
    #[error("unknown model `{0}` (models: {1})")]
    UnknownModel(String, String),
    /// A reference names no version or alias of a model.
    #[error("model `{model}` has no version or alias `{wanted}` (versions: {versions}; aliases: {aliases})")]
    UnknownVersion {
        /// Model name.
        model: String,
        /// What was asked for.
        wanted: String,
        /// Known versions.
        versions: String,
        /// Known aliases.
        aliases: String,
    },
}

/// An input or output as the manifest describes it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct PortSpec {
    /// Name in the ONNX graph.
    pub name: String,
    /// Shape, with `"N"` for the batch dimension.
    pub shape: Vec<serde_json::Value>,
    /// Element type.
    #[serde(rename = "type")]
    pub element_type: String,
    /// What it means.
    pub meaning: String,
}

/// One model version in the manifest.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ModelVersion {
    /// Model name.
    pub name: String,
    /// Integer version.
    pub version: u32,
    /// File, relative to the manifest.
    pub file: String,
    /// sha256 of the file.
    pub sha256: String,
    /// Inputs.
    pub inputs: Vec<PortSpec>,
    /// Outputs.
    pub outputs: Vec<PortSpec>,
    /// How outputs are read (score with threshold, classes).
    #[serde(default)]
    pub output_kind: BTreeMap<String, serde_json::Value>,
    /// Training data.
    #[serde(default)]
    pub training_data: String,
    /// Held-out evaluation.
    #[serde(default)]
    pub held_out: BTreeMap<String, serde_json::Value>,
    /// Description.
    #[serde(default)]
    pub description: String,
}

#[derive(Deserialize)]
struct RawManifest {
    models: Vec<ModelVersion>,
    #[serde(default)]
    aliases: BTreeMap<String, BTreeMap<String, u32>>,
}

/// All models of a manifest.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Registry {
    /// Versions by model name, ascending.
    pub models: BTreeMap<String, Vec<ModelVersion>>,
    /// Aliases by model name: alias -> version.
    pub aliases: BTreeMap<String, BTreeMap<String, u32>>,
}

impl Registry {
    /// Parses a manifest. `file` names it in errors.
    ///
    /// # Errors
    /// Malformed JSON, duplicate versions, aliases to missing versions.
    pub fn from_manifest(file: &str, text: &str) -> Result<Self, RegistryError> {
        let error = |reason: String| RegistryError::Manifest {
            file: file.to_owned(),
            reason,
        };
        let raw: RawManifest = serde_json::from_str(text).map_err(|err| error(err.to_string()))?;
        let mut registry = Registry::default();
        for model in raw.models {
            let versions = registry.models.entry(model.name.clone()).or_default();
            if versions.iter().any(|v| v.version == model.version) {
                return Err(error(format!(
                    "model `{}` version {} appears twice",
                    model.name, model.version
                )));
            }
            versions.push(model);
            versions.sort_by_key(|v| v.version);
        }
        for (name, aliases) in &raw.aliases {
            let Some(versions) = registry.models.get(name) else {
                return Err(error(format!("aliases for unknown model `{name}`")));
            };
            for (alias, version) in aliases {
                if !versions.iter().any(|v| v.version == *version) {
                    return Err(error(format!(
                        "alias `{name}@{alias}` points to missing version {version}"
                    )));
                }
            }
        }
        registry.aliases = raw.aliases;
        Ok(registry)
    }

    /// Resolves `name`, `name@3` or `name@champion` (a bare name is its highest version).
    ///
    /// # Errors
    /// Unknown model, version or alias, each naming what exists.
    pub fn resolve(&self, reference: &str) -> Result<&ModelVersion, RegistryError> {
        let (name, wanted) = reference
            .split_once('@')
            .map_or((reference, None), |(n, w)| (n, Some(w)));
        let versions = self.models.get(name).ok_or_else(|| {
            RegistryError::UnknownModel(
                name.to_owned(),
                self.models.keys().cloned().collect::<Vec<_>>().join(", "),
            )
        })?;
        let aliases = self.aliases.get(name);
        let version = match wanted {
            None => versions.last().map(|v| v.version),
            Some(w) => w
                .parse::<u32>()
                .ok()
                .or_else(|| aliases.and_then(|a| a.get(w).copied())),
        };
        versions
            .iter()
            .find(|v| Some(v.version) == version)
            .ok_or_else(|| RegistryError::UnknownVersion {
                model: name.to_owned(),
                wanted: wanted.unwrap_or("").to_owned(),
                versions: versions
                    .iter()
                    .map(|v| v.version.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                aliases: aliases.map_or_else(
                    || "none".to_owned(),
                    |a| {
                        a.iter()
                            .map(|(k, v)| format!("{k} = {v}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                ),
            })
    }

    /// The aliases that point at a version.
    pub fn aliases_of(&self, name: &str, version: u32) -> Vec<&str> {
        self.aliases.get(name).map_or_else(Vec::new, |a| {
            a.iter()
                .filter(|(_, v)| **v == version)
                .map(|(k, _)| k.as_str())
                .collect()
        })
    }
}

/// The sha256 of bytes, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"{"models": [
        {"name": "m", "version": 2, "file": "m2.onnx", "sha256": "x", "inputs": [], "outputs": []},
        {"name": "m", "version": 1, "file": "m1.onnx", "sha256": "y", "inputs": [], "outputs": []}],
        "aliases": {"m": {"champion": 1}}}"#;

    #[test]
    fn resolves_versions_and_aliases() {
        let registry = Registry::from_manifest("manifest.json", MANIFEST).expect("valid");
        assert_eq!(registry.resolve("m").expect("latest").version, 2);
        assert_eq!(registry.resolve("m@1").expect("v1").file, "m1.onnx");
        assert_eq!(registry.resolve("m@champion").expect("alias").version, 1);
        let err = registry.resolve("m@challenger").expect_err("no such alias");
        assert_eq!(
            err.to_string(),
            "model `m` has no version or alias `challenger` (versions: 1, 2; aliases: champion = 1)"
        );
        assert!(registry.resolve("n").is_err());
        assert_eq!(registry.aliases_of("m", 1), vec!["champion"]);
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn refuses_bad_manifests() {
        assert!(Registry::from_manifest("f", "{").is_err());
        let dup = MANIFEST.replace("\"version\": 1", "\"version\": 2");
        assert!(
            Registry::from_manifest("f", &dup)
                .expect_err("duplicate")
                .to_string()
                .contains("appears twice")
        );
        let bad_alias = MANIFEST.replace("\"champion\": 1", "\"champion\": 7");
        assert!(Registry::from_manifest("f", &bad_alias).is_err());
    }
}
