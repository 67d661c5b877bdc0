//! Scenario files: a TOML description of a fleet, a storyboard of timed events and pass/fail
//! criteria, parsed strictly and validated into a typed [`Scenario`].
//!
//! Loading happens in three stages, each reporting problems as `file:line:column: path: reason`:
//! TOML syntax, the raw serde shape ([`raw`], unknown fields refused), and validation
//! (`validate`: ranges, references, selectors, replay files, metric names).

pub mod location;
pub mod raw;
mod template;
mod validate;

pub use validate::fill_filter;

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

pub use template::IdTemplate;
use thiserror::Error;

use crate::criteria::Criterion;
use crate::fault::SensorFault;
use crate::inference::CompiledModel;
pub use crate::load::{Arrivals, LOAD_METRICS, LoadSpec};
use crate::signal::Signal;
use crate::time::{ClockMode, SimDuration};
use location::{FieldPath, Segment, line_column, locate};

/// Reads the files a scenario refers to (replay recordings). The `twin` binary implements it
/// with the file system, relative to the scenario's folder; tests implement it in memory.
pub trait FileSource {
    /// The text of `path` as written in the scenario.
    ///
    /// # Errors
    /// A plain reason (`no such file`, ...).
    fn read_to_string(&self, path: &str) -> Result<String, String>;

    /// The bytes of `path` (model files).
    ///
    /// # Errors
    /// A plain reason.
    fn read_bytes(&self, path: &str) -> Result<Vec<u8>, String> {
        self.read_to_string(path).map(String::into_bytes)
    }
}

/// A [`FileSource`] that has no files.
pub struct NoFiles;

impl FileSource for NoFiles {
    fn read_to_string(&self, path: &str) -> Result<String, String> {
        Err(format!("cannot read `{path}`: no files are available here"))
    }
}

/// Options of loading a scenario.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Largest estimated memory a fleet may need.
    pub max_memory_bytes: u64,
    /// Replaces the file's master seed (seeded selectors are resolved with it).
    pub seed: Option<u64>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_memory_bytes: 8 << 30,
            seed: None,
        }
    }
}

/// Estimated resident bytes per device, without its sensors (measured: see BENCHMARKS.md).
pub const ESTIMATED_BYTES_PER_DEVICE: u64 = 160;
/// Estimated resident bytes per sensor.
pub const ESTIMATED_BYTES_PER_SENSOR: u64 = 176;

/// One problem in a scenario file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Field path, e.g. `fleet[1].count` (empty for syntax errors).
    pub path: String,
    /// Plain reason.
    pub message: String,
}

/// A scenario file that cannot be run, with every problem found.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub struct ScenarioError {
    /// The file as the user named it.
    pub file: String,
    /// Problems, in file order where known.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}:{}:{}: ", self.file, problem.line, problem.column)?;
            if !problem.path.is_empty() {
                write!(f, "{}: ", problem.path)?;
            }
            f.write_str(&problem.message)?;
        }
        Ok(())
    }
}

/// A problem found during validation, before it is located in the text.
#[derive(Clone, Debug)]
pub(crate) struct Diagnostic {
    pub path: FieldPath,
    pub message: String,
}

/// How a device's data leaves the edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadMode {
    /// Every reading is a message.
    Raw,
    /// One message per device and window with count/min/max/mean/stddev/last per channel.
    Summary,
}

impl UploadMode {
    /// The mode's name in scenarios and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Summary => "summary",
        }
    }
}

/// Upload settings of a device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UploadSpec {
    /// Raw or summary.
    pub mode: UploadMode,
    /// Summary window (also the period at which statistics are folded).
    pub window: SimDuration,
    /// Header bytes per message.
    pub overhead_bytes: u32,
}

/// Bytes of one channel value in a raw message.
pub const RAW_VALUE_BYTES: u32 = 8;
/// Bytes of one sensor's entry header in a summary (sensor id and count).
pub const SUMMARY_SENSOR_BYTES: u32 = 8;
/// Bytes of one channel in a summary: min, max, mean, stddev, last as f64.
pub const SUMMARY_CHANNEL_BYTES: u32 = 40;

