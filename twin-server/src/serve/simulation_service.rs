//! The `Simulation` service: what-if runs of scenarios in virtual time on the server, each on
//! a worker thread of its own (never the engine thread), optionally forked from live twins.
//!
//! StartSimulation validates the scenario (on a blocking thread: validation reads files and
//! compiles models), reserves one of `simulation.max_running` slots and starts the run as a
//! tracked blocking task. The run steps the world as fast as it goes (virtual time: the
//! scenario's pacing is ignored) and publishes its status on a watch channel at most every
//! [`PROGRESS_INTERVAL`]; the report is `report.json`'s text ([`crate::run::report_json`]).
//! A fork reads the selected twins from one published snapshot and never writes to them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};
use twin_core::scenario::{ExternalDevice, ExternalFleet};
use twin_core::{FileSource, LoadOptions, RunOptions, Scenario, ScenarioError, Simulation};
use twin_proto::v1 as pb;
use twin_proto::v1::simulation_server;

use super::config::SimulationConfig;
use super::convert::{ERROR_DOMAIN, invalid_argument, timestamp};
use super::engine::Shared;
use super::filter::Filter;
use crate::files::ScenarioFiles;
use crate::twins::{ModelKey, Timestamp};

/// Shortest wall time between two progress statuses of one simulation.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// One simulation: its status (watched) and, once finished, its report.
#[derive(Debug)]
struct Entry {
    status: watch::Sender<pb::SimulationStatus>,
    report: OnceLock<Arc<String>>,
}

impl Entry {
    fn status(&self) -> pb::SimulationStatus {
        self.status.borrow().clone()
    }
}

/// The simulations the server knows, by id, in start order.
#[derive(Debug, Default)]
struct Registry {
    by_id: HashMap<String, (u64, Arc<Entry>)>,
    order: BTreeMap<u64, String>,
}

/// The Simulation service.
#[derive(Debug, Clone)]
pub struct SimulationService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    scenario_dir: PathBuf,
    config: SimulationConfig,
    shared: Arc<Shared>,
    simulations: Mutex<Registry>,
    active: Arc<AtomicUsize>,
    next: AtomicU64,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// A reserved simulation slot, released when the run ends (or never starts).
struct Slot {
    active: Arc<AtomicUsize>,
    shared: Arc<Shared>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
        self.shared.counters.simulations_running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The live twins a simulation starts from.
#[derive(Debug, Default)]
struct Forked {
    fleet: ExternalFleet,
    twins: u64,
    revision: u64,
}

impl SimulationService {
    /// The service: scenario paths are relative to `scenario_dir`; forks read `shared`'s
    /// snapshot; runs are tracked tasks that stop at `shutdown`.
    pub fn new(
        scenario_dir: PathBuf,
        config: SimulationConfig,
        shared: Arc<Shared>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        SimulationService {
            inner: Arc::new(Inner {
                scenario_dir,
                config,
                shared,
                simulations: Mutex::new(Registry::default()),
                active: Arc::new(AtomicUsize::new(0)),
                next: AtomicU64::new(1),
                shutdown,
                tasks,
            }),
        }
    }

    fn entry(&self, id: &str) -> Result<Arc<Entry>, Status> {
        let simulations = self
            .inner
            .simulations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match simulations.by_id.get(id) {
            Some((_, entry)) => Ok(Arc::clone(entry)),
            None => Err(not_found(id)),
        }
    }

