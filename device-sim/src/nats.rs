//! NATS target (async-nats): telemetry published on subjects from the template, to JetStream
//! with asynchronous publish acknowledgements (at most `max_in_flight` waiting per lane) or as
//! core NATS publishes; `--create-stream` creates the stream. The checker is a JetStream
//! consumer (deliver new, no acks) on the stream, or a core subscription.
//!
//! One client connection carries the fleet (NATS has no per-device sessions); devices are
//! spread over a few publishing lanes, each device always on the same lane, so each device's
//! messages leave in order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use crate::RunError;
use crate::checker::{CHECK_INTERVAL, Ledger};
use crate::measure::Counters;
use crate::message::{Outgoing, batch, encode, read_stamp};
use crate::shared::{Shared, TransportSettings, wildcard};

/// Messages queued per lane.
const LANE_CAPACITY: usize = 8192;
/// Most publishing lanes.
const MAX_LANES: usize = 8;

/// Publish-acknowledgement permits of the JetStream context: one for every publish the lanes
/// may have waiting (`MAX_LANES` x `--max-in-flight`). async-nats holds a permit until the
/// acknowledgement future is polled to completion and makes `publish` wait for one; a lane
/// waiting there does not poll its own futures, so with fewer permits (its default is 5 000,
/// less than 8 x 1 024) every lane could wait for permits the others hold, and publishing
/// stalled once that many acknowledgements were pending (about 1 000 msgs/s at an offered
/// 200 000/s).
/// (At most tokio's semaphore limit, which a larger count would make async-nats panic on.)
pub fn ack_permits(max_in_flight: usize) -> usize {
    MAX_LANES
        .saturating_mul(max_in_flight.max(1))
        .min(tokio::sync::Semaphore::MAX_PERMITS)
}

/// A connected client, the stream ready, the checker subscribed.
pub struct Prepared {
    client: async_nats::Client,
    jetstream: Option<jetstream::Context>,
    receiver: Receiver,
    /// How the checker reads.
    pub checker: String,
    connect_latency: Duration,
}

enum Receiver {
    JetStream(Box<consumer::pull::Stream>),
    Core(async_nats::Subscriber),
}

/// Connects, creates or finds the stream, and subscribes the checker.
///
/// # Errors
/// No connection within the connect timeout, a missing stream without `--create-stream`, a
/// stream or consumer the server refuses.
pub async fn prepare(settings: &TransportSettings) -> Result<Prepared, RunError> {
    let target = settings.target.to_string();
    let started = Instant::now();
    let connect = async_nats::ConnectOptions::new()
        .connection_timeout(settings.connect_timeout)
        .subscription_capacity(1 << 20)
        .client_capacity(1 << 16)
        .connect(settings.target.authority());
    let client = match tokio::time::timeout(settings.connect_timeout, connect).await {
        Ok(Ok(client)) => client,
        Ok(Err(err)) => return Err(RunError::Connect(format!("cannot connect to {target}: {err}"))),
        Err(_) => {
            return Err(RunError::Connect(format!(
                "cannot connect to {target}: no answer within the connect timeout ({} ms)",
                settings.connect_timeout.as_millis()
            )));
        }
    };
    let connect_latency = started.elapsed();
    let filter = wildcard(&settings.topic, "*");
    let Some(stream_name) = &settings.stream else {
        let subscriber = client
            .subscribe(filter.clone())
            .await
            .map_err(|err| RunError::Connect(format!("cannot subscribe the checker to `{filter}`: {err}")))?;
        client
            .flush()
            .await
            .map_err(|err| RunError::Connect(format!("cannot reach {target}: {err}")))?;
        return Ok(Prepared {
            client,
            jetstream: None,
            receiver: Receiver::Core(subscriber),
            checker: format!("core NATS subscription on `{filter}`"),
            connect_latency,
        });
    };
    let context = jetstream::ContextBuilder::new()
        .max_ack_inflight(ack_permits(settings.max_in_flight))
        .build(client.clone());
    let stream = if settings.create_stream {
        context
            .get_or_create_stream(stream::Config {
                name: stream_name.clone(),
                subjects: vec![filter.clone()],
                ..Default::default()
            })
            .await
            .map_err(|err| {
                RunError::Connect(format!(
                    "cannot create JetStream stream `{stream_name}` on {target}: {err}"
                ))
            })?
    } else {
        context.get_stream(stream_name).await.map_err(|err| {
            RunError::Connect(format!(
                "JetStream stream `{stream_name}` on {target}: {err} (add --create-stream to create it)"
            ))
        })?
    };
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::New,
            ack_policy: consumer::AckPolicy::None,
            filter_subject: filter.clone(),
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .map_err(|err| {
            RunError::Connect(format!(
                "cannot create the checker's consumer on `{stream_name}`: {err}"
            ))
        })?;
    let messages = consumer
        .messages()
        .await
        .map_err(|err| RunError::Connect(format!("cannot read the checker's consumer on `{stream_name}`: {err}")))?;
    Ok(Prepared {
        client,
        jetstream: Some(context),
        receiver: Receiver::JetStream(Box::new(messages)),
        checker: format!("JetStream consumer on stream `{stream_name}` ({filter})"),
        connect_latency,
    })
}

