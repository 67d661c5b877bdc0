//! The engine: one thread owns every twin ([`Twins`]), the fleet-wide revision counter and the
//! device sessions. Handlers send it [`Command`]s over a bounded channel and await a oneshot
//! reply.
//!
//! The engine works in rounds: it takes every queued command (up to `max_round`), applies each
//! to the twins in memory, writes every twin the round changed in one store batch, waits for the
//! durable commit, and only then publishes: deltas to device sessions, the new snapshot, the
//! change events to watchers, and the replies. A reply is therefore never sent before its change
//! is on disk, and concurrent callers share one commit (group commit at the engine; the store
//! would also group writes from several submitters). Should a commit fail, the round's changes
//! are not published, their callers get UNAVAILABLE, and the engine refuses every later change:
//! memory is then ahead of the disk and only a restart (which reloads the disk) is safe.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use twin_proto::v1 as pb;

use super::convert::{self, json_text, key_reconciliations, model_json, timestamp, twin_status, unix_nanos_i64};
use super::filter::Filter;
use super::history::{ChangeRecord, History};
use super::models_service::Deployed;
use super::snapshot::{ConnectionState, PublishedTwin, SharedSnapshot, Snapshot};
use super::telemetry_service::{TelemetryLedger, TelemetryNotices};
use crate::store::{PendingWrite, Revisions, Store, StoreError, WriteBatch};
use crate::twins::{
    CheckOutcome, DesiredAck, InferenceCheck, NewTwin, Reconciliation, SectionPatch, Timestamp, Twin, TwinError, Twins,
    json_equal,
};

/// A reply to a command: its result, sent after the change is durable.
pub type Reply<T> = oneshot::Sender<Result<T, Status>>;

/// An accepted change, as its caller learns it.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The twin's version after the change.
    pub version: u64,
    /// The fleet-wide revision of the change.
    pub revision: u64,
    /// Server time of the change.
    pub at: Timestamp,
    /// Whether desired and reported agree after the change.
    pub delta_empty: bool,
    /// The twin after the change (before it, for a deletion).
    pub twin: Arc<PublishedTwin>,
}

/// A device stream's link to the engine: where its deltas go and why it ended.
#[derive(Debug, Clone)]
pub struct SessionLink {
    /// Unique per stream since the server started.
    pub session_id: u64,
    /// Deltas for the device, in order. The engine never waits on it: a full queue ends the
    /// session.
    pub deltas: mpsc::Sender<pb::ServerMessage>,
    /// Set by the engine when it ends the session (replaced, too slow, shutdown).
    pub end: Arc<OnceLock<Status>>,
}

/// What a device says in its Hello.
#[derive(Debug, Clone)]
pub struct HelloInput {
    /// The device id.
    pub device_id: String,
    /// The group, used only when the Hello registers the twin.
    pub group: Option<String>,
    /// The last desired version the device saw.
    pub last_desired_version: u64,
    /// The model the device runs, as the JSON kept under reported `"model"`.
    pub model: Option<Value>,
    /// The firmware, kept under reported `"firmware"` when not empty.
    pub firmware: Option<String>,
}

/// A desired patch for one twin.
#[derive(Debug)]
pub struct DesiredUpdate {
    /// The twin.
    pub device_id: String,
    /// The patch.
    pub patch: SectionPatch,
    /// The patch as received, for the change event.
    pub patch_json: String,
    /// Expected version.
    pub expected: Option<u64>,
}

/// A request to the engine.
#[derive(Debug)]
pub enum Command {
    /// Twins.CreateTwin.
    Create {
        /// The twin.
        new: NewTwin,
        /// The result.
        reply: Reply<Applied>,
    },
    /// Twins.UpdateDesired.
    UpdateDesired {
        /// The update.
        update: DesiredUpdate,
        /// The result.
        reply: Reply<Applied>,
    },
    /// Twins.UpdateDesiredBatch: each update applied on its own, in order, in one round.
    UpdateDesiredBatch {
        /// The updates.
        updates: Vec<DesiredUpdate>,
        /// One result per update, in order.
        reply: Reply<Vec<Result<Applied, Status>>>,
    },
    /// Twins.UpdateTags.
    UpdateTags {
        /// The twin.
        device_id: String,
        /// The patch.
        patch: SectionPatch,
        /// The patch as received.
        patch_json: String,
        /// Expected version.
        expected: Option<u64>,
        /// The result.
        reply: Reply<Applied>,
    },
    /// A device's reported patch.
    UpdateReported {
        /// The twin.
        device_id: String,
        /// The patch.
        patch: SectionPatch,
        /// The patch as received.
        patch_json: String,
        /// The device's time of the change.
        source_time: Option<Timestamp>,
        /// The result.
        reply: Reply<Applied>,
    },
    /// A device's acknowledgements of desired keys.
    Acknowledge {
        /// The twin.
        device_id: String,
        /// The acknowledgements.
        acks: Vec<DesiredAck>,
        /// The result.
        reply: Reply<Applied>,
    },
    /// Twins.DeleteTwin.
    Delete {
        /// The twin.
        device_id: String,
        /// Expected version.
        expected: Option<u64>,
        /// The result.
        reply: Reply<Applied>,
    },
    /// A device stream opened (its Hello).
    Connect {
        /// The Hello.
        hello: HelloInput,
        /// Where the device's deltas go.
        session: SessionLink,
        /// Ok once the CONNECTED delta is queued on the session.
        reply: Reply<()>,
    },
    /// A device stream ended.
    Disconnect {
        /// The device.
        device_id: String,
        /// The stream that ended; ignored if a newer stream replaced it.
        session_id: u64,
    },
    /// Models.DeployModel: sets desired `"model"` on every twin the filter selects.
    DeployModel {
        /// The twins.
        filter: Filter,
        /// The object to set under desired `"model"`.
        model: Value,
        /// The counts and the last revision.
        reply: Reply<Deployed>,
    },
    /// Records the outcome of live inference checks on a twin (no version, no revision).
    RecordInference {
        /// The twin.
        device_id: String,
        /// The checks, in the order the device sent the reports.
        checks: Vec<CheckOutcome>,
        /// The twin's inference check after recording.
        reply: Reply<InferenceCheck>,
    },
    /// Finish the queued commands and stop.
    Shutdown,
}