    fn reserve(&self) -> Result<Slot, Status> {
        let max = self.inner.config.max_running;
        let reserved = self
            .inner
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |active| {
                (active < max).then_some(active + 1)
            });
        if reserved.is_err() {
            let mut metadata = HashMap::new();
            metadata.insert("limit".to_owned(), "simulation.max_running".to_owned());
            metadata.insert("max".to_owned(), max.to_string());
            return Err(Status::with_error_details(
                Code::ResourceExhausted,
                format!(
                    "{max} simulations are queued or running, the most this server runs at once (simulation.max_running); retry when one ends"
                ),
                ErrorDetails::with_error_info("TOO_MANY_SIMULATIONS", ERROR_DOMAIN, metadata),
            ));
        }
        self.inner
            .shared
            .counters
            .simulations_running
            .fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            active: Arc::clone(&self.inner.active),
            shared: Arc::clone(&self.inner.shared),
        })
    }

    /// The scenario's file name for messages, its text, and the folder its files are read
    /// from.
    fn source(
        &self,
        scenario: Option<pb::start_simulation_request::Scenario>,
    ) -> Result<(String, String, PathBuf), Status> {
        use pb::start_simulation_request::Scenario as Source;
        match scenario {
            None => Err(invalid_argument(
                "scenario",
                "not set: send scenario_toml (the text) or scenario_path (a file under the server's scenario_dir)",
            )),
            Some(Source::ScenarioToml(text)) => {
                if text.trim().is_empty() {
                    return Err(invalid_argument("scenario_toml", "empty"));
                }
                Ok(("scenario_toml".to_owned(), text, self.inner.scenario_dir.clone()))
            }
            Some(Source::ScenarioPath(path)) => {
                let file = resolve_under(&self.inner.scenario_dir, &path)?;
                let text = std::fs::read_to_string(&file).map_err(|error| {
                    if error.kind() == std::io::ErrorKind::NotFound {
                        Status::not_found(format!(
                            "scenario_path: no scenario {path:?} in the server's scenario_dir"
                        ))
                    } else {
                        invalid_argument("scenario_path", format!("cannot read {path:?}: {error}"))
                    }
                })?;
                let folder = file.parent().map(Path::to_path_buf).unwrap_or_default();
                Ok((path, text, folder))
            }
        }
    }

    /// Reads the twins a fork selects from one snapshot.
    fn fork(&self, fork: Option<pb::Fork>) -> Result<Forked, Status> {
        let Some(fork) = fork else {
            return Ok(Forked::default());
        };
        let filter = Filter::new("fork.selector", fork.selector)?;
        let snapshot = self.inner.shared.snapshot.read();
        let mut forked = Forked {
            revision: snapshot.revision,
            ..Forked::default()
        };
        for published in snapshot.twins.values() {
            if !filter.matches(published) {
                continue;
            }
            let twin = &published.twin;
            let Some(group) = twin.group() else {
                return Err(invalid_argument(
                    "fork.selector",
                    format!("twin {:?} has no group, so no scenario group to run in", twin.id()),
                ));
            };
            // The desired model, deployed at t=0 (instantly), wins over the reported one.
            let model = fork_model(&twin.desired()).or_else(|| fork_model(&twin.reported()));
            forked
                .fleet
                .groups
                .entry(group.to_owned())
                .or_default()
                .push(ExternalDevice {
                    id: twin.id().to_owned(),
                    model,
                });
            forked.twins += 1;
        }
        if forked.twins == 0 {
            return Err(invalid_argument(
                "fork.selector",
                "selects no twin: a fork needs at least one",
            ));
        }
        Ok(forked)
    }
}

/// The files a scenario names (replays, the model registry), read relative to its folder but
/// never outside the server's scenario_dir.
struct ConfinedFiles {
    files: ScenarioFiles,
    folder: PathBuf,
    root: PathBuf,
}

impl ConfinedFiles {
    fn check(&self, path: &str) -> Result<(), String> {
        let leaves = || format!("cannot read `{path}`: it leaves the server's scenario_dir");
        if Path::new(path).components().any(|component| {
            matches!(
                component,
                Component::ParentDir | Component::RootDir | Component::Prefix(_)
            )
        }) {
            return Err(leaves());
        }
        if let (Ok(root), Ok(resolved)) = (self.root.canonicalize(), self.folder.join(path).canonicalize())
            && !resolved.starts_with(root)
        {
            return Err(leaves());
        }
        Ok(())
    }
}

impl FileSource for ConfinedFiles {
    fn read_to_string(&self, path: &str) -> Result<String, String> {
        self.check(path)?;
        self.files.read_to_string(path)
    }

    fn read_bytes(&self, path: &str) -> Result<Vec<u8>, String> {
        self.check(path)?;
        self.files.read_bytes(path)
    }
}

/// The model a twin document names under `"model"`, if it names one a simulation can load
/// (a name and a version from 1).
fn fork_model(document: &serde_json::Map<String, serde_json::Value>) -> Option<(String, u32)> {
    let model = ModelKey::from_reported(document)?;
    let version = u32::try_from(model.version).ok().filter(|version| *version > 0)?;
    (!model.name.is_empty()).then_some((model.name, version))
}

/// `relative` inside `dir`, refusing absolute paths, `..` and anything (a symbolic link) that
/// resolves outside `dir`.
fn resolve_under(dir: &Path, relative: &str) -> Result<PathBuf, Status> {
    let field = "scenario_path";
    if relative.is_empty() {
        return Err(invalid_argument(field, "empty"));
    }
    let path = Path::new(relative);
    for component in path.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(invalid_argument(
                    field,
                    format!("{relative:?} leaves the server's scenario_dir: give a path relative to it, without '..'"),
                ));
            }
        }
    }
    let joined = dir.join(path);
    if let (Ok(base), Ok(resolved)) = (dir.canonicalize(), joined.canonicalize())
        && !resolved.starts_with(&base)
    {
        return Err(invalid_argument(
            field,
            format!("{relative:?} leaves the server's scenario_dir (a link points outside it)"),
        ));
    }
    Ok(joined)
}

