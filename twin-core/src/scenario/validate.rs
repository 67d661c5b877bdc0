//! Raw scenario to typed [`Scenario`]: every range, reference and selector checked, every
//! problem collected with its field path.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::f64::consts::PI;
use std::sync::Arc;

use nalgebra::{Rotation3, Vector3};

use super::location::FieldPath;
use super::raw::{self, RawScenario};
use super::{
    Action, Arrivals, ClockSpec, ComparisonSpec, Diagnostic, ESTIMATED_BYTES_PER_DEVICE, ESTIMATED_BYTES_PER_SENSOR,
    EventSpec, ExternalFleet, FileSource, Gate, GatewaySpec, GroupSpec, IdTemplate, LOAD_METRICS, LoadOptions,
    LoadSpec, ModelBinding, ModelSpec, Placement, RolloutSpec, Scenario, SensorSpec, ShadowSpec, StageSpec, Target,
    UploadMode, UploadSpec,
};
use crate::criteria::{Check, Criterion, edit_distance};
use crate::fault::SensorFault;
use crate::features;
use crate::hardware;
use crate::inference::CompiledModel;
use crate::models::{Registry, sha256_hex};
use crate::replay::{self, Origin, ReplayFormat, ReplaySpec};
use crate::rng::{mix, stable_key};
use crate::signal::{Markov, Signal, Sine, Vibration};
use crate::time::{ClockMode, SimDuration};

/// Highest sampling rate accepted, in Hz.
const MAX_RATE_HZ: f64 = 100_000.0;
/// Default edge buffer per gateway.
const DEFAULT_BUFFER_BYTES: u64 = 1 << 20;
/// Default summary window.
const DEFAULT_WINDOW: SimDuration = SimDuration::from_secs(60);
/// Default message header size.
const DEFAULT_OVERHEAD_BYTES: u32 = 24;

struct Checker {
    problems: Vec<Diagnostic>,
}

impl Checker {
    fn report(&mut self, path: &FieldPath, message: impl Into<String>) {
        self.problems.push(Diagnostic {
            path: path.clone(),
            message: message.into(),
        });
    }

    /// A finite float, or a problem.
    fn finite(&mut self, path: &FieldPath, value: f64) -> f64 {
        if !value.is_finite() {
            self.report(path, format!("must be a finite number, got {value}"));
        }
        value
    }

    fn positive(&mut self, path: &FieldPath, value: f64) -> f64 {
        if !value.is_finite() {
            self.report(path, format!("must be a finite number, got {value}"));
        } else if value <= 0.0 {
            self.report(path, format!("must be greater than 0, got {value}"));
        }
        value
    }

    fn non_negative(&mut self, path: &FieldPath, value: f64) -> f64 {
        if !value.is_finite() {
            self.report(path, format!("must be a finite number, got {value}"));
        } else if value < 0.0 {
            self.report(path, format!("must not be negative, got {value}"));
        }
        value
    }

    fn probability(&mut self, path: &FieldPath, value: f64) -> f64 {
        if !(0.0..=1.0).contains(&value) {
            self.report(path, format!("must be a probability between 0 and 1, got {value}"));
        }
        value
    }

    fn positive_duration(&mut self, path: &FieldPath, value: SimDuration) -> SimDuration {
        if value.0 == 0 {
            self.report(path, "must be longer than 0s");
        }
        value
    }
}

pub(super) fn validate(
    raw: RawScenario,
    files: &dyn FileSource,
    options: LoadOptions,
    fleet: &ExternalFleet,
) -> Result<Scenario, Vec<Diagnostic>> {
    let mut checker = Checker { problems: Vec::new() };
    let root = FieldPath::root();

    let meta = &raw.meta;
    if meta.name.trim().is_empty() {
        checker.report(&root.key("meta").key("name"), "must not be empty");
    } else if meta.name.contains(['/', '\\']) || meta.name == "." || meta.name == ".." {
        checker.report(
            &root.key("meta").key("name"),
            format!("`{}` cannot name an output folder (no slashes)", meta.name),
        );
    }
    if let Some(schema) = meta.schema
        && schema != 1
    {
        checker.report(
            &root.key("meta").key("schema"),
            format!("unsupported schema version {schema} (this build reads version 1)"),
        );
    }

    let clock = validate_clock(&mut checker, &raw.clock, &root.key("clock"));
    let gateways = validate_gateways(&mut checker, &raw.gateways, &root.key("gateways"));
    let (groups, sensors) = validate_fleet(
        &mut checker,
        (&raw.fleet, fleet),
        &gateways,
        files,
        options.max_memory_bytes,
        &root.key("fleet"),
    );
    check_counts_fit(&mut checker, &groups, &sensors, clock.tick, &root);
    let partial = Scenario {
        name: meta.name.clone(),
        description: meta.description.clone(),
        tags: meta.tags.clone(),
        seed: options.seed.or(raw.seed).unwrap_or(0),
        clock,
        gateways,
        groups,
        sensors,
        events: Vec::new(),
        criteria: Vec::new(),
        load: None,
        models: Vec::new(),
        comparisons: Vec::new(),
    };
    if !checker.problems.is_empty() {
        return Err(checker.problems);
    }
    let mut partial = partial;
    check_replay_coverage(&mut checker, &mut partial);
    let loader = validate_models(&mut checker, &raw, &mut partial, files);
    if let Some(loader) = &loader {
        bind_external_models(&mut checker, loader, fleet, &mut partial, files);
    }
    let events = validate_storyboard(
        &mut checker,
        &raw.storyboard,
        &mut partial,
        loader.as_ref(),
        files,
        &root.key("storyboard"),
    );
    let mut scenario = Scenario { events, ..partial };
    if !raw.criteria.is_empty() {
        let (numbers, texts) = crate::report::metric_names(&scenario);
        let names = MetricNames {
            numbers: &numbers,
            texts: &texts,
            listing: "see `twin metrics FILE` for the list",
        };
        scenario.criteria = validate_criteria(&mut checker, &raw.criteria, &names, &root.key("criteria"));
    }
    scenario.load = raw
        .load
        .as_ref()
        .map(|load| validate_load(&mut checker, load, &root.key("load")));
    if checker.problems.is_empty() {
        Ok(scenario)
    } else {
        Err(checker.problems)
    }
}

fn validate_clock(checker: &mut Checker, raw: &raw::RawClock, path: &FieldPath) -> ClockSpec {
    let mode = match raw.mode.unwrap_or(raw::RawClockMode::Virtual) {
        raw::RawClockMode::Virtual => ClockMode::Virtual,
        raw::RawClockMode::Realtime => ClockMode::Realtime,
        raw::RawClockMode::Scaled => match raw.factor {
            Some(factor) => ClockMode::Scaled {
                factor: checker.positive(&path.key("factor"), factor),
            },
            None => {
                checker.report(
                    &path.key("mode"),
                    "`scaled` needs `factor` (simulated seconds per wall second)",
                );
                ClockMode::Scaled { factor: 1.0 }
            }
        },
    };
    if raw.factor.is_some() && !matches!(mode, ClockMode::Scaled { .. }) {
        checker.report(&path.key("factor"), "only `scaled` mode takes a factor");
    }
    let duration = checker.positive_duration(&path.key("duration"), raw.duration);
    let tick = checker.positive_duration(&path.key("tick"), raw.tick.unwrap_or(SimDuration::from_secs(1)));
    ClockSpec {
        mode,
        start: raw.start.as_ref().map(ToString::to_string),
        duration,
        tick,
    }
}

fn validate_gateways(checker: &mut Checker, raw: &[raw::RawGateway], path: &FieldPath) -> Vec<GatewaySpec> {
    let mut seen = HashSet::new();
    let mut gateways = Vec::new();
    if raw.len() > usize::from(u16::MAX - 1) {
        checker.report(path, format!("at most {} gateways, got {}", u16::MAX - 1, raw.len()));
    }
    for (i, gateway) in raw.iter().enumerate() {
        let path = path.index(i);
        if !seen.insert(gateway.name.as_str()) {
            checker.report(&path.key("name"), format!("duplicate gateway name `{}`", gateway.name));
        }
        let buffer_bytes = match gateway.buffer_bytes {
            None => DEFAULT_BUFFER_BYTES,
            Some(b) if b < 0 => {
                checker.report(&path.key("buffer_bytes"), format!("must not be negative, got {b}"));
                0
            }
            Some(b) => b as u64,
        };
        let hardware = hardware_profile(
            checker,
            gateway.hardware.as_deref().unwrap_or(hardware::DEFAULT_GATEWAY),
            &path.key("hardware"),
        );
        gateways.push(GatewaySpec {
            name: gateway.name.clone(),
            site: gateway.site.clone(),
            buffer_bytes,
            hardware,
        });
    }
    gateways
}