impl Command {
    /// The changes the command may make, which a round's size (`engine.max_round`) counts.
    fn weight(&self) -> usize {
        match self {
            Command::UpdateDesiredBatch { updates, .. } => updates.len().max(1),
            _ => 1,
        }
    }
}

/// Counters of the engine and the streams, for logs and metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Rounds that committed changes.
    pub commits: AtomicU64,
    /// Changes committed.
    pub changes: AtomicU64,
    /// Commands refused (domain errors).
    pub refused: AtomicU64,
    /// Duration of the last commit, in microseconds.
    pub last_commit_micros: AtomicU64,
    /// Sum of the durations of all commits, in microseconds.
    pub commit_micros_total: AtomicU64,
    /// Device streams open now.
    pub connected_devices: AtomicU64,
    /// Desired deltas queued to device streams.
    pub deltas_sent: AtomicU64,
    /// Telemetry batches accepted on DeviceSync streams and by the Telemetry service.
    pub telemetry_batches: AtomicU64,
    /// Telemetry samples accepted on DeviceSync streams and by the Telemetry service.
    pub telemetry_samples: AtomicU64,
    /// Telemetry batches the Telemetry service rejected.
    pub telemetry_rejected: AtomicU64,
    /// Inference reports received on DeviceSync streams.
    pub inference_reports: AtomicU64,
    /// Inference reports checked (the twin re-ran the model and compared).
    pub inference_checked: AtomicU64,
    /// Checks whose outputs agreed within the tolerance.
    pub inference_agreed: AtomicU64,
    /// Checks that diverged: outputs beyond the tolerance, or a model version the twin cannot
    /// run.
    pub inference_diverged: AtomicU64,
    /// Inference reports refused (bad width, queue full, model not loadable).
    pub inference_refused: AtomicU64,
    /// Simulations queued or running now.
    pub simulations_running: AtomicU64,
    /// Simulations accepted since the server started.
    pub simulations_started: AtomicU64,
}

/// What the engine publishes and the handlers read.
#[derive(Debug)]
pub struct Shared {
    /// Committed twins.
    pub snapshot: SharedSnapshot,
    /// Committed change events.
    pub history: History,
    /// Counters.
    pub counters: Counters,
    /// Telemetry per device, counted by the Telemetry service (not by the engine: ingest
    /// changes no twin).
    pub telemetry: TelemetryLedger,
    /// Accepted telemetry batches, for Watch streams with `include_telemetry`.
    pub telemetry_notices: TelemetryNotices,
}

/// A cloneable handle to the engine.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    capacity: usize,
}

impl EngineHandle {
    /// Sends a command built around a reply channel and waits for the reply.
    ///
    /// # Errors
    /// The command's own error; RESOURCE_EXHAUSTED when the engine queue is full (nothing was
    /// done, retry later); UNAVAILABLE when the engine has stopped.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Status> {
        let (reply, answer) = oneshot::channel();
        self.commands.try_send(make(reply)).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => Status::resource_exhausted(format!(
                "the engine queue is full ({} commands waiting); retry later",
                self.capacity
            )),
            mpsc::error::TrySendError::Closed(_) => Status::unavailable("the server is shutting down"),
        })?;
        answer
            .await
            .unwrap_or_else(|_| Err(Status::unavailable("the server stopped before answering")))
    }

    /// Commands waiting in the engine's queue now.
    pub fn queue_depth(&self) -> usize {
        self.capacity.saturating_sub(self.commands.capacity())
    }

    /// Sends a command without a reply, waiting for room in the queue.
    pub async fn notify(&self, command: Command) {
        // A stopped engine has nothing left to notify.
        let _sent = self.commands.send(command).await;
    }
}