/// The clock section.
#[derive(Clone, Debug)]
pub struct ClockSpec {
    /// Pacing.
    pub mode: ClockMode,
    /// The date the run represents (as written), if any.
    pub start: Option<String>,
    /// Simulated length.
    pub duration: SimDuration,
    /// Longest step.
    pub tick: SimDuration,
}

/// A gateway between devices and the cloud.
#[derive(Clone, Debug)]
pub struct GatewaySpec {
    /// Name.
    pub name: String,
    /// Site label.
    pub site: Option<String>,
    /// Edge buffer capacity during partitions.
    pub buffer_bytes: u64,
    /// Hardware profile (index into [`crate::hardware::PROFILES`]) for models placed here.
    pub hardware: usize,
}

/// A group of identical devices.
#[derive(Clone, Debug)]
pub struct GroupSpec {
    /// Name.
    pub name: String,
    /// Devices.
    pub count: u32,
    /// Device id template.
    pub template: IdTemplate,
    /// First index substituted into the template.
    pub start_index: u64,
    /// Gateway index, if the devices reach the cloud through one.
    pub gateway: Option<u16>,
    /// Initial upload settings.
    pub upload: UploadSpec,
    /// The group's sensors, as indices into [`Scenario::sensors`].
    pub sensors: Range<usize>,
    /// Global index of the group's first device.
    pub first_device: u32,
    /// Ground truth for model accuracy: `Some(true)` for a group of faulty machines.
    pub faulty: Option<bool>,
    /// The model the group's devices run, if any.
    pub model: Option<ModelBinding>,
    /// Hardware profile of the devices (index into [`crate::hardware::PROFILES`]).
    pub hardware: usize,
    /// Explicit device ids, one per device, when the devices come from outside the scenario
    /// (an [`ExternalFleet`]); `None`: ids come from the template.
    pub ids: Option<Arc<[String]>>,
    /// The model each device starts with (indices into [`Scenario::models`]), when its devices
    /// come from an [`ExternalFleet`] whose devices name models; `None`: every device starts
    /// with the group's [`ModelBinding::model`].
    pub initial_models: Option<Arc<[usize]>>,
}

/// Devices supplied from outside a scenario, by group name: for example the live twins a
/// simulation is forked from. Each listed group of the scenario is made of exactly these
/// devices, in this order, instead of its `count` devices named by its `id` template; the
/// group keeps everything else (sensors, gateway, upload, model binding, hardware), and the
/// storyboard's selectors, replay filters and rollouts are resolved against these devices.
/// Groups not listed keep their own devices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExternalFleet {
    /// Devices by group name. An empty list leaves the group as the scenario defines it.
    pub groups: std::collections::BTreeMap<String, Vec<ExternalDevice>>,
}

/// One device of an [`ExternalFleet`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExternalDevice {
    /// Its device id (unique across the whole fleet).
    pub id: String,
    /// The model version it starts with, as `(name, version)`; `None`: the group's model.
    /// Ignored in a group that binds no model. It must fit the group's bound sensor.
    pub model: Option<(String, u32)>,
}

impl ExternalFleet {
    /// Whether no group is replaced.
    pub fn is_empty(&self) -> bool {
        self.groups.values().all(Vec::is_empty)
    }
}

/// A model version a scenario deploys, loaded and compiled once.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// sha256 of its file.
    pub sha256: String,
    /// The compiled plan, shared by every device running this version.
    pub compiled: Arc<CompiledModel>,
}

impl ModelSpec {
    /// `name@version`.
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// Which model a group runs, on which sensor's windows, and how its output is read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelBinding {
    /// Index into [`Scenario::models`].
    pub model: usize,
    /// Index of the bound sensor among the group's sensors.
    pub slot: usize,
    /// Alarm when the score is at least this.
    pub threshold: f32,
    /// Where inference runs.
    pub placement: Placement,
    /// A challenger beside the model, if any.
    pub shadow: Option<ShadowSpec>,
}

/// Where a group's model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Placement {
    /// On the device, right when its window closes.
    Edge,
    /// On the device's gateway: the window's raw readings travel over the site network.
    Gateway,
    /// In the cloud, on what the uplink delivers (summaries in summary mode), after the
    /// upload; while the gateway is partitioned the rows wait.
    Cloud,
}