fn validate_upload(checker: &mut Checker, raw: Option<&raw::RawUpload>, path: &FieldPath) -> UploadSpec {
    let Some(raw) = raw else {
        return UploadSpec {
            mode: UploadMode::Raw,
            window: DEFAULT_WINDOW,
            overhead_bytes: DEFAULT_OVERHEAD_BYTES,
        };
    };
    let mode = match raw.mode {
        raw::RawUploadMode::Raw => UploadMode::Raw,
        raw::RawUploadMode::Summary => UploadMode::Summary,
    };
    let window = checker.positive_duration(&path.key("window"), raw.window.unwrap_or(DEFAULT_WINDOW));
    let overhead_bytes = match raw.overhead_bytes {
        None => DEFAULT_OVERHEAD_BYTES,
        Some(b) if !(0..=65_536).contains(&b) => {
            checker.report(
                &path.key("overhead_bytes"),
                format!("must be between 0 and 65536, got {b}"),
            );
            0
        }
        Some(b) => b as u32,
    };
    UploadSpec {
        mode,
        window,
        overhead_bytes,
    }
}

fn validate_fleet(
    checker: &mut Checker,
    (raw, external): (&[raw::RawGroup], &ExternalFleet),
    gateways: &[GatewaySpec],
    files: &dyn FileSource,
    max_memory_bytes: u64,
    path: &FieldPath,
) -> (Vec<GroupSpec>, Vec<SensorSpec>) {
    if raw.is_empty() {
        checker.report(path, "the fleet needs at least one group ([[fleet]])");
    }
    for (name, devices) in &external.groups {
        if !devices.is_empty() && !raw.iter().any(|group| &group.name == name) {
            let names: Vec<&str> = raw.iter().map(|group| group.name.as_str()).collect();
            checker.report(
                path,
                format!(
                    "{} external device{} belong to group `{name}`, which the scenario does not define (groups: {})",
                    devices.len(),
                    if devices.len() == 1 { "" } else { "s" },
                    names.join(", ")
                ),
            );
        }
    }
    let mut groups = Vec::new();
    let mut sensors = Vec::new();
    let mut names = HashSet::new();
    let mut first_device: u64 = 0;
    let mut estimated_bytes: u64 = 0;
    let mut largest: Option<(usize, u64)> = None;
    for (i, group) in raw.iter().enumerate() {
        let path = path.index(i);
        if !names.insert(group.name.as_str()) {
            checker.report(&path.key("name"), format!("duplicate group name `{}`", group.name));
        }
        let external_devices = external.groups.get(&group.name).filter(|devices| !devices.is_empty());
        if group.count < 1 && external_devices.is_none() {
            checker.report(&path.key("count"), format!("must be at least 1, got {}", group.count));
        }
        let count = match external_devices {
            Some(devices) => devices.len() as u64,
            None => group.count.max(0) as u64,
        };
        let per_device = ESTIMATED_BYTES_PER_DEVICE + ESTIMATED_BYTES_PER_SENSOR * group.sensors.len() as u64;
        estimated_bytes = estimated_bytes.saturating_add(count.saturating_mul(per_device));
        if largest.is_none_or(|(_, c)| count > c) {
            largest = Some((i, count));
        }
        let template_text = group.id.clone().unwrap_or_else(|| "{group}-{index:05}".to_owned());
        let template = match IdTemplate::parse(&template_text) {
            Ok(t) => t,
            Err(message) => {
                checker.report(&path.key("id"), message);
                IdTemplate::parse("{group}-{index}").unwrap_or_else(|_| unreachable!("fixed template parses"))
            }
        };
        if count > 1 && !template.has_index() && external_devices.is_none() {
            checker.report(
                &path.key("id"),
                format!("template `{template_text}` gives all {count} devices the same id: add {{index}}"),
            );
        }
        let start_index = match group.start_index {
            Some(s) if s < 0 => {
                checker.report(&path.key("start_index"), format!("must not be negative, got {s}"));
                0
            }
            Some(s) => s as u64,
            None => 0,
        };
        let gateway = group
            .gateway
            .as_ref()
            .and_then(|name| match gateways.iter().position(|g| &g.name == name) {
                Some(index) => Some(index as u16),
                None => {
                    let known: Vec<&str> = gateways.iter().map(|g| g.name.as_str()).collect();
                    checker.report(
                        &path.key("gateway"),
                        format!(
                            "unknown gateway `{name}` (declared: {})",
                            if known.is_empty() {
                                "none".to_owned()
                            } else {
                                known.join(", ")
                            }
                        ),
                    );
                    None
                }
            });
        let upload = validate_upload(checker, group.upload.as_ref(), &path.key("upload"));
        if group.sensors.is_empty() {
            checker.report(
                &path.key("sensors"),
                "a device needs at least one sensor ([[fleet.sensors]])",
            );
        }
        let first_sensor = sensors.len();
        let mut sensor_names = HashSet::new();
        for (j, sensor) in group.sensors.iter().enumerate() {
            let sensor_path = path.key("sensors").index(j);
            if !sensor_names.insert(sensor.name.as_str()) {
                checker.report(
                    &sensor_path.key("name"),
                    format!("duplicate sensor name `{}` in group `{}`", sensor.name, group.name),
                );
            }
            if let Some(spec) = validate_sensor(checker, sensor, files, &sensor_path) {
                sensors.push(spec);
            }
        }
        groups.push(GroupSpec {
            name: group.name.clone(),
            count: count.min(u64::from(u32::MAX)) as u32,
            template,
            start_index,
            gateway,
            upload,
            sensors: first_sensor..sensors.len(),
            first_device: first_device.min(u64::from(u32::MAX)) as u32,
            faulty: group.label.map(|l| l == raw::RawLabel::Faulty),
            model: None,
            hardware: hardware_profile(
                checker,
                group.hardware.as_deref().unwrap_or(hardware::DEFAULT_DEVICE),
                &path.key("hardware"),
            ),
            ids: external_devices.map(|devices| devices.iter().map(|device| device.id.clone()).collect()),
            initial_models: None,
        });
        first_device = first_device.saturating_add(count);
    }
    if estimated_bytes > max_memory_bytes {
        if let Some((i, count)) = largest {
            checker.report(
                &path.index(i).key("count"),
                format!(
                    "{count} devices would need about {} of memory for the fleet, more than the {} limit (raise it with --max-memory)",
                    human_bytes(estimated_bytes),
                    human_bytes(max_memory_bytes)
                ),
            );
        }
    } else if first_device > u64::from(u32::MAX - 1) {
        checker.report(
            path,
            format!("at most {} devices in all, got {first_device}", u32::MAX - 1),
        );
    }
    if checker.problems.is_empty() {
        check_duplicate_ids(checker, &groups, path);
    }
    (groups, sensors)
}

/// The index of the hardware profile `name`, or a problem listing the known ones.
fn hardware_profile(checker: &mut Checker, name: &str, path: &FieldPath) -> usize {
    match hardware::PROFILES.iter().position(|p| p.name == name) {
        Some(index) => index,
        None => {
            checker.report(
                path,
                format!("unknown hardware `{name}` (profiles: {})", hardware::profile_names()),
            );
            0
        }
    }
}

/// Most readings one device may take in one step, or one channel in one window (counters are
/// 32-bit).
const MAX_READINGS: f64 = 1e9;

/// Readings per step and per window must fit the engine's counters.
fn check_counts_fit(
    checker: &mut Checker,
    groups: &[GroupSpec],
    sensors: &[SensorSpec],
    tick: SimDuration,
    root: &FieldPath,
) {
    for (gi, group) in groups.iter().enumerate() {
        let specs = sensors.get(group.sensors.clone()).unwrap_or_default();
        let rate: f64 = specs.iter().map(|s| s.rate_hz).sum();
        let per_step = rate * tick.as_secs_f64();
        if per_step > MAX_READINGS {
            checker.report(
                &root.key("clock").key("tick"),
                format!("a {tick} tick gives each device of group `{}` {per_step:.3e} readings per step, more than {MAX_READINGS:e}: use a shorter tick", group.name),
            );
        }
        let fastest = specs.iter().map(|s| s.rate_hz).fold(0.0, f64::max);
        let window = group.upload.window;
        let per_window = fastest * window.as_secs_f64();
        if per_window > MAX_READINGS {
            checker.report(
                &root.key("fleet").index(gi).key("upload").key("window"),
                format!("a {window} window holds {per_window:.3e} readings of one sensor, more than {MAX_READINGS:e}"),
            );
        }
    }
}