/// Starts the engine thread with the twins restored from the store.
///
/// # Errors
/// When the thread cannot be spawned.
pub fn start(
    twins: Twins,
    revisions: Revisions,
    store: Store,
    queue_capacity: usize,
    max_round: usize,
    max_in_flight: usize,
    history: History,
) -> std::io::Result<(EngineHandle, Arc<Shared>, JoinHandle<()>)> {
    let mut snapshot = Snapshot {
        revision: revisions.last,
        twins: BTreeMap::new(),
    };
    for twin in twins.iter_shared() {
        let revision = revisions.per_twin.get(twin.id()).copied().unwrap_or(0);
        snapshot.twins.insert(
            twin.id().to_owned(),
            Arc::new(PublishedTwin {
                twin: Arc::clone(twin),
                revision,
                connection: ConnectionState::default(),
            }),
        );
    }
    let shared = Arc::new(Shared {
        snapshot: SharedSnapshot::new(snapshot),
        history,
        counters: Counters::default(),
        telemetry: TelemetryLedger::default(),
        telemetry_notices: TelemetryNotices::default(),
    });
    let (sender, receiver) = mpsc::channel(queue_capacity.max(1));
    let engine = Engine {
        twins,
        revision: revisions.last,
        revisions: revisions.per_twin,
        connections: HashMap::new(),
        sessions: HashMap::new(),
        store,
        shared: Arc::clone(&shared),
        max_round: max_round.max(1),
        max_in_flight: max_in_flight.max(1),
        failed: None,
        last_now: Timestamp::default(),
    };
    let thread = std::thread::Builder::new()
        .name("twin-engine".to_owned())
        .spawn(move || engine.run(receiver))?;
    let handle = EngineHandle {
        commands: sender,
        capacity: queue_capacity.max(1),
    };
    Ok((handle, shared, thread))
}

type Deferred = Box<dyn FnOnce(Option<&Status>) + Send>;

/// Sends `result` once the round is durable; a failed commit turns a success into its error.
fn defer<T: Send + 'static>(reply: Reply<T>, result: Result<T, Status>) -> Deferred {
    Box::new(move |commit_error| {
        let answer = match (commit_error, result) {
            (Some(error), Ok(_)) => Err(error.clone()),
            (_, result) => result,
        };
        // A caller that went away does not need its answer.
        let _sent = reply.send(answer);
    })
}

/// Sends each result once the round is durable; a failed commit turns every success into its
/// error.
fn defer_each<T: Send + 'static>(reply: Reply<Vec<Result<T, Status>>>, results: Vec<Result<T, Status>>) -> Deferred {
    Box::new(move |commit_error| {
        let answer = match commit_error {
            Some(error) => results
                .into_iter()
                .map(|result| result.and_then(|_| Err(error.clone())))
                .collect(),
            None => results,
        };
        // A caller that went away does not need its answer.
        let _sent = reply.send(Ok(answer));
    })
}

/// How a round's writes stand.
enum Commit {
    /// The round changed nothing durable.
    Nothing,
    /// Submitted to the store.
    Waiting(PendingWrite),
    /// Could not be submitted.
    Failed(StoreError),
}

struct InFlight {
    commit: Commit,
    round: Round,
    started: Instant,
}

#[derive(Default)]
struct Round {
    /// The last revision taken by this round.
    revision: u64,
    touched: BTreeSet<String>,
    records: Vec<Arc<ChangeRecord>>,
    publish: BTreeMap<String, Option<Arc<PublishedTwin>>>,
    pushes: Vec<(String, u64, pb::ServerMessage)>,
    replies: Vec<Deferred>,
}

struct Session {
    link: SessionLink,
}

struct Engine {
    twins: Twins,
    revision: u64,
    revisions: HashMap<String, u64>,
    connections: HashMap<String, ConnectionState>,
    sessions: HashMap<String, Session>,
    store: Store,
    shared: Arc<Shared>,
    max_round: usize,
    max_in_flight: usize,
    failed: Option<Status>,
    last_now: Timestamp,
}

/// What a recorded change carries besides its kind.
#[derive(Default)]
struct ChangeDetails {
    patch_json: String,
    delta_json: String,
    source_time: Option<Timestamp>,
    acks: Vec<pb::DesiredAck>,
    reconciliation: Vec<pb::KeyReconciliation>,
}