impl Placement {
    /// Every placement, in order.
    pub const ALL: [Placement; 3] = [Placement::Edge, Placement::Gateway, Placement::Cloud];

    /// The placement's name in scenarios and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Edge => "edge",
            Self::Gateway => "gateway",
            Self::Cloud => "cloud",
        }
    }
}

/// A challenger run beside a group's model on a fraction of its devices.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShadowSpec {
    /// Index into [`Scenario::models`].
    pub model: usize,
    /// Fraction of the group's devices (seeded pick).
    pub fraction: f64,
    /// Index into [`Scenario::comparisons`].
    pub comparison: usize,
}

/// One side-by-side comparison of two versions on the same inputs: a group's shadow, or the
/// new and previous versions during a rollout.
#[derive(Clone, Debug, PartialEq)]
pub struct ComparisonSpec {
    /// Label in the report (`group` or rollout name).
    pub label: String,
    /// The version that acts.
    pub primary: usize,
    /// The version that runs beside it without acting (`None` in a rollout, where each
    /// device's previous version does).
    pub shadow: Option<usize>,
}

/// Conditions on a rollout's updated devices; every condition given must hold (success) or
/// any one trips (abort).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Gate {
    /// Alarm rate of the new version below.
    pub alarm_rate_below: Option<f64>,
    /// Alarm rate above.
    pub alarm_rate_above: Option<f64>,
    /// Agreement with the previous version below.
    pub agreement_below: Option<f64>,
    /// Agreement above.
    pub agreement_above: Option<f64>,
    /// Updated devices missing their deadline, above.
    pub deadline_misses_above: Option<u64>,
}

impl Gate {
    /// Whether the gate has any condition.
    pub fn is_empty(&self) -> bool {
        *self == Gate::default()
    }
}

/// One stage of a rollout.
#[derive(Clone, Debug, PartialEq)]
pub struct StageSpec {
    /// `canary`, `wave 1`, ...
    pub name: String,
    /// Cumulative fraction of the targeted devices.
    pub fraction: f64,
    /// Cumulative devices updated once the stage is deployed.
    pub devices: u32,
    /// Soak before the gate.
    pub soak: SimDuration,
}

/// A staged rollout of a model version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RolloutSpec {
    /// Name in the report.
    pub name: String,
    /// Model name.
    pub model_name: String,
    /// `name@version` rolled out.
    pub label: String,
    /// The version rolled out (index into [`Scenario::models`]).
    pub model: usize,
    /// Targeted devices in update order (a seeded ranking).
    pub order: Vec<u32>,
    /// Stages, canary first.
    pub stages: Vec<StageSpec>,
    /// Devices that must have run the new version before gates are evaluated.
    pub min_devices: u32,
    /// Gate to the next stage.
    pub success: Gate,
    /// Abort conditions.
    pub abort: Gate,
    /// Roll back on abort (else halt).
    pub rollback: bool,
    /// Index into [`Scenario::comparisons`].
    pub comparison: usize,
}

impl GroupSpec {
    /// The id of the group's `ordinal`-th device.
    pub fn device_id(&self, ordinal: u32) -> String {
        if let Some(id) = self.ids.as_ref().and_then(|ids| ids.get(ordinal as usize)) {
            return id.clone();
        }
        self.template.render(&self.name, self.start_index + u64::from(ordinal))
    }

    /// The model version (index into [`Scenario::models`]) the group's `ordinal`-th device
    /// starts with, if the group runs a model.
    pub fn initial_model(&self, ordinal: u32) -> Option<usize> {
        let binding = self.model?;
        let own = self
            .initial_models
            .as_ref()
            .and_then(|models| models.get(ordinal as usize).copied());
        Some(own.unwrap_or(binding.model))
    }

    /// Whether some device of the group starts with model version `index`.
    pub fn starts_with_model(&self, index: usize) -> bool {
        match &self.initial_models {
            Some(models) => models.contains(&index),
            None => self.model.is_some_and(|binding| binding.model == index),
        }
    }
}

