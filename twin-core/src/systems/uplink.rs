//! `forward_uplink` and `measure_staleness`: what leaves the edge each step, where it goes
//! (the cloud, a partitioned gateway's buffer, or lost), and how old the cloud's data is.
//!
//! Both run on the world's thread in device index order, so buffer admission (which device's
//! messages still fit) is deterministic. Admission works per device and step: a device's
//! messages of one step are admitted whole while they fit; when they do not, as many as fit
//! are admitted counting each at the step's mean message size (the buffer rejects new data
//! when full, like Greengrass stream manager's `RejectNewData`).

use bevy_ecs::resource::Resource;
use bevy_ecs::system::{Query, Res, ResMut};

use crate::components::{DeviceTable, EdgeBuffer, ScenarioSpec, Sensor, SensorState, Topology};
use crate::metrics::Metrics;
use crate::scenario::UploadMode;
use crate::time::{SimClock, secs};

/// Per-device scratch and cloud-side view, indexed by global device index.
#[derive(Resource, Clone, Debug, Default)]
pub struct UplinkState {
    /// Messages produced this step.
    pub messages: Vec<u64>,
    /// Bytes produced this step.
    pub bytes: Vec<u64>,
    /// Newest reading produced this step.
    pub newest: Vec<f64>,
    /// Samples taken this step.
    pub samples: Vec<u64>,
    /// Newest reading the cloud holds per device (simulated seconds).
    pub cloud_latest: Vec<f64>,
    /// Newest reading waiting in a gateway buffer per device.
    pub buffered_newest: Vec<f64>,
    /// Summary entry bytes per group (sum over the group's sensors).
    pub summary_entry_bytes: Vec<u64>,
}

impl UplinkState {
    /// Sized for `devices` devices.
    pub fn new(devices: usize, summary_entry_bytes: Vec<u64>) -> Self {
        Self {
            messages: vec![0; devices],
            bytes: vec![0; devices],
            newest: vec![f64::NEG_INFINITY; devices],
            samples: vec![0; devices],
            cloud_latest: vec![0.0; devices],
            buffered_newest: vec![f64::NEG_INFINITY; devices],
            summary_entry_bytes,
        }
    }
}

/// Window boundaries `b` with `now < b <= end`.
fn boundaries_in(now: u64, end: u64, window: u64) -> u64 {
    end / window - now / window
}

