//! What every part of a run shares: the fleet, the time base, the settings of the transports,
//! the counters and latencies, and the signals that end a run.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::Pace;
use crate::fleet::Fleet;
use crate::measure::{Counters, Latencies};
use crate::message::PayloadFormat;
use crate::schedule::DeviceCommand;
use crate::target::Target;

/// Settings of the transports.
#[derive(Clone, Debug)]
pub struct TransportSettings {
    /// The backend.
    pub target: Target,
    /// MQTT QoS (0 or 1).
    pub qos: u8,
    /// Payload encoding (MQTT, NATS).
    pub payload: PayloadFormat,
    /// Telemetry topic or subject template (`{id}`, `{group}`).
    pub topic: String,
    /// MQTT command topic template, subscribed by each device.
    pub command_topic: String,
    /// MQTT client id template (default `{id}`: the device id).
    pub client_id: String,
    /// JetStream stream (`None`: core NATS publish).
    pub stream: Option<String>,
    /// Create the stream.
    pub create_stream: bool,
    /// Delete the stream at the end.
    pub delete_stream: bool,
    /// Connections opened per second (`None`: all at once).
    pub connect_rate: Option<f64>,
    /// Longest wait for the first connection to the target.
    pub connect_timeout: Duration,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Longest wait, after the last message, for in-flight acknowledgements and the checker.
    pub drain_timeout: Duration,
    /// Most JetStream publishes waiting for their acknowledgement at once.
    pub max_in_flight: usize,
    /// Run the checker (MQTT: off with `--no-checker`, which then measures no loss or
    /// end-to-end latency, as a bare publisher would not).
    pub checker: bool,
}

/// The run's shared state.
pub struct Shared {
    /// The virtual devices.
    pub fleet: Arc<Fleet>,
    /// Time base (simulated time 0 on the wall clock).
    pub pace: Pace,
    /// Transport settings.
    pub settings: TransportSettings,
    /// Counters.
    pub counters: Arc<Counters>,
    /// Latency histograms.
    pub latencies: Latencies,
    /// Commands (upload, sampling) received per device.
    pub commands: Arc<Vec<DeviceCommand>>,
    /// Cancelled once every device has handed its last message to the network: the checker
    /// then waits only for what is still on its way.
    pub flushed: CancellationToken,
    /// Cancelled when waiting is over: connections close, the checker stops.
    pub hard_stop: CancellationToken,
}

impl Shared {
    /// Notes a device's (or client's) first connection, for the connect rate.
    pub fn note_first_connect(&self) {
        Counters::add(&self.counters.first_connects, 1);
        let since = self.pace.start.elapsed().as_nanos() as u64;
        self.counters
            .last_first_connect_nanos
            .fetch_max(since, std::sync::atomic::Ordering::Relaxed);
    }

    /// A template filled for one device.
    pub fn fill(&self, template: &str, device: u32) -> String {
        let info = &self.fleet.devices[device as usize];
        template
            .replace("{id}", &info.id)
            .replace("{group}", &self.fleet.scenario.groups[info.group].name)
    }
}

/// A template with every placeholder replaced by `wildcard` (MQTT `+`, NATS `*`).
pub fn wildcard(template: &str, wildcard: &str) -> String {
    template.replace("{id}", wildcard).replace("{group}", wildcard)
}

#[cfg(test)]
impl Shared {
    /// A run's shared state for a unit test: two thermometers (`t-0`, `t-1`), MQTT on
    /// 127.0.0.1:1883 with the default templates, nothing connected.
    pub fn for_test(connect_timeout: Duration) -> Self {
        const TWO_THERMOMETERS: &str = r#"
seed = 1
[meta]
name = "two"
description = "Two thermometers."
[clock]
mode = "virtual"
duration = "10s"
tick = "250ms"
[[fleet]]
name = "t"
count = 2
id = "t-{index}"
[[fleet.sensors]]
name = "temperature"
unit = "C"
rate_hz = 1
ornstein_uhlenbeck = { mean = 21.0, reversion = 0.1, volatility = 0.2 }
"#;
        let scenario =
            twin_core::Scenario::from_toml("test", TWO_THERMOMETERS, &twin_core::NoFiles, Default::default())
                .expect("valid scenario");
        Self {
            fleet: Arc::new(Fleet::new(Arc::new(scenario))),
            pace: Pace::starting_now(1.0),
            settings: TransportSettings {
                target: Target::parse("mqtt://127.0.0.1:1883").expect("target"),
                qos: 0,
                payload: PayloadFormat::Json,
                topic: "devices/{id}/telemetry".into(),
                command_topic: "devices/{id}/desired".into(),
                client_id: "{id}".into(),
                stream: None,
                create_stream: false,
                delete_stream: false,
                connect_rate: None,
                connect_timeout,
                keep_alive: Duration::from_secs(30),
                drain_timeout: Duration::from_secs(5),
                max_in_flight: 1024,
                checker: true,
            },
            counters: Arc::default(),
            latencies: Latencies::default(),
            commands: Arc::new(Vec::new()),
            flushed: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
        }
    }
}
