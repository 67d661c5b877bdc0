//! Components and resources of the fleet world: plain data, no behaviour.
//!
//! Devices and gateways are entities; a device's sensors are slots of its [`Sensors`]
//! component (the sensor is the unit of generation, the device the unit of ownership: a sensor
//! never exists without its device, and a million devices must fit in 512 MiB). Topology is
//! data: a device names its gateway, and the [`Topology`] resource lists entities by stable
//! index (the order of the scenario's groups and devices), the only order in which anything is
//! ever reduced or written out.

use std::sync::Arc;

use bevy_ecs::component::Component;
use bevy_ecs::entity::Entity;
use bevy_ecs::resource::Resource;
use smallvec::SmallVec;

use crate::fault::ActiveFault;
use crate::replay::ReplaySeries;
use crate::rng::Stream;
use crate::scenario::{Placement, Scenario, UploadSpec};
use crate::stats::{RunStats, WindowAcc};

/// An edge device's identity (a Raspberry Pi, a Jetson, an MCU board...).
#[derive(Component, Clone, Copy, Debug)]
pub struct Device {
    /// Stable global index (scenario order).
    pub index: u32,
    /// Group index.
    pub group: u16,
    /// Gateway index, if the device reaches the cloud through one.
    pub gateway: Option<u16>,
}

/// The device clock's error: `device_time = t + offset + ppm * 1e-6 * (t - since)`.
#[derive(Clone, Copy, Debug, Default)]
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

/// What a device's sensors produced during the current step, read by the uplink.
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

/// A device's changing state: power, upload settings, clock, and the current step's output.
#[derive(Component, Clone, Copy, Debug)]
pub struct DeviceState {
    /// False while crashed.
    pub online: bool,
    /// How its data leaves the edge.
    pub uplink: UploadSpec,
    /// Its clock's error.
    pub skew: ClockSkew,
    /// Output of the current step.
    pub step: StepOutput,
}

/// One channel's statistics: the open window (what a summary would carry) and the run so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChannelStats {
    /// The window being filled; its `last` persists across windows (the last reading ever).
    pub window: WindowAcc,
    /// Closed windows, merged.
    pub total: RunStats,
}

/// Statistics of a sensor's channels: one inline for scalar sensors, three boxed for vectors.
#[derive(Clone, Debug)]
pub enum Channels {
    /// A scalar sensor.
    Scalar(ChannelStats),
    /// A vector sensor.
    Vector(Box<[ChannelStats]>),
}

impl Channels {
    /// Statistics for `dims` channels.
    pub fn new(dims: usize) -> Self {
        let fresh = ChannelStats {
            window: WindowAcc::default(),
            total: RunStats::default(),
        };
        if dims == 1 {
            Self::Scalar(fresh)
        } else {
            Self::Vector(vec![fresh; dims].into_boxed_slice())
        }
    }

    /// The channels.
    pub fn as_slice(&self) -> &[ChannelStats] {
        match self {
            Self::Scalar(c) => std::slice::from_ref(c),
            Self::Vector(v) => v,
        }
    }

    /// The channels, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [ChannelStats] {
        match self {
            Self::Scalar(c) => std::slice::from_mut(c),
            Self::Vector(v) => v,
        }
    }
}

/// One sensor of a device: generator state and statistics.
#[derive(Clone, Debug)]
pub struct SensorSlot {
    /// Index of its spec in [`Scenario::sensors`].
    pub spec: u32,
    /// Index of the next periodic sample (sample `k` is at `k / rate_hz`).
    pub next_index: u64,
    /// Generator state (walk position, OU value, Markov state).
    pub level: f64,
    /// The signal's random stream.
    pub stream: Stream,
    /// Statistics per channel.
    pub channels: Channels,
}

/// A device's sensors, in the order of its group's `[[fleet.sensors]]`.
#[derive(Component, Clone, Debug, Default)]
pub struct Sensors(pub SmallVec<[SensorSlot; 2]>);

/// Faults in effect on a device's sensors, one list per sensor slot (present only while a
/// fault is).
#[derive(Component, Clone, Debug, Default)]
pub struct SensorFaults(pub SmallVec<[Vec<ActiveFault>; 2]>);

impl SensorFaults {
    /// Whether no fault is in effect.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Vec::is_empty)
    }
}

/// Playback position of a replay sensor.
#[derive(Clone, Debug)]
pub struct ReplayCursor {
    /// The sensor's series.
    pub series: Arc<ReplaySeries>,
    /// Next row.
    pub row: usize,
    /// Completed passes (looping).
    pub pass: u64,
}

/// Replay positions of a device's sensors (`None` for sensors that do not replay).
#[derive(Component, Clone, Debug, Default)]
pub struct ReplayCursors(pub SmallVec<[Option<ReplayCursor>; 2]>);

/// Readings kept for the recording, per sensor slot: `(device time, channel values...)` flattened.
#[derive(Component, Clone, Debug, Default)]
pub struct Recorder(pub SmallVec<[Vec<f64>; 2]>);

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

/// The scenario the world was built from.
#[derive(Resource, Clone, Debug)]
pub struct ScenarioSpec(pub Arc<Scenario>);

/// Entities by stable index.
#[derive(Resource, Clone, Debug, Default)]
pub struct Topology {
    /// Devices by global index.
    pub devices: Vec<Entity>,
    /// Gateways by index.
    pub gateways: Vec<Entity>,
}

/// No index (no shadow, no comparison).
pub const NONE: u16 = u16::MAX;

/// The model a device runs on each completed window of one of its sensors.
#[derive(Component, Clone, Copy, Debug)]
pub struct DeployedModel {
    /// Index into [`Scenario::models`].
    pub model: u16,
    /// The bound sensor slot.
    pub slot: u16,
    /// Alarm threshold on the score.
    pub threshold: f32,
    /// Where inference runs.
    pub placement: Placement,
    /// A version run beside it on the same rows without acting ([`NONE`] if none).
    pub shadow: u16,
    /// The comparison its rows count towards (index into [`Scenario::comparisons`], or
    /// [`NONE`]).
    pub comparison: u16,
}

/// Feature rows of the windows a device completed and not yet scored: usually those of the
/// current step; rows placed in the cloud wait here while the device's gateway is partitioned.
#[derive(Component, Clone, Debug, Default)]
pub struct PendingRows {
    /// Values, row by row.
    pub values: Vec<f32>,
    /// When each row's window closed (or frame was taken), in simulated nanoseconds.
    pub closed_at: Vec<u64>,
    /// Each row's true class, for camera frames (empty for window features).
    pub labels: Vec<i64>,
}
