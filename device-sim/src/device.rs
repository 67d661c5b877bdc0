//! A virtual device's own behaviour beyond its readings: applying desired changes (upload
//! settings, sampling rate, model version) and running its model on its windows with
//! `twin_core::inference`, as the device would on the edge.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use serde_json::{Map, Value};
use twin_core::features::push_window_features;
use twin_core::inference::{CompiledModel, extend_row_f32};
use twin_core::models::Registry;
use twin_core::scenario::UploadMode;
use twin_core::stats::WindowAcc;
use twin_core::time::SimDuration;

use crate::message::Reading;
use crate::shared::Shared;

/// The model a device runs.
#[derive(Clone, Debug)]
pub struct RunningModel {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// sha256 of its file.
    pub sha256: String,
    /// The compiled plan.
    pub compiled: Arc<CompiledModel>,
}

/// Where a device finds model versions it is asked to run: the scenario's deployed versions,
/// then the registry beside the scenario (`models/manifest.json`). Clones share what was loaded.
#[derive(Clone, Debug)]
pub struct ModelSource {
    /// The registry folder.
    pub registry_dir: PathBuf,
    /// Versions loaded from the registry, by reference: each is read, checked and compiled once
    /// per run (a compiled model holds six tract plans, milliseconds of optimizing), and every
    /// device asked to run it shares them. Devices asking at the same time wait for the first.
    loaded: Arc<Mutex<HashMap<String, Arc<Loading>>>>,
}

/// A registry version being loaded, or loaded.
type Loading = OnceLock<Result<RunningModel, String>>;

impl ModelSource {
    /// The registry folder of a scenario file.
    pub fn beside(scenario_path: &Path) -> Self {
        Self {
            registry_dir: scenario_path.parent().unwrap_or(Path::new(".")).join("models"),
            loaded: Arc::default(),
        }
    }

    /// Loads `reference` (`name`, `name@3`, `name@champion`) and runs it once on a row of
    /// zeros.
    ///
    /// # Errors
    /// An unknown model or version, an unreadable or corrupt file, a model that does not run.
    pub fn load(&self, shared: &Shared, reference: &str) -> Result<RunningModel, String> {
        if let Some((name, version)) = reference.split_once('@')
            && let Ok(number) = version.parse::<u32>()
            && let Some(deployed) = shared
                .fleet
                .scenario
                .models
                .iter()
                .find(|m| m.name == name && m.version == number)
        {
            return Ok(RunningModel {
                name: deployed.name.clone(),
                version: deployed.version,
                sha256: deployed.sha256.clone(),
                compiled: deployed.compiled.clone(),
            });
        }
        self.registry_version(reference)
    }

    /// `reference` from the registry, loaded once and shared (see `loaded`).
    fn registry_version(&self, reference: &str) -> Result<RunningModel, String> {
        let cell = Arc::clone(
            self.loaded
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(reference.to_owned())
                .or_default(),
        );
        let result = cell.get_or_init(|| self.read_registry(reference)).clone();
        if result.is_err() {
            // A failure is not kept: the next device asked tries again (the file may be fixed).
            let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
            if loaded.get(reference).is_some_and(|kept| Arc::ptr_eq(kept, &cell)) {
                loaded.remove(reference);
            }
        }
        result
    }

    /// Reads `reference` from the registry, checks its sha256, compiles it and runs it once on
    /// a row of zeros.
    fn read_registry(&self, reference: &str) -> Result<RunningModel, String> {
        let manifest = self.registry_dir.join("manifest.json");
        let text =
            std::fs::read_to_string(&manifest).map_err(|err| format!("cannot read {}: {err}", manifest.display()))?;
        let registry =
            Registry::from_manifest(&manifest.display().to_string(), &text).map_err(|err| err.to_string())?;
        let entry = registry.resolve(reference).map_err(|err| err.to_string())?;
        let file = self.registry_dir.join(&entry.file);
        let bytes = std::fs::read(&file).map_err(|err| format!("cannot read {}: {err}", file.display()))?;
        let sha256 = twin_core::models::sha256_hex(&bytes);
        if sha256 != entry.sha256 {
            return Err(format!(
                "{} has sha256 {sha256}, the manifest says {}",
                file.display(),
                entry.sha256
            ));
        }
        let compiled = CompiledModel::load(&bytes).map_err(|err| err.to_string())?;
        compiled
            .run(&vec![0.0; compiled.width()])
            .map_err(|err| format!("{reference} does not run: {err}"))?;
        Ok(RunningModel {
            name: entry.name.clone(),
            version: entry.version,
            sha256,
            compiled: Arc::new(compiled),
        })
    }
}

