//! gRPC target (twin-server): each device holds its own DeviceSync stream on its own
//! connection. It says Hello with the last desired version it applied (and the model it runs),
//! sends its readings as telemetry batches and its model's outputs as inference reports (one
//! per closed window of a window model, one per frame of a camera's image model),
//! applies every desired delta (upload settings, sampling, model version: loaded and run with
//! `twin_core::inference`), reports what it now runs, acknowledges each key, and reconnects
//! with backoff after a disconnect. Convergence is measured from the delta's
//! `desired_changed_unix_nanos` to the acknowledgement.
//!
//! The checker is a `Twins.Watch` with `include_telemetry`: the server's telemetry notices carry
//! each accepted batch's stamp and the server's acceptance time, which ends the end-to-end
//! latency. A server without telemetry notices leaves the run without a checker (received,
//! loss and end-to-end latency are then not measured).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Streaming};
use twin_proto::v1 as pb;
use twin_proto::v1::device_sync_client::DeviceSyncClient;
use twin_proto::v1::twins_client::TwinsClient;

use crate::RunError;
use crate::checker::{CHECK_INTERVAL, Ledger};
use crate::clock::system_unix_nanos;
use crate::device::{DeviceInference, ModelSource, RunningModel, apply_delta};
use crate::measure::Counters;
use crate::message::{Outgoing, Stamp, batch};
use crate::shared::{Shared, TransportSettings};

/// Messages queued per device towards its stream.
pub const OUTBOX_CAPACITY: usize = 1024;
/// Messages queued per stream towards the network.
const STREAM_CAPACITY: usize = 256;
/// First reconnect delay; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The server reached and the checker's Watch open (if the server streams telemetry notices).
pub struct Prepared {
    watch: Option<Streaming<pb::WatchResponse>>,
    /// How the checker reads.
    pub checker: String,
}

fn endpoint(settings: &TransportSettings) -> Result<Endpoint, RunError> {
    Endpoint::from_shared(format!("http://{}", settings.target.authority()))
        .map(|e| e.connect_timeout(settings.connect_timeout).tcp_nodelay(true))
        .map_err(|err| RunError::Connect(format!("--target {}: {err}", settings.target)))
}

/// Connects once (within the connect timeout) and opens the checker's Watch.
///
/// # Errors
/// No connection within the connect timeout; a Watch refused for another reason than
/// telemetry notices not being implemented.
pub async fn prepare(settings: &TransportSettings) -> Result<Prepared, RunError> {
    let target = settings.target.to_string();
    let endpoint = endpoint(settings)?;
    let connect = endpoint.connect();
    let channel = match tokio::time::timeout(settings.connect_timeout, connect).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(err)) => {
            let cause = std::error::Error::source(&err).map_or_else(|| err.to_string(), |s| s.to_string());
            return Err(RunError::Connect(format!("cannot connect to {target}: {cause}")));
        }
        Err(_) => {
            return Err(RunError::Connect(format!(
                "cannot connect to {target}: no answer within the connect timeout ({} ms)",
                settings.connect_timeout.as_millis()
            )));
        }
    };
    let mut twins = TwinsClient::new(channel);
    let request = pb::WatchRequest {
        include_telemetry: true,
        ..pb::WatchRequest::default()
    };
    match twins.watch(request).await {
        Ok(response) => {
            let mut watch = response.into_inner();
            // The first message (WatchStarted) says the watch is live.
            match tokio::time::timeout(settings.connect_timeout, watch.message()).await {
                Ok(Ok(Some(_))) => Ok(Prepared {
                    watch: Some(watch),
                    checker: "Twins.Watch telemetry notices".into(),
                }),
                Ok(Ok(None)) => Err(RunError::Connect(format!("{target}: the Watch ended at once"))),
                Ok(Err(status)) => Err(RunError::Connect(format!("{target}: Watch: {}", status.message()))),
                Err(_) => Err(RunError::Connect(format!(
                    "{target}: Watch: no answer within the connect timeout"
                ))),
            }
        }
        Err(status) if status.code() == Code::Unimplemented => Ok(Prepared {
            watch: None,
            checker: format!("none ({target} does not stream telemetry notices)"),
        }),
        Err(status) => Err(RunError::Connect(format!(
            "{target}: Watch refused: {:?}: {}",
            status.code(),
            status.message()
        ))),
    }
}

