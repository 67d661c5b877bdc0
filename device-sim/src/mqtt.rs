//! MQTT target (rumqttc): one connection per device (client id = device id), telemetry
//! published on the topic template at QoS 0 or 1, the command topic subscribed, keep-alive,
//! reconnect with exponential backoff, a connection ramp; and the checker, one more connection
//! subscribed to every device's telemetry topic.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing as MqttOutgoing, Packet, QoS, Request,
};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use crate::RunError;
use crate::checker::{CHECK_INTERVAL, Ledger};
use crate::clock::system_unix_nanos;
use crate::device::{ModelSource, apply_delta};
use crate::measure::Counters;
use crate::message::{Outgoing, batch, decode_stamp, encode};
use crate::shared::{Shared, TransportSettings, wildcard};

/// Largest MQTT packet sent or accepted (a summary window of readings can be large).
const MAX_PACKET_BYTES: usize = 4 << 20;
/// Messages queued per device towards its connection.
pub const OUTBOX_CAPACITY: usize = 1024;
/// First reconnect delay; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

fn qos(level: u8) -> QoS {
    if level == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce }
}

/// The checker connected and subscribed.
pub struct Prepared {
    client: AsyncClient,
    eventloop: EventLoop,
    filter: String,
    /// How the checker reads.
    pub checker: String,
}

fn options(settings: &TransportSettings, client_id: &str) -> MqttOptions {
    let target = &settings.target;
    let mut options = MqttOptions::new(client_id, target.host(), target.port());
    options.set_keep_alive(settings.keep_alive.max(Duration::from_secs(1)));
    options.set_clean_session(true);
    options.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    options.set_inflight(100);
    options
}

/// Connects the checker and subscribes it to every device's telemetry; returns once the
/// subscription is acknowledged, so nothing sent after is missed.
///
/// # Errors
/// No connection or no subscription acknowledgement within the connect timeout.
pub async fn prepare(settings: &TransportSettings) -> Result<Prepared, RunError> {
    let client_id = format!(
        "device-sim-checker-{}-{}",
        std::process::id(),
        system_unix_nanos() % 1_000_000_007
    );
    let (client, mut eventloop) = AsyncClient::new(options(settings, &client_id), 1024);
    eventloop
        .network_options
        .set_connection_timeout(settings.connect_timeout.as_secs().max(1));
    let filter = wildcard(&settings.topic, "+");
    let target = settings.target.to_string();
    let timeout = settings.connect_timeout;
    let level = qos(settings.qos);
    let ready = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.try_subscribe(filter.clone(), level).map_err(|err| {
                        RunError::Connect(format!("cannot subscribe the checker to `{filter}`: {err}"))
                    })?;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(err) => return Err(RunError::Connect(format!("cannot connect to {target}: {err}"))),
            }
        }
    };
    match tokio::time::timeout(timeout, ready).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(RunError::Connect(format!(
                "cannot connect to {target}: no answer within the connect timeout ({} ms)",
                timeout.as_millis()
            )));
        }
    }
    Ok(Prepared {
        client,
        eventloop,
        checker: format!("MQTT subscription on `{filter}` at QoS {}", settings.qos.min(1)),
        filter,
    })
}

/// Starts the checker and one task per device; returns each device's queue.
pub fn start(
    prepared: Prepared,
    shared: &Arc<Shared>,
    models: &ModelSource,
    tracker: &TaskTracker,
) -> (Vec<mpsc::Sender<Outgoing>>, JoinHandle<Ledger>) {
    let checker = tokio::spawn(run_checker(shared.clone(), prepared));
    (start_devices(shared, models, tracker), checker)
}

