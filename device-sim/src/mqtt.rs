//! MQTT target (rumqttc): one connection per device (client id = device id), telemetry
//! published on the topic template at QoS 0 or 1, the command topic subscribed, keep-alive,
//! reconnect with exponential backoff, a connection ramp; and the checker, one more connection
//! subscribed to every device's telemetry topic.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing as MqttOutgoing, Packet, QoS, Request,
    valid_topic,
};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use crate::RunError;
use crate::checker::{CHECK_INTERVAL, Ledger};
use crate::clock::system_unix_nanos;
use crate::device::{ModelSource, apply_delta};
use crate::measure::Counters;
use crate::message::{Outgoing, read_stamp, write_payload};
use crate::shared::{Shared, TransportSettings, wildcard};

/// Largest MQTT packet sent or accepted (a summary window of readings can be large).
const MAX_PACKET_BYTES: usize = 4 << 20;
/// Messages queued per device towards its connection.
pub const OUTBOX_CAPACITY: usize = 1024;
/// First reconnect delay; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Requests a device's client queues towards its connection (rumqttc's channel).
const REQUEST_CAPACITY: usize = 64;
/// Messages a device task takes from its queue at once.
const TAKE_AT_ONCE: usize = 64;
/// Size of the blocks a device's payloads are written into: each payload is a slice of a
/// block, and a block is reused once rumqttc has dropped every payload in it.
const PAYLOAD_BLOCK: usize = 4096;
/// Room below which a device starts a new payload block (a larger payload grows the block).
const PAYLOAD_ROOM: usize = 512;

fn qos(level: u8) -> QoS {
    if level == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce }
}

/// The checker connected and subscribed (or, with `--no-checker`, the broker found reachable).
pub struct Prepared {
    connection: Option<CheckerConnection>,
    /// How the checker reads.
    pub checker: String,
}

struct CheckerConnection {
    client: AsyncClient,
    eventloop: EventLoop,
    filter: String,
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

/// A client and its event loop, which gives up a connection attempt (TCP and CONNACK) after
/// the connect timeout, in whole seconds (rumqttc's unit; at least 1 s) rather than rumqttc's
/// default of 5 s.
fn client(settings: &TransportSettings, client_id: &str, capacity: usize) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options(settings, client_id), capacity);
    eventloop
        .network_options
        .set_connection_timeout(connect_timeout_secs(settings.connect_timeout));
    (client, eventloop)
}

/// The connect timeout in rumqttc's unit: whole seconds, rounded up, at least 1.
fn connect_timeout_secs(timeout: Duration) -> u64 {
    let whole = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    whole.max(1)
}

/// Connects the checker and subscribes it to every device's telemetry; returns once the
/// subscription is acknowledged, so nothing sent after is missed. Without a checker
/// (`TransportSettings::checker` off), connects once and disconnects, so an unreachable broker
/// still fails the run before it starts.
///
/// # Errors
/// No connection or no subscription acknowledgement within the connect timeout.
pub async fn prepare(settings: &TransportSettings) -> Result<Prepared, RunError> {
    let client_id = format!(
        "device-sim-checker-{}-{}",
        std::process::id(),
        system_unix_nanos() % 1_000_000_007
    );
    let (client, mut eventloop) = client(settings, &client_id, 1024);
    let filter = wildcard(&settings.topic, "+");
    let target = settings.target.to_string();
    let timeout = settings.connect_timeout;
    let level = qos(settings.qos);
    let subscribe = settings.checker;
    let ready = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) if !subscribe => return Ok(()),
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
    if !subscribe {
        // The probe is done: send DISCONNECT and let the event loop write it.
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while !matches!(
                eventloop.poll().await,
                Ok(Event::Outgoing(MqttOutgoing::Disconnect)) | Err(_)
            ) {}
        })
        .await;
        return Ok(Prepared {
            connection: None,
            checker: "none (--no-checker): nothing received, loss and end-to-end latency not measured".into(),
        });
    }
    Ok(Prepared {
        checker: format!("MQTT subscription on `{filter}` at QoS {}", settings.qos.min(1)),
        connection: Some(CheckerConnection {
            client,
            eventloop,
            filter,
        }),
    })
}

