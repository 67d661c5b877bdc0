//! Model input features, defined once. The training script (`scenarios/models/train.py`)
//! computes the same numbers from raw readings; a test checks both agree on the reference
//! windows shipped with the models.
//!
//! **Vibration window features** (input of the `vibration-anomaly` models): for one window of
//! a 3-axis accelerometer's readings, in this order,
//!
//! | index | feature |
//! |---|---|
//! | 0, 1, 2 | mean of x, y, z (m/s^2): where gravity sits, i.e. how the sensor is mounted |
//! | 3, 4, 5 | population standard deviation of x, y, z: vibration energy per axis |
//! | 6, 7, 8 | peak-to-peak (max - min) of x, y, z: impacts and spikes |
//!
//! All nine are window summary statistics, so a cloud model fed summary uploads sees exactly
//! the features an edge model computes from raw readings.

use crate::stats::WindowSummary;

/// Number of vibration window features.
pub const VIBRATION_FEATURES: usize = 9;

/// The features of one window of a 3-axis sensor, from its per-axis summaries.
///
/// Returns `None` when an axis has no readings in the window.
pub fn vibration_features(axes: &[WindowSummary; 3]) -> Option<[f32; VIBRATION_FEATURES]> {
    if axes.iter().any(|a| a.count == 0) {
        return None;
    }
    let mut features = [0.0f32; VIBRATION_FEATURES];
    for (axis, summary) in axes.iter().enumerate() {
        features[axis] = summary.mean as f32;
        features[3 + axis] = summary.std_dev as f32;
        features[6 + axis] = (summary.max - summary.min) as f32;
    }
    Some(features)
}

/// The features of one window given its raw readings (`[x, y, z]` per reading): the same
/// numbers as [`vibration_features`] of the window's summaries.
pub fn vibration_features_from_readings(readings: &[[f64; 3]]) -> Option<[f32; VIBRATION_FEATURES]> {
    if readings.is_empty() {
        return None;
    }
    let mut axes = [WindowSummary {
        count: 0,
        min: 0.0,
        max: 0.0,
        mean: 0.0,
        std_dev: 0.0,
        last: 0.0,
    }; 3];
    for (axis, summary) in axes.iter_mut().enumerate() {
        let mut acc = crate::stats::WindowAcc::default();
        let values: Vec<f64> = readings.iter().map(|r| r[axis]).collect();
        let shift = values[0];
        acc.add_block(&values, shift);
        *summary = acc.summary(shift);
    }
    vibration_features(&axes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_of_a_known_window() {
        let readings = [[1.0, 0.0, -9.0], [3.0, 0.0, -10.0], [2.0, 0.0, -11.0]];
        let f = vibration_features_from_readings(&readings).expect("features");
        assert_eq!(f[0], 2.0);
        assert_eq!(f[2], -10.0);
        assert!((f[3] - (2.0f32 / 3.0).sqrt()).abs() < 1e-6);
        assert_eq!(f[4], 0.0);
        assert_eq!(f[6], 2.0);
        assert_eq!(f[8], 2.0);
        assert!(vibration_features_from_readings(&[]).is_none());
    }
}