/// Human-readable size.
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn check_duplicate_ids(checker: &mut Checker, groups: &[GroupSpec], path: &FieldPath) {
    // Ids are compared through 64-bit hashes (8 bytes a device instead of the strings); a hash
    // match is confirmed on the rendered ids before it is reported.
    let mut seen: HashMap<u64, (usize, u32)> = HashMap::with_capacity(groups.iter().map(|g| g.count as usize).sum());
    for (gi, group) in groups.iter().enumerate() {
        for ordinal in 0..group.count {
            let id = group.device_id(ordinal);
            let hash = stable_key(&[&id]);
            if let Some(&(other_group, other_ordinal)) = seen.get(&hash)
                && groups[other_group].device_id(other_ordinal) == id
            {
                let message = if other_group == gi {
                    format!("duplicate device id `{id}` within group `{}`", group.name)
                } else {
                    format!(
                        "duplicate device id `{id}`: also in group `{}` (fleet[{other_group}])",
                        groups[other_group].name
                    )
                };
                checker.report(&path.index(gi).key("id"), message);
                return;
            }
            seen.insert(hash, (gi, ordinal));
        }
    }
}

fn validate_sensor(
    checker: &mut Checker,
    raw: &raw::RawSensor,
    files: &dyn FileSource,
    path: &FieldPath,
) -> Option<SensorSpec> {
    let kinds: Vec<&str> = [
        ("constant", raw.constant.is_some()),
        ("uniform", raw.uniform.is_some()),
        ("gaussian", raw.gaussian.is_some()),
        ("sine", raw.sine.is_some()),
        ("random_walk", raw.random_walk.is_some()),
        ("ornstein_uhlenbeck", raw.ornstein_uhlenbeck.is_some()),
        ("markov", raw.markov.is_some()),
        ("vibration", raw.vibration.is_some()),
        ("replay", raw.replay.is_some()),
        ("camera", raw.camera.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, present)| present.then_some(name))
    .collect();
    if kinds.len() != 1 {
        let found = if kinds.is_empty() {
            "none".to_owned()
        } else {
            kinds.join(" and ")
        };
        checker.report(path, format!("needs exactly one signal (constant, uniform, gaussian, sine, random_walk, ornstein_uhlenbeck, markov, vibration, replay or camera), found {found}"));
        return None;
    }
    let is_replay = raw.replay.is_some();
    let rate_hz = match (raw.rate_hz, is_replay) {
        (Some(_), true) => {
            checker.report(
                &path.key("rate_hz"),
                "a replay sensor takes its timing from the file: remove rate_hz",
            );
            0.0
        }
        (None, true) => 0.0,
        (None, false) => {
            checker.report(path, "missing field `rate_hz` (samples per second)");
            1.0
        }
        (Some(rate), false) => {
            let rate = checker.positive(&path.key("rate_hz"), rate);
            if rate > MAX_RATE_HZ {
                checker.report(
                    &path.key("rate_hz"),
                    format!("must be at most {MAX_RATE_HZ} Hz, got {rate}"),
                );
            }
            rate
        }
    };
    let rate_ok = rate_hz > 0.0 && rate_hz.is_finite();
    let signal = if let Some(s) = &raw.constant {
        Signal::Constant {
            value: checker.finite(&path.key("constant").key("value"), s.value),
        }
    } else if let Some(s) = &raw.uniform {
        let p = path.key("uniform");
        let low = checker.finite(&p.key("low"), s.low);
        let high = checker.finite(&p.key("high"), s.high);
        if high <= low {
            checker.report(&p.key("high"), format!("must be greater than low ({low}), got {high}"));
        }
        Signal::Uniform { low, width: high - low }
    } else if let Some(s) = &raw.gaussian {
        let p = path.key("gaussian");
        Signal::Gaussian {
            mean: checker.finite(&p.key("mean"), s.mean),
            std_dev: checker.non_negative(&p.key("std_dev"), s.std_dev),
        }
    } else if let Some(s) = &raw.sine {
        let p = path.key("sine");
        let amplitude = checker.finite(&p.key("amplitude"), s.amplitude);
        let period = checker.positive_duration(&p.key("period"), s.period).as_secs_f64();
        let phase = checker.finite(&p.key("phase_deg"), s.phase_deg.unwrap_or(0.0)) * PI / 180.0;
        let offset = checker.finite(&p.key("offset"), s.offset.unwrap_or(0.0));
        if period <= 0.0 || !rate_ok {
            return None;
        }
        Signal::Sine(Sine::new(amplitude, period, phase, offset, rate_hz))
    } else if let Some(s) = &raw.random_walk {
        let p = path.key("random_walk");
        let start = checker.finite(&p.key("start"), s.start);
        let step_std_dev = checker.non_negative(&p.key("step_std_dev"), s.step_std_dev);
        let min = s.min.map_or(f64::NEG_INFINITY, |v| checker.finite(&p.key("min"), v));
        let max = s.max.map_or(f64::INFINITY, |v| checker.finite(&p.key("max"), v));
        if min > max {
            checker.report(&p.key("max"), format!("must not be below min ({min}), got {max}"));
        } else if !(min..=max).contains(&start) {
            checker.report(
                &p.key("start"),
                format!("must lie within [min, max] = [{min}, {max}], got {start}"),
            );
        }
        Signal::RandomWalk {
            start,
            step_std_dev,
            min,
            max,
        }
    } else if let Some(s) = &raw.ornstein_uhlenbeck {
        let p = path.key("ornstein_uhlenbeck");
        let mean = checker.finite(&p.key("mean"), s.mean);
        let theta = checker.positive(&p.key("reversion"), s.reversion);
        let sigma = checker.non_negative(&p.key("volatility"), s.volatility);
        let start = checker.finite(&p.key("start"), s.start.unwrap_or(mean));
        if !rate_ok || theta <= 0.0 || !theta.is_finite() {
            return None;
        }
        let dt = 1.0 / rate_hz;
        let decay = libm::exp(-theta * dt);
        let innovation = sigma * ((1.0 - libm::exp(-2.0 * theta * dt)) / (2.0 * theta)).sqrt();
        Signal::OrnsteinUhlenbeck {
            mean,
            start,
            decay,
            innovation,
        }
    } else if let Some(s) = &raw.markov {
        validate_markov(checker, s, &path.key("markov"))?
    } else if let Some(s) = &raw.vibration {
        if !rate_ok {
            return None;
        }
        validate_vibration(checker, s, rate_hz, &path.key("vibration"))?
    } else if let Some(s) = &raw.replay {
        validate_replay(checker, s, files, &path.key("replay"))?
    } else if let Some(s) = &raw.camera {
        let p = path.key("camera").key("images");
        let text = match files.read_to_string(&s.images) {
            Ok(text) => text,
            Err(reason) => {
                checker.report(&p, reason);
                return None;
            }
        };
        match crate::camera::ImageSet::from_jsonl(&text) {
            Ok(images) => Signal::Camera(Arc::new(images)),
            Err(reason) => {
                checker.report(&p, format!("{}: {reason}", s.images));
                return None;
            }
        }
    } else {
        return None;
    };
    let noise = checker.non_negative(&path.key("noise"), raw.noise.unwrap_or(0.0));
    let clamp = match raw.clamp.as_deref() {
        None => None,
        Some([low, high]) => {
            let low = checker.finite(&path.key("clamp").index(0), *low);
            let high = checker.finite(&path.key("clamp").index(1), *high);
            if low > high {
                checker.report(&path.key("clamp"), format!("low ({low}) is above high ({high})"));
            }
            Some((low, high))
        }
        Some(other) => {
            checker.report(
                &path.key("clamp"),
                format!("must be [low, high], got {} values", other.len()),
            );
            None
        }
    };
    let quantize = raw.quantize.map(|q| checker.positive(&path.key("quantize"), q));
    let dims = signal.dims();
    let shift = signal.centre();
    Some(SensorSpec {
        name: raw.name.clone(),
        unit: raw.unit.clone(),
        rate_hz,
        signal,
        noise,
        clamp,
        quantize,
        dims,
        shift,
    })
}

