//! The `twin` command's library: scenario commands (`run`, `validate`, `metrics`) and the
//! pieces of IO around the pure core (files, recordings, timing), and `serve`, the live twin gRPC
//! server over the twin domain (`twins`) and its durable store (`store`).

pub mod clock;
pub mod files;
pub mod models;
pub mod recording;
pub mod run;
pub mod serve;
pub mod store;
pub mod summary;
pub mod timing;
pub mod twins;

/// Exit code: every criterion passed (or the files are valid).
pub const EXIT_OK: u8 = 0;
/// Exit code: a criterion failed.
pub const EXIT_CRITERIA_FAILED: u8 = 1;
/// Exit code: invalid input (a scenario, a flag, an unwritable output folder).
pub const EXIT_INVALID: u8 = 2;
