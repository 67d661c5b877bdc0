//! The `Models` service: the model registry as the server sees it (the manifest `twin models
//! list` reads), and deployment of a version as desired state through the engine.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};
use twin_core::models::{ModelVersion, PortSpec, Registry, RegistryError};
use twin_proto::v1 as pb;
use twin_proto::v1::models_server::Models;

use super::ServeError;
use super::convert::{ERROR_DOMAIN, invalid_argument};
use super::engine::{Command, EngineHandle, Shared};
use super::filter::Filter;
use crate::twins::json_equal;

/// The model registry the server was started with, and the folder its files are in.
#[derive(Debug, Clone, Default)]
pub struct ModelCatalog {
    /// The manifest's models and aliases (empty when the folder has no manifest).
    pub registry: Registry,
    /// The folder holding `manifest.json` and the ONNX files it names.
    pub dir: PathBuf,
}

impl ModelCatalog {
    /// Reads `dir/manifest.json`. A folder without a manifest gives an empty catalog (the
    /// server then knows no model); a manifest that cannot be read or parsed is an error.
    ///
    /// # Errors
    /// `Start` when the manifest exists but is unreadable or invalid.
    pub fn load(dir: &Path) -> Result<Self, ServeError> {
        let registry = if dir.join("manifest.json").exists() {
            crate::models::load_registry(dir)
                .map_err(|error| ServeError::Start(format!("the model registry: {error:#}")))?
        } else {
            tracing::warn!(dir = %dir.display(), "no model manifest: the server knows no model");
            Registry::default()
        };
        Ok(ModelCatalog {
            registry,
            dir: dir.to_owned(),
        })
    }

    /// One version by name and number.
    pub fn version(&self, name: &str, version: u32) -> Option<&ModelVersion> {
        self.registry
            .models
            .get(name)?
            .iter()
            .find(|candidate| candidate.version == version)
    }
}

/// The JSON object kept under desired (and reported) `"model"` for a version.
pub fn deployed_model_json(version: &ModelVersion) -> Value {
    let mut object = Map::new();
    object.insert("name".to_owned(), Value::from(version.name.clone()));
    object.insert("version".to_owned(), Value::from(version.version));
    object.insert("sha256".to_owned(), Value::from(version.sha256.clone()));
    Value::Object(object)
}

/// What a deployment did, as the engine reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deployed {
    /// Twins the selector matched.
    pub targeted: u64,
    /// Twins whose desired `"model"` changed.
    pub changed: u64,
    /// The revision of the last change, 0 if none.
    pub revision: u64,
}

/// The Models service.
#[derive(Debug, Clone)]
pub struct ModelsService {
    catalog: Arc<ModelCatalog>,
    engine: EngineHandle,
    shared: Arc<Shared>,
}

impl ModelsService {
    /// The service over a catalog, the engine and its published state.
    pub fn new(catalog: Arc<ModelCatalog>, engine: EngineHandle, shared: Arc<Shared>) -> Self {
        ModelsService {
            catalog,
            engine,
            shared,
        }
    }
}

/// A registry reference that resolves to nothing, as NOT_FOUND with an ErrorInfo.
fn registry_status(reference: &str, error: &RegistryError) -> Status {
    let reason = match error {
        RegistryError::UnknownModel(..) => "MODEL_NOT_FOUND",
        RegistryError::UnknownVersion { .. } => "MODEL_VERSION_NOT_FOUND",
        RegistryError::Manifest { .. } => "MODEL_REGISTRY_INVALID",
    };
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("model".to_owned(), reference.to_owned());
    Status::with_error_details(
        Code::NotFound,
        format!("model: {error}"),
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
    )
}

/// A manifest port as the protobuf TensorSpec: `"N"` (any text) becomes -1.
fn tensor_spec(port: &PortSpec) -> pb::TensorSpec {
    pb::TensorSpec {
        name: port.name.clone(),
        shape: port
            .shape
            .iter()
            .map(|dimension| dimension.as_i64().unwrap_or(-1))
            .collect(),
        element_type: port.element_type.clone(),
        meaning: port.meaning.clone(),
    }
}

/// The protobuf Model of one registry entry.
pub fn model_message(registry: &Registry, name: &str, versions: &[ModelVersion]) -> pb::Model {
    pb::Model {
        name: name.to_owned(),
        versions: versions
            .iter()
            .map(|version| pb::ModelVersion {
                version: version.version,
                sha256: version.sha256.clone(),
                description: version.description.clone(),
                inputs: version.inputs.iter().map(tensor_spec).collect(),
                outputs: version.outputs.iter().map(tensor_spec).collect(),
                aliases: registry
                    .aliases_of(name, version.version)
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
            })
            .collect(),
        aliases: registry
            .aliases
            .get(name)
            .map(|aliases| {
                aliases
                    .iter()
                    .map(|(alias, version)| (alias.clone(), *version))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl Models for ModelsService {
    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let wanted = request.into_inner().name;
        let registry = &self.catalog.registry;
        let models = registry
            .models
            .iter()
            .filter(|(name, _)| wanted.is_empty() || **name == wanted)
            .map(|(name, versions)| model_message(registry, name, versions))
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn deploy_model(
        &self,
        request: Request<pb::DeployModelRequest>,
    ) -> Result<Response<pb::DeployModelResponse>, Status> {
        let request = request.into_inner();
        if request.model.trim().is_empty() {
            return Err(invalid_argument(
                "model",
                "empty: name a model as \"name\", \"name@3\" or \"name@alias\"",
            ));
        }
        let filter = Filter::new("selector", request.selector)?;
        let version = self
            .catalog
            .registry
            .resolve(&request.model)
            .map_err(|error| registry_status(&request.model, &error))?;
        let model = deployed_model_json(version);
        let model_ref = pb::ModelRef {
            name: version.name.clone(),
            version: version.version,
            sha256: version.sha256.clone(),
        };
        let deployed = if request.dry_run {
            let snapshot = self.shared.snapshot.read();
            let mut counted = Deployed::default();
            for published in snapshot.twins.values() {
                if filter.matches(published) {
                    counted.targeted += 1;
                    let desired = published.twin.desired();
                    if !desired.get("model").is_some_and(|current| json_equal(current, &model)) {
                        counted.changed += 1;
                    }
                }
            }
            counted
        } else {
            self.engine
                .call(|reply| Command::DeployModel { filter, model, reply })
                .await?
        };
        tracing::info!(
            model = %request.model,
            dry_run = request.dry_run,
            targeted = deployed.targeted,
            changed = deployed.changed,
            "deploy model"
        );
        Ok(Response::new(pb::DeployModelResponse {
            model: Some(model_ref),
            twins_targeted: deployed.targeted,
            twins_changed: deployed.changed,
            revision: deployed.revision,
        }))
    }
}
