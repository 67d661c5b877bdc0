//! `mqtt-baseline`: the bare rumqttc publish loop device-sim's MQTT rate is compared with
//! (BENCHMARKS.md, "device-sim load"). N connections (client options as device-sim sets them:
//! clean session, keep-alive 30 s, 100 in flight, a request channel of 64), each publishing one
//! fixed payload in a loop on `baseline/{i}/telemetry` at QoS 0 or 1 for the duration, as fast
//! as `AsyncClient::publish` accepts; no scheduling, no encoding, no checker. With
//! `--subscribe`, one more connection subscribes to every topic and counts what arrives (the
//! broker then fans out each message once, as it does for device-sim's checker). With
//! `--publish-bytes`, each publish goes through `AsyncClient::publish_bytes` with a shared
//! `Bytes` payload instead of `publish` with a copied `Vec` (no payload copy, one topic copy
//! fewer, no per-call topic check: the path device-sim itself uses), a cheaper loop than the
//! default one.
//!
//! Prints one JSON object: publishes handed to rumqttc per second (`msgs_per_s`, the figure
//! compared with device-sim's `published` / `send_seconds`), PUBLISH packets written per second,
//! CPU seconds and messages per CPU second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

#[derive(Parser, Debug)]
#[command(
    name = "mqtt-baseline",
    about = "A bare rumqttc QoS 0/1 publish loop, for comparison with device-sim"
)]
struct Args {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Publishing connections.
    #[arg(long, default_value_t = 100)]
    connections: u32,
    /// Seconds of publishing (after every connection has its CONNACK).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// QoS 0 or 1.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// One more connection subscribed to every topic, counting what arrives.
    #[arg(long)]
    subscribe: bool,
    /// Publish with `publish_bytes` and a shared `Bytes` payload (device-sim's call) instead
    /// of `publish` with a `Vec` copied per message.
    #[arg(long)]
    publish_bytes: bool,
}

fn options(args: &Args, client_id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, args.host.clone(), args.port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    options.set_max_packet_size(4 << 20, 4 << 20);
    options.set_inflight(100);
    options
}

/// User + system CPU seconds of this process.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

#[derive(Default)]
struct Counts {
    connected: AtomicU64,
    handed: AtomicU64,
    written: AtomicU64,
    received: AtomicU64,
    errors: AtomicU64,
}

fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    if args.connections == 0 || args.seconds <= 0.0 {
        bail!("--connections and --seconds must be greater than 0");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(args))
}

async fn run(args: Arc<Args>) -> anyhow::Result<()> {
    let qos = if args.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start_gate = Arc::new(tokio::sync::Semaphore::new(0));
    let tag = std::process::id();

    if args.subscribe {
        let (client, mut eventloop) = AsyncClient::new(options(&args, &format!("baseline-sub-{tag}")), 1024);
        let ready = Arc::new(tokio::sync::Notify::new());
        let ready_tx = ready.clone();
        let counts = counts.clone();
        let stopped = stopped.clone();
        tokio::spawn(async move {
            while !stopped.load(Ordering::Relaxed) {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe("baseline/+/telemetry", qos);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => ready_tx.notify_one(),
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        counts.received.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready.notified())
            .await
            .context("the subscriber got no SUBACK within 10 s")?;
    }

    let payload = vec![b'x'; args.payload_bytes];
    let shared_payload = bytes::Bytes::from(payload.clone());
    let publish_bytes = args.publish_bytes;
    let mut publishers = Vec::new();
    for i in 0..args.connections {
        let (client, mut eventloop) = AsyncClient::new(options(&args, &format!("baseline-{tag}-{i}")), 64);
        let counts_poll = counts.clone();
        let stopped_poll = stopped.clone();
        tokio::spawn(async move {
            while !stopped_poll.load(Ordering::Relaxed) {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        counts_poll.connected.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                        counts_poll.written.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(_) => {
                        counts_poll.errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        let topic = format!("baseline/{i}/telemetry");
        let payload = payload.clone();
        let shared_payload = shared_payload.clone();
        let counts = counts.clone();
        let stop = stop.clone();
        let gate = start_gate.clone();
        publishers.push(tokio::spawn(async move {
            if let Ok(permit) = gate.acquire().await {
                permit.forget();
            }
            let stopping = stop.notified();
            tokio::pin!(stopping);
            if publish_bytes {
                loop {
                    tokio::select! {
                        biased;
                        () = &mut stopping => break,
                        result = client.publish_bytes(topic.clone(), qos, false, shared_payload.clone()) => match result {
                            Ok(()) => { counts.handed.fetch_add(1, Ordering::Relaxed); }
                            Err(_) => { counts.errors.fetch_add(1, Ordering::Relaxed); break; }
                        },
                    }
                }
            } else {
                loop {
                    tokio::select! {
                        biased;
                        () = &mut stopping => break,
                        result = client.publish(topic.clone(), qos, false, payload.clone()) => match result {
                            Ok(()) => { counts.handed.fetch_add(1, Ordering::Relaxed); }
                            Err(_) => { counts.errors.fetch_add(1, Ordering::Relaxed); break; }
                        },
                    }
                }
            }
            let _ = client.try_disconnect();
        }));
    }
    let connect_deadline = Instant::now() + Duration::from_secs(30);
    while counts.connected.load(Ordering::Relaxed) < u64::from(args.connections) {
        if Instant::now() > connect_deadline {
            bail!(
                "only {} of {} connections got a CONNACK within 30 s",
                counts.connected.load(Ordering::Relaxed),
                args.connections
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let cpu_before = cpu_seconds();
    let started = Instant::now();
    start_gate.add_permits(args.connections as usize);
    tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
    stop.notify_waiters();
    let handed = counts.handed.load(Ordering::Relaxed);
    let written = counts.written.load(Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let cpu = match (cpu_before, cpu_seconds()) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    for publisher in publishers {
        let _ = tokio::time::timeout(Duration::from_secs(2), publisher).await;
    }
    // Let the subscriber take what is still on its way.
    if args.subscribe {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stopped.store(true, Ordering::Relaxed);
    let report = serde_json::json!({
        "connections": args.connections,
        "qos": args.qos,
        "payload_bytes": args.payload_bytes,
        "publish_bytes": args.publish_bytes,
        "seconds": seconds,
        "handed": handed,
        "written": written,
        "msgs_per_s": handed as f64 / seconds,
        "written_per_s": written as f64 / seconds,
        "received": args.subscribe.then(|| counts.received.load(Ordering::Relaxed)),
        "errors": counts.errors.load(Ordering::Relaxed),
        "cpu_seconds": cpu,
        "msgs_per_core_s": cpu.filter(|&c| c > 0.0).map(|c| handed as f64 / c),
    });
    println!("{report}");
    Ok(())
}