async fn run_checker(shared: Arc<Shared>, prepared: Prepared) -> Ledger {
    let Prepared {
        client,
        mut eventloop,
        filter,
        ..
    } = prepared;
    let format = shared.settings.payload;
    let mut ledger = Ledger::new(shared.fleet.devices.len());
    let mut flushed_at = None;
    let mut backoff = FIRST_BACKOFF;
    loop {
        if ledger.done(&shared, &mut flushed_at) {
            break;
        }
        let event = tokio::select! {
            event = eventloop.poll() => event,
            () = tokio::time::sleep(CHECK_INTERVAL) => continue,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let stamp = decode_stamp(&publish.payload, format);
                ledger.observe(&shared, stamp.as_ref(), shared.pace.now_unix());
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = FIRST_BACKOFF;
                let _ = client.try_subscribe(filter.clone(), qos(shared.settings.qos));
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(error = %err, "checker connection lost; reconnecting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    let _ = client.try_disconnect();
    ledger
}

/// Starts one task per device; returns each device's queue.
fn start_devices(shared: &Arc<Shared>, models: &ModelSource, tracker: &TaskTracker) -> Vec<mpsc::Sender<Outgoing>> {
    let mut outboxes = Vec::with_capacity(shared.fleet.devices.len());
    for device in 0..shared.fleet.devices.len() as u32 {
        let (sender, receiver) = mpsc::channel(OUTBOX_CAPACITY);
        outboxes.push(sender);
        tracker.spawn(run_device(shared.clone(), models.clone(), device, receiver));
    }
    outboxes
}

/// What a device's publisher and its connection task share.
#[derive(Default)]
struct Progress {
    /// PUBLISH packets written to the network (QoS 0 and 1).
    written: AtomicU64,
    /// Publishes dropped by the client when a new session replaced a lost one.
    dropped: AtomicU64,
    /// QoS 1 publishes written and not yet acknowledged.
    unacked: AtomicU64,
    changed: Notify,
}

async fn run_device(shared: Arc<Shared>, models: ModelSource, device: u32, mut outbox: mpsc::Receiver<Outgoing>) {
    if let Some(rate) = shared.settings.connect_rate {
        let at = shared.pace.start + Duration::from_secs_f64(f64::from(device) / rate);
        tokio::select! {
            () = tokio::time::sleep_until(at.into()) => {}
            () = shared.hard_stop.cancelled() => return,
        }
    }
    let info = &shared.fleet.devices[device as usize];
    let (client, eventloop) = AsyncClient::new(
        options(&shared.settings, &shared.fill(&shared.settings.client_id, device)),
        64,
    );
    let progress = Arc::new(Progress::default());
    let connection = tokio::spawn(poll_connection(
        shared.clone(),
        models,
        device,
        client.clone(),
        eventloop,
        progress.clone(),
    ));
    let topic = shared.fill(&shared.settings.topic, device);
    let level = qos(shared.settings.qos);
    let mut handed = 0u64;
    loop {
        let message = tokio::select! {
            message = outbox.recv() => message,
            () = shared.hard_stop.cancelled() => None,
        };
        let Some(message) = message else { break };
        let sent_unix = shared.pace.now_unix();
        let telemetry = batch(
            &shared.fleet.scenario,
            info,
            &message,
            shared.pace.start_unix_nanos,
            sent_unix,
        );
        let payload = encode(&telemetry, shared.settings.payload);
        let publish = client.publish(topic.clone(), level, false, payload);
        let result = tokio::select! {
            result = publish => result,
            () = shared.hard_stop.cancelled() => break,
        };
        match result {
            Ok(()) => {
                handed += 1;
                Counters::add(&shared.counters.published, 1);
            }
            Err(err) => {
                tracing::debug!(device_id = %info.id, error = %err, "publish failed");
                Counters::add(&shared.counters.errors, 1);
            }
        }
    }
    // Wait until every publish is on the wire and, at QoS 1, acknowledged.
    loop {
        let written = progress.written.load(Ordering::Relaxed) + progress.dropped.load(Ordering::Relaxed);
        if (written >= handed && progress.unacked.load(Ordering::Relaxed) == 0) || shared.hard_stop.is_cancelled() {
            break;
        }
        tokio::select! {
            () = progress.changed.notified() => {}
            () = tokio::time::sleep(CHECK_INTERVAL) => {}
            () = shared.hard_stop.cancelled() => break,
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
}

async fn poll_connection(
    shared: Arc<Shared>,
    models: ModelSource,
    device: u32,
    client: AsyncClient,
    mut eventloop: EventLoop,
    progress: Arc<Progress>,
) {
    let info = &shared.fleet.devices[device as usize];
    let command_topic = shared.fill(&shared.settings.command_topic, device);
    let reported_topic = command_topic.strip_suffix("desired").map_or_else(
        || format!("{command_topic}/reported"),
        |prefix| format!("{prefix}reported"),
    );
    let mut model = None;
    let mut written_at: HashMap<u16, Instant> = HashMap::new();
    let mut attempt = Instant::now();
    let mut connected_once = false;
    let mut pending_on_failure = 0u64;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            () = shared.hard_stop.cancelled() => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                shared
                    .latencies
                    .connect
                    .record_nanos(attempt.elapsed().as_nanos() as i64);
                Counters::add(&shared.counters.connects, 1);
                if connected_once {
                    Counters::add(&shared.counters.reconnects, 1);
                } else {
                    shared.note_first_connect();
                }
                connected_once = true;
                backoff = FIRST_BACKOFF;
                if !connack.session_present {
                    progress.dropped.fetch_add(pending_on_failure, Ordering::Relaxed);
                    progress.unacked.store(0, Ordering::Relaxed);
                    written_at.clear();
                    progress.changed.notify_waiters();
                }
                pending_on_failure = 0;
                let _ = client.try_subscribe(command_topic.clone(), QoS::AtLeastOnce);
            }
            Ok(Event::Outgoing(MqttOutgoing::Publish(pkid))) => {
                progress.written.fetch_add(1, Ordering::Relaxed);
                if pkid != 0 {
                    written_at.insert(pkid, Instant::now());
                    progress.unacked.fetch_add(1, Ordering::Relaxed);
                }
                progress.changed.notify_waiters();
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(written) = written_at.remove(&ack.pkid) {
                    shared.latencies.ack.record_nanos(written.elapsed().as_nanos() as i64);
                    Counters::add(&shared.counters.acks, 1);
                    let _ = progress
                        .unacked
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
                    progress.changed.notify_waiters();
                }
            }
            Ok(Event::Incoming(Packet::Publish(command))) if command.topic == command_topic => {
                handle_command(
                    &shared,
                    &models,
                    device,
                    &client,
                    &reported_topic,
                    &command.payload,
                    &mut model,
                );
            }
            Ok(Event::Outgoing(MqttOutgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => break,
            Err(err) => {
                if connected_once {
                    tracing::debug!(device_id = %info.id, error = %err, "connection lost; reconnecting");
                } else {
                    tracing::debug!(device_id = %info.id, error = %err, "cannot connect; retrying");
                }
                Counters::add(&shared.counters.connect_failures, 1);
                pending_on_failure = eventloop
                    .pending
                    .iter()
                    .filter(|r| matches!(r, Request::Publish(_)))
                    .count() as u64;
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shared.hard_stop.cancelled() => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                attempt = Instant::now();
            }
        }
    }
}

/// A command on `devices/{id}/desired`: a JSON object of desired keys, optionally with
/// `desired_changed_unix_nanos`. The device applies it and publishes what it now runs, with
/// one acknowledgement per key, on `devices/{id}/reported`.
fn handle_command(
    shared: &Shared,
    models: &ModelSource,
    device: u32,
    client: &AsyncClient,
    reported_topic: &str,
    payload: &[u8],
    model: &mut Option<crate::device::RunningModel>,
) {
    let Ok(serde_json::Value::Object(mut delta)) = serde_json::from_slice::<serde_json::Value>(payload) else {
        Counters::add(&shared.counters.errors, 1);
        return;
    };
    let changed = delta.remove("desired_changed_unix_nanos").and_then(|v| v.as_i64());
    let applied = apply_delta(shared, device, &delta, models, model);
    let acks: Vec<serde_json::Value> = applied
        .outcomes
        .iter()
        .map(|o| serde_json::json!({"key": o.key, "status_code": o.status, "description": o.description}))
        .collect();
    let answer = serde_json::json!({"reported": applied.reported, "acks": acks});
    if client
        .try_publish(reported_topic, QoS::AtLeastOnce, false, answer.to_string())
        .is_ok()
    {
        if let Some(changed) = changed {
            shared.latencies.convergence.record_nanos(system_unix_nanos() - changed);
        }
        Counters::add(&shared.counters.converged, 1);
    }
}