/// Each device's queue, and the checker if the server streams telemetry notices.
pub type Started = (Vec<mpsc::Sender<Outgoing>>, Option<JoinHandle<Ledger>>);

/// Starts the checker and one task per device; returns each device's queue.
pub fn start(
    prepared: Prepared,
    shared: &Arc<Shared>,
    models: &ModelSource,
    tracker: &TaskTracker,
) -> Result<Started, RunError> {
    let endpoint = endpoint(&shared.settings)?;
    let mut outboxes = Vec::with_capacity(shared.fleet.devices.len());
    for device in 0..shared.fleet.devices.len() as u32 {
        let (sender, receiver) = mpsc::channel(OUTBOX_CAPACITY);
        outboxes.push(sender);
        tracker.spawn(run_device(
            shared.clone(),
            endpoint.clone(),
            models.clone(),
            device,
            receiver,
        ));
    }
    let checker = prepared
        .watch
        .map(|watch| tokio::spawn(run_checker(shared.clone(), watch)));
    Ok((outboxes, checker))
}

async fn run_checker(shared: Arc<Shared>, mut watch: Streaming<pb::WatchResponse>) -> Ledger {
    let mut ledger = Ledger::new(shared.fleet.devices.len());
    let mut flushed_at = None;
    loop {
        if ledger.done(&shared, &mut flushed_at) {
            break;
        }
        let message = tokio::select! {
            message = watch.message() => message,
            () = tokio::time::sleep(CHECK_INTERVAL) => continue,
        };
        match message {
            Ok(Some(pb::WatchResponse {
                event: Some(pb::watch_response::Event::Telemetry(notice)),
            })) => {
                let stamp = notice.stamp.map(|s| Stamp {
                    device_id: s.device_id,
                    sequence: s.sequence,
                    sim_time_nanos: s.sim_time_nanos,
                    intended_send_unix_nanos: s.intended_send_unix_nanos,
                    sent_unix_nanos: s.sent_unix_nanos,
                });
                let received = if notice.received_unix_nanos > 0 {
                    notice.received_unix_nanos
                } else {
                    system_unix_nanos()
                };
                ledger.observe(&shared, stamp.as_ref().map(Stamp::borrowed), received);
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "the checker's Watch ended");
                break;
            }
        }
    }
    ledger
}

/// One device's state across its connections.
struct DeviceState {
    last_desired_version: u64,
    model: Option<RunningModel>,
    inference: Option<DeviceInference>,
    connected_once: bool,
}

enum StreamEnd {
    /// The fleet is done: no more messages.
    Finished,
    /// The connection or the stream failed.
    Lost,
}

