//! The pure simulation core of the edge-fleet digital twin.
//!
//! A [`scenario::Scenario`] (parsed from TOML) describes a fleet of devices with sensors behind
//! gateways, a storyboard of faults and mode changes, and pass/fail criteria. A
//! [`engine::Simulation`] builds a bevy_ecs world from it and advances a simulated clock step by
//! step; [`engine::Simulation::finish`] returns a [`report::Report`] that depends only on the
//! scenario and its seed.
//!
//! No IO and no wall clock here: files reach the core as text through
//! [`scenario::FileSource`], and pacing against real time is the driver's business.

pub mod camera;
pub mod components;
pub mod criteria;
pub mod engine;
pub mod fault;
pub mod features;
pub mod hardware;
pub mod inference;
pub mod load;
pub mod metrics;
pub mod models;
pub mod normal;
pub mod replay;
pub mod report;
pub mod rng;
pub mod scenario;
pub mod schedule;
pub mod signal;
pub mod stats;
pub mod systems;
pub mod time;

pub use engine::{RecordedSample, RunOptions, Simulation, init_threads};
pub use report::Report;
pub use scenario::{FileSource, LoadOptions, NoFiles, Scenario, ScenarioError};