fn validate_markov(checker: &mut Checker, raw: &raw::RawMarkov, path: &FieldPath) -> Option<Signal> {
    let n = raw.states.len();
    if n == 0 {
        checker.report(&path.key("states"), "needs at least one state");
        return None;
    }
    if raw.values.len() != n {
        checker.report(
            &path.key("values"),
            format!("needs one value per state ({n}), got {}", raw.values.len()),
        );
        return None;
    }
    for (i, v) in raw.values.iter().enumerate() {
        checker.finite(&path.key("values").index(i), *v);
    }
    if raw.transition.len() != n {
        checker.report(
            &path.key("transition"),
            format!("needs {n} rows (one per state), got {}", raw.transition.len()),
        );
        return None;
    }
    let mut cumulative = Vec::with_capacity(n);
    for (i, row) in raw.transition.iter().enumerate() {
        let row_path = path.key("transition").index(i);
        if row.len() != n {
            checker.report(&row_path, format!("needs {n} probabilities, got {}", row.len()));
            return None;
        }
        let mut sum = 0.0;
        let mut cum = Vec::with_capacity(n);
        for (j, p) in row.iter().enumerate() {
            checker.probability(&row_path.index(j), *p);
            sum += p;
            cum.push(sum);
        }
        if (sum - 1.0).abs() > 1e-9 {
            checker.report(&row_path, format!("probabilities must sum to 1, got {sum}"));
        }
        if let Some(last) = cum.last_mut() {
            *last = f64::INFINITY;
        }
        cumulative.push(cum);
    }
    let initial = match &raw.initial {
        None => 0,
        Some(name) => match raw.states.iter().position(|s| s == name) {
            Some(i) => i,
            None => {
                checker.report(
                    &path.key("initial"),
                    format!("unknown state `{name}` (states: {})", raw.states.join(", ")),
                );
                0
            }
        },
    };
    Some(Signal::Markov(Markov {
        states: raw.states.clone(),
        values: raw.values.clone(),
        cumulative,
        initial,
    }))
}

fn vector3(checker: &mut Checker, values: Option<&Vec<f64>>, default: [f64; 3], path: &FieldPath) -> Vector3<f64> {
    match values.map(Vec::as_slice) {
        None => Vector3::from(default),
        Some(&[x, y, z]) => Vector3::new(
            checker.finite(&path.index(0), x),
            checker.finite(&path.index(1), y),
            checker.finite(&path.index(2), z),
        ),
        Some(other) => {
            checker.report(path, format!("must have 3 components, got {}", other.len()));
            Vector3::from(default)
        }
    }
}

fn validate_vibration(
    checker: &mut Checker,
    raw: &raw::RawVibration,
    rate_hz: f64,
    path: &FieldPath,
) -> Option<Signal> {
    let shaft_hz = checker.positive(&path.key("shaft_hz"), raw.shaft_hz);
    if raw.harmonics.is_empty() {
        checker.report(&path.key("harmonics"), "needs at least the 1x amplitude");
    }
    let phases = raw.phases_deg.clone().unwrap_or_else(|| vec![0.0; raw.harmonics.len()]);
    if phases.len() != raw.harmonics.len() {
        checker.report(
            &path.key("phases_deg"),
            format!(
                "needs one phase per harmonic ({}), got {}",
                raw.harmonics.len(),
                phases.len()
            ),
        );
        return None;
    }
    let harmonics: Vec<(f64, f64)> = raw
        .harmonics
        .iter()
        .zip(&phases)
        .enumerate()
        .map(|(i, (a, p))| {
            (
                checker.finite(&path.key("harmonics").index(i), *a),
                checker.finite(&path.key("phases_deg").index(i), *p) * PI / 180.0,
            )
        })
        .collect();
    let axis = vector3(checker, raw.axis.as_ref(), [1.0, 0.0, 0.0], &path.key("axis"));
    if axis.norm() == 0.0 {
        checker.report(&path.key("axis"), "must not be the zero vector");
        return None;
    }
    let orientation = vector3(
        checker,
        raw.orientation_deg.as_ref(),
        [0.0, 0.0, 0.0],
        &path.key("orientation_deg"),
    ) * (PI / 180.0);
    let gravity = checker.non_negative(&path.key("gravity"), raw.gravity.unwrap_or(9.806_65));
    let highest = shaft_hz * harmonics.len() as f64;
    if highest * 2.0 > rate_hz {
        checker.report(
            &path.key("harmonics"),
            format!(
                "the highest harmonic ({highest} Hz) is above the Nyquist frequency of rate_hz ({} Hz)",
                rate_hz / 2.0
            ),
        );
    }
    if shaft_hz <= 0.0 || !shaft_hz.is_finite() {
        return None;
    }
    let rotation = Rotation3::from_euler_angles(orientation.x, orientation.y, orientation.z);
    Some(Signal::Vibration(Box::new(Vibration::new(
        shaft_hz, harmonics, axis, rotation, gravity, rate_hz,
    ))))
}

fn validate_replay(
    checker: &mut Checker,
    raw: &raw::RawReplay,
    files: &dyn FileSource,
    path: &FieldPath,
) -> Option<Signal> {
    let format = match raw.format {
        Some(raw::RawReplayFormat::Csv) => ReplayFormat::Csv,
        Some(raw::RawReplayFormat::Jsonl) => ReplayFormat::Jsonl,
        None if raw.file.ends_with(".csv") => ReplayFormat::Csv,
        None if raw.file.ends_with(".jsonl") || raw.file.ends_with(".ndjson") => ReplayFormat::Jsonl,
        None => {
            checker.report(
                &path.key("format"),
                format!(
                    "cannot tell the format of `{}` from its extension: set format = \"csv\" or \"jsonl\"",
                    raw.file
                ),
            );
            return None;
        }
    };
    let speed = checker.positive(&path.key("speed"), raw.speed.unwrap_or(1.0));
    let origin = match &raw.origin {
        None => Origin::FirstRow,
        Some(toml::Value::String(s)) if s == "first_row" => Origin::FirstRow,
        Some(toml::Value::Integer(i)) => Origin::At(*i as f64),
        Some(toml::Value::Float(f)) if f.is_finite() => Origin::At(*f),
        Some(other) => {
            checker.report(
                &path.key("origin"),
                format!("must be \"first_row\" or a number of seconds, got {other}"),
            );
            return None;
        }
    };
    let columns = raw.columns.clone().unwrap_or_else(|| vec!["value".to_owned()]);
    if columns.is_empty() || columns.len() == 2 || columns.len() > 3 {
        checker.report(
            &path.key("columns"),
            format!("needs 1 or 3 value columns, got {}", columns.len()),
        );
        return None;
    }
    let filter: Vec<(String, String)> = raw.filter.clone().unwrap_or_default().into_iter().collect();
    for (column, template) in &filter {
        let stripped = template
            .replace("{id}", "")
            .replace("{sensor}", "")
            .replace("{group}", "");
        if stripped.contains(['{', '}']) {
            checker.report(
                &path.key("filter").key(column),
                format!("unknown placeholder in `{template}` (use {{id}}, {{sensor}} or {{group}})"),
            );
        }
    }
    if speed <= 0.0 || !speed.is_finite() {
        return None;
    }
    let mut spec = ReplaySpec {
        file: raw.file.clone(),
        format,
        timestamp: raw.timestamp.clone().unwrap_or_else(|| "timestamp".to_owned()),
        columns,
        dims: 1,
        filter,
        speed,
        looping: raw.looping.unwrap_or(false),
        start_offset: raw.start_offset.unwrap_or_default().as_secs_f64(),
        origin,
        table: Arc::default(),
    };
    let text = match files.read_to_string(&raw.file) {
        Ok(text) => text,
        Err(reason) => {
            checker.report(&path.key("file"), reason);
            return None;
        }
    };
    match replay::parse(&spec, &text) {
        Ok(table) => {
            spec.table = Arc::new(table);
            Some(Signal::Replay(Box::new(spec)))
        }
        Err(err) => {
            checker.report(&path.key("file"), err.to_string());
            None
        }
    }
}

/// Fills a replay filter template for one device and sensor.
pub fn fill_filter(template: &str, device_id: &str, sensor: &str, group: &str) -> String {
    template
        .replace("{id}", device_id)
        .replace("{sensor}", sensor)
        .replace("{group}", group)
}

