//! Components and resources of the fleet world: plain data, no behaviour.
//!
//! Topology is data: a device names its gateway, a sensor names its device, and the
//! [`Topology`] resource lists entities by stable index (the order of the scenario's groups and
//! devices), which is the only order in which anything is ever reduced or written out.

use std::sync::Arc;

use bevy_ecs::component::Component;
use bevy_ecs::entity::Entity;
use bevy_ecs::resource::Resource;
use smallvec::SmallVec;

use crate::fault::ActiveFault;
use crate::replay::ReplaySeries;
use crate::rng::Stream;
use crate::scenario::{Scenario, UploadMode, UploadSpec};
use crate::stats::{RunStats, WindowAcc};

/// An edge device (a Raspberry Pi, a Jetson, an MCU board...).
#[derive(Component, Clone, Copy, Debug)]
pub struct Device {
    /// Stable global index (scenario order).
    pub index: u32,
    /// Group index.
    pub group: u16,
    /// Gateway index, if the device reaches the cloud through one.
    pub gateway: Option<u16>,
}

/// Whether a device is running.
#[derive(Component, Clone, Copy, Debug)]
pub struct Power {
    /// False while crashed.
    pub online: bool,
}

/// How a device's data leaves the edge.
#[derive(Component, Clone, Copy, Debug)]
pub struct Uplink(pub UploadSpec);

/// The device clock's error: `device_time = t + offset + ppm * 1e-6 * (t - since)`.
#[derive(Component, Clone, Copy, Debug, Default)]
pub struct ClockSkew {
    /// Offset in seconds.
    pub offset_s: f64,
    /// Drift in parts per million.
    pub ppm: f64,
    /// When the drift started (simulated seconds).
    pub since_s: f64,
}

impl ClockSkew {
    /// The device's timestamp for true simulated time `t`.
    #[inline]
    pub fn device_time(&self, t: f64) -> f64 {
        t + self.offset_s + self.ppm * 1e-6 * (t - self.since_s)
    }
}

/// A gateway (site) between devices and the cloud.
#[derive(Component, Clone, Copy, Debug)]
pub struct Gateway {
    /// Stable index (scenario order).
    pub index: u16,
}

/// The edge buffer a gateway fills while its uplink is partitioned.
#[derive(Component, Clone, Copy, Debug, Default)]
pub struct EdgeBuffer {
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// Bytes waiting.
    pub backlog_bytes: u64,
    /// Messages waiting.
    pub backlog_messages: u64,
    /// True while the uplink is down.
    pub partitioned: bool,
}

/// A sensor on a device.
#[derive(Component, Clone, Copy, Debug)]
pub struct Sensor {
    /// Global index of its device.
    pub device: u32,
    /// Index of its spec in [`Scenario::sensors`].
    pub spec: u32,
}

/// What a sensor produced during the current step, read by the uplink.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepOutput {
    /// Readings kept (after dropout).
    pub samples: u32,
    /// Raw-mode messages.
    pub raw_messages: u32,
    /// Raw-mode bytes.
    pub raw_bytes: u64,
    /// Time of the newest kept reading (simulated seconds), or -inf.
    pub newest: f64,
}

/// A sensor's generator state.
#[derive(Component, Clone, Debug)]
pub struct SensorState {
    /// Index of the next periodic sample (sample `k` is at `k / rate_hz`).
    pub next_index: u64,
    /// Generator state (walk position, OU value, Markov state).
    pub level: f64,
    /// The signal's random stream.
    pub stream: Stream,
    /// Output of the current step.
    pub step: StepOutput,
}

/// One channel's statistics: the open window and the run so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChannelStats {
    /// The window being filled.
    pub window: WindowAcc,
    /// Closed windows, merged.
    pub total: RunStats,
    /// Last reading ever.
    pub last: f64,
}

/// Statistics per channel (one for scalar sensors, three for vectors).
#[derive(Component, Clone, Debug, Default)]
pub struct SensorStats {
    /// Channels.
    pub channels: SmallVec<[ChannelStats; 1]>,
}

/// Faults in effect on a sensor (present only while one is).
#[derive(Component, Clone, Debug, Default)]
pub struct SensorFaults(pub Vec<ActiveFault>);

/// Playback position of a replay sensor.
#[derive(Component, Clone, Debug)]
pub struct ReplayCursor {
    /// The sensor's series.
    pub series: Arc<ReplaySeries>,
    /// Next row.
    pub row: usize,
    /// Completed passes (looping).
    pub pass: u64,
}

/// Readings kept for the recording: `(device time, channel values...)` flattened.
#[derive(Component, Clone, Debug, Default)]
pub struct Recorder(pub Vec<f64>);

/// The scenario the world was built from.
#[derive(Resource, Clone, Debug)]
pub struct ScenarioSpec(pub Arc<Scenario>);

/// Entities by stable index.
#[derive(Resource, Clone, Debug, Default)]
pub struct Topology {
    /// Devices by global index.
    pub devices: Vec<Entity>,
    /// `sensors[sensor_start[d]..sensor_start[d + 1]]` are device `d`'s sensors.
    pub sensor_start: Vec<u32>,
    /// Sensors, device by device.
    pub sensors: Vec<Entity>,
    /// Gateways by index.
    pub gateways: Vec<Entity>,
}

impl Topology {
    /// The sensor entities of device `d`.
    pub fn sensors_of(&self, device: u32) -> &[Entity] {
        let d = device as usize;
        &self.sensors[self.sensor_start[d] as usize..self.sensor_start[d + 1] as usize]
    }
}

/// Per-device state the parallel sensor pass needs, published once per step.
#[derive(Clone, Copy, Debug)]
pub struct DeviceRow {
    /// Running.
    pub online: bool,
    /// Upload mode.
    pub mode: UploadMode,
    /// Header bytes per message.
    pub overhead_bytes: u32,
    /// Summary window in nanoseconds.
    pub window: u64,
    /// Clock error.
    pub skew: ClockSkew,
}

/// The published device table, indexed by global device index.
#[derive(Resource, Clone, Debug, Default)]
pub struct DeviceTable(pub Vec<DeviceRow>);

/// Whether readings are kept for a recording.
#[derive(Resource, Clone, Copy, Debug, Default)]
pub struct Recording(pub bool);
