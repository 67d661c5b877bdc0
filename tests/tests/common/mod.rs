//! Helpers shared by the integration tests: load scenarios, run them in-process, capture
//! recordings as JSON Lines.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use twin_core::{FileSource, LoadOptions, Report, RunOptions, Scenario, Simulation};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Files served from memory, for replay tests.
#[derive(Default)]
pub struct MemoryFiles(pub HashMap<String, String>);

impl FileSource for MemoryFiles {
    fn read_to_string(&self, path: &str) -> Result<String, String> {
        self.0
            .get(path)
            .cloned()
            .ok_or_else(|| format!("cannot read `{path}`: not in memory"))
    }
}

/// Parses a scenario from text, panicking with the problems if it is invalid.
pub fn scenario(text: &str, files: &dyn FileSource) -> Scenario {
    Scenario::from_toml("test.toml", text, files, LoadOptions::default())
        .unwrap_or_else(|err| panic!("invalid scenario:\n{err}"))
}

/// Loads a shipped scenario file.
pub fn shipped(name: &str) -> Scenario {
    twin_server::files::load_scenario(&workspace().join("scenarios").join(name), LoadOptions::default())
        .unwrap_or_else(|err| panic!("{err}"))
}

/// Runs to the end; returns the report and, when `record`, the recording as JSON Lines.
pub fn run(scenario: Scenario, record: bool) -> (Report, String) {
    let mut simulation = Simulation::new(Arc::new(scenario), RunOptions { record });
    let mut recording = Vec::new();
    while simulation.step() {
        simulation.drain_recording(&mut |sample| {
            twin_server::recording::write_sample(&mut recording, &sample).expect("in-memory write");
        });
    }
    (simulation.finish(), String::from_utf8(recording).expect("utf-8"))
}

/// A metric of a report by dotted path.
pub fn metric(report: &Report, name: &str) -> f64 {
    *report
        .metrics()
        .get(name)
        .unwrap_or_else(|| panic!("no metric `{name}`"))
}

/// One line of a recording, parsed.
pub fn reading(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|err| panic!("not a recording line ({err}): {line}"))
}

/// The timestamps of a recording's lines that contain `filter` (all lines for `""`).
pub fn timestamps(recording: &str, filter: &str) -> Vec<f64> {
    recording
        .lines()
        .filter(|l| l.contains(filter))
        .map(|l| reading(l)["timestamp"].as_f64().expect("timestamp"))
        .collect()
}