/// Every device of a replaying group must find rows in its file, all with the same number of
/// values (1 or 3), which becomes the sensor's channel count.
fn check_replay_coverage(checker: &mut Checker, scenario: &mut Scenario) {
    for (gi, group) in scenario.groups.iter().enumerate() {
        for local in 0..group.sensors.len() {
            let sensor = &mut scenario.sensors[group.sensors.start + local];
            let Signal::Replay(replay) = &mut sensor.signal else {
                continue;
            };
            let path = FieldPath::root()
                .key("fleet")
                .index(gi)
                .key("sensors")
                .index(local)
                .key("replay");
            let mut dims = None;
            for ordinal in 0..group.count {
                let id = group.device_id(ordinal);
                let filled: Vec<String> = replay
                    .filter
                    .iter()
                    .map(|(_, t)| fill_filter(t, &id, &sensor.name, &group.name))
                    .collect();
                let key = replay::series_key(filled.iter().map(String::as_str));
                let series = match replay.table.series.get(&key) {
                    Some(series) if !series.times.is_empty() => series,
                    _ => {
                        let wanted: Vec<String> = replay
                            .filter
                            .iter()
                            .zip(&filled)
                            .map(|((c, _), v)| format!("{c} = \"{v}\""))
                            .collect();
                        let filter = if wanted.is_empty() {
                            "none".to_owned()
                        } else {
                            wanted.join(", ")
                        };
                        checker.report(
                            &path.key("filter"),
                            format!("no rows of `{}` for device `{id}` (filter {filter})", replay.file),
                        );
                        return;
                    }
                };
                match dims {
                    None => dims = Some(series.dims),
                    Some(d) if d != series.dims => {
                        checker.report(
                            &path.key("file"),
                            format!(
                                "rows of `{}` for device `{id}` have {} values, other devices' have {d}",
                                replay.file, series.dims
                            ),
                        );
                        return;
                    }
                    Some(_) => {}
                }
            }
            let dims = dims.unwrap_or(1);
            if dims != 1 && dims != 3 {
                checker.report(
                    &path.key("columns"),
                    format!(
                        "rows of `{}` have {dims} values; a sensor has 1 or 3 channels",
                        replay.file
                    ),
                );
                return;
            }
            replay.dims = dims;
            sensor.dims = dims;
        }
    }
}

/// The registry a scenario names, and the folder its model files are relative to.
struct ModelLoader {
    registry: Registry,
    folder: String,
}

impl ModelLoader {
    /// Reads and parses the registry; `None` (with a problem) if it cannot be read.
    fn open(checker: &mut Checker, raw: &RawScenario, files: &dyn FileSource) -> Option<Self> {
        let registry_path = raw
            .models
            .as_ref()
            .and_then(|m| m.registry.clone())
            .unwrap_or_else(|| "models/manifest.json".to_owned());
        let registry_field = FieldPath::root().key("models").key("registry");
        let text = match files.read_to_string(&registry_path) {
            Ok(text) => text,
            Err(reason) => {
                checker.report(&registry_field, reason);
                return None;
            }
        };
        let registry = match Registry::from_manifest(&registry_path, &text) {
            Ok(registry) => registry,
            Err(err) => {
                checker.report(&registry_field, err.to_string());
                return None;
            }
        };
        let folder = registry_path
            .rsplit_once('/')
            .map_or(String::new(), |(dir, _)| format!("{dir}/"));
        Some(Self { registry, folder })
    }

    /// Resolves `name` at `version` (a number, an alias, or the highest version when absent),
    /// checks the file against the manifest's sha256 and compiles it once per version.
    /// Problems go to `paths`: (the binding, its name field, its version field).
    fn load(
        &self,
        checker: &mut Checker,
        scenario: &mut Scenario,
        files: &dyn FileSource,
        (name, version): (&str, Option<&toml::Value>),
        (path, name_path, version_path): (&FieldPath, &FieldPath, &FieldPath),
    ) -> Option<(usize, crate::models::ModelVersion)> {
        let reference = match version {
            None => name.to_owned(),
            Some(toml::Value::Integer(v)) => format!("{name}@{v}"),
            Some(toml::Value::String(alias)) => format!("{name}@{alias}"),
            Some(other) => {
                checker.report(
                    version_path,
                    format!("must be a version number or an alias, got {other}"),
                );
                return None;
            }
        };
        let version_entry = match self.registry.resolve(&reference) {
            Ok(version) => version.clone(),
            Err(err) => {
                let at = if version.is_some() && self.registry.models.contains_key(name) {
                    version_path
                } else {
                    name_path
                };
                checker.report(at, err.to_string());
                return None;
            }
        };
        if let Some(index) = scenario
            .models
            .iter()
            .position(|m| m.name == version_entry.name && m.version == version_entry.version)
        {
            return Some((index, version_entry));
        }
        let file = format!("{}{}", self.folder, version_entry.file);
        let bytes = match files.read_bytes(&file) {
            Ok(bytes) => bytes,
            Err(reason) => {
                checker.report(path, reason);
                return None;
            }
        };
        let sha = sha256_hex(&bytes);
        if sha != version_entry.sha256 {
            checker.report(
                path,
                format!(
                    "{file}: sha256 {sha} does not match the registry's {}",
                    version_entry.sha256
                ),
            );
            return None;
        }
        let compiled = match CompiledModel::load(&bytes) {
            Ok(compiled) => compiled,
            Err(err) => {
                checker.report(path, format!("{file}: {err}"));
                return None;
            }
        };
        scenario.models.push(ModelSpec {
            name: version_entry.name.clone(),
            version: version_entry.version,
            sha256: sha,
            compiled: Arc::new(compiled),
        });
        Some((scenario.models.len() - 1, version_entry))
    }
}

/// Whether the model at `index` reads rows as wide as the window features of `slot`.
fn check_width(
    checker: &mut Checker,
    scenario: &Scenario,
    group: usize,
    slot: usize,
    index: usize,
    path: &FieldPath,
) -> bool {
    let group = &scenario.groups[group];
    let sensor = &scenario.sensors[group.sensors.start + slot];
    let dims = sensor.dims;
    let width = scenario.models[index].compiled.width();
    if let Some(images) = sensor.camera() {
        if width == images.width {
            return true;
        }
        checker.report(
            path,
            format!(
                "`{}` takes {width} values per row, but the frames of camera `{}` have {} pixels",
                scenario.models[index].label(),
                sensor.name,
                images.width
            ),
        );
        return false;
    }
    if width == features::window_feature_count(dims) {
        return true;
    }
    checker.report(
        path,
        format!(
            "`{}` takes {width} values per row, but the window features of `{}` ({dims} channel{}: mean, std_dev and peak-to-peak of each) are {}",
            scenario.models[index].label(),
            sensor.name,
            if dims == 1 { "" } else { "s" },
            features::window_feature_count(dims)
        ),
    );
    false
}

/// The models external devices start with: each version loaded like a group's model and
/// checked against the group's bound sensor. Devices of a group that binds no model keep none.
fn bind_external_models(
    checker: &mut Checker,
    loader: &ModelLoader,
    fleet: &ExternalFleet,
    scenario: &mut Scenario,
    files: &dyn FileSource,
) {
    for gi in 0..scenario.groups.len() {
        let group = &scenario.groups[gi];
        let Some(binding) = group.model else { continue };
        let Some(devices) = fleet.groups.get(&group.name).filter(|devices| !devices.is_empty()) else {
            continue;
        };
        if devices.iter().all(|device| device.model.is_none()) {
            continue;
        }
        let path = FieldPath::root().key("fleet").index(gi).key("model");
        let mut models = Vec::with_capacity(devices.len());
        for device in devices {
            let Some((name, version)) = &device.model else {
                models.push(binding.model);
                continue;
            };
            let version = toml::Value::Integer(i64::from(*version));
            let before = checker.problems.len();
            let loaded = loader
                .load(checker, scenario, files, (name, Some(&version)), (&path, &path, &path))
                .map(|(index, _)| index);
            let fits = loaded.is_some_and(|index| check_width(checker, scenario, gi, binding.slot, index, &path));
            for problem in &mut checker.problems[before..] {
                problem.message = format!(
                    "device `{}` starts with `{name}@{version}`: {}",
                    device.id, problem.message
                );
            }
            match loaded {
                Some(index) if fits => models.push(index),
                _ => return,
            }
        }
        scenario.groups[gi].initial_models = Some(models.into());
    }
}

