//! device-sim against the real brokers on this machine: Mosquitto at 127.0.0.1:1883 and NATS
//! with JetStream at 127.0.0.1:4222 (see device-sim/README.md to start them). Every test uses
//! its own topics, subjects and streams, and deletes the streams it creates.

mod common;

use std::time::Duration;

use common::{MQTT, NATS, SMOKE_MESSAGES, require_broker, settings, smoke, unique};
use device_sim::message::PayloadFormat;
use device_sim::run::run;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;
use twin_core::load::Arrivals;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_qos1_delivers_every_message_once_in_order() {
    require_broker("Mosquitto", 1883);
    let prefix = unique("ds-q1-");
    let mut settings = settings(MQTT, &format!("{prefix}/{{id}}/telemetry"));
    settings.transport.qos = 1;
    settings.transport.command_topic = format!("{prefix}/{{id}}/desired");
    settings.transport.client_id = format!("{prefix}-{{id}}");
    let report = run(smoke(), settings, CancellationToken::new()).await.expect("run");
    let m = &report.messages;
    assert_eq!(m.sent, SMOKE_MESSAGES, "{}", report.summary());
    assert_eq!(m.received, Some(SMOKE_MESSAGES));
    assert_eq!(m.lost, Some(0));
    assert_eq!(m.duplicates, Some(0));
    assert_eq!(m.reordered, Some(0));
    assert_eq!(m.errors, 0);
    assert_eq!(m.acks, SMOKE_MESSAGES, "every QoS 1 publish is acknowledged");
    assert_eq!(report.e2e.count, SMOKE_MESSAGES);
    assert_eq!(report.connections.connects, 5, "one connection per device");
    assert!(
        report.passed,
        "the smoke scenario's load criteria pass: {}",
        report.summary()
    );
    assert_eq!(report.metrics.get("loss"), Some(&Some(0.0)));
    for (name, _) in twin_core::load::LOAD_METRICS {
        assert!(report.metrics.contains_key(*name), "metric {name} is reported");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_qos1_ack_latency_counts_from_the_intended_send_time() {
    require_broker("Mosquitto", 1883);
    let prefix = unique("ds-ackint-");
    let mut settings = settings(MQTT, &format!("{prefix}/{{id}}/telemetry"));
    settings.transport.qos = 1;
    settings.transport.command_topic = format!("{prefix}/{{id}}/desired");
    settings.transport.client_id = format!("{prefix}-{{id}}");
    // Device k connects k / 2 s after the start: the last pump (device 4) at 2 s, the end of the
    // scenario, so its windows due at 0.5, 1.0 and 1.5 s wait in its queue and are published at
    // 2 s or later. Measured from the intended send time, their acknowledgements take at least
    // 0.5 s whatever the broker's speed (from the write, they would look as fast as the rest).
    settings.transport.connect_rate = Some(2.0);
    let report = run(smoke(), settings, CancellationToken::new()).await.expect("run");
    let m = &report.messages;
    assert_eq!(m.sent, SMOKE_MESSAGES, "{}", report.summary());
    assert_eq!(m.acks, SMOKE_MESSAGES, "{}", report.summary());
    assert_eq!(report.ack.count, SMOKE_MESSAGES);
    let max = report.ack.max_ms.expect("acknowledgements measured");
    assert!(
        max >= 500.0,
        "the waiting windows' acknowledgements count their wait: max {max} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_qos0_protobuf_counts_every_message() {
    require_broker("Mosquitto", 1883);
    let prefix = unique("ds-q0-");
    let mut settings = settings(MQTT, &format!("{prefix}/{{group}}/{{id}}"));
    settings.transport.payload = PayloadFormat::Protobuf;
    settings.transport.command_topic = format!("{prefix}/{{id}}/desired");
    settings.transport.client_id = format!("{prefix}-{{id}}");
    settings.transport.connect_rate = Some(50.0);
    let report = run(smoke(), settings, CancellationToken::new()).await.expect("run");
    let m = &report.messages;
    assert_eq!(m.sent, SMOKE_MESSAGES, "{}", report.summary());
    assert_eq!(m.errors, 0);
    assert_eq!(m.acks, 0, "QoS 0 has no acknowledgements");
    let received = m.received.expect("a checker ran");
    assert_eq!(received + m.lost.unwrap_or_default(), SMOKE_MESSAGES);
    assert_eq!(m.duplicates, Some(0));
    assert_eq!(report.connections.connects, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_without_checker_publishes_everything_and_measures_no_receipt() {
    require_broker("Mosquitto", 1883);
    let prefix = unique("ds-nochk-");
    let mut settings = settings(MQTT, &format!("{prefix}/{{id}}/telemetry"));
    settings.transport.command_topic = format!("{prefix}/{{id}}/desired");
    settings.transport.client_id = format!("{prefix}-{{id}}");
    settings.transport.checker = false;
    // An independent subscriber counts what the broker delivers.
    let options = MqttOptions::new(unique("ds-counter-"), "127.0.0.1", 1883);
    let (counter, mut events) = AsyncClient::new(options, 16);
    counter
        .subscribe(format!("{prefix}/+/telemetry"), QoS::AtMostOnce)
        .await
        .expect("subscribe");
    tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(events.poll().await, Ok(Event::Incoming(Packet::SubAck(_)))) {}
    })
    .await
    .expect("suback");
    let counting = tokio::spawn(async move {
        let mut stamps = Vec::new();
        while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                stamps.push(device_sim::message::decode_stamp(&p.payload, PayloadFormat::Json).expect("a stamp"));
            }
        }
        stamps
    });
    let report = run(smoke(), settings, CancellationToken::new()).await.expect("run");
    let m = &report.messages;
    assert_eq!(m.sent, SMOKE_MESSAGES, "{}", report.summary());
    assert_eq!(m.published, SMOKE_MESSAGES);
    assert_eq!(m.errors, 0);
    assert_eq!(
        (m.received, m.lost, m.duplicates),
        (None, None, None),
        "no checker, no receipt figures"
    );
    assert_eq!(report.e2e.count, 0);
    assert!(report.run.checker.starts_with("none"), "{}", report.run.checker);
    let stamps = counting.await.expect("counter");
    // QoS 0 on loopback at this rate: the broker delivers everything, each stamp once.
    let mut seen: Vec<(String, u64)> = stamps.iter().map(|s| (s.device_id.clone(), s.sequence)).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len() as u64, SMOKE_MESSAGES, "{stamps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_devices_apply_and_acknowledge_commands() {
    require_broker("Mosquitto", 1883);
    let prefix = unique("ds-cmd-");
    let mut settings = settings(MQTT, &format!("{prefix}/{{id}}/telemetry"));
    settings.transport.command_topic = format!("{prefix}/{{id}}/desired");
    settings.transport.client_id = format!("{prefix}-{{id}}");
    settings.clock = Some(twin_core::time::ClockMode::Scaled { factor: 0.5 });
    // The operator side: sends a command once thermo-01 is connected, reads its answer.
    let options = MqttOptions::new(unique("ds-operator-"), "127.0.0.1", 1883);
    let (operator, mut events) = AsyncClient::new(options, 16);
    operator
        .subscribe(format!("{prefix}/thermo-01/reported"), QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let fleet = tokio::spawn(run(smoke(), settings, CancellationToken::new()));
    let command = serde_json::json!({
        "upload": {"mode": "summary", "window": "1s"},
        "sampling": {"rate_hz": 2},
        "desired_changed_unix_nanos": device_sim::clock::system_unix_nanos(),
    });
    let answer = tokio::time::timeout(Duration::from_secs(20), async {
        // The device subscribes when it connects; a retained command reaches it whenever that is.
        operator
            .publish(
                format!("{prefix}/thermo-01/desired"),
                QoS::AtLeastOnce,
                true,
                command.to_string(),
            )
            .await
            .expect("publish");
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = events.poll().await
                && p.topic.ends_with("/reported")
            {
                return serde_json::from_slice::<serde_json::Value>(&p.payload).expect("json");
            }
        }
    })
    .await
    .expect("the device answers the command");
    // Clear the retained command.
    operator
        .publish(
            format!("{prefix}/thermo-01/desired"),
            QoS::AtLeastOnce,
            true,
            Vec::new(),
        )
        .await
        .expect("clear");
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while !matches!(events.poll().await, Ok(Event::Incoming(Packet::PubAck(_))) | Err(_)) {}
    })
    .await;
    assert_eq!(answer["reported"]["sampling"]["rate_hz"], 2);
    assert_eq!(answer["reported"]["upload"]["mode"], "summary");
    let acks = answer["acks"].as_array().expect("acks");
    assert_eq!(acks.len(), 2);
    assert!(acks.iter().all(|a| a["status_code"] == 200), "{answer}");
    let report = fleet.await.expect("task").expect("run");
    assert!(report.messages.converged >= 1);
    assert_eq!(report.convergence.count, report.messages.converged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_acknowledges_and_delivers_every_message() {
    require_broker("NATS", 4222);
    let subject = unique("dsjs");
    let stream = subject.to_uppercase();
    let mut settings = settings(NATS, &format!("{subject}.{{group}}.{{id}}"));
    settings.transport.stream = Some(stream.clone());
    settings.transport.create_stream = true;
    settings.transport.delete_stream = true;
    settings.transport.payload = PayloadFormat::Protobuf;
    let report = run(smoke(), settings, CancellationToken::new()).await.expect("run");
    let m = &report.messages;
    assert_eq!(m.sent, SMOKE_MESSAGES, "{}", report.summary());
    assert_eq!(m.acks, SMOKE_MESSAGES, "every JetStream publish is acknowledged");
    assert_eq!(m.received, Some(SMOKE_MESSAGES));
    assert_eq!(m.lost, Some(0));
    assert_eq!(m.duplicates, Some(0));
    assert_eq!(m.errors, 0);
    assert_eq!(report.ack.count, SMOKE_MESSAGES);
    // The stream is gone.
    let client = async_nats::connect("127.0.0.1:4222").await.expect("connect");
    let gone = async_nats::jetstream::new(client).get_stream(&stream).await;
    assert!(gone.is_err(), "stream {stream} was deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_at_a_constant_rate_sends_exactly_rate_times_duration() {
    require_broker("NATS", 4222);
    let subject = unique("dscore");
    let mut settings = settings(NATS, &format!("{subject}.{{id}}"));
    settings.rate = Some(40.0);
    settings.arrivals = Some(Arrivals::Constant);
    let report = run(smoke(), settings, CancellationToken::new()).await.expect("run");
    let m = &report.messages;
    // 2 s at 40 messages per second, the first at 0.
    assert_eq!(m.sent, 80, "{}", report.summary());
    assert_eq!(m.errors, 0);
    assert_eq!(m.received.unwrap_or_default() + m.lost.unwrap_or_default(), 80);
    assert_eq!(m.duplicates, Some(0));
    assert_eq!(report.run.schedule, "constant 40/s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_caps_the_cadence_and_counts_what_it_held_back() {
    require_broker("NATS", 4222);
    let subject = unique("dscap");
    let mut settings = settings(NATS, &format!("{subject}.{{id}}"));
    // The smoke fleet wants 16 messages per second; the cap allows 10 (one every 100 ms from
    // the start: 20 slots in 2 s).
    settings.max_rate = Some(10.0);
    let report = run(smoke(), settings, CancellationToken::new()).await.expect("run");
    let m = &report.messages;
    assert_eq!(m.sent, 20, "{}", report.summary());
    assert_eq!(
        m.unsent,
        SMOKE_MESSAGES - 20,
        "the rest was due and held back when the run ended"
    );
    assert!(m.capped > 0);
    assert_eq!(m.errors, 0);
    assert_eq!(m.received.unwrap_or_default() + m.lost.unwrap_or_default(), 20);
}