/// One desired key as the device answered it.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyOutcome {
    /// Top-level key.
    pub key: String,
    /// HTTP-style status: 200 applied, 400 refused, 500 failed.
    pub status: i32,
    /// Why, when not applied.
    pub description: String,
}

/// What applying a delta gave: the reported patch (what the device now runs) and one outcome
/// per key.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    /// Reported merge patch.
    pub reported: Map<String, Value>,
    /// Per key.
    pub outcomes: Vec<KeyOutcome>,
}

/// Applies a desired delta on device `device`: `upload` (`"raw"`, `"summary"` or
/// `{ mode, window }`) changes how it sends, `sampling` (`{ rate_hz }`, or `null` for the
/// scenario's rates) thins each sensor's readings to that rate, `model` (`{ name, version }` or
/// `"name@version"`) loads and runs that version; any other key is taken as given. Applied keys
/// are reported with the desired value, so the delta closes.
pub fn apply_delta(
    shared: &Shared,
    device: u32,
    delta: &Map<String, Value>,
    models: &ModelSource,
    model: &mut Option<RunningModel>,
) -> Applied {
    let mut applied = Applied::default();
    for (key, value) in delta {
        let result = match key.as_str() {
            "upload" => apply_upload(shared, device, value),
            "sampling" => apply_sampling(shared, device, value),
            "model" => apply_model(shared, value, models, model).map(|()| {
                model
                    .as_ref()
                    .map(|m| serde_json::json!({"name": m.name, "version": m.version, "sha256": m.sha256}))
            }),
            _ => Ok(None),
        };
        match result {
            Ok(reported) => {
                applied
                    .reported
                    .insert(key.clone(), reported.unwrap_or_else(|| value.clone()));
                applied.outcomes.push(KeyOutcome {
                    key: key.clone(),
                    status: 200,
                    description: String::new(),
                });
            }
            Err((status, description)) => applied.outcomes.push(KeyOutcome {
                key: key.clone(),
                status,
                description,
            }),
        }
    }
    applied
}

fn apply_upload(shared: &Shared, device: u32, value: &Value) -> Result<Option<Value>, (i32, String)> {
    // A delta holds only the leaves that differ: a missing mode is the one the device has.
    let current = shared
        .commands
        .get(device as usize)
        .and_then(|c| c.current())
        .unwrap_or(shared.fleet.initial_upload(device).mode);
    let (mode, window) = match value {
        Value::String(mode) => (mode.as_str(), None),
        Value::Object(fields) => (
            fields.get("mode").and_then(Value::as_str).unwrap_or(current.name()),
            fields.get("window"),
        ),
        _ => return Err((400, "upload: expected \"raw\", \"summary\" or { mode, window }".into())),
    };
    let mode = match mode {
        "raw" => UploadMode::Raw,
        "summary" => UploadMode::Summary,
        other => return Err((400, format!("upload.mode: `{other}` is not raw or summary"))),
    };
    let window = match window {
        None => None,
        Some(Value::Number(seconds)) => Some(
            SimDuration::from_secs_f64(seconds.as_f64().unwrap_or(-1.0))
                .map_err(|e| (400, format!("upload.window: {e}")))?,
        ),
        Some(Value::String(text)) => Some(SimDuration::parse(text).map_err(|e| (400, format!("upload.window: {e}")))?),
        Some(_) => return Err((400, "upload.window: expected a duration".into())),
    };
    if window.is_some_and(|w| w.0 == 0) {
        return Err((400, "upload.window: must be longer than 0s".into()));
    }
    if let Some(command) = shared.commands.get(device as usize) {
        command.set(mode, window);
    }
    Ok(None)
}