/// The checker task and the lanes; returns each device's queue (devices of a lane share it).
pub fn start(
    prepared: Prepared,
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
) -> (Vec<mpsc::Sender<Outgoing>>, JoinHandle<Ledger>) {
    let Prepared {
        client,
        jetstream,
        receiver,
        connect_latency,
        ..
    } = prepared;
    shared.latencies.connect.record_nanos(connect_latency.as_nanos() as i64);
    Counters::add(&shared.counters.connects, 1);
    shared.note_first_connect();
    let devices = shared.fleet.devices.len();
    let lanes = devices.clamp(1, MAX_LANES);
    let mut senders = Vec::with_capacity(lanes);
    for _ in 0..lanes {
        let (sender, receiver) = mpsc::channel(LANE_CAPACITY);
        senders.push(sender);
        tracker.spawn(run_lane(shared.clone(), client.clone(), jetstream.clone(), receiver));
    }
    let outboxes = (0..devices).map(|d| senders[d % lanes].clone()).collect();
    let checker = tokio::spawn(run_checker(shared.clone(), receiver));
    (outboxes, checker)
}

async fn run_lane(
    shared: Arc<Shared>,
    client: async_nats::Client,
    jetstream: Option<jetstream::Context>,
    mut lane: mpsc::Receiver<Outgoing>,
) {
    let mut in_flight = FuturesUnordered::new();
    let max_in_flight = shared.settings.max_in_flight.max(1);
    loop {
        let message = tokio::select! {
            message = lane.recv() => message,
            Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                note_ack(&shared, result);
                continue;
            }
            () = shared.hard_stop.cancelled() => None,
        };
        let Some(message) = message else { break };
        let device = &shared.fleet.devices[message.device as usize];
        let subject = shared.fill(&shared.settings.topic, message.device);
        let sent_unix = shared.pace.now_unix();
        let payload = encode(
            &batch(
                &shared.fleet.scenario,
                device,
                &message,
                shared.pace.start_unix_nanos,
                sent_unix,
            ),
            shared.settings.payload,
        );
        match &jetstream {
            Some(context) => {
                while in_flight.len() >= max_in_flight {
                    if let Some(result) = in_flight.next().await {
                        note_ack(&shared, result);
                    }
                }
                let published = Instant::now();
                match context.publish(subject, payload.into()).await {
                    Ok(ack) => {
                        Counters::add(&shared.counters.published, 1);
                        in_flight.push(async move { (published, ack.await.map(|_| ())) });
                    }
                    Err(err) => {
                        tracing::debug!(device_id = %device.id, error = %err, "jetstream publish failed");
                        Counters::add(&shared.counters.errors, 1);
                    }
                }
            }
            None => match client.publish(subject, payload.into()).await {
                Ok(()) => Counters::add(&shared.counters.published, 1),
                Err(err) => {
                    tracing::debug!(device_id = %device.id, error = %err, "publish failed");
                    Counters::add(&shared.counters.errors, 1);
                }
            },
        }
    }
    while !in_flight.is_empty() {
        tokio::select! {
            Some(result) = in_flight.next() => note_ack(&shared, result),
            () = shared.hard_stop.cancelled() => break,
        }
    }
    let _ = client.flush().await;
}

fn note_ack(shared: &Shared, (published, result): (Instant, Result<(), jetstream::context::PublishError>)) {
    match result {
        Ok(()) => {
            Counters::add(&shared.counters.acks, 1);
            shared.latencies.ack.record_nanos(published.elapsed().as_nanos() as i64);
        }
        Err(err) => {
            tracing::debug!(error = %err, "jetstream publish not acknowledged");
            Counters::add(&shared.counters.errors, 1);
        }
    }
}

async fn run_checker(shared: Arc<Shared>, mut receiver: Receiver) -> Ledger {
    let mut ledger = Ledger::new(shared.fleet.devices.len());
    let mut flushed_at = None;
    let format = shared.settings.payload;
    loop {
        if ledger.done(&shared, &mut flushed_at) {
            break;
        }
        let payload = match &mut receiver {
            Receiver::JetStream(messages) => tokio::select! {
                message = messages.next() => match message {
                    Some(Ok(message)) => Some(message.message.payload.clone()),
                    Some(Err(err)) => {
                        tracing::warn!(error = %err, "checker consumer error");
                        None
                    }
                    None => break,
                },
                () = tokio::time::sleep(CHECK_INTERVAL) => None,
            },
            Receiver::Core(subscriber) => tokio::select! {
                message = subscriber.next() => match message {
                    Some(message) => Some(message.payload),
                    None => break,
                },
                () = tokio::time::sleep(CHECK_INTERVAL) => None,
            },
        };
        if let Some(payload) = payload {
            let stamp = read_stamp(&payload, format);
            ledger.observe(&shared, stamp, shared.pace.now_unix());
        }
    }
    ledger
}

/// Deletes the stream (`--delete-stream`).
///
/// # Errors
/// The server refuses.
pub async fn delete_stream(settings: &TransportSettings) -> Result<(), String> {
    let Some(name) = &settings.stream else { return Ok(()) };
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(settings.connect_timeout)
        .connect(settings.target.authority())
        .await
        .map_err(|err| err.to_string())?;
    jetstream::new(client)
        .delete_stream(name)
        .await
        .map(|_| ())
        .map_err(|err| format!("cannot delete stream `{name}`: {err}"))
}

#[cfg(test)]
mod tests {
    use super::{MAX_LANES, ack_permits};

    #[test]
    fn every_lane_can_fill_its_in_flight_window_without_waiting_for_a_permit() {
        for max_in_flight in [1, 1024, 4096] {
            assert!(ack_permits(max_in_flight) >= MAX_LANES * max_in_flight);
        }
        // The default --max-in-flight (1024) needs more than async-nats' default 5 000 permits.
        assert!(ack_permits(1024) > 5_000);
        assert_eq!(ack_permits(0), MAX_LANES);
        assert_eq!(ack_permits(usize::MAX), tokio::sync::Semaphore::MAX_PERMITS);
    }
}