fn not_found(id: &str) -> Status {
    let mut metadata = HashMap::new();
    metadata.insert("simulation_id".to_owned(), id.to_owned());
    Status::with_error_details(
        Code::NotFound,
        format!("no simulation {id:?}"),
        ErrorDetails::with_error_info("SIMULATION_NOT_FOUND", ERROR_DOMAIN, metadata),
    )
}

/// Every problem of a scenario as INVALID_ARGUMENT: the message lists them all
/// (`file:line:column: path: reason`), the BadRequest has one violation per problem.
fn scenario_status(error: &ScenarioError, source_field: &str) -> Status {
    let violations: Vec<FieldViolation> = error
        .problems
        .iter()
        .map(|problem| {
            let field = if problem.path.is_empty() {
                source_field.to_owned()
            } else {
                problem.path.clone()
            };
            FieldViolation::new(
                field,
                format!(
                    "{}:{}:{}: {}",
                    error.file, problem.line, problem.column, problem.message
                ),
            )
        })
        .collect();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("the scenario does not validate:\n{error}"),
        ErrorDetails::with_bad_request(violations),
    )
}

fn now() -> Timestamp {
    Timestamp::from_unix_nanos(crate::clock::unix_nanos_now())
}

fn duration_nanos(nanos: u64) -> i64 {
    i64::try_from(nanos).unwrap_or(i64::MAX)
}

fn is_final(state: i32) -> bool {
    state == pb::SimulationState::Finished as i32 || state == pb::SimulationState::Failed as i32
}

#[tonic::async_trait]
impl simulation_server::Simulation for SimulationService {
    type WatchSimulationStream = ReceiverStream<Result<pb::SimulationStatus, Status>>;

