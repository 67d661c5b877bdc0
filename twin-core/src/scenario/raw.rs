//! The raw serde shape of a scenario file: exactly what TOML allows, unknown fields refused.
//!
//! Nothing here is checked beyond types; `validate` turns a [`RawScenario`] into a
//! typed [`super::Scenario`] and reports every problem with its field path.

use serde::Deserialize;

use crate::time::SimDuration;

/// A whole scenario file.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawScenario {
    /// Master seed of every random stream (default 0).
    pub seed: Option<u64>,
    /// Name, description, tags.
    pub meta: RawMeta,
    /// Time: mode, start, duration, tick.
    pub clock: RawClock,
    /// Gateways (sites) between devices and the cloud.
    #[serde(default)]
    pub gateways: Vec<RawGateway>,
    /// Device groups.
    #[serde(default)]
    pub fleet: Vec<RawGroup>,
    /// Timed events.
    #[serde(default)]
    pub storyboard: Vec<RawEvent>,
    /// Pass/fail assertions on report metrics.
    #[serde(default)]
    pub criteria: Vec<RawCriterion>,
    /// Where deployed models come from.
    pub models: Option<RawModels>,
    /// Defaults and criteria of `device-sim` runs (load on real backends).
    pub load: Option<RawLoad>,
}

/// `[load]`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawLoad {
    /// Wall-clock length of a run.
    pub duration: Option<SimDuration>,
    /// Messages per second over the whole fleet (open loop); none: the scenario's cadence.
    pub rate: Option<f64>,
    /// Cap on messages per second.
    pub max_rate: Option<f64>,
    /// Arrival process of `rate`.
    pub arrivals: Option<RawArrivals>,
    /// Connections opened per second.
    pub connect_rate: Option<f64>,
    /// Pass/fail assertions on the load report.
    #[serde(default)]
    pub criteria: Vec<RawCriterion>,
}

/// `arrivals = "constant" | "poisson"`
#[derive(Deserialize, Debug, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum RawArrivals {
    /// Evenly spaced.
    Constant,
    /// Exponential gaps.
    Poisson,
}

/// `[models]`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawModels {
    /// The registry manifest, relative to the scenario (default "models/manifest.json").
    pub registry: Option<String>,
}

/// Ground truth of a group's machines.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawLabel {
    /// Normal machines.
    Healthy,
    /// Faulty machines.
    Faulty,
}

/// `model = { name, version, sensor, threshold }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawModelBinding {
    /// Model name in the registry.
    pub name: String,
    /// Version number or alias (default: the highest version).
    pub version: Option<toml::Value>,
    /// The sensor whose windows feed the model.
    pub sensor: String,
    /// Alarm threshold on the score (default: the manifest's, else 0.5).
    pub threshold: Option<f64>,
    /// Where the model runs (default edge).
    pub placement: Option<RawPlacement>,
    /// A challenger run beside the model on the same inputs, without acting.
    pub shadow: Option<RawShadow>,
}

/// Where inference runs.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawPlacement {
    /// On the device.
    Edge,
    /// On the device's gateway.
    Gateway,
    /// In the cloud, on what the uplink delivers.
    Cloud,
}

/// `shadow = { version, fraction }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawShadow {
    /// Version number or alias of the same model (e.g. "challenger").
    pub version: toml::Value,
    /// Fraction of the group's devices that run it (default 1).
    pub fraction: Option<f64>,
}

/// `rollout = { ... }` in a storyboard event.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    /// Name in the report (default `rollout-<event index>`).
    pub name: Option<String>,
    /// Model name.
    pub model: String,
    /// Version number or alias to roll out.
    pub version: toml::Value,
    /// First stage: a small fraction that soaks before any wave.
    pub canary: Option<RawWave>,
    /// Later stages: cumulative fractions of the targeted devices, increasing.
    #[serde(default)]
    pub waves: Vec<RawWave>,
    /// Devices that must have run the new version before any gate is evaluated (default 1).
    pub min_devices: Option<i64>,
    /// Gate to the next stage, checked when a stage's soak ends.
    pub success: Option<RawGate>,
    /// Checked after every step once `min_devices` have run the new version.
    pub abort: Option<RawGate>,
    /// What an abort does (default rollback).
    pub on_abort: Option<RawOnAbort>,
}

