//! The live inference check's worker: re-runs a device's model version on the input the device
//! reported and compares the outputs, off the engine thread and off the async runtime.
//!
//! DeviceSync sessions submit checks over a bounded queue (full: the report is refused). One
//! worker takes every queued check (up to `max_batch`) and, on a blocking thread, groups them
//! by model version and runs each version once, on all of its rows, with
//! [`CompiledModel::run`]; each check's answer goes back on its own oneshot. Compiled models are loaded from the registry on first
//! use (sha256 checked against the manifest) and kept.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use twin_core::inference::{CompiledModel, extend_row_f32};
use twin_core::models::{ModelVersion, sha256_hex};

use super::config::InferenceConfig;
use super::models_service::ModelCatalog;
use crate::twins::{CheckOutcome, ModelKey, max_abs_difference};

/// Why a check could not be made; the report is refused and nothing is recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// The check queue is full.
    #[error("the inference check queue is full ({0} reports waiting); retry later")]
    QueueFull(usize),
    /// The worker has stopped (server shutdown).
    #[error("the inference checker has stopped")]
    Stopped,
    /// The registry names the version but its file cannot be loaded.
    #[error("model {model}: cannot be loaded by the server: {reason}")]
    Unloadable {
        /// `name@version`.
        model: String,
        /// What went wrong.
        reason: String,
    },
    /// The model gave another number of outputs than the device reported.
    #[error("{reported} outputs reported, the model gives {expected} per row")]
    OutputCount {
        /// Values the device sent.
        reported: usize,
        /// Values the model gives per row.
        expected: usize,
    },
}

struct Job {
    model: ModelKey,
    features: Vec<f32>,
    outputs: Vec<f32>,
    reply: oneshot::Sender<Result<CheckOutcome, CheckError>>,
}

/// A cloneable handle to the check worker.
#[derive(Debug, Clone)]
pub struct InferenceChecker {
    jobs: mpsc::Sender<Job>,
    capacity: usize,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Job")
            .field("model", &self.model)
            .field("features", &self.features.len())
            .finish_non_exhaustive()
    }
}

impl InferenceChecker {
    /// Starts the worker: a tracked task that takes the queued checks and runs each batch on
    /// a blocking thread; it stops at `shutdown` or when every handle is dropped.
    pub fn start(
        catalog: Arc<ModelCatalog>,
        settings: InferenceConfig,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Self {
        let capacity = settings.queue_capacity.max(1);
        let (jobs, receiver) = mpsc::channel(capacity);
        let worker = Worker {
            catalog,
            tolerance: settings.tolerance,
            compiled: HashMap::new(),
        };
        tasks.spawn(run(worker, receiver, settings.max_batch.max(1), shutdown));
        InferenceChecker { jobs, capacity }
    }

    /// Checks one report: the device ran `model` on `features` and got `outputs`. The version
    /// must be in the registry (the caller checked it and the widths).
    ///
    /// # Errors
    /// A full queue, a stopped worker, a model file the server cannot load, or outputs of
    /// another count than the model gives.
    pub async fn check(
        &self,
        model: ModelKey,
        features: Vec<f32>,
        outputs: Vec<f32>,
    ) -> Result<CheckOutcome, CheckError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            model,
            features,
            outputs,
            reply,
        };
        self.jobs.try_send(job).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => CheckError::QueueFull(self.capacity),
            mpsc::error::TrySendError::Closed(_) => CheckError::Stopped,
        })?;
        answer.await.unwrap_or(Err(CheckError::Stopped))
    }
}

/// Values per row of each output the manifest declares, in output order: the product of every
/// dimension but the batch (`"N"`) one.
pub fn output_widths(version: &ModelVersion) -> Vec<usize> {
    version
        .outputs
        .iter()
        .map(|port| {
            port.shape
                .iter()
                .filter_map(serde_json::Value::as_u64)
                .map(|dimension| usize::try_from(dimension).unwrap_or(usize::MAX))
                .fold(1_usize, usize::saturating_mul)
        })
        .collect()
}

/// Values per input row the manifest declares (the first input's non-batch dimensions).
pub fn input_width(version: &ModelVersion) -> Option<usize> {
    let port = version.inputs.first()?;
    Some(
        port.shape
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .map(|dimension| usize::try_from(dimension).unwrap_or(usize::MAX))
            .fold(1_usize, usize::saturating_mul),
    )
}

struct Worker {
    catalog: Arc<ModelCatalog>,
    tolerance: f64,
    compiled: HashMap<(String, u64), Arc<CompiledModel>>,
}