impl Engine {
    /// Rounds are pipelined: while round N's commit is in flight, round N+1 is applied and
    /// submitted (the store's committer may then put both in one transaction). Rounds are
    /// published strictly in order, each only after its own commit.
    fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut in_flight: VecDeque<InFlight> = VecDeque::with_capacity(self.max_in_flight);
        let mut stop = false;
        // Waits for the oldest commit or the next command, whichever comes first (channels
        // only: no IO or timer driver). Without it the engine would sit out a whole commit
        // before applying a command that arrived meanwhile, and that command would wait for a
        // second commit.
        let waiter = tokio::runtime::Builder::new_current_thread().build().ok();
        let mut carried: Option<Command> = None;
        loop {
            let mut batch = Vec::new();
            let mut weight = 0;
            if let Some(command) = carried.take() {
                weight += command.weight();
                batch.push(command);
            }
            if !stop && in_flight.len() < self.max_in_flight {
                if in_flight.is_empty() && batch.is_empty() {
                    match commands.blocking_recv() {
                        Some(command) => {
                            weight += command.weight();
                            batch.push(command);
                        }
                        None => stop = true,
                    }
                }
                while !stop && weight < self.max_round {
                    match commands.try_recv() {
                        Ok(command) => {
                            weight += command.weight();
                            batch.push(command);
                        }
                        Err(_) => break,
                    }
                }
            }
            let received = !batch.is_empty();
            if received {
                let mut round = Round::default();
                for command in batch {
                    if matches!(command, Command::Shutdown) {
                        stop = true;
                    } else {
                        self.apply(command, &mut round);
                    }
                }
                round.revision = self.revision;
                let started = Instant::now();
                let commit = self.submit(&round);
                in_flight.push_back(InFlight { commit, round, started });
            }
            // Publish every round whose commit is done, in order; wait for the oldest when there
            // is nothing else to do (no new command, the pipeline is full, or stopping).
            let mut wait = !received || in_flight.len() >= self.max_in_flight || stop;
            let room = !stop && in_flight.len() < self.max_in_flight;
            while let Some(front) = in_flight.front_mut() {
                let outcome = match &mut front.commit {
                    Commit::Nothing => Some(Ok(())),
                    Commit::Failed(error) => Some(Err(error.to_string())),
                    Commit::Waiting(pending) => pending
                        .try_wait()
                        .map(|result| result.map(drop).map_err(|error| error.to_string())),
                };
                let outcome = match outcome {
                    Some(outcome) => outcome,
                    None if wait => match std::mem::replace(&mut front.commit, Commit::Nothing) {
                        Commit::Waiting(mut pending) => match (&waiter, room) {
                            (Some(waiter), true) => {
                                let first = waiter.block_on(async {
                                    tokio::select! {
                                        biased;
                                        committed = pending.wait_mut() => Ok(committed),
                                        command = commands.recv() => Err(command),
                                    }
                                });
                                match first {
                                    Ok(committed) => committed.map(drop).map_err(|error| error.to_string()),
                                    Err(command) => {
                                        // A command came first: apply it in a new round now, and
                                        // come back for this commit.
                                        front.commit = Commit::Waiting(pending);
                                        match command {
                                            Some(command) => carried = Some(command),
                                            None => stop = true,
                                        }
                                        break;
                                    }
                                }
                            }
                            _ => pending.wait_blocking().map(drop).map_err(|error| error.to_string()),
                        },
                        _ => Ok(()),
                    },
                    None => break,
                };
                wait = false;
                let Some(done) = in_flight.pop_front() else {
                    break;
                };
                let kicked = self.publish(done.round, outcome, done.started);
                for device_id in kicked {
                    self.after_kick(&device_id, in_flight.back_mut().map(|flight| &mut flight.round));
                }
            }
            if stop && in_flight.is_empty() {
                break;
            }
        }
        for (_, session) in self.sessions.drain() {
            let _set = session.link.end.set(Status::unavailable("the server is shutting down"));
        }
        tracing::info!(revision = self.revision, "engine stopped");
    }

    fn now(&mut self) -> Timestamp {
        let wall = crate::clock::unix_nanos_now();
        self.last_now = self.last_now.max(Timestamp::from_unix_nanos(wall));
        self.last_now
    }

    fn shared_twin(&self, id: &str) -> Result<Arc<Twin>, TwinError> {
        self.twins
            .get_shared(id)
            .ok_or_else(|| TwinError::NotFound { twin_id: id.to_owned() })
    }

    fn connection(&self, id: &str) -> ConnectionState {
        self.connections.get(id).copied().unwrap_or_default()
    }

    fn apply(&mut self, command: Command, round: &mut Round) {
        if let Some(failed) = &self.failed {
            let failed = failed.clone();
            match command {
                Command::Create { reply, .. }
                | Command::UpdateDesired { reply, .. }
                | Command::UpdateTags { reply, .. }
                | Command::UpdateReported { reply, .. }
                | Command::Acknowledge { reply, .. }
                | Command::Delete { reply, .. } => round.replies.push(defer(reply, Err(failed))),
                Command::UpdateDesiredBatch { reply, .. } => round.replies.push(defer(reply, Err(failed))),
                Command::Connect { reply, .. } => round.replies.push(defer(reply, Err(failed))),
                Command::DeployModel { reply, .. } => round.replies.push(defer(reply, Err(failed))),
                Command::RecordInference { reply, .. } => round.replies.push(defer(reply, Err(failed))),
                Command::Disconnect { .. } | Command::Shutdown => {}
            }
            return;
        }
        match command {
            Command::Create { new, reply } => {
                let result = self.create(new, round);
                self.answer(round, reply, result);
            }
            Command::UpdateDesired { update, reply } => {
                let result = self.update_desired(round, update);
                self.answer(round, reply, result);
            }
            Command::UpdateDesiredBatch { updates, reply } => {
                let results = updates
                    .into_iter()
                    .map(|update| {
                        self.update_desired(round, update).map_err(|error| {
                            self.shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                            twin_status(&error)
                        })
                    })
                    .collect();
                round.replies.push(defer_each(reply, results));
            }
            Command::UpdateTags {
                device_id,
                patch,
                patch_json,
                expected,
                reply,
            } => {
                let now = self.now();
                let result = self.update(
                    round,
                    &device_id,
                    pb::ChangeKind::TagsUpdated,
                    patch_json,
                    None,
                    |twins| twins.update_tags(&device_id, &patch, expected, now),
                );
                self.answer(round, reply, result);
            }
            Command::UpdateReported {
                device_id,
                patch,
                patch_json,
                source_time,
                reply,
            } => {
                let now = self.now();
                let result = self.update(
                    round,
                    &device_id,
                    pb::ChangeKind::ReportedUpdated,
                    patch_json,
                    source_time,
                    |twins| twins.update_reported(&device_id, &patch, None, now, source_time),
                );
                self.answer(round, reply, result);
            }
            Command::Acknowledge { device_id, acks, reply } => {
                let result = self.acknowledge(round, &device_id, &acks);
                self.answer(round, reply, result);
            }
            Command::Delete {
                device_id,
                expected,
                reply,
            } => {
                let result = self.delete(round, &device_id, expected);
                self.answer(round, reply, result);
            }
            Command::Connect { hello, session, reply } => {
                let result = self.connect(round, hello, session);
                self.answer(round, reply, result);
            }
            Command::Disconnect { device_id, session_id } => self.disconnect(round, &device_id, session_id),
            Command::DeployModel { filter, model, reply } => {
                let deployed = self.deploy_model(round, &filter, &model);
                round.replies.push(defer(reply, Ok(deployed)));
            }
            Command::RecordInference {
                device_id,
                checks,
                reply,
            } => {
                let result = self.record_inference(round, &device_id, &checks);
                self.answer(round, reply, result);
            }
            Command::Shutdown => {}
        }
    }

    /// Sets desired `"model"` on each selected twin that does not desire it yet, each as a
    /// change of its own (version, revision, change event, delta to its device). A twin that
    /// refuses the change (a document limit) is left as it was, logged and not counted.
    fn deploy_model(&mut self, round: &mut Round, filter: &Filter, model: &Value) -> Deployed {
        let mut selected = Vec::new();
        for twin in self.twins.iter_shared() {
            let published = PublishedTwin {
                twin: Arc::clone(twin),
                revision: self.revisions.get(twin.id()).copied().unwrap_or(0),
                connection: self.connection(twin.id()),
            };
            if filter.matches(&published) {
                let desired = twin.desired();
                let unchanged = desired.get("model").is_some_and(|current| json_equal(current, model));
                selected.push((twin.id().to_owned(), unchanged));
            }
        }
        let mut deployed = Deployed {
            targeted: selected.len() as u64,
            ..Deployed::default()
        };
        let mut patch = Map::new();
        patch.insert("model".to_owned(), model.clone());
        let patch_json = json_text(&patch);
        let patch = SectionPatch::Merge(patch);
        for (device_id, unchanged) in selected {
            if unchanged {
                continue;
            }
            let now = self.now();
            let result = self.update(
                round,
                &device_id,
                pb::ChangeKind::DesiredUpdated,
                patch_json.clone(),
                None,
                |twins| twins.update_desired(&device_id, &patch, None, now),
            );
            match result {
                Ok(applied) => {
                    deployed.changed += 1;
                    deployed.revision = applied.revision;
                }
                Err(error) => {
                    self.shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(device_id = %device_id, %error, "deploy model: twin refused the change");
                }
            }
        }
        deployed
    }

    /// Records inference checks on a twin: kept with the twin and written with the round, but
    /// not a document change (no version, no revision, no change event).
    fn record_inference(
        &mut self,
        round: &mut Round,
        device_id: &str,
        checks: &[CheckOutcome],
    ) -> Result<InferenceCheck, TwinError> {
        let now = self.now();
        let check = self.twins.record_inference(device_id, checks, now)?.clone();
        round.touched.insert(device_id.to_owned());
        self.republish(round, device_id);
        Ok(check)
    }

    fn update_desired(&mut self, round: &mut Round, update: DesiredUpdate) -> Result<Applied, TwinError> {
        let now = self.now();
        let DesiredUpdate {
            device_id,
            patch,
            patch_json,
            expected,
        } = update;
        self.update(
            round,
            &device_id,
            pb::ChangeKind::DesiredUpdated,
            patch_json,
            None,
            |twins| twins.update_desired(&device_id, &patch, expected, now),
        )
    }

    fn answer<T: Send + 'static>(&self, round: &mut Round, reply: Reply<T>, result: Result<T, TwinError>) {
        let result = result.map_err(|error| {
            self.shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            twin_status(&error)
        });
        round.replies.push(defer(reply, result));
    }

    /// Takes the next revision and records a change of `twin` (as it is after the change, or
    /// before it for a deletion).
    fn record(
        &mut self,
        round: &mut Round,
        twin: Arc<Twin>,
        kind: pb::ChangeKind,
        now: Timestamp,
        details: ChangeDetails,
    ) -> (u64, Arc<PublishedTwin>) {
        self.revision += 1;
        let revision = self.revision;
        let id = twin.id().to_owned();
        let group = twin.group().unwrap_or_default().to_owned();
        let version = if kind == pb::ChangeKind::Deleted {
            self.twins.high_water(twin.id()).unwrap_or(twin.version())
        } else {
            twin.version()
        };
        let published = Arc::new(PublishedTwin {
            twin,
            revision,
            connection: self.connection(&id),
        });
        if kind == pb::ChangeKind::Deleted {
            self.revisions.remove(&id);
            round.publish.insert(id.clone(), None);
        } else {
            self.revisions.insert(id.clone(), revision);
            round.publish.insert(id.clone(), Some(Arc::clone(&published)));
        }
        round.touched.insert(id.clone());
        let event = pb::ChangeEvent {
            revision,
            device_id: id,
            version,
            kind: kind as i32,
            server_time: Some(timestamp(now)),
            source_time: details.source_time.map(timestamp),
            patch_json: details.patch_json,
            delta_json: details.delta_json,
            acks: details.acks,
            reconciliation: details.reconciliation,
            twin: (kind == pb::ChangeKind::Created).then(|| convert::twin_message(&published, true)),
            group,
        };
        round.records.push(Arc::new(ChangeRecord {
            event,
            twin: Arc::clone(&published),
        }));
        (revision, published)
    }

    fn create(&mut self, new: NewTwin, round: &mut Round) -> Result<Applied, TwinError> {
        let now = self.now();
        let id = new.id.clone();
        self.twins.create(new, now)?;
        let twin = self.shared_twin(&id)?;
        let (revision, published) = self.record(
            round,
            Arc::clone(&twin),
            pb::ChangeKind::Created,
            now,
            ChangeDetails::default(),
        );
        Ok(Applied {
            version: twin.version(),
            revision,
            at: now,
            delta_empty: twin.delta().is_empty(),
            twin: published,
        })
    }

    fn update(
        &mut self,
        round: &mut Round,
        device_id: &str,
        kind: pb::ChangeKind,
        patch_json: String,
        source_time: Option<Timestamp>,
        change: impl FnOnce(&mut Twins) -> Result<crate::twins::UpdateOutcome, TwinError>,
    ) -> Result<Applied, TwinError> {
        let now = self.last_now;
        let outcome = change(&mut self.twins)?;
        let twin = self.shared_twin(device_id)?;
        // A desired or reported update computed the whole delta (given when not empty); a tags
        // update leaves it as it was.
        let (delta_json, delta_empty) = match (kind, &outcome.delta) {
            (pb::ChangeKind::TagsUpdated, _) => (String::new(), twin.delta().is_empty()),
            (_, Some(delta)) => (json_text(delta), false),
            (_, None) => (json_text(&Map::new()), true),
        };
        let details = ChangeDetails {
            patch_json,
            delta_json,
            source_time,
            acks: Vec::new(),
            reconciliation: key_reconciliations(&twin, outcome.reconciliation.iter().map(|(key, entry)| (key, entry))),
        };
        let (revision, published) = self.record(round, Arc::clone(&twin), kind, now, details);
        if kind == pb::ChangeKind::DesiredUpdated
            && let Some(delta) = &outcome.delta
            && let Some(session) = self.sessions.get(device_id)
        {
            let message = delta_message(twin.version(), delta, pb::DeltaReason::DesiredChanged, now);
            round
                .pushes
                .push((device_id.to_owned(), session.link.session_id, message));
        }
        Ok(Applied {
            version: outcome.version,
            revision,
            at: now,
            delta_empty,
            twin: published,
        })
    }

    fn acknowledge(&mut self, round: &mut Round, device_id: &str, acks: &[DesiredAck]) -> Result<Applied, TwinError> {
        let now = self.now();
        let before = self.twins.require(device_id)?.reconciliation().clone();
        let version = self.twins.acknowledge(device_id, acks, None, now)?;
        let twin = self.shared_twin(device_id)?;
        let details = ChangeDetails {
            acks: acks
                .iter()
                .map(|ack| pb::DesiredAck {
                    key: ack.key.clone(),
                    status_code: i32::from(ack.status),
                    acknowledged_version: ack.version,
                    description: ack.description.clone(),
                })
                .collect(),
            reconciliation: reconciliation_changes(&twin, &before),
            ..ChangeDetails::default()
        };
        let (revision, published) = self.record(round, Arc::clone(&twin), pb::ChangeKind::Acknowledged, now, details);
        Ok(Applied {
            version,
            revision,
            at: now,
            delta_empty: twin.delta().is_empty(),
            twin: published,
        })
    }

    fn delete(&mut self, round: &mut Round, device_id: &str, expected: Option<u64>) -> Result<Applied, TwinError> {
        let now = self.now();
        let before = self.shared_twin(device_id)?;
        let version = self.twins.delete(device_id, expected)?;
        let (revision, published) = self.record(round, before, pb::ChangeKind::Deleted, now, ChangeDetails::default());
        Ok(Applied {
            version,
            revision,
            at: now,
            delta_empty: true,
            twin: published,
        })
    }

    fn connect(&mut self, round: &mut Round, hello: HelloInput, session: SessionLink) -> Result<(), TwinError> {
        let now = self.now();
        let id = hello.device_id;
        self.twins.limits().check_id("hello.device_id", &id)?;
        if self.twins.get(&id).is_none() {
            let new = NewTwin {
                id: id.clone(),
                group: hello.group,
                ..NewTwin::default()
            };
            self.create(new, round)?;
        }
        let twin = self.twins.require(&id)?;
        let mut patch = Map::new();
        if let Some(model) = hello.model
            && twin.reported().get("model") != Some(&model)
        {
            patch.insert("model".to_owned(), model);
        }
        if let Some(firmware) = hello.firmware
            && twin.reported().get("firmware").and_then(Value::as_str) != Some(firmware.as_str())
        {
            patch.insert("firmware".to_owned(), Value::from(firmware));
        }
        if !patch.is_empty() {
            let patch_json = json_text(&patch);
            let patch = SectionPatch::Merge(patch);
            self.update(round, &id, pb::ChangeKind::ReportedUpdated, patch_json, None, |twins| {
                twins.update_reported(&id, &patch, None, now, None)
            })?;
        }
        if let Some(old) = self.sessions.remove(&id) {
            tracing::info!(device_id = %id, session = old.link.session_id, "device stream replaced by a newer one");
            let _set = old.link.end.set(Status::aborted(format!(
                "device {id:?}: replaced by a newer DeviceSync stream"
            )));
        }
        let connection = ConnectionState {
            connected: true,
            since: Some(now),
            last_desired_version: hello.last_desired_version,
        };
        self.connections.insert(id.clone(), connection);
        let twin = self.twins.require(&id)?;
        let message = delta_message(
            twin.version(),
            &twin.delta(),
            pb::DeltaReason::Connected,
            twin.metadata().desired.last_updated,
        );
        round.pushes.push((id.clone(), session.session_id, message));
        self.republish(round, &id);
        self.sessions.insert(id, Session { link: session });
        Ok(())
    }

    fn disconnect(&mut self, round: &mut Round, device_id: &str, session_id: u64) {
        let current = self
            .sessions
            .get(device_id)
            .is_some_and(|session| session.link.session_id == session_id);
        if !current {
            return;
        }
        self.sessions.remove(device_id);
        self.mark_disconnected(round, device_id);
    }

    fn mark_disconnected(&mut self, round: &mut Round, device_id: &str) {
        if self.twins.get(device_id).is_none() {
            self.connections.remove(device_id);
            return;
        }
        let now = self.now();
        let connection = self.connections.entry(device_id.to_owned()).or_default();
        connection.connected = false;
        connection.since = Some(now);
        self.republish(round, device_id);
    }

    /// Publishes a twin again with its current connection (no new revision).
    fn republish(&self, round: &mut Round, device_id: &str) {
        let Some(twin) = self.twins.get_shared(device_id) else {
            return;
        };
        let revision = self.revisions.get(device_id).copied().unwrap_or(0);
        round.publish.insert(
            device_id.to_owned(),
            Some(Arc::new(PublishedTwin {
                twin,
                revision,
                connection: self.connection(device_id),
            })),
        );
    }

    /// Publishes a round whose commit ended: deltas to devices, the snapshot, the change
    /// events, then the replies. A failed commit publishes nothing and fails its callers.
    /// Returns the devices whose sessions were ended because they did not read their deltas.
    fn publish(&mut self, mut round: Round, outcome: Result<(), String>, started: Instant) -> Vec<String> {
        if self.failed.is_none()
            && let Err(error) = &outcome
        {
            tracing::error!(%error, revision = round.revision, "commit failed; refusing further changes");
            self.failed = Some(Status::unavailable(format!(
                "a change could not be made durable ({error}); the server refuses changes until it is restarted"
            )));
        }
        if let Some(failed) = &self.failed {
            // This round failed, or was applied on top of one that did: its outcome is unknown.
            for reply in round.replies {
                reply(Some(failed));
            }
            return Vec::new();
        }
        if !round.touched.is_empty() {
            let counters = &self.shared.counters;
            counters.commits.fetch_add(1, Ordering::Relaxed);
            counters
                .changes
                .fetch_add(round.records.len() as u64, Ordering::Relaxed);
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            counters.last_commit_micros.store(micros, Ordering::Relaxed);
            counters.commit_micros_total.fetch_add(micros, Ordering::Relaxed);
        }
        let mut kicked = Vec::new();
        for (device_id, session_id, message) in std::mem::take(&mut round.pushes) {
            if !self.push(&device_id, session_id, message) {
                kicked.push(device_id);
            }
        }
        if !round.publish.is_empty() {
            let mut snapshot = self.shared.snapshot.write();
            snapshot.revision = round.revision;
            for (id, entry) in std::mem::take(&mut round.publish) {
                match entry {
                    Some(entry) => snapshot.twins.insert(id, entry),
                    None => snapshot.twins.remove(&id),
                };
            }
        }
        self.shared.history.append(std::mem::take(&mut round.records));
        self.shared
            .counters
            .connected_devices
            .store(self.sessions.len() as u64, Ordering::Relaxed);
        for reply in round.replies {
            reply(None);
        }
        kicked
    }

    /// A session ended by the engine: the twin shows the device disconnected. The connection is
    /// published with the newest round still in flight (whose twin states are the newest), or at
    /// once when none is.
    fn after_kick(&mut self, device_id: &str, newest: Option<&mut Round>) {
        match newest {
            Some(round) => self.mark_disconnected(round, device_id),
            None => {
                let mut round = Round::default();
                self.mark_disconnected(&mut round, device_id);
                let mut snapshot = self.shared.snapshot.write();
                for (id, entry) in round.publish {
                    if let Some(entry) = entry {
                        snapshot.twins.insert(id, entry);
                    }
                }
            }
        }
    }

    /// Submits the round's writes to the store without waiting for the commit.
    fn submit(&self, round: &Round) -> Commit {
        if round.touched.is_empty() || self.failed.is_some() {
            return Commit::Nothing;
        }
        let mut batch = WriteBatch::new();
        for id in &round.touched {
            if let Some(twin) = self.twins.get(id) {
                let revision = self.revisions.get(id).copied().unwrap_or(0);
                if let Err(error) = batch.put_twin_at(twin, revision) {
                    return Commit::Failed(error);
                }
            } else if let Some(version) = self.twins.high_water(id) {
                batch.delete_twin(id, version);
            }
        }
        batch.set_revision(round.revision);
        match self.store.submit_blocking(batch) {
            Ok(pending) => Commit::Waiting(pending),
            Err(error) => Commit::Failed(error),
        }
    }

    /// Queues a message on a device's session if it is still the one the message was for. A
    /// session whose queue is full is ended: the device reconnects and gets the whole delta.
    /// Returns false when it ended the session.
    fn push(&mut self, device_id: &str, session_id: u64, message: pb::ServerMessage) -> bool {
        let Some(session) = self.sessions.get(device_id) else {
            return true;
        };
        if session.link.session_id != session_id {
            return true;
        }
        match session.link.deltas.try_send(message) {
            Ok(()) => {
                self.shared.counters.deltas_sent.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(device_id, "device stream too slow: ending it");
                let _set = session.link.end.set(Status::resource_exhausted(format!(
                    "device {device_id:?}: {} deltas not read; reconnect to receive the whole current delta",
                    session.link.deltas.max_capacity()
                )));
                self.sessions.remove(device_id);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.sessions.remove(device_id);
                false
            }
        }
    }
}

