//! Model input features, defined once. The training script (`scenarios/models/train.py`)
//! computes the same numbers from raw readings; a test checks both agree on the reference
//! windows shipped with the models.
//!
//! **Window features**: for one window of a sensor with `d` channels, `3 d` values in this
//! order: the mean of each channel, the population standard deviation of each channel, the
//! peak-to-peak (max - min) of each channel. For a 3-axis accelerometer (the input of the
//! `vibration-anomaly` models) that is
//!
//! | index | feature |
//! |---|---|
//! | 0, 1, 2 | mean of x, y, z (m/s^2): where gravity sits, i.e. how the sensor is mounted |
//! | 3, 4, 5 | standard deviation of x, y, z: vibration energy per axis |
//! | 6, 7, 8 | peak-to-peak of x, y, z: impacts and spikes |
//!
//! All of them are window summary statistics, so a cloud model fed summary uploads sees
//! exactly the features an edge model computes from raw readings.

use crate::stats::{WindowAcc, WindowSummary};

/// Number of vibration window features (a 3-axis sensor).
pub const VIBRATION_FEATURES: usize = 9;

/// Number of window features of a sensor with `dims` channels.
pub const fn window_feature_count(dims: usize) -> usize {
    3 * dims
}

/// Appends the features of one window (one summary per channel) to `out`.
///
/// Returns false, appending nothing, when a channel has no readings in the window.
pub fn push_window_features(channels: &[WindowSummary], out: &mut Vec<f32>) -> bool {
    if channels.is_empty() || channels.iter().any(|c| c.count == 0) {
        return false;
    }
    out.extend(channels.iter().map(|c| c.mean as f32));
    out.extend(channels.iter().map(|c| c.std_dev as f32));
    out.extend(channels.iter().map(|c| (c.max - c.min) as f32));
    true
}

/// The features of one window of a 3-axis sensor, from its per-axis summaries.
///
/// Returns `None` when an axis has no readings in the window.
pub fn vibration_features(axes: &[WindowSummary; 3]) -> Option<[f32; VIBRATION_FEATURES]> {
    let mut out = Vec::with_capacity(VIBRATION_FEATURES);
    push_window_features(axes, &mut out).then(|| {
        let mut features = [0.0; VIBRATION_FEATURES];
        features.copy_from_slice(&out);
        features
    })
}

/// The features of one window given its raw readings (`[x, y, z]` per reading): the same
/// numbers as [`vibration_features`] of the window's summaries.
pub fn vibration_features_from_readings(readings: &[[f64; 3]]) -> Option<[f32; VIBRATION_FEATURES]> {
    let first = readings.first()?;
    let mut axes = [WindowSummary {
        count: 0,
        min: 0.0,
        max: 0.0,
        mean: 0.0,
        std_dev: 0.0,
        last: 0.0,
    }; 3];
    for (axis, summary) in axes.iter_mut().enumerate() {
        let mut acc = WindowAcc::default();
        let values: Vec<f64> = readings.iter().map(|r| r[axis]).collect();
        acc.add_block(&values, first[axis]);
        *summary = acc.summary(first[axis]);
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
        assert_eq!(window_feature_count(1), 3);
    }
}