/// Takes every queued check (up to `max_batch`) and checks the batch on a blocking thread, so
/// tract never runs on the async runtime's threads; checks queued meanwhile wait for the next
/// batch.
async fn run(mut worker: Worker, mut receiver: mpsc::Receiver<Job>, max_batch: usize, shutdown: CancellationToken) {
    loop {
        let first = tokio::select! {
            job = receiver.recv() => match job {
                Some(job) => job,
                None => break,
            },
            () = shutdown.cancelled() => break,
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match receiver.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let checked = tokio::task::spawn_blocking(move || {
            worker.check_batch(batch);
            worker
        })
        .await;
        match checked {
            Ok(returned) => worker = returned,
            Err(error) => {
                // The batch's callers get `Stopped` (their replies were dropped), and so does
                // everyone after: the queue closes with this task.
                tracing::error!(%error, "the inference checker failed");
                break;
            }
        }
    }
    tracing::debug!("inference checker stopped");
}

impl Worker {
    /// Groups a batch by model version and checks each group with one tract call.
    fn check_batch(&mut self, batch: Vec<Job>) {
        let mut by_version: BTreeMap<(String, u64), Vec<Job>> = BTreeMap::new();
        for job in batch {
            by_version
                .entry((job.model.name.clone(), job.model.version))
                .or_default()
                .push(job);
        }
        for ((name, version), jobs) in by_version {
            self.check_version(&name, version, jobs);
        }
    }

    /// Runs one version once on every row of `jobs` and answers each job.
    fn check_version(&mut self, name: &str, version: u64, jobs: Vec<Job>) {
        let model = match self.model(name, version) {
            Ok(model) => model,
            Err(error) => {
                for job in jobs {
                    let _sent = job.reply.send(Err(error.clone()));
                }
                return;
            }
        };
        let width = model.width();
        let (jobs, wrong_width): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|job| job.features.len() == width);
        for job in wrong_width {
            // The session checked the width against the manifest; a manifest that disagrees
            // with its file lands here.
            let error = CheckError::Unloadable {
                model: format!("{name}@{version}"),
                reason: format!("the file takes {width} features, the report has {}", job.features.len()),
            };
            let _sent = job.reply.send(Err(error));
        }
        if jobs.is_empty() {
            return;
        }
        let mut rows = Vec::with_capacity(jobs.len() * width);
        for job in &jobs {
            rows.extend_from_slice(&job.features);
        }
        let outputs = match model.run(&rows) {
            Ok(outputs) => outputs,
            Err(error) => {
                let error = CheckError::Unloadable {
                    model: format!("{name}@{version}"),
                    reason: format!("tract failed: {error}"),
                };
                for job in jobs {
                    let _sent = job.reply.send(Err(error.clone()));
                }
                return;
            }
        };
        for (row, job) in jobs.into_iter().enumerate() {
            let mut expected = Vec::with_capacity(job.outputs.len());
            extend_row_f32(&outputs, row, &mut expected);
            let answer = match max_abs_difference(&job.outputs, &expected) {
                Some(difference) => Ok(CheckOutcome {
                    agreed: difference <= self.tolerance,
                    max_abs_error: Some(difference),
                    model: job.model,
                }),
                None => Err(CheckError::OutputCount {
                    reported: job.outputs.len(),
                    expected: expected.len(),
                }),
            };
            let _sent = job.reply.send(answer);
        }
    }

    /// The compiled version, loaded on first use: the file the manifest names, its sha256
    /// checked.
    fn model(&mut self, name: &str, version: u64) -> Result<Arc<CompiledModel>, CheckError> {
        let key = (name.to_owned(), version);
        if let Some(model) = self.compiled.get(&key) {
            return Ok(Arc::clone(model));
        }
        let label = format!("{name}@{version}");
        let unloadable = |reason: String| CheckError::Unloadable {
            model: label.clone(),
            reason,
        };
        let entry = u32::try_from(version)
            .ok()
            .and_then(|version| self.catalog.version(name, version))
            .ok_or_else(|| unloadable("not in the registry".to_owned()))?;
        let path = self.catalog.dir.join(&entry.file);
        let bytes =
            std::fs::read(&path).map_err(|error| unloadable(format!("cannot read {}: {error}", path.display())))?;
        if sha256_hex(&bytes) != entry.sha256 {
            return Err(unloadable(format!(
                "{} does not match its manifest sha256 {}",
                path.display(),
                entry.sha256
            )));
        }
        let compiled = CompiledModel::load(&bytes).map_err(|error| unloadable(error.to_string()))?;
        let compiled = Arc::new(compiled);
        tracing::info!(model = %label, "inference check: model loaded");
        self.compiled.insert(key, Arc::clone(&compiled));
        Ok(compiled)
    }
}
