//! The virtual devices: the scenario's own devices, loaded with twin-server's scenario loader,
//! optionally rescaled to `--devices N`, and what each device's schedule needs to know about
//! them (id, group, sensors, upload settings, crashes from the storyboard).

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use thiserror::Error;
use twin_core::scenario::{Action, Target, UploadMode, UploadSpec};
use twin_core::{LoadOptions, Scenario, ScenarioError};
use twin_server::files::{ScenarioFiles, load_scenario};

/// A scenario that cannot be used.
#[derive(Debug, Error)]
pub enum FleetError {
    /// The file is invalid (every problem, `file:line:column: path: reason`).
    #[error("{0}")]
    Scenario(#[from] ScenarioError),
    /// `--devices` cannot be applied.
    #[error("--devices {devices}: {reason}")]
    Devices {
        /// The number asked for.
        devices: u32,
        /// Why not.
        reason: String,
    },
}

/// Loads and validates `path`, then, with `devices`, rescales the fleet to that many devices:
/// each group keeps its share (largest remainder, at least one device per group) and the
/// scenario is validated again, so seeded selections and ids are the scenario's own.
///
/// # Errors
/// Every problem of the file, or a rescaling the scenario refuses (it names the group counts).
pub fn load(path: &Path, options: LoadOptions, devices: Option<u32>) -> Result<Scenario, FleetError> {
    let scenario = load_scenario(path, options)?;
    let Some(wanted) = devices else {
        return Ok(scenario);
    };
    if wanted == scenario.device_count() {
        return Ok(scenario);
    }
    let groups = scenario.groups.len() as u32;
    if wanted < groups {
        return Err(FleetError::Devices {
            devices: wanted,
            reason: format!("the scenario has {groups} groups and each needs at least one device"),
        });
    }
    let counts = rescale(&scenario.groups.iter().map(|g| g.count).collect::<Vec<_>>(), wanted);
    let text = std::fs::read_to_string(path).map_err(|err| FleetError::Devices {
        devices: wanted,
        reason: format!("cannot read {} again: {err}", path.display()),
    })?;
    let mut document: toml::Table = toml::from_str(&text).map_err(|err| FleetError::Devices {
        devices: wanted,
        reason: format!("cannot parse {} again: {err}", path.display()),
    })?;
    if let Some(toml::Value::Array(fleet)) = document.get_mut("fleet") {
        for (group, count) in fleet.iter_mut().zip(&counts) {
            if let toml::Value::Table(group) = group {
                group.insert("count".into(), toml::Value::Integer(i64::from(*count)));
            }
        }
    }
    let rescaled = toml::to_string(&document).map_err(|err| FleetError::Devices {
        devices: wanted,
        reason: format!("cannot rewrite the fleet: {err}"),
    })?;
    let name = format!("{} (with --devices {wanted}: group counts {counts:?})", path.display());
    Scenario::from_toml(&name, &rescaled, &ScenarioFiles::beside(path), options).map_err(FleetError::from)
}

/// Splits `total` over groups in proportion to `counts` (largest remainder), then gives every
/// group at least one device, taken from the largest groups (`total` must be at least the
/// number of groups).
pub fn rescale(counts: &[u32], total: u32) -> Vec<u32> {
    let sum: u64 = counts.iter().map(|&c| u64::from(c)).sum::<u64>().max(1);
    let total64 = u64::from(total);
    let mut shares: Vec<u64> = counts.iter().map(|&c| total64 * u64::from(c) / sum).collect();
    let mut by_remainder: Vec<usize> = (0..counts.len()).collect();
    by_remainder.sort_by_key(|&i| (std::cmp::Reverse(total64 * u64::from(counts[i]) % sum), i));
    let mut left = total64 - shares.iter().sum::<u64>();
    for &i in by_remainder.iter().cycle().take(counts.len() * 2) {
        if left == 0 {
            break;
        }
        shares[i] += 1;
        left -= 1;
    }
    for i in 0..shares.len() {
        if shares[i] == 0 {
            let Some(largest) = (0..shares.len()).max_by_key(|&j| (shares[j], std::cmp::Reverse(j))) else {
                break;
            };
            if shares[largest] > 1 {
                shares[largest] -= 1;
                shares[i] = 1;
            }
        }
    }
    shares.iter().map(|&s| s as u32).collect()
}

/// One virtual device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// Global device index (the scenario's order).
    pub index: u32,
    /// Device id.
    pub id: String,
    /// Group index.
    pub group: usize,
    /// The group's sensors, as indices into `Scenario::sensors`.
    pub sensors: Range<usize>,
    /// The start of every JSON payload the device sends, up to the sequence number:
    /// `{"stamp":{"device_id":"<id, escaped>","sequence":`, written once.
    pub json_prefix: Box<[u8]>,
}