/// `sampling`: `{ "rate_hz": R }` or `null`. The device's readings come from the scenario's
/// stream, so it can sample more slowly than the scenario's rate, never faster: a rate above
/// one of its sensors' is refused, naming the sensor.
fn apply_sampling(shared: &Shared, device: u32, value: &Value) -> Result<Option<Value>, (i32, String)> {
    let command = shared.commands.get(device as usize);
    let fields = match value {
        Value::Null => {
            if let Some(command) = command {
                command.set_sampling(None);
            }
            return Ok(None);
        }
        Value::Object(fields) => fields,
        _ => return Err((400, "sampling: expected { \"rate_hz\": number } or null".into())),
    };
    if let Some(unknown) = fields.keys().find(|k| *k != "rate_hz") {
        return Err((
            400,
            format!("sampling.{unknown}: unknown setting (a simulated device applies rate_hz)"),
        ));
    }
    let Some(rate) = fields.get("rate_hz") else {
        // A delta holds only the leaves that differ: nothing here changes the rate.
        return Ok(None);
    };
    let rate = match rate {
        Value::Null => {
            if let Some(command) = command {
                command.set_sampling(None);
            }
            return Ok(None);
        }
        Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        _ => return Err((400, "sampling.rate_hz: expected a number of Hz".into())),
    };
    if !(rate.is_finite() && rate > 0.0) {
        return Err((400, format!("sampling.rate_hz: must be above 0 Hz, got {rate}")));
    }
    let info = &shared.fleet.devices[device as usize];
    for spec in &shared.fleet.scenario.sensors[info.sensors.clone()] {
        if spec.rate_hz > 0.0 && rate > spec.rate_hz {
            return Err((
                400,
                format!(
                    "sampling.rate_hz: {rate} Hz is above sensor `{}`'s {} Hz, the scenario's rate (a simulated device can sample its stream more slowly, not faster)",
                    spec.name, spec.rate_hz
                ),
            ));
        }
    }
    let period = SimDuration::from_secs_f64(1.0 / rate).map_err(|e| (400, format!("sampling.rate_hz: {e}")))?;
    if let Some(command) = command {
        command.set_sampling(Some(period));
    }
    Ok(None)
}

fn apply_model(
    shared: &Shared,
    value: &Value,
    models: &ModelSource,
    model: &mut Option<RunningModel>,
) -> Result<(), (i32, String)> {
    let reference = match value {
        Value::String(text) => text.clone(),
        Value::Object(fields) => {
            // A delta holds only the leaves that differ: a missing name is the running model's.
            let running = model.as_ref().map(|m| m.name.as_str()).unwrap_or_default();
            let name = fields.get("name").and_then(Value::as_str).unwrap_or(running);
            match fields.get("version") {
                Some(Value::Number(n)) => format!("{name}@{n}"),
                Some(Value::String(s)) => format!("{name}@{s}"),
                _ => name.to_owned(),
            }
        }
        _ => return Err((400, "model: expected \"name@version\" or { name, version }".into())),
    };
    let loaded = models.load(shared, &reference);
    match loaded {
        Ok(running) => {
            if let Some(current) = model.as_ref()
                && current.compiled.width() != running.compiled.width()
            {
                return Err((
                    400,
                    format!(
                        "{}@{} takes {} features, the device computes {}",
                        running.name,
                        running.version,
                        running.compiled.width(),
                        current.compiled.width()
                    ),
                ));
            }
            *model = Some(running);
            Ok(())
        }
        Err(reason) => Err((500, reason)),
    }
}

/// One window's inference, ready to report.
#[derive(Clone, Debug, PartialEq)]
pub struct Inference {
    /// Window start on the device's clock, nanoseconds from the scenario start.
    pub window_start_nanos: i64,
    /// Window end (exclusive).
    pub window_end_nanos: i64,
    /// The input row.
    pub features: Vec<f32>,
    /// The outputs for it, in output order.
    pub outputs: Vec<f32>,
}

/// A device's own inference: a window model on its bound sensor's windows, or an image model
/// on every camera frame.
#[derive(Clone, Debug)]
pub enum DeviceInference {
    /// Features of each closed window.
    Windows(WindowInference),
    /// Each frame's pixels.
    Frames(FrameInference),
}

impl DeviceInference {
    /// The inference a device of `group` runs on its bound sensor, if its group runs a model.
    pub fn for_group(scenario: &twin_core::Scenario, group: usize, device_id: &str) -> Option<Self> {
        let spec = &scenario.groups[group];
        let binding = spec.model?;
        let sensor = &scenario.sensors[spec.sensors.start + binding.slot];
        Some(match sensor.camera() {
            Some(images) => Self::Frames(FrameInference {
                slot: binding.slot as u16,
                rate_hz: sensor.rate_hz,
                first_image: images.first_image(scenario.seed, device_id, &sensor.name),
                images: images.clone(),
            }),
            None => Self::Windows(WindowInference::new(binding.slot as u16, spec.upload.window.0 as i64)),
        })
    }