/// Collects each device's traffic for the step and sends it to the cloud or its gateway's buffer.
pub fn forward_uplink(
    clock: Res<SimClock>,
    scenario: Res<ScenarioSpec>,
    devices: Res<DeviceTable>,
    topology: Res<Topology>,
    sensors: Query<(&Sensor, &SensorState)>,
    mut buffers: Query<&mut EdgeBuffer>,
    mut uplink: ResMut<UplinkState>,
    mut metrics: ResMut<Metrics>,
) {
    let uplink = &mut *uplink;
    for (sensor, state) in &sensors {
        let d = sensor.device as usize;
        uplink.messages[d] += u64::from(state.step.raw_messages);
        uplink.bytes[d] += state.step.raw_bytes;
        uplink.samples[d] += u64::from(state.step.samples);
        if state.step.newest > uplink.newest[d] {
            uplink.newest[d] = state.step.newest;
        }
    }
    let scenario = &scenario.0;
    let now_s = secs(clock.now);
    for (g, &entity) in topology.gateways.iter().enumerate() {
        if buffers.get(entity).is_ok_and(|b| b.partitioned) {
            metrics.gateways[g].partitioned_seconds += clock.step_secs();
        }
    }
    let metrics = &mut *metrics;
    for (gi, group) in scenario.groups.iter().enumerate() {
        let group_metrics = &mut metrics.groups[gi];
        let mut gateway_metrics = group.gateway.map(|g| &mut metrics.gateways[usize::from(g)]);
        let mut gateway_buffer = group
            .gateway
            .map(|g| buffers.get_mut(topology.gateways[g as usize]).ok())
            .flatten();
        for d in group.first_device as usize..(group.first_device + group.count) as usize {
            let row = &devices.0[d];
            let mut messages = std::mem::take(&mut uplink.messages[d]);
            let mut bytes = std::mem::take(&mut uplink.bytes[d]);
            let mut newest = std::mem::replace(&mut uplink.newest[d], f64::NEG_INFINITY);
            group_metrics.samples += std::mem::take(&mut uplink.samples[d]);
            if row.mode == UploadMode::Summary {
                let closes = if row.online {
                    boundaries_in(clock.now, clock.step_end, row.window.max(1))
                } else {
                    0
                };
                messages = closes;
                bytes = closes * (u64::from(row.overhead_bytes) + uplink.summary_entry_bytes[gi]);
                group_metrics.summary.add(messages, bytes);
                if closes > 0 {
                    newest = newest.max(secs(clock.step_end / row.window.max(1) * row.window.max(1)));
                }
            } else {
                group_metrics.raw.add(messages, bytes);
            }
            if messages == 0 {
                continue;
            }
            match gateway_buffer.as_deref_mut() {
                Some(buffer) if buffer.partitioned => {
                    let free = buffer.capacity_bytes - buffer.backlog_bytes;
                    let (admitted_messages, admitted_bytes) = if bytes <= free {
                        (messages, bytes)
                    } else {
                        let mean_size = bytes.div_ceil(messages);
                        let fit = free / mean_size;
                        (fit, fit * mean_size)
                    };
                    buffer.backlog_bytes += admitted_bytes;
                    buffer.backlog_messages += admitted_messages;
                    group_metrics.buffered.add(admitted_messages, admitted_bytes);
                    group_metrics
                        .lost
                        .add(messages - admitted_messages, bytes - admitted_bytes);
                    let Some(gateway_metrics) = gateway_metrics.as_deref_mut() else {
                        continue;
                    };
                    gateway_metrics.buffered.add(admitted_messages, admitted_bytes);
                    gateway_metrics
                        .lost
                        .add(messages - admitted_messages, bytes - admitted_bytes);
                    gateway_metrics.peak_backlog_bytes = gateway_metrics.peak_backlog_bytes.max(buffer.backlog_bytes);
                    if admitted_messages > 0 {
                        let admitted_newest = if admitted_messages == messages { newest } else { now_s };
                        uplink.buffered_newest[d] = uplink.buffered_newest[d].max(admitted_newest);
                    }
                }
                _ => {
                    group_metrics.delivered.add(messages, bytes);
                    if newest > uplink.cloud_latest[d] {
                        uplink.cloud_latest[d] = newest;
                    }
                }
            }
        }
    }
}

/// Adds each device's cloud-side staleness (end of step minus the newest reading the cloud
/// holds) to its group's time integral and maximum, and crashed time to the group's total.
pub fn measure_staleness(
    clock: Res<SimClock>,
    scenario: Res<ScenarioSpec>,
    devices: Res<DeviceTable>,
    uplink: Res<UplinkState>,
    mut metrics: ResMut<Metrics>,
) {
    let end_s = clock.step_end_secs();
    let dt = clock.step_secs();
    for (gi, group) in scenario.0.groups.iter().enumerate() {
        let group_metrics = &mut metrics.groups[gi];
        let mut integral = 0.0;
        let mut max = group_metrics.staleness_max;
        let mut offline = 0u64;
        for d in group.first_device as usize..(group.first_device + group.count) as usize {
            let staleness = end_s - uplink.cloud_latest[d];
            integral += staleness;
            max = if staleness > max { staleness } else { max };
            offline += u64::from(!devices.0[d].online);
        }
        group_metrics.staleness_integral += integral * dt;
        group_metrics.staleness_max = max;
        group_metrics.offline_device_seconds += offline as f64 * dt;
    }
}

#[cfg(test)]
mod tests {
    use super::boundaries_in;

    #[test]
    fn window_boundaries_in_step() {
        assert_eq!(boundaries_in(0, 60, 60), 1);
        assert_eq!(boundaries_in(0, 59, 60), 0);
        assert_eq!(boundaries_in(60, 180, 60), 2);
        assert_eq!(boundaries_in(30, 90, 60), 1);
    }
}