/// The fleet as device-sim sees it.
pub struct Fleet {
    /// The validated scenario.
    pub scenario: Arc<Scenario>,
    /// Every device, by global index.
    pub devices: Vec<DeviceInfo>,
    /// Global index of each device id.
    pub index_of: foldhash::HashMap<String, u32>,
}

impl Fleet {
    /// The devices of a validated scenario.
    pub fn new(scenario: Arc<Scenario>) -> Self {
        let mut devices = Vec::with_capacity(scenario.device_count() as usize);
        for (group_index, group) in scenario.groups.iter().enumerate() {
            for ordinal in 0..group.count {
                let id = group.device_id(ordinal);
                devices.push(DeviceInfo {
                    index: group.first_device + ordinal,
                    json_prefix: crate::message::json_prefix(&id),
                    id,
                    group: group_index,
                    sensors: group.sensors.clone(),
                });
            }
        }
        let index_of = devices.iter().map(|d| (d.id.clone(), d.index)).collect();
        Self {
            scenario,
            devices,
            index_of,
        }
    }

    /// The storyboard's changes of upload settings and crashes, in time order.
    pub fn transitions(&self) -> Vec<Transition> {
        let mut transitions = Vec::new();
        for event in &self.scenario.events {
            let Target::Devices(devices) = &event.target else {
                continue;
            };
            let (start, end) = match &event.action {
                Action::Upload(spec) => (Change::Upload(Some(*spec)), Change::Upload(None)),
                Action::Crash => (Change::Crashed(true), Change::Crashed(false)),
                _ => continue,
            };
            transitions.push(Transition {
                at: event.at.0,
                devices: devices.clone(),
                change: start,
            });
            if let Some(until) = event.until {
                transitions.push(Transition {
                    at: until.0,
                    devices: devices.clone(),
                    change: end,
                });
            }
        }
        // Ends before starts at the same instant, as the core applies them.
        transitions.sort_by_key(|t| (t.at, !matches!(t.change, Change::Upload(None) | Change::Crashed(false))));
        transitions
    }

    /// The upload settings a device starts with.
    pub fn initial_upload(&self, device: u32) -> UploadSpec {
        self.scenario.groups[self.devices[device as usize].group].upload
    }
}

/// A storyboard change that shapes a device's messages.
#[derive(Clone, Debug)]
pub struct Transition {
    /// Simulated time, nanoseconds.
    pub at: u64,
    /// Global device indices.
    pub devices: Vec<u32>,
    /// What changes.
    pub change: Change,
}

/// What a [`Transition`] changes.
#[derive(Clone, Copy, Debug)]
pub enum Change {
    /// New upload settings (`None`: back to the group's).
    Upload(Option<UploadSpec>),
    /// The device crashed (true) or restarted (false).
    Crashed(bool),
}

/// Whether a device sends one message per reading.
pub fn is_raw(spec: &UploadSpec) -> bool {
    spec.mode == UploadMode::Raw
}

#[cfg(test)]
mod tests {
    use super::rescale;

    #[test]
    fn rescaling_keeps_shares_and_one_per_group() {
        assert_eq!(rescale(&[10, 30], 4), vec![1, 3]);
        assert_eq!(rescale(&[1, 1000], 2), vec![1, 1]);
        assert_eq!(rescale(&[5, 5, 5], 10), vec![4, 3, 3]);
        assert_eq!(rescale(&[2], 50), vec![50]);
        assert_eq!(rescale(&[3, 1], 400).iter().sum::<u32>(), 400);
    }
}