    /// The bound sensor's index among the device's sensors.
    pub fn slot(&self) -> u16 {
        match self {
            Self::Windows(windows) => windows.slot,
            Self::Frames(frames) => frames.slot,
        }
    }

    /// Takes readings (in time order); returns the inferences they complete.
    pub fn push(&mut self, readings: &[Reading], model: Option<&RunningModel>) -> Vec<Inference> {
        match self {
            Self::Windows(windows) => windows.push(readings, model),
            Self::Frames(frames) => frames.push(readings, model),
        }
    }
}

/// Rows per tract call when a message carries many frames.
const FRAME_BATCH: usize = 256;

/// Runs an image model on every frame a camera takes, as the edge camera does: frame `k` of
/// the camera (its reading at `k / rate_hz`) is image `first_image + k` of the scenario's image
/// set, the same image the core's camera replays (`ImageSet::first_image`). Frames of one
/// message run as one batched tract call (at most `FRAME_BATCH` rows).
#[derive(Clone, Debug)]
pub struct FrameInference {
    /// Index of the camera among the device's sensors.
    pub slot: u16,
    /// The camera's frame rate.
    pub rate_hz: f64,
    /// The image of frame 0.
    pub first_image: u64,
    /// The images the camera replays.
    pub images: Arc<twin_core::camera::ImageSet>,
}

impl FrameInference {
    /// Takes readings; returns one inference per frame of the camera (none without a model).
    pub fn push(&self, readings: &[Reading], model: Option<&RunningModel>) -> Vec<Inference> {
        let Some(model) = model else {
            return Vec::new();
        };
        if model.compiled.width() != self.images.width {
            return Vec::new();
        }
        let frame_nanos = (1e9 / self.rate_hz).round() as i64;
        let frames: Vec<i64> = readings
            .iter()
            .filter(|r| r.sensor == self.slot)
            .map(|r| r.timestamp_nanos)
            .collect();
        let mut done = Vec::with_capacity(frames.len());
        for chunk in frames.chunks(FRAME_BATCH) {
            let mut rows = Vec::with_capacity(chunk.len() * self.images.width);
            for &timestamp in chunk {
                // The device's clock names the frame (under a clock skew, the skewed one).
                let k = (timestamp.max(0) as f64 * self.rate_hz / 1e9).round() as u64;
                rows.extend_from_slice(self.images.image(self.first_image + k).0);
            }
            let Ok(outputs) = model.compiled.run(&rows) else {
                continue;
            };
            for (row, &timestamp) in chunk.iter().enumerate() {
                let mut values = Vec::new();
                extend_row_f32(&outputs, row, &mut values);
                let width = self.images.width;
                done.push(Inference {
                    window_start_nanos: timestamp,
                    window_end_nanos: timestamp + frame_nanos,
                    features: rows[row * width..(row + 1) * width].to_vec(),
                    outputs: values,
                });
            }
        }
        done
    }
}

/// Collects the bound sensor's readings window by window and runs the model on each closed
/// window's features (twin-core's definition: mean, standard deviation, peak-to-peak per
/// channel).
#[derive(Clone, Debug)]
pub struct WindowInference {
    /// Index of the bound sensor among the device's sensors.
    pub slot: u16,
    /// Window length, nanoseconds.
    pub window_nanos: i64,
    window_end: i64,
    readings: Vec<Reading>,
}

impl WindowInference {
    /// Inference on sensor `slot`, windows of `window_nanos`.
    pub fn new(slot: u16, window_nanos: i64) -> Self {
        let window_nanos = window_nanos.max(1);
        Self {
            slot,
            window_nanos,
            window_end: window_nanos,
            readings: Vec::new(),
        }
    }

