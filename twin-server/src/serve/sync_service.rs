//! The `DeviceSync` service: one task per device stream reads the device's messages, forwards
//! changes to the engine and the engine's deltas to the device.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tonic_types::StatusExt;
use twin_proto::v1 as pb;
use twin_proto::v1::device_message::Body;
use twin_proto::v1::device_sync_server::DeviceSync;

use super::auth::Role;
use super::convert::{from_timestamp, parse_patch};
use super::engine::{Command, EngineHandle, HelloInput, SessionLink, Shared, hello_model};
use super::inference_check::{CheckError, InferenceChecker, input_width, output_widths};
use super::models_service::ModelCatalog;
use super::telemetry_service::TelemetryStorage;
use crate::store::StoreError;
use crate::twins::{CheckOutcome, DesiredAck, Limits, ModelKey, Section, TwinError};

/// Messages queued towards one device besides the deltas (acks and errors).
const REPLY_BUFFER: usize = 64;

/// The DeviceSync service.
#[derive(Debug, Clone)]
pub struct SyncService {
    engine: EngineHandle,
    shared: Arc<Shared>,
    limits: Limits,
    outbound_capacity: usize,
    next_session: Arc<AtomicU64>,
    inference: Inference,
    storage: TelemetryStorage,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// What the live inference check needs on a stream: the registry (to check a report before
/// it is queued) and the worker.
#[derive(Debug, Clone)]
pub struct Inference {
    /// The model registry.
    pub catalog: Arc<ModelCatalog>,
    /// The check worker.
    pub checker: InferenceChecker,
}

impl SyncService {
    /// The service over an engine, with the inference checker and the server's shutdown token
    /// and task tracker.
    #[expect(
        clippy::too_many_arguments,
        reason = "the service's parts, each passed once by `serve`"
    )]
    pub fn new(
        engine: EngineHandle,
        shared: Arc<Shared>,
        limits: Limits,
        outbound_capacity: usize,
        inference: Inference,
        storage: TelemetryStorage,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        SyncService {
            engine,
            shared,
            limits,
            outbound_capacity,
            next_session: Arc::new(AtomicU64::new(1)),
            inference,
            storage,
            shutdown,
            tasks,
        }
    }
}

type Outbound = mpsc::Sender<Result<pb::ServerMessage, Status>>;

#[tonic::async_trait]
impl DeviceSync for SyncService {
    type SyncStream = ReceiverStream<Result<pb::ServerMessage, Status>>;