/// One rollout stage.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawWave {
    /// Cumulative fraction of the targeted devices running the new version after this stage.
    pub fraction: f64,
    /// How long the stage soaks before its gate is checked.
    pub soak: SimDuration,
}

/// Conditions on the updated devices' metrics since the rollout started.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct RawGate {
    /// Alarms per inference of the new version, below.
    pub alarm_rate_below: Option<f64>,
    /// Alarms per inference of the new version, above.
    pub alarm_rate_above: Option<f64>,
    /// Share of decisions equal to the previous version's on the same inputs, below.
    pub agreement_below: Option<f64>,
    /// Share of decisions equal to the previous version's, above.
    pub agreement_above: Option<f64>,
    /// Updated devices whose projected p90 latency misses the window deadline, above.
    pub deadline_misses_above: Option<i64>,
}

/// What an abort does.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawOnAbort {
    /// Every updated device goes back to the version it ran before.
    Rollback,
    /// No further stage; updated devices keep the new version.
    Halt,
}

/// `[meta]`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawMeta {
    /// Scenario name: names the output folder.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// Scenario schema version (only 1 exists).
    pub schema: Option<i64>,
    /// Free labels.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Pacing mode in a scenario file.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum RawClockMode {
    /// As fast as possible.
    Virtual,
    /// `factor` times real time.
    Scaled,
    /// Real time.
    Realtime,
}

/// `[clock]`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawClock {
    /// Pacing (default virtual).
    pub mode: Option<RawClockMode>,
    /// Speed factor for `scaled`.
    pub factor: Option<f64>,
    /// Wall-clock date the run represents (a TOML datetime); reported, never read from a clock.
    pub start: Option<toml::value::Datetime>,
    /// Simulated length of the run.
    pub duration: SimDuration,
    /// Longest engine step (default 1s).
    pub tick: Option<SimDuration>,
}

/// `[[gateways]]`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    /// Gateway name.
    pub name: String,
    /// Site label (free text, reported).
    pub site: Option<String>,
    /// Edge buffer for partitions, in bytes (default 1 MiB).
    pub buffer_bytes: Option<i64>,
    /// Device class, for models placed on the gateway (default jetson-nano-gpu).
    pub hardware: Option<String>,
}

/// Upload mode in a scenario file.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawUploadMode {
    /// Every sample leaves the edge.
    Raw,
    /// One summary per device and window.
    Summary,
}

/// `upload = { ... }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawUpload {
    /// raw or summary.
    pub mode: RawUploadMode,
    /// Summary window (default 60s).
    pub window: Option<SimDuration>,
    /// Bytes of header per message (default 24).
    pub overhead_bytes: Option<i64>,
}

/// `[[fleet]]`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawGroup {
    /// Group name.
    pub name: String,
    /// Number of devices.
    pub count: i64,
    /// Device id template.
    pub id: Option<String>,
    /// First index substituted into the template (default 0).
    pub start_index: Option<i64>,
    /// Gateway the group's devices reach the cloud through.
    pub gateway: Option<String>,
    /// Upload mode and window.
    pub upload: Option<RawUpload>,
    /// Sensors on every device of the group.
    #[serde(default)]
    pub sensors: Vec<RawSensor>,
    /// Ground truth for model accuracy.
    pub label: Option<RawLabel>,
    /// The model the devices run on each completed window.
    pub model: Option<RawModelBinding>,
    /// Device class for latency projections (default rpi4-cpu).
    pub hardware: Option<String>,
}

/// `[[fleet.sensors]]`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawSensor {
    /// Sensor name, unique within the group.
    pub name: String,
    /// Unit label.
    pub unit: Option<String>,
    /// Sampling rate in Hz (0.01 to 1000); not used by `replay`.
    pub rate_hz: Option<f64>,
    /// Signal: a constant.
    pub constant: Option<RawConstant>,
    /// Signal: uniform in [low, high).
    pub uniform: Option<RawUniform>,
    /// Signal: gaussian.
    pub gaussian: Option<RawGaussian>,
    /// Signal: sine.
    pub sine: Option<RawSine>,
    /// Signal: gaussian random walk.
    pub random_walk: Option<RawRandomWalk>,
    /// Signal: Ornstein-Uhlenbeck.
    pub ornstein_uhlenbeck: Option<RawOrnsteinUhlenbeck>,
    /// Signal: Markov chain over named states.
    pub markov: Option<RawMarkov>,
    /// Signal: 3-axis accelerometer on a vibrating machine.
    pub vibration: Option<RawVibration>,
    /// Signal: recorded telemetry.
    pub replay: Option<RawReplay>,
    /// Signal: a camera replaying recorded images.
    pub camera: Option<RawCamera>,
    /// Gaussian measurement noise (standard deviation).
    pub noise: Option<f64>,
    /// Output range `[low, high]`.
    pub clamp: Option<Vec<f64>>,
    /// Quantization step.
    pub quantize: Option<f64>,
}