/// A sensor on every device of a group.
#[derive(Clone, Debug)]
pub struct SensorSpec {
    /// Name.
    pub name: String,
    /// Unit label.
    pub unit: Option<String>,
    /// Sampling rate (0 for replay, whose timing comes from the file).
    pub rate_hz: f64,
    /// What it reads.
    pub signal: Signal,
    /// Gaussian measurement noise.
    pub noise: f64,
    /// Output range.
    pub clamp: Option<(f64, f64)>,
    /// Quantization step.
    pub quantize: Option<f64>,
    /// Channels.
    pub dims: usize,
    /// Statistics shift (the signal's centre).
    pub shift: f64,
}

impl SensorSpec {
    /// Bytes of one raw message of this sensor.
    pub fn raw_message_bytes(&self, overhead: u32) -> u32 {
        match &self.signal {
            // A frame: one byte per pixel.
            Signal::Camera(images) => overhead + images.width as u32,
            _ => overhead + RAW_VALUE_BYTES * self.dims as u32,
        }
    }

    /// The images of a camera sensor.
    pub fn camera(&self) -> Option<&Arc<crate::camera::ImageSet>> {
        match &self.signal {
            Signal::Camera(images) => Some(images),
            _ => None,
        }
    }

    /// Bytes of this sensor's entry in a summary message.
    pub fn summary_entry_bytes(&self) -> u32 {
        SUMMARY_SENSOR_BYTES + SUMMARY_CHANNEL_BYTES * self.dims as u32
    }

    /// Axis names of the channels (`x`, `y`, `z` for three channels).
    pub fn channel_names(&self) -> &'static [&'static str] {
        if self.dims == 1 { &[""] } else { &["x", "y", "z"] }
    }
}

/// What a storyboard event does.
#[derive(Clone, Debug)]
pub enum Action {
    /// A sensor fault on the targeted devices' sensor (all sensors when `sensor` is `None`).
    SensorFault {
        /// Sensor name.
        sensor: Option<String>,
        /// The fault.
        fault: SensorFault,
    },
    /// Devices go offline.
    Crash,
    /// Devices' clocks gain an offset and a drift.
    ClockSkew {
        /// Offset in seconds.
        offset_s: f64,
        /// Drift in parts per million.
        ppm: f64,
    },
    /// A gateway loses its uplink.
    Partition,
    /// Devices switch upload settings.
    Upload(UploadSpec),
    /// A staged model rollout to the targeted devices.
    Rollout(Arc<RolloutSpec>),
}

impl Action {
    /// The action's name in scenarios and reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::SensorFault { fault, .. } => fault.kind(),
            Self::Crash => "crash",
            Self::ClockSkew { .. } => "clock_skew",
            Self::Partition => "partition",
            Self::Upload(_) => "upload",
            Self::Rollout(_) => "rollout",
        }
    }
}

/// Who an event acts on.
#[derive(Clone, Debug)]
pub enum Target {
    /// Global device indices, ascending.
    Devices(Vec<u32>),
    /// One gateway.
    Gateway(u16),
}

/// A timed storyboard event.
#[derive(Clone, Debug)]
pub struct EventSpec {
    /// Position in the storyboard.
    pub index: u32,
    /// Start.
    pub at: SimDuration,
    /// End of the effect, if it ends.
    pub until: Option<SimDuration>,
    /// What happens.
    pub action: Action,
    /// To whom.
    pub target: Target,
}

/// A validated scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Labels.
    pub tags: Vec<String>,
    /// Master seed.
    pub seed: u64,
    /// Time.
    pub clock: ClockSpec,
    /// Gateways.
    pub gateways: Vec<GatewaySpec>,
    /// Device groups.
    pub groups: Vec<GroupSpec>,
    /// Sensors of all groups.
    pub sensors: Vec<SensorSpec>,
    /// Storyboard, in file order.
    pub events: Vec<EventSpec>,
    /// Criteria.
    pub criteria: Vec<Criterion>,
    /// The `[load]` section: `device-sim`'s defaults and load criteria, if any.
    pub load: Option<LoadSpec>,
    /// Model versions deployed by the scenario.
    pub models: Vec<ModelSpec>,
    /// Side-by-side comparisons (shadows, then rollouts).
    pub comparisons: Vec<ComparisonSpec>,
}