/// Loads the registry, resolves each group's model (and its shadow), checks its file against
/// the manifest's sha256, compiles it once per version, and binds it to a sensor whose window
/// features have the model's input width. Returns the loader for the storyboard's rollouts.
fn validate_models(
    checker: &mut Checker,
    raw: &RawScenario,
    scenario: &mut Scenario,
    files: &dyn FileSource,
) -> Option<ModelLoader> {
    let uses_models = raw.fleet.iter().any(|g| g.model.is_some()) || raw.storyboard.iter().any(|e| e.rollout.is_some());
    if !uses_models {
        return None;
    }
    let loader = ModelLoader::open(checker, raw, files)?;
    for (gi, binding) in raw
        .fleet
        .iter()
        .enumerate()
        .filter_map(|(i, g)| g.model.as_ref().map(|m| (i, m)))
    {
        let path = FieldPath::root().key("fleet").index(gi).key("model");
        let Some((index, version)) = loader.load(
            checker,
            scenario,
            files,
            (&binding.name, binding.version.as_ref()),
            (&path, &path.key("name"), &path.key("version")),
        ) else {
            continue;
        };
        let group = &scenario.groups[gi];
        let Some(slot) = scenario.sensors[group.sensors.clone()]
            .iter()
            .position(|s| s.name == binding.sensor)
        else {
            let names: Vec<&str> = scenario.sensors[group.sensors.clone()]
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            checker.report(
                &path.key("sensor"),
                format!(
                    "group `{}` has no sensor `{}` (sensors: {})",
                    group.name,
                    binding.sensor,
                    names.join(", ")
                ),
            );
            continue;
        };
        if !check_width(checker, scenario, gi, slot, index, &path.key("sensor")) {
            continue;
        }
        let default_threshold = version
            .output_kind
            .get("score")
            .and_then(|k| k.get("threshold"))
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.5);
        let threshold = binding
            .threshold
            .map_or(default_threshold, |t| checker.finite(&path.key("threshold"), t));
        let placement = match binding.placement.unwrap_or(raw::RawPlacement::Edge) {
            raw::RawPlacement::Edge => Placement::Edge,
            raw::RawPlacement::Gateway => Placement::Gateway,
            raw::RawPlacement::Cloud => Placement::Cloud,
        };
        if placement == Placement::Gateway && scenario.groups[gi].gateway.is_none() {
            checker.report(
                &path.key("placement"),
                format!(
                    "group `{}` has no gateway to run its model on (set `gateway` on the group)",
                    scenario.groups[gi].name
                ),
            );
        }
        let mut shadow = None;
        if let Some(raw_shadow) = &binding.shadow {
            let shadow_path = path.key("shadow");
            let fraction = raw_shadow.fraction.unwrap_or(1.0);
            if !(fraction > 0.0 && fraction <= 1.0) {
                checker.report(
                    &shadow_path.key("fraction"),
                    format!("must be greater than 0 and at most 1, got {fraction}"),
                );
            }
            if let Some((shadow_index, _)) = loader.load(
                checker,
                scenario,
                files,
                (&binding.name, Some(&raw_shadow.version)),
                (&shadow_path, &path.key("name"), &shadow_path.key("version")),
            ) {
                if shadow_index == index {
                    checker.report(
                        &shadow_path.key("version"),
                        format!(
                            "the shadow is `{}`, the version the group already runs: compare two different versions",
                            scenario.models[index].label()
                        ),
                    );
                } else if check_width(checker, scenario, gi, slot, shadow_index, &shadow_path.key("version")) {
                    scenario.comparisons.push(ComparisonSpec {
                        label: scenario.groups[gi].name.clone(),
                        primary: index,
                        shadow: Some(shadow_index),
                    });
                    shadow = Some(ShadowSpec {
                        model: shadow_index,
                        fraction,
                        comparison: scenario.comparisons.len() - 1,
                    });
                }
            }
        }
        scenario.groups[gi].model = Some(ModelBinding {
            model: index,
            slot,
            threshold: threshold as f32,
            placement,
            shadow,
        });
    }
    Some(loader)
}

fn sensor_fault(
    checker: &mut Checker,
    event: &raw::RawEvent,
    path: &FieldPath,
) -> Vec<(Option<String>, SensorFault, &'static str)> {
    let mut found = Vec::new();
    if let Some(d) = &event.drift {
        let per_hour = checker.finite(&path.key("drift").key("per_hour"), d.per_hour);
        found.push((
            d.sensor.clone(),
            SensorFault::Drift {
                per_second: per_hour / 3600.0,
            },
            "drift",
        ));
    }
    if let Some(s) = &event.stuck {
        let value = s.value.map(|v| checker.finite(&path.key("stuck").key("value"), v));
        found.push((s.sensor.clone(), SensorFault::Stuck { value }, "stuck"));
    }
    if let Some(s) = &event.spikes {
        let probability = checker.probability(&path.key("spikes").key("probability"), s.probability);
        let magnitude = checker.finite(&path.key("spikes").key("magnitude"), s.magnitude);
        found.push((
            s.sensor.clone(),
            SensorFault::Spikes { probability, magnitude },
            "spikes",
        ));
    }
    if let Some(s) = &event.dropout {
        let probability = checker.probability(&path.key("dropout").key("probability"), s.probability.unwrap_or(1.0));
        found.push((s.sensor.clone(), SensorFault::Dropout { probability }, "dropout"));
    }
    if let Some(s) = &event.saturation {
        let low = s.low.map_or(f64::NEG_INFINITY, |v| {
            checker.finite(&path.key("saturation").key("low"), v)
        });
        let high = s.high.map_or(f64::INFINITY, |v| {
            checker.finite(&path.key("saturation").key("high"), v)
        });
        if s.low.is_none() && s.high.is_none() {
            checker.report(&path.key("saturation"), "needs low, high or both");
        } else if low > high {
            checker.report(&path.key("saturation"), format!("low ({low}) is above high ({high})"));
        }
        found.push((s.sensor.clone(), SensorFault::Saturation { low, high }, "saturation"));
    }
    if let Some(s) = &event.noise {
        let std_dev = checker.non_negative(&path.key("noise").key("std_dev"), s.std_dev);
        found.push((s.sensor.clone(), SensorFault::Noise { std_dev }, "noise"));
    }
    found
}

fn validate_storyboard(
    checker: &mut Checker,
    raw: &[raw::RawEvent],
    scenario: &mut Scenario,
    loader: Option<&ModelLoader>,
    files: &dyn FileSource,
    path: &FieldPath,
) -> Vec<EventSpec> {
    let mut events = Vec::new();
    let mut ids: Option<HashMap<String, u32>> = None;
    for (i, event) in raw.iter().enumerate() {
        let path = path.index(i);
        if event.at >= scenario.clock.duration {
            checker.report(
                &path.key("at"),
                format!(
                    "{} is at or after the end of the run ({})",
                    event.at, scenario.clock.duration
                ),
            );
            continue;
        }
        if let Some(lasts) = event.lasts {
            checker.positive_duration(&path.key("for"), lasts);
        }
        let mut actions: Vec<(Action, &'static str)> = sensor_fault(checker, event, &path)
            .into_iter()
            .map(|(sensor, fault, key)| (Action::SensorFault { sensor, fault }, key))
            .collect();
        if event.crash.is_some() {
            actions.push((Action::Crash, "crash"));
        }
        if let Some(skew) = &event.clock_skew {
            let offset_s = checker.finite(&path.key("clock_skew").key("offset_s"), skew.offset_s.unwrap_or(0.0));
            let ppm = checker.finite(&path.key("clock_skew").key("ppm"), skew.ppm.unwrap_or(0.0));
            actions.push((Action::ClockSkew { offset_s, ppm }, "clock_skew"));
        }
        if event.partition.is_some() {
            actions.push((Action::Partition, "partition"));
        }
        if let Some(upload) = &event.upload {
            let spec = validate_upload(checker, Some(upload), &path.key("upload"));
            let fastest = scenario.sensors.iter().map(|s| s.rate_hz).fold(0.0, f64::max);
            if fastest * spec.window.as_secs_f64() > MAX_READINGS {
                let message = format!(
                    "a {} window holds more than {MAX_READINGS:e} readings of the fastest sensor",
                    spec.window
                );
                checker.report(&path.key("upload").key("window"), message);
            }
            actions.push((Action::Upload(spec), "upload"));
        }
        if event.rollout.is_some() {
            if event.lasts.is_some() {
                checker.report(
                    &path.key("for"),
                    "a rollout takes no `for`: its stages' soaks decide how long it runs",
                );
            }
            actions.push((Action::Rollout(Arc::default()), "rollout"));
        }
        if actions.len() != 1 {
            let found: Vec<&str> = actions.iter().map(|(_, k)| *k).collect();
            checker.report(
                &path,
                format!(
                    "needs exactly one action (drift, stuck, spikes, dropout, saturation, noise, crash, clock_skew, partition, upload or rollout), found {}",
                    if found.is_empty() { "none".to_owned() } else { found.join(" and ") }
                ),
            );
            continue;
        }
        let (mut action, key) = actions.remove(0);
        let target = resolve_target(
            checker,
            event.target.as_ref(),
            &action,
            scenario,
            i as u32,
            &mut ids,
            &path.key("target"),
        );
        let Some(target) = target else { continue };
        if let (Some(raw_rollout), Target::Devices(devices)) = (&event.rollout, &target) {
            let Some(loader) = loader else { continue };
            let context = RolloutContext {
                event: i as u32,
                at: event.at,
                devices,
                loader,
                files,
                path: &path,
            };
            match validate_rollout(checker, raw_rollout, scenario, &context, &events) {
                Some(spec) => action = Action::Rollout(Arc::new(spec)),
                None => continue,
            }
        }
        if let (
            Action::SensorFault {
                sensor: Some(sensor), ..
            },
            Target::Devices(devices),
        ) = (&action, &target)
        {
            let mut checked = HashSet::new();
            for &device in devices {
                let gi = scenario.group_of(device);
                if !checked.insert(gi) {
                    continue;
                }
                let group = &scenario.groups[gi];
                if !scenario.sensors[group.sensors.clone()]
                    .iter()
                    .any(|s| &s.name == sensor)
                {
                    let names: Vec<&str> = scenario.sensors[group.sensors.clone()]
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect();
                    checker.report(
                        &path.key(key).key("sensor"),
                        format!(
                            "group `{}` has no sensor `{sensor}` (sensors: {})",
                            group.name,
                            names.join(", ")
                        ),
                    );
                    break;
                }
            }
        }
        let until = event.lasts.map(|d| SimDuration(event.at.0.saturating_add(d.0)));
        events.push(EventSpec {
            index: i as u32,
            at: event.at,
            until,
            action,
            target,
        });
    }
    events
}

/// Where a rollout event sits, for its validation.
struct RolloutContext<'a> {
    event: u32,
    at: SimDuration,
    devices: &'a [u32],
    loader: &'a ModelLoader,
    files: &'a dyn FileSource,
    path: &'a FieldPath,
}