/// `constant = { value }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawConstant {
    /// The value.
    pub value: f64,
}

/// `uniform = { low, high }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawUniform {
    /// Lower bound.
    pub low: f64,
    /// Upper bound.
    pub high: f64,
}

/// `gaussian = { mean, std_dev }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawGaussian {
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub std_dev: f64,
}

/// `sine = { amplitude, period, phase_deg, offset }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawSine {
    /// Amplitude.
    pub amplitude: f64,
    /// Period.
    pub period: SimDuration,
    /// Phase in degrees (default 0).
    pub phase_deg: Option<f64>,
    /// Offset (default 0).
    pub offset: Option<f64>,
}

/// `random_walk = { start, step_std_dev, min, max }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawRandomWalk {
    /// Initial value.
    pub start: f64,
    /// Standard deviation of each step.
    pub step_std_dev: f64,
    /// Lower bound of the walk.
    pub min: Option<f64>,
    /// Upper bound of the walk.
    pub max: Option<f64>,
}

/// `ornstein_uhlenbeck = { mean, reversion, volatility, start }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawOrnsteinUhlenbeck {
    /// Long-run mean.
    pub mean: f64,
    /// Mean-reversion rate theta, per second.
    pub reversion: f64,
    /// Volatility sigma, per square-root second.
    pub volatility: f64,
    /// Initial value (default: the mean).
    pub start: Option<f64>,
}

/// `markov = { states, values, transition, initial }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawMarkov {
    /// State names.
    pub states: Vec<String>,
    /// Output value of each state.
    pub values: Vec<f64>,
    /// Row-stochastic transition matrix, applied once per sample.
    pub transition: Vec<Vec<f64>>,
    /// Initial state name (default: the first).
    pub initial: Option<String>,
}

/// `vibration = { ... }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawVibration {
    /// Shaft rotation frequency in Hz.
    pub shaft_hz: f64,
    /// Amplitudes (m/s^2) of the 1x, 2x, 3x... harmonics.
    pub harmonics: Vec<f64>,
    /// Phases of the harmonics in degrees (default all 0).
    pub phases_deg: Option<Vec<f64>>,
    /// Vibration direction in the machine frame (default [1, 0, 0]).
    pub axis: Option<Vec<f64>>,
    /// Sensor mounting orientation: roll, pitch, yaw in degrees (default 0, 0, 0).
    pub orientation_deg: Option<Vec<f64>>,
    /// Gravity magnitude in m/s^2 (default 9.80665), along -z of the machine frame.
    pub gravity: Option<f64>,
}

/// Replay file format.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawReplayFormat {
    /// Comma-separated values with a header row.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

/// `replay = { file, ... }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawReplay {
    /// Path, relative to the scenario file.
    pub file: String,
    /// csv or jsonl (default: from the extension).
    pub format: Option<RawReplayFormat>,
    /// Timestamp column (default "timestamp"): seconds, or RFC 3339 text.
    pub timestamp: Option<String>,
    /// Value columns (default ["value"]); three for a vector sensor.
    pub columns: Option<Vec<String>>,
    /// Keep only rows whose column equals the template (`{id}`, `{sensor}`, `{group}`).
    pub filter: Option<std::collections::BTreeMap<String, String>>,
    /// Playback speed factor (default 1).
    pub speed: Option<f64>,
    /// Start again at the end (default false).
    #[serde(rename = "loop")]
    pub looping: Option<bool>,
    /// Skip this much of the recording.
    pub start_offset: Option<SimDuration>,
    /// File time that maps to the scenario start: "first_row" (default) or seconds.
    pub origin: Option<toml::Value>,
}

