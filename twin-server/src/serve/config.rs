//! The server's settings: a TOML file with `deny_unknown_fields`, defaults compiled in and
//! printable (`twin print-config`), command-line overrides for the listen address and data folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::auth::AuthConfig;
use super::metrics::MetricsConfig;
use super::tls::TlsConfig;
use crate::store::StoreOptions;
use crate::twins::Limits;

/// Name of the database file inside the data folder.
pub const DATABASE_FILE: &str = "twin.redb";

/// Everything `twin serve` can be configured with. Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Address the gRPC server listens on (default `127.0.0.1:7878`: loopback only).
    pub listen: SocketAddr,
    /// Folder of the twin database; the file is `<data_dir>/twin.redb` (default `./twin-data`).
    pub data_dir: PathBuf,
    /// At shutdown, how long calls in flight and open connections get to finish before the
    /// server closes them, in milliseconds (default 5000). Commands already queued at the
    /// engine are committed either way.
    pub shutdown_grace_ms: u64,
    /// Folder of the model registry (`manifest.json` and the ONNX files), the one
    /// `twin models list` reads (default `scenarios/models`). Without a manifest there the
    /// server knows no model.
    pub models_dir: PathBuf,
    /// Folder that `Simulation.StartSimulation` scenario paths are relative to, and that files
    /// named by scenario text (replays, the model registry) are read from (default
    /// `scenarios`).
    pub scenario_dir: PathBuf,
    /// Document limits.
    pub limits: Limits,
    /// The engine that owns the twins.
    pub engine: EngineConfig,
    /// The durable store.
    pub store: StoreConfig,
    /// Twins.Watch streams.
    pub watch: WatchConfig,
    /// DeviceSync streams.
    pub sync: SyncConfig,
    /// Bearer tokens; none configured: authentication off.
    pub auth: AuthConfig,
    /// The Prometheus metrics endpoint.
    pub metrics: MetricsConfig,
    /// TLS on the gRPC port; no certificate configured: plaintext.
    pub tls: TlsConfig,
    /// Simulations run by the server.
    pub simulation: SimulationConfig,
    /// The live inference check.
    pub inference: InferenceConfig,
}

/// Settings of the Simulation service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulationConfig {
    /// Simulations queued or running at once, each on a worker thread of its own; one more is
    /// refused with RESOURCE_EXHAUSTED (default 2).
    pub max_running: usize,
    /// Finished or failed simulations kept for GetSimulation and GetReport; beyond it the
    /// oldest finished one is forgotten (default 100).
    pub max_kept: usize,
    /// Largest estimated memory of one simulation's fleet, in bytes; a bigger scenario does not
    /// validate (default 1 GiB; `twin run` allows 8 GiB).
    pub max_memory_bytes: u64,
}

/// Settings of the live inference check.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Largest absolute difference allowed between each output the device reports and the
    /// twin's re-run (default 1e-4).
    pub tolerance: f64,
    /// Inference reports waiting for the check worker; when full, a report is refused with a
    /// RESOURCE_EXHAUSTED SyncError (default 1024).
    pub queue_capacity: usize,
    /// Most reports checked in one batch; reports of the same model version share one tract
    /// call (default 256).
    pub max_batch: usize,
}

/// Settings of the engine thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Commands waiting for the engine; when full, calls fail with RESOURCE_EXHAUSTED
    /// (default 8192).
    pub queue_capacity: usize,
    /// The most changes applied before one durable commit: a command counts one, an
    /// UpdateDesiredBatch call its updates (default 4096).
    pub max_round: usize,
    /// Rounds whose commit may be in flight at once: the engine applies the next round while
    /// the previous ones commit (default 4; 1 waits for each commit before the next round).
    pub max_in_flight: usize,
}

