//! Shared by the device-sim tests: the shipped smoke scenario, run settings, unique names, and
//! the brokers' presence.

#![allow(dead_code, reason = "each test file uses part of the helpers")]

use std::path::PathBuf;
use std::time::Duration;

use device_sim::device::ModelSource;
use device_sim::message::PayloadFormat;
use device_sim::run::RunSettings;
use device_sim::shared::TransportSettings;
use device_sim::target::Target;
use twin_core::{LoadOptions, Scenario};

/// Mosquitto's address in tests.
pub const MQTT: &str = "mqtt://127.0.0.1:1883";
/// NATS's address in tests.
pub const NATS: &str = "nats://127.0.0.1:4222";

/// The workspace's `scenarios/` folder.
pub fn scenarios() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

/// The smoke scenario, validated.
pub fn smoke() -> Scenario {
    device_sim::fleet::load(&scenarios().join("device-sim-smoke.toml"), LoadOptions::default(), None)
        .expect("device-sim-smoke.toml is valid")
}

/// A name no other test (or run) uses.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{prefix}{}x{nanos}", std::process::id())
}

/// Run settings for `target` with the defaults of the command line.
pub fn settings(target: &str, topic: &str) -> RunSettings {
    RunSettings {
        transport: TransportSettings {
            target: Target::parse(target).expect("target"),
            qos: 0,
            payload: PayloadFormat::Json,
            topic: topic.to_owned(),
            command_topic: "devices/{id}/desired".to_owned(),
            client_id: "{id}".to_owned(),
            stream: None,
            create_stream: false,
            delete_stream: false,
            connect_rate: None,
            connect_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(5),
            max_in_flight: 1024,
            checker: true,
        },
        duration: None,
        clock: None,
        rate: None,
        max_rate: None,
        arrivals: None,
        progress: false,
        models: ModelSource::beside(&scenarios().join("device-sim-smoke.toml")),
    }
}

/// Fails with how to start the broker when nothing listens on `port`.
pub fn require_broker(name: &str, port: u16) {
    if std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).is_err() {
        panic!(
            "{name} is not running on 127.0.0.1:{port}. The device-sim tests need Mosquitto and NATS with \
             JetStream: `apt-get install mosquitto nats-server`, then `mosquitto -d` and \
             `nats-server -js -a 127.0.0.1 -p 4222 &` (see device-sim/README.md)"
        );
    }
}

/// Messages the smoke scenario's fleet sends in cadence mode: three thermometers at 4 Hz for
/// 2 s (8 readings each, one message per reading) and two pumps with 500 ms summary windows
/// (the windows ending at 0.5, 1.0 and 1.5 s; the one ending with the run is not due in it).
pub const SMOKE_MESSAGES: u64 = 3 * 8 + 2 * 3;