/// Starts the checker (if any) and one task per device; returns each device's queue.
pub fn start(
    prepared: Prepared,
    shared: &Arc<Shared>,
    models: &ModelSource,
    tracker: &TaskTracker,
) -> (Vec<mpsc::Sender<Outgoing>>, Option<JoinHandle<Ledger>>) {
    let checker = prepared
        .connection
        .map(|connection| tokio::spawn(run_checker(shared.clone(), connection)));
    (start_devices(shared, models, tracker), checker)
}

async fn run_checker(shared: Arc<Shared>, connection: CheckerConnection) -> Ledger {
    let CheckerConnection {
        client,
        mut eventloop,
        filter,
    } = connection;
    let format = shared.settings.payload;
    let mut ledger = Ledger::new(shared.fleet.devices.len());
    let mut flushed_at = None;
    let mut backoff = FIRST_BACKOFF;
    // One timer for the whole run (not one per message): it wakes the loop to look at whether
    // it is done while nothing arrives.
    let tick = tokio::time::sleep(CHECK_INTERVAL);
    tokio::pin!(tick);
    // Whether it is done is asked when the timer fires and every `DONE_CHECK` messages, not
    // per message (the question reads shared atomics).
    const DONE_CHECK: u32 = 256;
    let mut unchecked = 0u32;
    loop {
        if unchecked == 0 && ledger.done(&shared, &mut flushed_at) {
            break;
        }
        let event = tokio::select! {
            event = eventloop.poll() => event,
            () = &mut tick => {
                tick.as_mut().reset(tokio::time::Instant::now() + CHECK_INTERVAL);
                unchecked = 0;
                continue;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let stamp = read_stamp(&publish.payload, format);
                ledger.observe(&shared, stamp, shared.pace.now_unix());
                unchecked = (unchecked + 1) % DONE_CHECK;
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
    /// The publisher is waiting for its last publishes: only then is `changed` notified.
    flushing: AtomicBool,
    changed: Notify,
    /// The QoS 1 publishes handed to the client and not yet written, in the order the client
    /// writes them: a telemetry message's intended send time, `None` for a reported answer.
    /// The device task is the connection's only publisher, so this order is the client's.
    handed: Mutex<VecDeque<Option<i64>>>,
}

/// A device's answer to a command, published by its device task (the connection's only
/// publisher), with when the desired change was made.
struct Answer {
    payload: String,
    changed: Option<i64>,
}

impl Progress {
    fn notify(&self) {
        if self.flushing.load(Ordering::Relaxed) {
            self.changed.notify_waiters();
        }
    }

    fn handed(&self) -> std::sync::MutexGuard<'_, VecDeque<Option<i64>>> {
        self.handed.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One device: connects (at its slot of the connection ramp), then publishes what the scheduler
/// hands it, taking whatever is queued at once and writing each payload into a reused block.
async fn run_device(shared: Arc<Shared>, models: ModelSource, device: u32, mut outbox: mpsc::Receiver<Outgoing>) {
    // One cancellation future for the device's life, not one per message.
    let stopped = shared.hard_stop.cancelled();
    tokio::pin!(stopped);
    if let Some(rate) = shared.settings.connect_rate {
        let at = shared.pace.start + Duration::from_secs_f64(f64::from(device) / rate);
        tokio::select! {
            () = tokio::time::sleep_until(at.into()) => {}
            () = &mut stopped => return,
        }
    }
    let info = &shared.fleet.devices[device as usize];
    let (client, eventloop) = client(
        &shared.settings,
        &shared.fill(&shared.settings.client_id, device),
        REQUEST_CAPACITY,
    );
    let progress = Arc::new(Progress::default());
    let (answers_tx, mut answers) = mpsc::unbounded_channel();
    let connection = tokio::spawn(poll_connection(
        shared.clone(),
        models,
        device,
        client.clone(),
        eventloop,
        progress.clone(),
        answers_tx,
    ));
    let command_topic = shared.fill(&shared.settings.command_topic, device);
    let reported_topic = command_topic.strip_suffix("desired").map_or_else(
        || format!("{command_topic}/reported"),
        |prefix| format!("{prefix}reported"),
    );
    let topic = shared.fill(&shared.settings.topic, device);
    // rumqttc's `publish` checks this on every call; `publish_bytes` does not, so it is checked
    // once here.
    let topic_valid = valid_topic(&topic);
    if !topic_valid {
        tracing::warn!(device_id = %info.id, topic = %topic, "the telemetry topic has a wildcard; every publish fails");
    }
    let level = qos(shared.settings.qos);
    let acknowledged = level != QoS::AtMostOnce;
    let format = shared.settings.payload;
    let mut payloads = BytesMut::new();
    let mut taken = Vec::with_capacity(TAKE_AT_ONCE);
    let mut handed = 0u64;
    'receive: loop {
        let count = tokio::select! {
            count = outbox.recv_many(&mut taken, TAKE_AT_ONCE) => count,
            Some(answer) = answers.recv() => {
                publish_answer(&shared, &client, &progress, &reported_topic, answer).await;
                continue;
            }
            () = &mut stopped => 0,
        };
        if count == 0 {
            break;
        }
        let mut published = 0;
        let mut failed = 0;
        let mut stop = false;
        for message in taken.drain(..) {
            if !topic_valid {
                failed += 1;
                continue;
            }
            if payloads.capacity() < PAYLOAD_ROOM {
                payloads.reserve(PAYLOAD_BLOCK);
            }
            write_payload(
                &mut payloads,
                &shared.fleet.scenario,
                info,
                &message,
                shared.pace.start_unix_nanos,
                shared.pace.now_unix(),
                format,
            );
            let payload = payloads.split().freeze();
            if acknowledged {
                progress.handed().push_back(Some(message.intended_unix_nanos));
            }
            let result = tokio::select! {
                biased;
                result = client.publish_bytes(topic.clone(), level, false, payload) => result,
                () = &mut stopped => {
                    stop = true;
                    break;
                }
            };
            match result {
                Ok(()) => published += 1,
                Err(err) => {
                    tracing::debug!(device_id = %info.id, error = %err, "publish failed");
                    if acknowledged {
                        progress.handed().pop_back();
                    }
                    failed += 1;
                }
            }
        }
        handed += published;
        Counters::add(&shared.counters.published, published);
        if failed > 0 {
            Counters::add(&shared.counters.errors, failed);
        }
        if stop {
            taken.clear();
            break 'receive;
        }
    }
    // Wait until every publish is on the wire and, at QoS 1, acknowledged.
    progress.flushing.store(true, Ordering::Relaxed);
    loop {
        let written = progress.written.load(Ordering::Relaxed) + progress.dropped.load(Ordering::Relaxed);
        if (written >= handed && progress.unacked.load(Ordering::Relaxed) == 0) || shared.hard_stop.is_cancelled() {
            break;
        }
        tokio::select! {
            () = progress.changed.notified() => {}
            Some(answer) = answers.recv() => {
                publish_answer(&shared, &client, &progress, &reported_topic, answer).await;
            }
            () = tokio::time::sleep(CHECK_INTERVAL) => {}
            () = &mut stopped => break,
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
    answers: mpsc::UnboundedSender<Answer>,
) {
    let info = &shared.fleet.devices[device as usize];
    let command_topic = shared.fill(&shared.settings.command_topic, device);
    let mut model = None;
    // QoS 1 publishes written and not acknowledged: the intended send time of a telemetry
    // message (its acknowledgement latency is measured from it, as end-to-end latency is, so a
    // publish that waited in the queues is not measured as fast), `None` for an answer.
    let mut written_at: HashMap<u16, Option<i64>> = HashMap::new();
    let mut attempt = Instant::now();
    let mut connected_once = false;
    let mut pending_on_failure = 0u64;
    let mut unwritten_on_failure = 0usize;
    let mut backoff = FIRST_BACKOFF;
    let stopped = shared.hard_stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            () = &mut stopped => break,
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
                    // The client dropped the QoS 1 publishes it had taken from its queue and
                    // not written: the oldest handed ones.
                    let mut handed = progress.handed();
                    let unwritten = unwritten_on_failure.min(handed.len());
                    handed.drain(..unwritten);
                    drop(handed);
                    progress.notify();
                }
                pending_on_failure = 0;
                unwritten_on_failure = 0;
                let _ = client.try_subscribe(command_topic.clone(), QoS::AtLeastOnce);
            }
            Ok(Event::Outgoing(MqttOutgoing::Publish(pkid))) => {
                progress.written.fetch_add(1, Ordering::Relaxed);
                // A packet id already waiting for its acknowledgement is a retransmission.
                if pkid != 0 && !written_at.contains_key(&pkid) {
                    let intended = progress.handed().pop_front().flatten();
                    written_at.insert(pkid, intended);
                    progress.unacked.fetch_add(1, Ordering::Relaxed);
                }
                progress.notify();
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(intended) = written_at.remove(&ack.pkid) {
                    if let Some(intended) = intended {
                        shared.latencies.ack.record_nanos(shared.pace.now_unix() - intended);
                    }
                    Counters::add(&shared.counters.acks, 1);
                    let _ = progress
                        .unacked
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
                    progress.notify();
                }
            }
            Ok(Event::Incoming(Packet::Publish(command))) if command.topic == command_topic => {
                if let Some(answer) = handle_command(&shared, &models, device, &command.payload, &mut model) {
                    let _ = answers.send(answer);
                }
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
                // Taken from the queue but never written: no packet id yet.
                unwritten_on_failure = eventloop
                    .pending
                    .iter()
                    .filter(|r| matches!(r, Request::Publish(p) if p.qos != QoS::AtMostOnce && p.pkid == 0))
                    .count();
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = &mut stopped => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                attempt = Instant::now();
            }
        }
    }
}

/// A command on `devices/{id}/desired`: a JSON object of desired keys, optionally with
/// `desired_changed_unix_nanos`. The device applies it; the answer (what it now runs, with one
/// acknowledgement per key) is for `devices/{id}/reported`.
fn handle_command(
    shared: &Shared,
    models: &ModelSource,
    device: u32,
    payload: &[u8],
    model: &mut Option<crate::device::RunningModel>,
) -> Option<Answer> {
    let Ok(serde_json::Value::Object(mut delta)) = serde_json::from_slice::<serde_json::Value>(payload) else {
        Counters::add(&shared.counters.errors, 1);
        return None;
    };
    let changed = delta.remove("desired_changed_unix_nanos").and_then(|v| v.as_i64());
    let applied = apply_delta(shared, device, &delta, models, model);
    let acks: Vec<serde_json::Value> = applied
        .outcomes
        .iter()
        .map(|o| serde_json::json!({"key": o.key, "status_code": o.status, "description": o.description}))
        .collect();
    let answer = serde_json::json!({"reported": applied.reported, "acks": acks});
    Some(Answer {
        payload: answer.to_string(),
        changed,
    })
}

/// Publishes a command's answer at QoS 1 (its place among the handed publishes noted first).
async fn publish_answer(shared: &Shared, client: &AsyncClient, progress: &Progress, topic: &str, answer: Answer) {
    progress.handed().push_back(None);
    if client
        .publish(topic, QoS::AtLeastOnce, false, answer.payload)
        .await
        .is_ok()
    {
        if let Some(changed) = answer.changed {
            shared.latencies.convergence.record_nanos(system_unix_nanos() - changed);
        }
        Counters::add(&shared.counters.converged, 1);
    } else {
        progress.handed().pop_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(connect_timeout: Duration) -> TransportSettings {
        Shared::for_test(connect_timeout).settings
    }

    #[test]
    fn every_connection_gives_up_after_the_connect_timeout() {
        // rumqttc's default is 5 s whatever --connect-timeout says; device connections and the
        // checker's now use the flag, rounded up to whole seconds.
        for (timeout, seconds) in [
            (Duration::from_secs(2), 2),
            (Duration::from_millis(2_500), 3),
            (Duration::from_secs(30), 30),
            (Duration::from_millis(200), 1),
            (Duration::ZERO, 1),
        ] {
            let (_client, eventloop) = client(&settings(timeout), "device-1", REQUEST_CAPACITY);
            assert_eq!(eventloop.network_options.connection_timeout(), seconds, "{timeout:?}");
        }
    }
}