async fn run_device(
    shared: Arc<Shared>,
    endpoint: Endpoint,
    models: ModelSource,
    device: u32,
    mut outbox: mpsc::Receiver<Outgoing>,
) {
    if let Some(rate) = shared.settings.connect_rate {
        let at = shared.pace.start + Duration::from_secs_f64(f64::from(device) / rate);
        tokio::select! {
            () = tokio::time::sleep_until(at.into()) => {}
            () = shared.hard_stop.cancelled() => return,
        }
    }
    let info = &shared.fleet.devices[device as usize];
    let group = &shared.fleet.scenario.groups[info.group];
    let model = group.model.map(|binding| {
        let spec = &shared.fleet.scenario.models[binding.model];
        RunningModel {
            name: spec.name.clone(),
            version: spec.version,
            sha256: spec.sha256.clone(),
            compiled: spec.compiled.clone(),
        }
    });
    let inference = DeviceInference::for_group(&shared.fleet.scenario, info.group, &info.id);
    let mut state = DeviceState {
        last_desired_version: 0,
        model,
        inference,
        connected_once: false,
    };
    let mut backoff = FIRST_BACKOFF;
    loop {
        if shared.hard_stop.is_cancelled() {
            return;
        }
        match connect_and_sync(&shared, &endpoint, &models, device, &mut outbox, &mut state).await {
            StreamEnd::Finished => return,
            StreamEnd::Lost => {
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shared.hard_stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        if outbox.is_closed() && outbox.is_empty() {
            return;
        }
    }
}

async fn connect_and_sync(
    shared: &Arc<Shared>,
    endpoint: &Endpoint,
    models: &ModelSource,
    device: u32,
    outbox: &mut mpsc::Receiver<Outgoing>,
    state: &mut DeviceState,
) -> StreamEnd {
    let info = &shared.fleet.devices[device as usize];
    let attempt = Instant::now();
    let channel: Channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(err) => {
            tracing::debug!(device_id = %info.id, error = %err, "cannot connect");
            Counters::add(&shared.counters.connect_failures, 1);
            return StreamEnd::Lost;
        }
    };
    let (requests, request_stream) = mpsc::channel::<pb::DeviceMessage>(STREAM_CAPACITY);
    let mut sequence = 0u64;
    let mut next = |body: pb::device_message::Body| {
        sequence += 1;
        pb::DeviceMessage {
            sequence,
            body: Some(body),
        }
    };
    let hello = pb::Hello {
        device_id: info.id.clone(),
        last_desired_version: state.last_desired_version,
        model: state.model.as_ref().map(|m| pb::ModelRef {
            name: m.name.clone(),
            version: m.version,
            sha256: m.sha256.clone(),
        }),
        group: shared.fleet.scenario.groups[info.group].name.clone(),
        firmware: format!("device-sim/{}", env!("CARGO_PKG_VERSION")),
    };
    if requests
        .send(next(pb::device_message::Body::Hello(hello)))
        .await
        .is_err()
    {
        return StreamEnd::Lost;
    }
    let mut inbound = match DeviceSyncClient::new(channel)
        .sync(ReceiverStream::new(request_stream))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => {
            tracing::debug!(device_id = %info.id, code = ?status.code(), message = status.message(), "sync refused");
            Counters::add(&shared.counters.connect_failures, 1);
            return StreamEnd::Lost;
        }
    };
    let mut connected = false;
    loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(pb::ServerMessage { body: Some(pb::server_message::Body::Delta(delta)) })) => {
                    if !connected {
                        connected = true;
                        shared.latencies.connect.record_nanos(attempt.elapsed().as_nanos() as i64);
                        Counters::add(&shared.counters.connects, 1);
                        if state.connected_once {
                            Counters::add(&shared.counters.reconnects, 1);
                        } else {
                            shared.note_first_connect();
                        }
                        state.connected_once = true;
                    }
                    if !apply(shared, models, device, &delta, state, &requests, &mut next).await {
                        return StreamEnd::Lost;
                    }
                }
                Ok(Some(pb::ServerMessage { body: Some(pb::server_message::Body::Error(error)) })) => {
                    tracing::debug!(device_id = %info.id, code = error.code, field = %error.field_path, message = %error.message, "message refused");
                    Counters::add(&shared.counters.errors, 1);
                }
                Ok(Some(_)) => {}
                Ok(None) => return StreamEnd::Lost,
                Err(status) => {
                    tracing::debug!(device_id = %info.id, code = ?status.code(), message = status.message(), "stream ended");
                    return StreamEnd::Lost;
                }
            },
            message = outbox.recv() => {
                let Some(message) = message else {
                    // Done: close our side and let the server finish with what it has.
                    drop(requests);
                    let _ = tokio::time::timeout(shared.settings.drain_timeout, async {
                        while let Ok(Some(_)) = inbound.message().await {}
                    }).await;
                    return StreamEnd::Finished;
                };
                let inferences = match state.inference.as_mut() {
                    Some(inference) => inference.push(&message.readings, state.model.as_ref()),
                    None => Vec::new(),
                };
                let telemetry = batch(
                    &shared.fleet.scenario,
                    info,
                    &message,
                    shared.pace.start_unix_nanos,
                    shared.pace.now_unix(),
                );
                if requests.send(next(pb::device_message::Body::Telemetry(telemetry))).await.is_err() {
                    Counters::add(&shared.counters.errors, 1);
                    return StreamEnd::Lost;
                }
                Counters::add(&shared.counters.published, 1);
                for inference in inferences {
                    let Some(model) = state.model.as_ref() else { break };
                    let sensor = state.inference.as_ref().map_or(0, |i| usize::from(i.slot()));
                    let report = pb::InferenceReport {
                        model: Some(pb::ModelRef {
                            name: model.name.clone(),
                            version: model.version,
                            sha256: model.sha256.clone(),
                        }),
                        sensor: shared.fleet.scenario.sensors[info.sensors.start + sensor].name.clone(),
                        window_start_unix_nanos: shared.pace.start_unix_nanos + inference.window_start_nanos,
                        window_end_unix_nanos: shared.pace.start_unix_nanos + inference.window_end_nanos,
                        features: inference.features,
                        outputs: inference.outputs,
                        sim_time_nanos: inference.window_end_nanos,
                    };
                    if requests.send(next(pb::device_message::Body::Inference(report))).await.is_err() {
                        return StreamEnd::Lost;
                    }
                    Counters::add(&shared.counters.inferences, 1);
                }
            }
            () = shared.hard_stop.cancelled() => return StreamEnd::Finished,
        }
    }
}