/// Checks a rollout: the version exists and fits every targeted group's model binding, stage
/// fractions lie in (0, 1] and increase, every stage can finish (enough devices for
/// `min_devices`, soaks that end within the run), gates are probabilities.
fn validate_rollout(
    checker: &mut Checker,
    raw: &raw::RawRollout,
    scenario: &mut Scenario,
    context: &RolloutContext<'_>,
    earlier: &[EventSpec],
) -> Option<RolloutSpec> {
    let path = context.path.key("rollout");
    let problems = checker.problems.len();
    let name = raw.name.clone().unwrap_or_else(|| format!("rollout-{}", context.event));
    let taken = earlier
        .iter()
        .any(|e| matches!(&e.action, Action::Rollout(r) if r.name == name));
    if taken {
        checker.report(&path.key("name"), format!("duplicate rollout name `{name}`"));
    }
    let (model, _) = context.loader.load(
        checker,
        scenario,
        context.files,
        (&raw.model, Some(&raw.version)),
        (&path, &path.key("model"), &path.key("version")),
    )?;
    let mut groups: Vec<usize> = context.devices.iter().map(|&d| scenario.group_of(d)).collect();
    groups.dedup();
    for gi in groups {
        let group = &scenario.groups[gi];
        match group.model {
            Some(binding) if scenario.models[binding.model].name == raw.model => {
                check_width(checker, scenario, gi, binding.slot, model, &path.key("version"));
            }
            other => {
                let runs = other.map_or("no model".to_owned(), |b| {
                    format!("`{}`", scenario.models[b.model].label())
                });
                checker.report(
                    &context.path.key("target"),
                    format!(
                        "group `{}` runs {runs}, not `{}`: a rollout replaces a model the devices already run",
                        group.name, raw.model
                    ),
                );
                return None;
            }
        }
    }
    let total = context.devices.len() as u64;
    let mut stages: Vec<StageSpec> = Vec::new();
    let mut raw_stages: Vec<(&raw::RawWave, FieldPath, String)> = Vec::new();
    if let Some(canary) = &raw.canary {
        raw_stages.push((canary, path.key("canary"), "canary".to_owned()));
    }
    for (k, wave) in raw.waves.iter().enumerate() {
        raw_stages.push((wave, path.key("waves").index(k), format!("wave {}", k + 1)));
    }
    if raw_stages.is_empty() {
        checker.report(&path, "needs a canary or at least one wave");
    }
    let mut ends = context.at;
    for (wave, wave_path, stage_name) in &raw_stages {
        let fraction = wave.fraction;
        if !(fraction > 0.0 && fraction <= 1.0) {
            checker.report(
                &wave_path.key("fraction"),
                format!("must be greater than 0 and at most 1 (a share of the targeted devices), got {fraction}"),
            );
            continue;
        }
        if let Some(previous) = stages.last()
            && fraction <= previous.fraction
        {
            checker.report(
                &wave_path.key("fraction"),
                format!(
                    "fractions are cumulative and must increase: {fraction} is not above {}'s {}",
                    previous.name, previous.fraction
                ),
            );
            continue;
        }
        checker.positive_duration(&wave_path.key("soak"), wave.soak);
        ends = SimDuration(ends.0.saturating_add(wave.soak.0));
        if ends > scenario.clock.duration {
            checker.report(
                &wave_path.key("soak"),
                format!(
                    "{stage_name} would end its soak at {ends}, after the run ends ({}): it can never finish",
                    scenario.clock.duration
                ),
            );
        }
        let devices = ((fraction * total as f64).ceil() as u64).clamp(1, total) as u32;
        stages.push(StageSpec {
            name: stage_name.clone(),
            fraction,
            devices,
            soak: wave.soak,
        });
    }
    let min_devices = match raw.min_devices {
        None => 1,
        Some(n) if n < 1 => {
            checker.report(&path.key("min_devices"), format!("must be at least 1, got {n}"));
            1
        }
        Some(n) => n.min(i64::from(u32::MAX)) as u32,
    };
    if let Some(first) = stages.first()
        && min_devices > first.devices
    {
        checker.report(
            &path.key("min_devices"),
            format!(
                "{} updates {} of the {total} targeted devices, fewer than min_devices = {min_devices}: its gate can never be evaluated, so it can never finish",
                first.name, first.devices
            ),
        );
    }
    let success = validate_gate(checker, raw.success.as_ref(), &path.key("success"));
    let abort = validate_gate(checker, raw.abort.as_ref(), &path.key("abort"));
    if checker.problems.len() > problems {
        return None;
    }
    scenario.comparisons.push(ComparisonSpec {
        label: name.clone(),
        primary: model,
        shadow: None,
    });
    let stream = format!("rollout:{}", context.event);
    let mut ranked: Vec<(u64, u32)> = context
        .devices
        .iter()
        .map(|&d| (mix(scenario.seed, stable_key(&[&scenario.device_id(d), &stream])), d))
        .collect();
    ranked.sort_unstable();
    Some(RolloutSpec {
        name,
        model_name: raw.model.clone(),
        label: scenario.models[model].label(),
        model,
        order: ranked.into_iter().map(|(_, d)| d).collect(),
        stages,
        min_devices,
        success,
        abort,
        rollback: raw.on_abort.unwrap_or(raw::RawOnAbort::Rollback) == raw::RawOnAbort::Rollback,
        comparison: scenario.comparisons.len() - 1,
    })
}

fn validate_gate(checker: &mut Checker, raw: Option<&raw::RawGate>, path: &FieldPath) -> Gate {
    let Some(raw) = raw else { return Gate::default() };
    let mut rate = |key: &str, value: Option<f64>| {
        value.inspect(|v| {
            if !(0.0..=1.0).contains(v) {
                checker.report(&path.key(key), format!("a rate between 0 and 1, got {v}"));
            }
        })
    };
    let gate = Gate {
        alarm_rate_below: rate("alarm_rate_below", raw.alarm_rate_below),
        alarm_rate_above: rate("alarm_rate_above", raw.alarm_rate_above),
        agreement_below: rate("agreement_below", raw.agreement_below),
        agreement_above: rate("agreement_above", raw.agreement_above),
        deadline_misses_above: raw.deadline_misses_above.map(|n| {
            if n < 0 {
                checker.report(
                    &path.key("deadline_misses_above"),
                    format!("must not be negative, got {n}"),
                );
            }
            n.max(0) as u64
        }),
    };
    if gate.is_empty() {
        checker.report(path, "an empty gate: give at least one condition (alarm_rate_below, alarm_rate_above, agreement_below, agreement_above, deadline_misses_above)");
    }
    gate
}

/// Picks `wanted` of `candidates` by ranking each device's seeded hash: the same devices for
/// the same seed, whatever order the fleet was declared or spawned in.
fn seeded_pick(scenario: &Scenario, candidates: &[u32], wanted: usize, event: u32) -> Vec<u32> {
    let stream = format!("select:{event}");
    let mut ranked: Vec<(u64, u32)> = candidates
        .iter()
        .map(|&d| (mix(scenario.seed, stable_key(&[&scenario.device_id(d), &stream])), d))
        .collect();
    ranked.sort_unstable();
    let mut picked: Vec<u32> = ranked.into_iter().take(wanted).map(|(_, d)| d).collect();
    picked.sort_unstable();
    picked
}