/// A DesiredDelta message.
fn delta_message(
    version: u64,
    delta: &Map<String, Value>,
    reason: pb::DeltaReason,
    changed: Timestamp,
) -> pb::ServerMessage {
    pb::ServerMessage {
        body: Some(pb::server_message::Body::Delta(pb::DesiredDelta {
            version,
            delta_json: json_text(delta),
            reason: reason as i32,
            desired_changed_unix_nanos: unix_nanos_i64(changed),
        })),
    }
}

/// The desired keys whose reconciliation differs from `before`, in their new state.
fn reconciliation_changes(twin: &Twin, before: &BTreeMap<String, Reconciliation>) -> Vec<pb::KeyReconciliation> {
    let after = twin.reconciliation();
    key_reconciliations(
        twin,
        after.iter().filter(|(key, entry)| before.get(*key) != Some(*entry)),
    )
}

/// The reported `"model"` JSON of a Hello's model, if it names one.
pub fn hello_model(model: Option<&pb::ModelRef>) -> Option<Value> {
    model.filter(|model| !model.name.is_empty()).map(model_json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_commit_fails_its_callers_and_every_later_change_but_not_reads() {
        let data = tempfile::tempdir().expect("tempdir");
        let limits = crate::twins::Limits::default();
        let path = data.path().join("twin.redb");
        let (store, twins, revisions) =
            Store::open_with_revisions(&path, crate::store::StoreOptions::default(), limits).expect("open");
        // A closed store refuses every write, as a store whose disk failed would.
        store.close();
        let (handle, shared, thread) = start(twins, revisions, store, 8, 8, 2, History::new(0, 8, 8)).expect("engine");
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let create = |id: &str| {
            let new = NewTwin {
                id: id.to_owned(),
                ..NewTwin::default()
            };
            let handle = handle.clone();
            runtime.block_on(async move { handle.call(|reply| Command::Create { new, reply }).await })
        };
        let failed = create("a").expect_err("not durable");
        assert_eq!(failed.code(), tonic::Code::Unavailable);
        assert!(
            failed.message().contains("could not be made durable"),
            "{}",
            failed.message()
        );
        let later = create("b").expect_err("refused after a failure");
        assert_eq!(later.code(), tonic::Code::Unavailable);
        assert!(
            shared.snapshot.read().twins.is_empty(),
            "nothing unconfirmed is published"
        );
        runtime.block_on(handle.notify(Command::Shutdown));
        thread.join().expect("engine thread");
    }

    #[tokio::test]
    async fn a_full_engine_queue_is_resource_exhausted_and_a_stopped_engine_unavailable() {
        let (commands, mut receiver) = mpsc::channel(1);
        let handle = EngineHandle { commands, capacity: 1 };
        handle
            .notify(Command::Disconnect {
                device_id: "d".to_owned(),
                session_id: 1,
            })
            .await;
        let full = handle
            .call(|reply| Command::Delete {
                device_id: "d".to_owned(),
                expected: None,
                reply,
            })
            .await
            .expect_err("full");
        assert_eq!(full.code(), tonic::Code::ResourceExhausted);
        assert!(full.message().contains("engine queue is full"), "{}", full.message());
        receiver.close();
        let _queued = receiver.recv().await;
        let stopped = handle
            .call(|reply| Command::Delete {
                device_id: "d".to_owned(),
                expected: None,
                reply,
            })
            .await
            .expect_err("stopped");
        assert_eq!(stopped.code(), tonic::Code::Unavailable);
    }
}
