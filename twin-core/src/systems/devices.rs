//! `publish_device_table`: copies the per-device state the parallel sensor pass reads into a
//! dense table, once per step.

use bevy_ecs::system::{Query, ResMut};

use crate::components::{ClockSkew, Device, DeviceRow, DeviceTable, Power, Uplink};

/// Publishes each device's power, upload settings and clock into [`DeviceTable`].
pub fn publish_device_table(devices: Query<(&Device, &Power, &Uplink, &ClockSkew)>, mut table: ResMut<DeviceTable>) {
    for (device, power, uplink, skew) in &devices {
        table.0[device.index as usize] = DeviceRow {
            online: power.online,
            mode: uplink.0.mode,
            overhead_bytes: uplink.0.overhead_bytes,
            window: uplink.0.window.0,
            skew: *skew,
        };
    }
}