/// `camera = { images }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawCamera {
    /// JSON Lines of `{"label", "pixels"}`, relative to the scenario file.
    pub images: String,
}

/// `[[storyboard]]`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawEvent {
    /// Start time, from the scenario start.
    pub at: SimDuration,
    /// How long the effect lasts (required for crash and partition).
    #[serde(rename = "for")]
    pub lasts: Option<SimDuration>,
    /// Which devices or gateway (default: every device).
    pub target: Option<RawTarget>,
    /// Sensor fault: linear drift.
    pub drift: Option<RawDrift>,
    /// Sensor fault: stuck at a value.
    pub stuck: Option<RawStuck>,
    /// Sensor fault: random spikes.
    pub spikes: Option<RawSpikes>,
    /// Sensor fault: dropped samples.
    pub dropout: Option<RawDropout>,
    /// Sensor fault: saturation.
    pub saturation: Option<RawSaturation>,
    /// Sensor fault: extra noise.
    pub noise: Option<RawNoise>,
    /// Device fault: crash, restart after `for`.
    pub crash: Option<RawEmpty>,
    /// Device fault: clock offset and drift.
    pub clock_skew: Option<RawClockSkew>,
    /// Gateway fault: uplink partitioned from the cloud for `for`.
    pub partition: Option<RawEmpty>,
    /// Change of upload mode.
    pub upload: Option<RawUpload>,
    /// A staged model rollout.
    pub rollout: Option<RawRollout>,
}

/// An action without parameters (`crash = {}`).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawEmpty {}

/// `target = { ... }`
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    /// A device group.
    pub group: Option<String>,
    /// A seeded fraction of the group.
    pub fraction: Option<f64>,
    /// A seeded number of the group's devices.
    pub count: Option<i64>,
    /// Explicit device ids.
    pub ids: Option<Vec<String>>,
    /// A gateway (for partitions), or the devices behind it.
    pub gateway: Option<String>,
}

/// `drift = { sensor, per_hour }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawDrift {
    /// Sensor name (default: every sensor of the device).
    pub sensor: Option<String>,
    /// Units per hour.
    pub per_hour: f64,
}

/// `stuck = { sensor, value }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawStuck {
    /// Sensor name.
    pub sensor: Option<String>,
    /// Value (default: the last value before the fault).
    pub value: Option<f64>,
}

/// `spikes = { sensor, probability, magnitude }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawSpikes {
    /// Sensor name.
    pub sensor: Option<String>,
    /// Chance per sample.
    pub probability: f64,
    /// Spike height (sign chosen at random).
    pub magnitude: f64,
}

/// `dropout = { sensor, probability }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawDropout {
    /// Sensor name.
    pub sensor: Option<String>,
    /// Chance a sample is lost (default 1).
    pub probability: Option<f64>,
}

/// `saturation = { sensor, low, high }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawSaturation {
    /// Sensor name.
    pub sensor: Option<String>,
    /// Readings below are pinned here.
    pub low: Option<f64>,
    /// Readings above are pinned here.
    pub high: Option<f64>,
}

/// `noise = { sensor, std_dev }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawNoise {
    /// Sensor name.
    pub sensor: Option<String>,
    /// Extra gaussian noise.
    pub std_dev: f64,
}

/// `clock_skew = { offset_s, ppm }`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawClockSkew {
    /// Offset in seconds (may be negative).
    pub offset_s: Option<f64>,
    /// Drift in parts per million.
    pub ppm: Option<f64>,
}

/// `[[criteria]]`
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawCriterion {
    /// Label (default: the expression).
    pub name: Option<String>,
    /// Report metric path.
    pub metric: String,
    /// Optional denominator metric (the criterion checks the ratio).
    pub divided_by: Option<String>,
    /// Less than.
    pub lt: Option<f64>,
    /// Less than or equal.
    pub le: Option<f64>,
    /// Greater than.
    pub gt: Option<f64>,
    /// Greater than or equal.
    pub ge: Option<f64>,
    /// Equal.
    pub eq: Option<f64>,
    /// Within `[low, high]`.
    pub between: Option<Vec<f64>>,
    /// Equal to a text value (rollout states).
    pub equals: Option<String>,
}