/// Settings of the redb store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Writes waiting for the committer (default 1024).
    pub queue_capacity: usize,
    /// The most writes in one commit (default 8192).
    pub max_batch: usize,
    /// redb's page cache in MiB (default 64). Twins are read from the file only at start, so
    /// the cache mostly serves commits; redb's own default (1 GiB) would hold much of the file.
    pub cache_mib: usize,
    /// How long accepted telemetry batches are kept, in seconds (default 86400, one day): a
    /// device's older batches are removed when it stores a new one. 0 stores no telemetry
    /// (batches are checked and counted only).
    pub telemetry_retention_s: u64,
}

/// Settings of Twins.Watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// Change events kept in memory for resuming watchers (default 65536). A watcher that asks
    /// for an older revision gets OUT_OF_RANGE.
    pub history: usize,
    /// How many events a live watcher may fall behind before it is ended with
    /// RESOURCE_EXHAUSTED (default 4096).
    pub lag: usize,
    /// Messages queued per watcher towards the network (default 256).
    pub buffer: usize,
}

/// Settings of DeviceSync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Deltas queued per device stream; a device that falls this far behind is disconnected
    /// with RESOURCE_EXHAUSTED and gets the whole delta when it reconnects (default 64).
    pub outbound_capacity: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            data_dir: PathBuf::from("./twin-data"),
            shutdown_grace_ms: 5000,
            limits: Limits::default(),
            engine: EngineConfig::default(),
            store: StoreConfig::default(),
            watch: WatchConfig::default(),
            sync: SyncConfig::default(),
            auth: AuthConfig::default(),
            metrics: MetricsConfig::default(),
            tls: TlsConfig::default(),
            models_dir: PathBuf::from(crate::models::DEFAULT_MODELS_DIR),
            scenario_dir: PathBuf::from("scenarios"),
            simulation: SimulationConfig::default(),
            inference: InferenceConfig::default(),
        }
    }
}

impl Default for SimulationConfig {
    fn default() -> Self {
        SimulationConfig {
            max_running: 2,
            max_kept: 100,
            max_memory_bytes: 1 << 30,
        }
    }
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            tolerance: 1e-4,
            queue_capacity: 1024,
            max_batch: 256,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            queue_capacity: 8192,
            max_round: 4096,
            max_in_flight: 4,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            queue_capacity: 1024,
            max_batch: 8192,
            cache_mib: 64,
            telemetry_retention_s: 86_400,
        }
    }
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            history: 65536,
            lag: 4096,
            buffer: 256,
        }
    }
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig { outbound_capacity: 64 }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read the config file: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the settings.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with the line, column and key.
        message: String,
    },
    /// A value is out of range.
    #[error("{path}: {field}: {reason}")]
    Invalid {
        /// The file (or `defaults`).
        path: PathBuf,
        /// The setting, as `engine.queue_capacity`.
        field: &'static str,
        /// What is wrong, with the value.
        reason: String,
    },
}