impl Scenario {
    /// Parses and validates a scenario. `file` names the source in messages.
    ///
    /// # Errors
    /// Every problem found, located by line, column and field path.
    pub fn from_toml(
        file: &str,
        text: &str,
        files: &dyn FileSource,
        options: LoadOptions,
    ) -> Result<Self, ScenarioError> {
        Self::from_toml_with_fleet(file, text, files, options, &ExternalFleet::default())
    }

    /// Parses and validates a scenario whose listed groups are made of the devices of `fleet`
    /// (see [`ExternalFleet`]) rather than of their templated devices. With an empty `fleet`
    /// this is [`Scenario::from_toml`].
    ///
    /// # Errors
    /// Every problem found, located by line, column and field path; a group of `fleet` the
    /// scenario does not define is a problem on `fleet`, and a device model that cannot be
    /// loaded or does not fit the group's sensor one on the group's `model`.
    pub fn from_toml_with_fleet(
        file: &str,
        text: &str,
        files: &dyn FileSource,
        options: LoadOptions,
        fleet: &ExternalFleet,
    ) -> Result<Self, ScenarioError> {
        let error = |problems| ScenarioError {
            file: file.to_owned(),
            problems,
        };
        let document = match toml::de::DeTable::parse(text) {
            Ok(document) => document,
            Err(err) => {
                let mut problem = toml_problem(text, &err, String::new());
                problem.message = format!("TOML syntax: {}", problem.message);
                return Err(error(vec![problem]));
            }
        };
        let deserializer = match toml::Deserializer::parse(text) {
            Ok(deserializer) => deserializer,
            Err(err) => return Err(error(vec![toml_problem(text, &err, String::new())])),
        };
        let raw: raw::RawScenario = match serde_path_to_error::deserialize(deserializer) {
            Ok(raw) => raw,
            Err(err) => {
                let path = serde_path(err.path());
                let inner = err.into_inner();
                let mut problem = toml_problem(text, &inner, path.to_string());
                if (inner.span().is_none() || problem.line == 1 && problem.column == 1)
                    && let Some(span) = locate(&document, &path)
                {
                    (problem.line, problem.column) = line_column(text, span.start);
                }
                return Err(error(vec![problem]));
            }
        };
        validate::validate(raw, files, options, fleet).map_err(|diagnostics| {
            let mut problems: Vec<Problem> = diagnostics
                .into_iter()
                .map(|d| {
                    let (line, column) =
                        locate(&document, &d.path).map_or((1, 1), |span| line_column(text, span.start));
                    Problem {
                        line,
                        column,
                        path: d.path.to_string(),
                        message: d.message,
                    }
                })
                .collect();
            problems.sort_by_key(|p| (p.line, p.column));
            error(problems)
        })
    }

    /// Devices in the fleet.
    pub fn device_count(&self) -> u32 {
        self.groups.iter().map(|g| g.count).sum()
    }

    /// Sensors in the fleet.
    pub fn sensor_count(&self) -> u64 {
        self.groups
            .iter()
            .map(|g| u64::from(g.count) * g.sensors.len() as u64)
            .sum()
    }

    /// The group a global device index belongs to.
    pub fn group_of(&self, device: u32) -> usize {
        self.groups.partition_point(|g| g.first_device + g.count <= device)
    }

    /// The id of a device by global index.
    pub fn device_id(&self, device: u32) -> String {
        let group = &self.groups[self.group_of(device)];
        group.device_id(device - group.first_device)
    }
}

fn toml_problem(text: &str, err: &toml::de::Error, path: String) -> Problem {
    let (line, column) = err.span().map_or((1, 1), |span| line_column(text, span.start));
    let message = err.message().trim().replace('\n', " ");
    Problem {
        line,
        column,
        path,
        message,
    }
}

fn serde_path(path: &serde_path_to_error::Path) -> FieldPath {
    let mut segments = Vec::new();
    for segment in path.iter() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => segments.push(Segment::Index(*index)),
            serde_path_to_error::Segment::Map { key } => segments.push(Segment::Key(key.clone())),
            serde_path_to_error::Segment::Enum { variant } => segments.push(Segment::Key(variant.clone())),
            serde_path_to_error::Segment::Unknown => {}
        }
    }
    FieldPath(segments)
}