/// Applies a delta, reports what the device now runs and acknowledges each key. Returns
/// false if the stream is gone.
async fn apply(
    shared: &Shared,
    models: &ModelSource,
    device: u32,
    delta: &pb::DesiredDelta,
    state: &mut DeviceState,
    requests: &mpsc::Sender<pb::DeviceMessage>,
    next: &mut impl FnMut(pb::device_message::Body) -> pb::DeviceMessage,
) -> bool {
    let Ok(Value::Object(keys)) = serde_json::from_str::<Value>(&delta.delta_json) else {
        Counters::add(&shared.counters.errors, 1);
        return true;
    };
    state.last_desired_version = state.last_desired_version.max(delta.version);
    if keys.is_empty() {
        return true;
    }
    let applied = apply_delta(shared, device, &keys, models, &mut state.model);
    if !applied.reported.is_empty() {
        let patch = Value::Object(applied.reported.clone()).to_string();
        let reported = pb::ReportedPatch {
            patch_json: patch,
            source_time: None,
        };
        if requests
            .send(next(pb::device_message::Body::Reported(reported)))
            .await
            .is_err()
        {
            return false;
        }
    }
    let acks = pb::DesiredAcks {
        acks: applied
            .outcomes
            .iter()
            .map(|o| pb::DesiredAck {
                key: o.key.clone(),
                status_code: o.status,
                acknowledged_version: delta.version,
                description: o.description.clone(),
            })
            .collect(),
    };
    if requests.send(next(pb::device_message::Body::Acks(acks))).await.is_err() {
        return false;
    }
    Counters::add(&shared.counters.converged, 1);
    if delta.reason == pb::DeltaReason::DesiredChanged as i32 && delta.desired_changed_unix_nanos > 0 {
        shared
            .latencies
            .convergence
            .record_nanos(system_unix_nanos() - delta.desired_changed_unix_nanos);
    }
    true
}