fn resolve_target(
    checker: &mut Checker,
    raw: Option<&raw::RawTarget>,
    action: &Action,
    scenario: &Scenario,
    event: u32,
    ids: &mut Option<HashMap<String, u32>>,
    path: &FieldPath,
) -> Option<Target> {
    let default = raw::RawTarget::default();
    let target = raw.unwrap_or(&default);
    if matches!(action, Action::Partition) {
        let Some(name) = &target.gateway else {
            checker.report(path, "a partition needs target = { gateway = \"...\" }");
            return None;
        };
        if target.group.is_some() || target.ids.is_some() || target.fraction.is_some() || target.count.is_some() {
            checker.report(
                path,
                "a partition targets a gateway only: remove group, ids, fraction and count",
            );
            return None;
        }
        return match scenario.gateways.iter().position(|g| &g.name == name) {
            Some(index) => Some(Target::Gateway(index as u16)),
            None => {
                checker.report(&path.key("gateway"), format!("unknown gateway `{name}`"));
                None
            }
        };
    }
    let mut devices: Vec<u32> = if let Some(list) = &target.ids {
        if target.group.is_some() || target.gateway.is_some() {
            checker.report(path, "ids cannot be combined with group or gateway");
            return None;
        }
        let map = ids.get_or_insert_with(|| {
            let mut map = HashMap::new();
            for group in &scenario.groups {
                for ordinal in 0..group.count {
                    map.insert(group.device_id(ordinal), group.first_device + ordinal);
                }
            }
            map
        });
        let mut devices = Vec::new();
        for (k, id) in list.iter().enumerate() {
            match map.get(id) {
                Some(&d) => devices.push(d),
                None => {
                    checker.report(&path.key("ids").index(k), format!("no device has id `{id}`"));
                    return None;
                }
            }
        }
        devices.sort_unstable();
        devices.dedup();
        devices
    } else {
        let groups: Vec<&GroupSpec> = match (&target.group, &target.gateway) {
            (Some(name), _) => match scenario.groups.iter().find(|g| &g.name == name) {
                Some(group) => vec![group],
                None => {
                    let names: Vec<&str> = scenario.groups.iter().map(|g| g.name.as_str()).collect();
                    checker.report(
                        &path.key("group"),
                        format!("unknown group `{name}` (groups: {})", names.join(", ")),
                    );
                    return None;
                }
            },
            (None, _) => scenario.groups.iter().collect(),
        };
        let gateway = match &target.gateway {
            None => None,
            Some(name) => match scenario.gateways.iter().position(|g| &g.name == name) {
                Some(index) => Some(index as u16),
                None => {
                    checker.report(&path.key("gateway"), format!("unknown gateway `{name}`"));
                    return None;
                }
            },
        };
        groups
            .into_iter()
            .filter(|g| gateway.is_none() || g.gateway == gateway)
            .flat_map(|g| g.first_device..g.first_device + g.count)
            .collect()
    };
    if let Some(fraction) = target.fraction {
        if !(0.0..=1.0).contains(&fraction) {
            checker.report(
                &path.key("fraction"),
                format!("must be between 0 and 1, got {fraction}"),
            );
            return None;
        }
        if target.count.is_some() {
            checker.report(path, "give fraction or count, not both");
            return None;
        }
        let wanted = (fraction * devices.len() as f64).round() as usize;
        devices = seeded_pick(scenario, &devices, wanted, event);
    } else if let Some(count) = target.count {
        if count < 1 || count as usize > devices.len() {
            checker.report(
                &path.key("count"),
                format!(
                    "must be between 1 and the {} matching devices, got {count}",
                    devices.len()
                ),
            );
            return None;
        }
        devices = seeded_pick(scenario, &devices, count as usize, event);
    }
    if devices.is_empty() {
        checker.report(path, "the selector matches no device");
        return None;
    }
    Some(Target::Devices(devices))
}

/// The metric names criteria may use, and where the user finds them listed.
struct MetricNames<'a> {
    numbers: &'a BTreeSet<String>,
    texts: &'a BTreeSet<String>,
    listing: &'a str,
}

/// `[load]`: the settings `device-sim` takes by default and the criteria on its report.
fn validate_load(checker: &mut Checker, raw: &raw::RawLoad, path: &FieldPath) -> LoadSpec {
    if let Some(duration) = raw.duration {
        checker.positive_duration(&path.key("duration"), duration);
    }
    let rate = raw.rate.map(|rate| checker.positive(&path.key("rate"), rate));
    let max_rate = raw.max_rate.map(|rate| checker.positive(&path.key("max_rate"), rate));
    let connect_rate = raw
        .connect_rate
        .map(|rate| checker.positive(&path.key("connect_rate"), rate));
    let numbers: BTreeSet<String> = LOAD_METRICS.iter().map(|(name, _)| (*name).to_owned()).collect();
    let names = MetricNames {
        numbers: &numbers,
        texts: &BTreeSet::new(),
        listing: "see `device-sim metrics` for the list",
    };
    let criteria = validate_criteria(checker, &raw.criteria, &names, &path.key("criteria"));
    LoadSpec {
        duration: raw.duration,
        rate,
        max_rate,
        arrivals: match raw.arrivals {
            None | Some(raw::RawArrivals::Constant) => Arrivals::Constant,
            Some(raw::RawArrivals::Poisson) => Arrivals::Poisson,
        },
        connect_rate,
        criteria,
    }
}

fn validate_criteria(
    checker: &mut Checker,
    raw: &[raw::RawCriterion],
    metric_names: &MetricNames<'_>,
    path: &FieldPath,
) -> Vec<Criterion> {
    let (numbers, texts) = (metric_names.numbers, metric_names.texts);
    let mut criteria = Vec::new();
    for (i, c) in raw.iter().enumerate() {
        let path = path.index(i);
        let names = if c.equals.is_some() { texts } else { numbers };
        let mut known = |field: &str, metric: &str| -> bool {
            if names.contains(metric) {
                return true;
            }
            if c.equals.is_some() && numbers.contains(metric) {
                checker.report(
                    &path.key(field),
                    format!("`{metric}` is a number: compare it with lt, le, gt, ge, eq or between, not equals"),
                );
                return false;
            }
            if c.equals.is_none() && texts.contains(metric) {
                checker.report(
                    &path.key(field),
                    format!("`{metric}` is a state (text): compare it with equals = \"...\""),
                );
                return false;
            }
            let closest = names
                .iter()
                .min_by_key(|n| edit_distance(n, metric))
                .filter(|n| edit_distance(n, metric) <= 4);
            let hint = match closest {
                Some(n) => format!(" (did you mean `{n}`?)"),
                None => format!(" ({})", metric_names.listing),
            };
            checker.report(&path.key(field), format!("unknown metric `{metric}`{hint}"));
            false
        };
        let metric_ok = known("metric", &c.metric);
        let divisor_ok = c.divided_by.as_ref().is_none_or(|d| known("divided_by", d));
        let mut checks = Vec::new();
        for (name, value, make) in [
            ("lt", c.lt, Check::Lt as fn(f64) -> Check),
            ("le", c.le, Check::Le),
            ("gt", c.gt, Check::Gt),
            ("ge", c.ge, Check::Ge),
            ("eq", c.eq, Check::Eq),
        ] {
            if let Some(v) = value {
                checks.push(make(checker.finite(&path.key(name), v)));
            }
        }
        match c.between.as_deref() {
            None => {}
            Some(&[low, high]) => {
                let low = checker.finite(&path.key("between").index(0), low);
                let high = checker.finite(&path.key("between").index(1), high);
                if low > high {
                    checker.report(&path.key("between"), format!("low ({low}) is above high ({high})"));
                }
                checks.push(Check::Between(low, high));
            }
            Some(other) => checker.report(
                &path.key("between"),
                format!("must be [low, high], got {} values", other.len()),
            ),
        }
        if let Some(text) = &c.equals {
            if c.divided_by.is_some() {
                checker.report(&path.key("divided_by"), "a state cannot be divided");
            }
            if !crate::report::ROLLOUT_STATES.contains(&text.as_str()) {
                checker.report(
                    &path.key("equals"),
                    format!(
                        "unknown state `{text}` (states: {})",
                        crate::report::ROLLOUT_STATES.join(", ")
                    ),
                );
            }
            checks.push(Check::Is(text.clone()));
        }
        if checks.len() != 1 {
            checker.report(
                &path,
                format!(
                    "needs exactly one comparison (lt, le, gt, ge, eq, between or equals), found {}",
                    checks.len()
                ),
            );
            continue;
        }
        if !(metric_ok && divisor_ok) {
            continue;
        }
        let check = checks.remove(0);
        let mut criterion = Criterion {
            name: String::new(),
            metric: c.metric.clone(),
            divided_by: c.divided_by.clone(),
            check,
        };
        criterion.name = c
            .name
            .clone()
            .unwrap_or_else(|| format!("{} {}", criterion.expression(), criterion.check.describe()));
        criteria.push(criterion);
    }
    criteria
}