    async fn sync(&self, request: Request<Streaming<pb::DeviceMessage>>) -> Result<Response<Self::SyncStream>, Status> {
        // Set by the interceptor; absent only if the service is mounted without it.
        let role = request.extensions().get::<Role>().cloned().unwrap_or(Role::Open);
        let mut inbound = request.into_inner();
        let first = tokio::select! {
            first = inbound.message() => first?,
            () = self.shutdown.cancelled() => return Err(Status::unavailable("the server is shutting down")),
        };
        let Some(pb::DeviceMessage {
            body: Some(Body::Hello(hello)),
            ..
        }) = first
        else {
            return Err(Status::failed_precondition(
                "the first message of a DeviceSync stream must be a Hello",
            ));
        };
        role.check_device(&hello.device_id)?;
        let session_id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (deltas, delta_receiver) = mpsc::channel(self.outbound_capacity.max(1));
        let link = SessionLink {
            session_id,
            deltas,
            end: Arc::new(OnceLock::new()),
        };
        let device_id = hello.device_id.clone();
        let input = HelloInput {
            device_id: hello.device_id,
            group: Some(hello.group).filter(|group| !group.is_empty()),
            last_desired_version: hello.last_desired_version,
            model: hello_model(hello.model.as_ref()),
            firmware: Some(hello.firmware).filter(|firmware| !firmware.is_empty()),
        };
        let end = Arc::clone(&link.end);
        self.engine
            .call(|reply| Command::Connect {
                hello: input,
                session: link,
                reply,
            })
            .await?;
        tracing::debug!(device_id = %device_id, session = session_id, "device connected");
        let (outbound, receiver) = mpsc::channel(REPLY_BUFFER.max(self.outbound_capacity));
        let session = Session {
            device_id,
            session_id,
            engine: self.engine.clone(),
            shared: Arc::clone(&self.shared),
            limits: self.limits,
            inference: self.inference.clone(),
            storage: self.storage.clone(),
            outbound,
            end,
            shutdown: self.shutdown.clone(),
        };
        self.tasks.spawn(session.run(inbound, delta_receiver));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

struct Session {
    device_id: String,
    session_id: u64,
    engine: EngineHandle,
    shared: Arc<Shared>,
    limits: Limits,
    inference: Inference,
    storage: TelemetryStorage,
    outbound: Outbound,
    end: Arc<OnceLock<Status>>,
    shutdown: CancellationToken,
}

impl Session {
    async fn run(self, mut inbound: Streaming<pb::DeviceMessage>, mut deltas: mpsc::Receiver<pb::ServerMessage>) {
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => {
                    self.finish(Err(Status::unavailable("the server is shutting down"))).await;
                    break;
                }
                delta = deltas.recv() => match delta {
                    Some(message) => {
                        if !self.send(Ok(message)).await {
                            break;
                        }
                    }
                    None => {
                        let status = self.end.get().cloned().unwrap_or_else(|| Status::unavailable("the session ended"));
                        self.finish(Err(status)).await;
                        break;
                    }
                },
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        if let Some(reply) = self.handle(message).await
                            && !self.send(Ok(reply)).await
                        {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(device_id = %self.device_id, %status, "device stream failed");
                        break;
                    }
                },
            }
        }
        self.engine
            .notify(Command::Disconnect {
                device_id: self.device_id.clone(),
                session_id: self.session_id,
            })
            .await;
        tracing::debug!(device_id = %self.device_id, session = self.session_id, "device disconnected");
    }

    /// Sends a message to the device unless the stream or the server is going away.
    async fn send(&self, message: Result<pb::ServerMessage, Status>) -> bool {
        tokio::select! {
            sent = self.outbound.send(message) => sent.is_ok(),
            () = self.shutdown.cancelled() => false,
        }
    }

    /// The stream's last message, if the device still reads.
    async fn finish(&self, status: Result<pb::ServerMessage, Status>) {
        // try_send: a device that does not read is not waited for.
        let _sent = self.outbound.try_send(status);
    }

    /// Handles one device message; returns the reply to send, if any.
    async fn handle(&self, message: pb::DeviceMessage) -> Option<pb::ServerMessage> {
        let sequence = message.sequence;
        let result = match message.body {
            None => Err(sync_error(
                sequence,
                tonic::Code::InvalidArgument,
                "body",
                "empty message: no body set",
            )),
            Some(Body::Hello(_)) => Err(sync_error(
                sequence,
                tonic::Code::FailedPrecondition,
                "hello",
                "a Hello is only accepted as the first message of a stream",
            )),
            Some(Body::Reported(reported)) => self.reported(sequence, reported).await,
            Some(Body::Acks(acks)) => self.acks(sequence, acks).await,
            Some(Body::Telemetry(batch)) => self.telemetry(sequence, &batch),
            Some(Body::Inference(report)) => {
                self.shared.counters.inference_reports.fetch_add(1, Ordering::Relaxed);
                let result = self.inference(sequence, report).await;
                if result.is_err() {
                    self.shared.counters.inference_refused.fetch_add(1, Ordering::Relaxed);
                }
                result
            }
        };
        match result {
            Ok(reply) => reply,
            Err(error) => Some(error),
        }
    }

    async fn reported(
        &self,
        sequence: u64,
        reported: pb::ReportedPatch,
    ) -> Result<Option<pb::ServerMessage>, pb::ServerMessage> {
        let field = "reported.patch_json";
        let patch = parse_patch(field, &reported.patch_json, Section::Reported, &self.limits)
            .map_err(|error| domain_error(sequence, &error))?;
        let source_time = match &reported.source_time {
            Some(time) => {
                Some(from_timestamp("reported.source_time", time).map_err(|error| domain_error(sequence, &error))?)
            }
            None => None,
        };
        let applied = self
            .engine
            .call(|reply| Command::UpdateReported {
                device_id: self.device_id.clone(),
                patch,
                patch_json: reported.patch_json,
                source_time,
                reply,
            })
            .await
            .map_err(|status| status_error(sequence, &status))?;
        Ok(Some(pb::ServerMessage {
            body: Some(pb::server_message::Body::ReportedAck(pb::ReportedAck {
                sequence,
                version: applied.version,
                revision: applied.revision,
            })),
        }))
    }

    async fn acks(&self, sequence: u64, acks: pb::DesiredAcks) -> Result<Option<pb::ServerMessage>, pb::ServerMessage> {
        let mut converted = Vec::with_capacity(acks.acks.len());
        for ack in acks.acks {
            let Ok(status) = u16::try_from(ack.status_code) else {
                return Err(sync_error(
                    sequence,
                    tonic::Code::InvalidArgument,
                    &format!("acks.{}.status_code", ack.key),
                    &format!("status {} is not 2xx, 4xx or 5xx", ack.status_code),
                ));
            };
            converted.push(DesiredAck {
                key: ack.key,
                status,
                version: ack.acknowledged_version,
                description: ack.description,
            });
        }
        self.engine
            .call(|reply| Command::Acknowledge {
                device_id: self.device_id.clone(),
                acks: converted,
                reply,
            })
            .await
            .map_err(|status| status_error(sequence, &status))?;
        Ok(None)
    }

    /// The live inference check of one report: checked against the registry here, re-run by
    /// the worker, then recorded on the twin through the engine (durable before the stream
    /// reads on). A model version the registry does not know is recorded as a divergence and
    /// answered with a NOT_FOUND SyncError.
    async fn inference(
        &self,
        sequence: u64,
        report: pb::InferenceReport,
    ) -> Result<Option<pb::ServerMessage>, pb::ServerMessage> {
        let invalid = |field: &str, message: &str| sync_error(sequence, tonic::Code::InvalidArgument, field, message);
        let Some(model) = report.model.filter(|model| !model.name.is_empty()) else {
            return Err(invalid("inference.model.name", "empty: name the model the device ran"));
        };
        let key = ModelKey {
            name: model.name.clone(),
            version: u64::from(model.version),
            sha256: model.sha256.clone(),
        };
        let catalog = &self.inference.catalog;
        let unknown = if !catalog.registry.models.contains_key(&model.name) {
            Some(("inference.model.name", format!("unknown model {:?}", model.name)))
        } else {
            match catalog.version(&model.name, model.version) {
                None => Some((
                    "inference.model.version",
                    format!("model {:?} has no version {}", model.name, model.version),
                )),
                Some(version) if !model.sha256.is_empty() && model.sha256 != version.sha256 => Some((
                    "inference.model.sha256",
                    format!(
                        "{}@{} has sha256 {}, the device reports {}",
                        model.name, model.version, version.sha256, model.sha256
                    ),
                )),
                Some(_) => None,
            }
        };
        if let Some((field, message)) = unknown {
            // The twin cannot run what the device says it runs: a divergence.
            let outcome = CheckOutcome {
                model: key,
                max_abs_error: None,
                agreed: false,
            };
            self.record_check(sequence, outcome).await?;
            return Err(sync_error(
                sequence,
                tonic::Code::NotFound,
                field,
                &format!("{message}: recorded as an inference divergence"),
            ));
        }
        let Some(version) = catalog.version(&model.name, model.version) else {
            return Err(invalid("inference.model.version", "unknown version"));
        };
        if let Some(width) = input_width(version)
            && report.features.len() != width
        {
            return Err(invalid(
                "inference.features",
                &format!(
                    "{} features, {}@{} takes {width}",
                    report.features.len(),
                    model.name,
                    model.version
                ),
            ));
        }
        if let Some(index) = report.features.iter().position(|value| !value.is_finite()) {
            return Err(invalid(
                &format!("inference.features[{index}]"),
                &format!("{} is not a finite number", report.features[index]),
            ));
        }
        let widths: usize = output_widths(version).iter().sum();
        if report.outputs.len() != widths {
            return Err(invalid(
                "inference.outputs",
                &format!(
                    "{} outputs, {}@{} gives {widths} per row (every output in order)",
                    report.outputs.len(),
                    model.name,
                    model.version
                ),
            ));
        }
        let outcome = self
            .inference
            .checker
            .check(key, report.features, report.outputs)
            .await
            .map_err(|error| {
                let code = match error {
                    CheckError::QueueFull(_) => tonic::Code::ResourceExhausted,
                    CheckError::Stopped => tonic::Code::Unavailable,
                    CheckError::Unloadable { .. } => tonic::Code::FailedPrecondition,
                    CheckError::OutputCount { .. } => tonic::Code::InvalidArgument,
                };
                let field = match error {
                    CheckError::OutputCount { .. } => "inference.outputs",
                    _ => "inference.model",
                };
                sync_error(sequence, code, field, &error.to_string())
            })?;
        self.record_check(sequence, outcome).await?;
        Ok(None)
    }

    /// Records a check on the twin through the engine and counts it.
    async fn record_check(&self, sequence: u64, outcome: CheckOutcome) -> Result<(), pb::ServerMessage> {
        let agreed = outcome.agreed;
        if !agreed {
            tracing::warn!(
                device_id = %self.device_id,
                model = %outcome.model.name,
                version = outcome.model.version,
                max_abs_error = ?outcome.max_abs_error,
                "inference divergence"
            );
        }
        self.engine
            .call(|reply| Command::RecordInference {
                device_id: self.device_id.clone(),
                checks: vec![outcome],
                reply,
            })
            .await
            .map_err(|status| status_error(sequence, &status))?;
        let counters = &self.shared.counters;
        counters.inference_checked.fetch_add(1, Ordering::Relaxed);
        if agreed {
            counters.inference_agreed.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.inference_diverged.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn telemetry(
        &self,
        sequence: u64,
        batch: &pb::TelemetryBatch,
    ) -> Result<Option<pb::ServerMessage>, pb::ServerMessage> {
        if let Some(stamp) = &batch.stamp
            && !stamp.device_id.is_empty()
            && stamp.device_id != self.device_id
        {
            return Err(sync_error(
                sequence,
                tonic::Code::PermissionDenied,
                "telemetry.stamp.device_id",
                &format!("{:?} is not this stream's device {:?}", stamp.device_id, self.device_id),
            ));
        }
        let mut samples: u64 = 0;
        for series in &batch.sensors {
            let rows = series.offsets_nanos.len() as u64;
            samples = samples.saturating_add(rows.saturating_mul(series.channels.len() as u64));
        }
        // Stored as the Telemetry service stores it; the stream has no telemetry acknowledgement,
        // so the commit is not awaited. A full store queue refuses the batch.
        let stored = self
            .storage
            .write(&self.device_id, batch)
            .map(|write| self.storage.store().try_submit(write))
            .transpose();
        if let Err(error) = stored {
            let code = match error {
                StoreError::Busy { .. } => tonic::Code::ResourceExhausted,
                _ => tonic::Code::Unavailable,
            };
            return Err(sync_error(
                sequence,
                code,
                "telemetry",
                &format!("the batch was not stored: {error}"),
            ));
        }
        let counters = &self.shared.counters;
        counters.telemetry_batches.fetch_add(1, Ordering::Relaxed);
        counters.telemetry_samples.fetch_add(samples, Ordering::Relaxed);
        self.shared.telemetry_notices.publish(&self.device_id, batch, samples);
        Ok(None)
    }
}

fn sync_error(sequence: u64, code: tonic::Code, field_path: &str, message: &str) -> pb::ServerMessage {
    pb::ServerMessage {
        body: Some(pb::server_message::Body::Error(pb::SyncError {
            sequence,
            code: code as i32,
            message: message.to_owned(),
            field_path: field_path.to_owned(),
        })),
    }
}

fn domain_error(sequence: u64, error: &TwinError) -> pb::ServerMessage {
    let status = super::convert::twin_status(error);
    let field = error.field().unwrap_or_default();
    sync_error(sequence, status.code(), field, status.message())
}

/// A refused engine call as a SyncError, with the field path of its BadRequest details.
fn status_error(sequence: u64, status: &Status) -> pb::ServerMessage {
    let field = status
        .get_details_bad_request()
        .and_then(|details| details.field_violations.into_iter().next())
        .map(|violation| violation.field)
        .or_else(|| {
            status
                .get_details_error_info()
                .and_then(|info| info.metadata.get("field").cloned())
        })
        .unwrap_or_default();
    sync_error(sequence, status.code(), &field, status.message())
}