    /// Takes readings (in time order); returns the inferences of every window they closed.
    pub fn push(&mut self, readings: &[Reading], model: Option<&RunningModel>) -> Vec<Inference> {
        let mut done = Vec::new();
        let slot = self.slot;
        for reading in readings.iter().filter(|r| r.sensor == slot) {
            while reading.timestamp_nanos >= self.window_end {
                if let Some(inference) = self.close(model) {
                    done.push(inference);
                }
                self.window_end += self.window_nanos;
            }
            self.readings.push(*reading);
        }
        done
    }

    fn close(&mut self, model: Option<&RunningModel>) -> Option<Inference> {
        let readings = std::mem::take(&mut self.readings);
        let model = model?;
        let first = readings.first()?;
        let dims = usize::from(first.dims);
        let mut summaries = Vec::with_capacity(dims);
        for channel in 0..dims {
            let values: Vec<f64> = readings.iter().map(|r| r.values[channel]).collect();
            let mut acc = WindowAcc::default();
            acc.add_block(&values, values[0]);
            summaries.push(acc.summary(values[0]));
        }
        let mut features = Vec::with_capacity(3 * dims);
        if !push_window_features(&summaries, &mut features) || features.len() != model.compiled.width() {
            return None;
        }
        let outputs = model.compiled.run(&features).ok()?;
        let mut values = Vec::new();
        extend_row_f32(&outputs, 0, &mut values);
        Some(Inference {
            window_start_nanos: self.window_end - self.window_nanos,
            window_end_nanos: self.window_end,
            features,
            outputs: values,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use twin_core::{LoadOptions, RunOptions, Simulation};

    use super::{Arc, DeviceInference, ModelSource};

    /// A camera's frame `k` in device-sim is the image the core's camera recorded at frame `k`
    /// (the recorded reading is the image's mean pixel).
    #[test]
    fn camera_frames_are_the_cores_images() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/device-sim-camera.toml");
        let scenario = Arc::new(crate::fleet::load(&path, LoadOptions::default(), None).expect("valid"));
        let mut simulation = Simulation::new(scenario.clone(), RunOptions { record: true });
        let mut recorded: Vec<(String, f64, f64)> = Vec::new();
        while simulation.step() {
            simulation.drain_recording(&mut |sample| {
                recorded.push((sample.device.to_owned(), sample.timestamp, sample.values[0]));
            });
        }
        assert_eq!(recorded.len(), 16);
        let mut firsts = std::collections::BTreeMap::new();
        for (device, timestamp, mean) in recorded {
            let Some(DeviceInference::Frames(frames)) = DeviceInference::for_group(&scenario, 0, &device) else {
                panic!("{device} runs an image model");
            };
            let k = (timestamp * frames.rate_hz).round() as u64;
            let (pixels, _) = frames.images.image(frames.first_image + k);
            let expected = pixels.iter().map(|&p| f64::from(p)).sum::<f64>() / pixels.len() as f64;
            assert!(
                (expected - mean).abs() < 1e-9,
                "{device} frame {k}: {expected} != {mean}"
            );
            firsts.insert(device, frames.first_image);
        }
        let firsts: Vec<u64> = firsts.into_values().collect();
        assert_eq!(firsts.len(), 2);
        assert_ne!(firsts[0], firsts[1], "each camera starts at its own image");
    }

    fn source() -> ModelSource {
        ModelSource::beside(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/device-sim-smoke.toml"))
    }

    /// Every clone of a source shares one compiled model per registry version; a failed load is
    /// reported to each caller and not kept.
    #[test]
    fn a_registry_version_is_compiled_once_and_shared() {
        let models = source();
        let first = models.registry_version("vibration-anomaly@3").expect("v3 loads");
        let again = models
            .clone()
            .registry_version("vibration-anomaly@3")
            .expect("v3 again");
        assert!(Arc::ptr_eq(&first.compiled, &again.compiled));
        assert_eq!((first.name.as_str(), first.version), ("vibration-anomaly", 3));
        let other = source()
            .registry_version("vibration-anomaly@3")
            .expect("another run's source");
        assert!(
            !Arc::ptr_eq(&first.compiled, &other.compiled),
            "separate sources share nothing"
        );
        for _ in 0..2 {
            let err = models
                .registry_version("vibration-anomaly@99")
                .expect_err("no version 99");
            assert!(err.contains("99"), "{err}");
        }
        let kept: Vec<String> = models.loaded.lock().expect("lock").keys().cloned().collect();
        assert_eq!(kept, ["vibration-anomaly@3"]);
    }
}