    async fn start_simulation(
        &self,
        request: Request<pb::StartSimulationRequest>,
    ) -> Result<Response<pb::SimulationStatus>, Status> {
        let request = request.into_inner();
        let slot = self.reserve()?;
        let source_field = match &request.scenario {
            Some(pb::start_simulation_request::Scenario::ScenarioPath(_)) => "scenario_path",
            _ => "scenario_toml",
        };
        let (file, text, folder) = self.source(request.scenario)?;
        let forked = self.fork(request.fork)?;
        let options = LoadOptions {
            seed: request.seed,
            max_memory_bytes: self.inner.config.max_memory_bytes,
        };
        let fleet = forked.fleet;
        let files = ConfinedFiles {
            files: ScenarioFiles::in_folder(&folder),
            folder,
            root: self.inner.scenario_dir.clone(),
        };
        let loaded =
            tokio::task::spawn_blocking(move || Scenario::from_toml_with_fleet(&file, &text, &files, options, &fleet))
                .await
                .map_err(|error| Status::internal(format!("scenario validation failed: {error}")))?;
        let scenario = loaded.map_err(|error| scenario_status(&error, source_field))?;

        let number = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let created = now();
        let id = format!("sim-{:x}-{number}", created.unix_nanos() / 1_000_000);
        let status = pb::SimulationStatus {
            simulation_id: id.clone(),
            label: request.label,
            state: pb::SimulationState::Queued as i32,
            sim_time_nanos: 0,
            sim_duration_nanos: duration_nanos(scenario.clock.duration.0),
            progress: 0.0,
            devices: u64::from(scenario.device_count()),
            forked_twins: forked.twins,
            fork_revision: forked.revision,
            seed: scenario.seed,
            created_at: Some(timestamp(created)),
            ..pb::SimulationStatus::default()
        };
        let (sender, _receiver) = watch::channel(status.clone());
        let entry = Arc::new(Entry {
            status: sender,
            report: OnceLock::new(),
        });
        self.remember(number, &id, Arc::clone(&entry));
        self.inner
            .shared
            .counters
            .simulations_started
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            simulation_id = %id,
            scenario = %scenario.name,
            devices = status.devices,
            forked_twins = forked.twins,
            fork_revision = forked.revision,
            seed = scenario.seed,
            "simulation started"
        );
        let stop = self.inner.shutdown.clone();
        self.inner
            .tasks
            .spawn_blocking(move || run_simulation(scenario, &entry, &stop, slot));
        Ok(Response::new(status))
    }

    async fn get_simulation(
        &self,
        request: Request<pb::GetSimulationRequest>,
    ) -> Result<Response<pb::SimulationStatus>, Status> {
        let entry = self.entry(&request.into_inner().simulation_id)?;
        Ok(Response::new(entry.status()))
    }

    async fn watch_simulation(
        &self,
        request: Request<pb::WatchSimulationRequest>,
    ) -> Result<Response<Self::WatchSimulationStream>, Status> {
        let entry = self.entry(&request.into_inner().simulation_id)?;
        let mut statuses = entry.status.subscribe();
        let (sender, receiver) = mpsc::channel(4);
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            loop {
                let status = statuses.borrow_and_update().clone();
                let last = is_final(status.state);
                if sender.send(Ok(status)).await.is_err() || last {
                    return;
                }
                tokio::select! {
                    changed = statuses.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    () = shutdown.cancelled() => {
                        let _sent = sender.try_send(Err(Status::unavailable("the server is shutting down")));
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn get_report(
        &self,
        request: Request<pb::GetReportRequest>,
    ) -> Result<Response<pb::SimulationReport>, Status> {
        let id = request.into_inner().simulation_id;
        let entry = self.entry(&id)?;
        let status = entry.status();
        match (pb::SimulationState::try_from(status.state), entry.report.get()) {
            (Ok(pb::SimulationState::Finished), Some(report)) => Ok(Response::new(pb::SimulationReport {
                simulation_id: id,
                report_json: report.as_str().to_owned(),
                criteria_passed: status.criteria_passed,
            })),
            (Ok(pb::SimulationState::Failed), _) => Err(Status::failed_precondition(format!(
                "simulation {id:?} failed, it has no report: {}",
                status.error
            ))),
            _ => Err(Status::failed_precondition(format!(
                "simulation {id:?} is still running ({:.0}% of its virtual time): its report is ready once it is FINISHED",
                status.progress * 100.0
            ))),
        }
    }
}

impl SimulationService {
    /// Keeps a new simulation, forgetting the oldest finished ones beyond `max_kept`.
    fn remember(&self, number: u64, id: &str, entry: Arc<Entry>) {
        let mut simulations = self
            .inner
            .simulations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        simulations.by_id.insert(id.to_owned(), (number, entry));
        simulations.order.insert(number, id.to_owned());
        let finished: Vec<u64> = simulations
            .order
            .iter()
            .filter(|(_, id)| {
                simulations
                    .by_id
                    .get(*id)
                    .is_some_and(|(_, entry)| is_final(entry.status.borrow().state))
            })
            .map(|(number, _)| *number)
            .collect();
        let excess = finished.len().saturating_sub(self.inner.config.max_kept);
        for number in finished.into_iter().take(excess) {
            if let Some(id) = simulations.order.remove(&number) {
                simulations.by_id.remove(&id);
            }
        }
    }
}

/// Runs a simulation to its end on the calling (blocking) thread, publishing its status.
fn run_simulation(scenario: Scenario, entry: &Entry, stop: &CancellationToken, slot: Slot) {
    let _slot = slot;
    let end = scenario.clock.duration.0;
    entry
        .status
        .send_modify(|status| status.state = pb::SimulationState::Running as i32);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut simulation = Simulation::new(Arc::new(scenario), RunOptions::default());
        let mut published = Instant::now();
        while simulation.step() {
            if stop.is_cancelled() {
                return Err("stopped by server shutdown".to_owned());
            }
            if published.elapsed() >= PROGRESS_INTERVAL {
                published = Instant::now();
                let reached = simulation.now().0;
                entry.status.send_modify(|status| {
                    status.sim_time_nanos = duration_nanos(reached);
                    status.progress = if end == 0 { 1.0 } else { reached as f64 / end as f64 };
                });
            }
        }
        let reached = simulation.now().0;
        let report = simulation.finish();
        let passed = (!report.criteria.is_empty()).then_some(report.passed);
        Ok((crate::run::report_json(&report), passed, reached))
    }));
    let finished_at = Some(timestamp(now()));
    match outcome {
        Ok(Ok((report, passed, reached))) => {
            let _set = entry.report.set(Arc::new(report));
            entry.status.send_modify(|status| {
                status.state = pb::SimulationState::Finished as i32;
                status.sim_time_nanos = duration_nanos(reached);
                status.progress = 1.0;
                status.criteria_passed = passed;
                status.finished_at = finished_at;
            });
            tracing::info!(simulation_id = %entry.status().simulation_id, "simulation finished");
        }
        Ok(Err(error)) => fail(entry, error, finished_at),
        Err(_) => fail(
            entry,
            "the simulation panicked (a bug in the simulation core)".to_owned(),
            finished_at,
        ),
    }
}

fn fail(entry: &Entry, error: String, finished_at: Option<prost_types::Timestamp>) {
    tracing::warn!(simulation_id = %entry.status().simulation_id, %error, "simulation failed");
    entry.status.send_modify(|status| {
        status.state = pb::SimulationState::Failed as i32;
        status.error = error;
        status.finished_at = finished_at;
    });
}