impl ServeConfig {
    /// Reads a config file; settings it does not name keep their defaults.
    ///
    /// # Errors
    /// `Read`, `Parse` (unknown keys included) or `Invalid`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        ServeConfig::parse(&text, path)
    }

    /// Parses config text; `path` names it in errors.
    ///
    /// # Errors
    /// `Parse` or `Invalid`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: ServeConfig = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: error.to_string().trim_end().to_owned(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks ranges: every queue and buffer must hold at least one entry.
    ///
    /// # Errors
    /// `Invalid`, naming the setting.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let positive = [
            ("engine.queue_capacity", self.engine.queue_capacity),
            ("engine.max_round", self.engine.max_round),
            ("engine.max_in_flight", self.engine.max_in_flight),
            ("store.queue_capacity", self.store.queue_capacity),
            ("store.max_batch", self.store.max_batch),
            ("watch.history", self.watch.history),
            ("watch.lag", self.watch.lag),
            ("watch.buffer", self.watch.buffer),
            ("sync.outbound_capacity", self.sync.outbound_capacity),
            ("simulation.max_running", self.simulation.max_running),
            ("simulation.max_kept", self.simulation.max_kept),
            ("inference.queue_capacity", self.inference.queue_capacity),
            ("inference.max_batch", self.inference.max_batch),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    field,
                    reason: "must be at least 1, got 0".to_owned(),
                });
            }
        }
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason,
        };
        let tolerance = self.inference.tolerance;
        if !(tolerance.is_finite() && tolerance >= 0.0) {
            return Err(invalid(
                "inference.tolerance",
                format!("must be a finite number of at least 0, got {tolerance}"),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        let tokens = self
            .auth
            .operator_tokens
            .iter()
            .map(|token| ("auth.operator_tokens", token))
            .chain(
                self.auth
                    .devices
                    .iter()
                    .map(|device| ("auth.devices.token", &device.token)),
            );
        for (field, token) in tokens {
            if token.trim().is_empty() || token.trim() != token {
                return Err(invalid(
                    field,
                    "a token must not be empty or start or end with whitespace".to_owned(),
                ));
            }
            if !seen.insert(token.as_str()) {
                return Err(invalid(field, "the same token is listed twice".to_owned()));
            }
        }
        for device in &self.auth.devices {
            self.limits
                .check_id("device_id", &device.device_id)
                .map_err(|error| invalid("auth.devices.device_id", error.to_string()))?;
        }
        if let Some((missing, present)) = self.tls.incomplete() {
            return Err(invalid(missing, format!("must be set together with {present}")));
        }
        Ok(())
    }

    /// The config as TOML text (what `twin print-config` prints).
    ///
    /// # Errors
    /// Only if serialization fails, which the types here do not allow.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        let text = toml::to_string(self)?;
        Ok(self.tls.annotate(text))
    }

    /// The database file: `<data_dir>/twin.redb`.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join(DATABASE_FILE)
    }

    /// The store's options.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            queue_capacity: self.store.queue_capacity,
            max_batch: self.store.max_batch,
            cache_bytes: self.store.cache_mib.saturating_mul(1 << 20),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = ServeConfig::default().to_toml().expect("toml");
        let parsed = ServeConfig::parse(&text, Path::new("defaults")).expect("parse");
        assert_eq!(parsed, ServeConfig::default());
    }

    #[test]
    fn a_partial_file_keeps_the_other_defaults() {
        let parsed = ServeConfig::parse("[engine]\nmax_round = 7\n", Path::new("x.toml")).expect("parse");
        assert_eq!(parsed.engine.max_round, 7);
        assert_eq!(parsed.engine.queue_capacity, EngineConfig::default().queue_capacity);
        assert_eq!(parsed.listen, ServeConfig::default().listen);
    }

    #[test]
    fn unknown_keys_and_zero_sizes_are_refused_with_their_name() {
        let unknown = ServeConfig::parse("[engine]\nqueue = 1\n", Path::new("x.toml")).expect_err("unknown");
        assert!(unknown.to_string().contains("queue"), "{unknown}");
        let zero = ServeConfig::parse("[watch]\nhistory = 0\n", Path::new("x.toml")).expect_err("zero");
        assert_eq!(zero.to_string(), "x.toml: watch.history: must be at least 1, got 0");
    }

    #[test]
    fn tokens_must_be_distinct_and_devices_valid() {
        let twice = "[auth]\noperator_tokens = [\"a\"]\n[[auth.devices]]\ndevice_id = \"d\"\ntoken = \"a\"\n";
        let error = ServeConfig::parse(twice, Path::new("x.toml")).expect_err("duplicate");
        assert_eq!(
            error.to_string(),
            "x.toml: auth.devices.token: the same token is listed twice"
        );
        let bad_id = "[[auth.devices]]\ndevice_id = \"a b\"\ntoken = \"t\"\n";
        let error = ServeConfig::parse(bad_id, Path::new("x.toml")).expect_err("bad id");
        assert!(
            error
                .to_string()
                .starts_with("x.toml: auth.devices.device_id: device_id"),
            "{error}"
        );
        let empty = "[auth]\noperator_tokens = [\"\"]\n";
        assert!(ServeConfig::parse(empty, Path::new("x.toml")).is_err());
    }
}
