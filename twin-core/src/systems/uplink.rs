//! `forward_uplink` and `measure_staleness`: what leaves the edge each step, where it goes
//! (the cloud, a partitioned gateway's buffer, or lost), and how old the cloud's data is.
//!
//! Both run on the world's thread in device index order, so buffer admission (which device's
//! messages still fit) and every float sum are deterministic. Admission works per device and
//! step: a device's messages of one step are admitted whole while they fit; when they do not,
//! as many as fit are admitted counting each at the step's mean message size (the buffer
//! rejects new data when full, like Greengrass stream manager's `RejectNewData`).

use bevy_ecs::resource::Resource;
use bevy_ecs::system::{Query, Res, ResMut};

use crate::components::{DeviceState, EdgeBuffer, ScenarioSpec, Topology};
use crate::metrics::Metrics;
use crate::scenario::UploadMode;
use crate::time::{SimClock, secs};

/// The cloud's view per device, indexed by global device index.
#[derive(Resource, Clone, Debug, Default)]
pub struct UplinkState {
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
    topology: Res<Topology>,
    devices: Query<&DeviceState>,
    mut buffers: Query<&mut EdgeBuffer>,
    mut uplink: ResMut<UplinkState>,
    mut metrics: ResMut<Metrics>,
) {
    let uplink = &mut *uplink;
    let metrics = &mut *metrics;
    let scenario = &scenario.0;
    let now_s = secs(clock.now);
    for (g, &entity) in topology.gateways.iter().enumerate() {
        if buffers.get(entity).is_ok_and(|b| b.partitioned) {
            metrics.gateways[g].partitioned_seconds += clock.step_secs();
        }
    }
    for (gi, group) in scenario.groups.iter().enumerate() {
        let group_metrics = &mut metrics.groups[gi];
        let mut gateway_metrics = group.gateway.map(|g| &mut metrics.gateways[usize::from(g)]);
        let mut gateway_buffer = group
            .gateway
            .and_then(|g| buffers.get_mut(topology.gateways[usize::from(g)]).ok());
        for d in group.first_device as usize..(group.first_device + group.count) as usize {
            let Ok(state) = devices.get(topology.devices[d]) else {
                continue;
            };
            let step = state.step;
            group_metrics.samples += u64::from(step.samples);
            let window = state.uplink.window.0.max(1);
            let (messages, bytes, newest) = match state.uplink.mode {
                UploadMode::Raw => {
                    group_metrics.raw.add(u64::from(step.raw_messages), step.raw_bytes);
                    (u64::from(step.raw_messages), step.raw_bytes, step.newest)
                }
                UploadMode::Summary => {
                    let closes = if state.online {
                        boundaries_in(clock.now, clock.step_end, window)
                    } else {
                        0
                    };
                    let bytes = closes * (u64::from(state.uplink.overhead_bytes) + uplink.summary_entry_bytes[gi]);
                    group_metrics.summary.add(closes, bytes);
                    (closes, bytes, secs(clock.step_end / window * window))
                }
            };
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
                    if let Some(gateway_metrics) = gateway_metrics.as_deref_mut() {
                        gateway_metrics.buffered.add(admitted_messages, admitted_bytes);
                        gateway_metrics
                            .lost
                            .add(messages - admitted_messages, bytes - admitted_bytes);
                        gateway_metrics.peak_backlog_bytes =
                            gateway_metrics.peak_backlog_bytes.max(buffer.backlog_bytes);
                    }
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
    uplink: Res<UplinkState>,
    mut metrics: ResMut<Metrics>,
) {
    let end_s = clock.step_end_secs();
    let dt = clock.step_secs();
    for (gi, group) in scenario.0.groups.iter().enumerate() {
        let group_metrics = &mut metrics.groups[gi];
        let mut integral = 0.0;
        let mut max = group_metrics.staleness_max;
        for d in group.first_device as usize..(group.first_device + group.count) as usize {
            let staleness = end_s - uplink.cloud_latest[d];
            integral += staleness;
            max = if staleness > max { staleness } else { max };
        }
        group_metrics.staleness_integral += integral * dt;
        group_metrics.staleness_max = max;
        group_metrics.offline_device_seconds += group_metrics.offline_devices as f64 * dt;
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
