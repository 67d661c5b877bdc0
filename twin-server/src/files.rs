//! Loading scenario files and the files they refer to, relative to the scenario's folder.

use std::path::{Path, PathBuf};

use twin_core::scenario::Problem;
use twin_core::{FileSource, LoadOptions, Scenario, ScenarioError};

/// Reads replay files relative to a scenario's folder.
pub struct ScenarioFiles {
    base: PathBuf,
}

impl ScenarioFiles {
    /// Files relative to the folder holding `scenario_path`.
    pub fn beside(scenario_path: &Path) -> Self {
        Self {
            base: scenario_path.parent().map(Path::to_path_buf).unwrap_or_default(),
        }
    }

    /// Files relative to `folder` (scenario text that has no file of its own).
    pub fn in_folder(folder: &Path) -> Self {
        Self {
            base: folder.to_path_buf(),
        }
    }
}

impl FileSource for ScenarioFiles {
    fn read_to_string(&self, path: &str) -> Result<String, String> {
        let resolved = self.base.join(path);
        std::fs::read_to_string(&resolved)
            .map_err(|err| format!("cannot read `{path}` ({}): {err}", resolved.display()))
    }

    fn read_bytes(&self, path: &str) -> Result<Vec<u8>, String> {
        let resolved = self.base.join(path);
        std::fs::read(&resolved).map_err(|err| format!("cannot read `{path}` ({}): {err}", resolved.display()))
    }
}

/// Reads and validates a scenario file.
///
/// # Errors
/// An unreadable file or every problem in it, located by line and column.
pub fn load_scenario(path: &Path, options: LoadOptions) -> Result<Scenario, ScenarioError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|err| ScenarioError {
        file: name.clone(),
        problems: vec![Problem {
            line: 1,
            column: 1,
            path: String::new(),
            message: format!("cannot read the scenario: {err}"),
        }],
    })?;
    Scenario::from_toml(&name, &text, &ScenarioFiles::beside(path), options)
}
