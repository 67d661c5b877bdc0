//! Durable twin storage on redb with group commit. The only module that knows redb; all its
//! table definitions are here.
//!
//! One committer thread owns the database. Writers submit a [`WriteBatch`] over a bounded
//! channel; the committer takes every pending batch (up to [`StoreOptions::max_batch`]), applies
//! them in one write transaction with immediate durability, commits, and only then answers each
//! writer. A write is acknowledged only after its commit; many writes share one commit.
//!
//! Tables:
//! - `twins`: twin id -> the twin's whole state ([`Twin`] as JSON);
//! - `tombstones`: deleted twin id -> the version of its deletion (its version high-water mark),
//!   removed when the id is created again (the new twin carries a larger version);
//! - `revisions`: twin id -> the fleet-wide revision of the twin's last change (written by the
//!   live server, [`WriteBatch::put_twin_at`]; absent for twins written without one);
//! - `meta`: `schema_version` -> 1, and `revision` -> the last fleet-wide revision committed
//!   ([`WriteBatch::set_revision`]), so that revisions are never reused after a restart;
//! - `telemetry`: (device id, the storage time the committer gives it: Unix nanoseconds,
//!   strictly increasing per device) -> one telemetry batch as received
//!   (`twin.v1.TelemetryBatch`, protobuf bytes), [`WriteBatch::put_telemetry`]; a device's
//!   batches older than its retention are removed when it stores the next one, and all of them
//!   when its twin is deleted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::twins::{Limits, Twin, Twins};

const TWINS: TableDefinition<&str, &[u8]> = TableDefinition::new("twins");
const TOMBSTONES: TableDefinition<&str, u64> = TableDefinition::new("tombstones");
const REVISIONS: TableDefinition<&str, u64> = TableDefinition::new("revisions");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const TELEMETRY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("telemetry");
const SCHEMA_VERSION_KEY: &str = "schema_version";
const REVISION_KEY: &str = "revision";
/// 2: twins stored packed ([`Twin::encode`]). A schema 1 file (twins as JSON) is read as it is
/// (`Twin::decode` reads both forms) and marked 2 when opened; its rows become packed as they
/// are rewritten.
const SCHEMA_VERSION: u64 = 2;
/// Schema versions this build opens.
const READABLE_SCHEMAS: [u64; 2] = [1, 2];
/// The default of [`StoreOptions::cache_bytes`].
const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or created.
    #[error("{path}: cannot open the twin database: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// redb's error.
        #[source]
        source: redb::Error,
    },
    /// The file was written by another schema version.
    #[error("{path}: schema version {found}, this build reads {expected}")]
    Schema {
        /// The database file.
        path: PathBuf,
        /// The version in the file.
        found: u64,
        /// The version this build writes.
        expected: u64,
    },
    /// A stored twin could not be read back.
    #[error("{path}: twin {twin_id:?} cannot be decoded: {source}")]
    Decode {
        /// The database file.
        path: PathBuf,
        /// The twin's id.
        twin_id: String,
        /// What is wrong with the bytes.
        #[source]
        source: crate::twins::PackError,
    },
    /// A twin could not be encoded.
    #[error("twin {twin_id:?} cannot be encoded: {source}")]
    Encode {
        /// The twin's id.
        twin_id: String,
        /// The encoder's error.
        #[source]
        source: crate::twins::PackError,
    },
    /// A read or a commit failed; every write of that commit gets this error and none is stored.
    #[error("twin database: {0}")]
    Storage(#[source] Arc<redb::Error>),
    /// The committer thread could not be started.
    #[error("cannot start the store's committer thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The queue of pending writes is full (only from [`Store::try_submit`]); retry later.
    #[error("the store's write queue is full ({capacity} pending writes)")]
    Busy {
        /// The queue's capacity.
        capacity: usize,
    },
    /// The store was closed; the write was not stored.
    #[error("the store is closed")]
    Closed,
}

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(error: E) -> Self {
        StoreError::Storage(Arc::new(error.into()))
    }
}

/// Store settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Writes waiting for the committer before writers wait (or [`Store::try_submit`] says busy).
    pub queue_capacity: usize,
    /// The most writes in one commit. 1 commits every write on its own (for comparison).
    pub max_batch: usize,
    /// redb's page cache, in bytes (default 64 MiB; redb's own default is 1 GiB). Twins are
    /// read from the file only when the store opens, so the cache mostly serves commits.
    pub cache_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            queue_capacity: 8192,
            max_batch: 8192,
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

/// Changes to persist atomically: twin states to store and twins deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    operations: Vec<Operation>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Operation {
    Put {
        twin_id: String,
        state: Vec<u8>,
        revision: Option<u64>,
    },
    Delete {
        twin_id: String,
        version: u64,
    },
    Revision(u64),
    Telemetry {
        device_id: String,
        batch: Vec<u8>,
        retention_nanos: u64,
    },
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        WriteBatch::default()
    }

    /// A batch storing one twin's whole state.
    ///
    /// # Errors
    /// `Encode` if the twin cannot be serialized.
    pub fn put(twin: &Twin) -> Result<Self, StoreError> {
        let mut batch = WriteBatch::new();
        batch.put_twin(twin)?;
        Ok(batch)
    }

    /// Stores a twin's whole state (encoded now, on the caller's thread).
    ///
    /// # Errors
    /// `Encode` if the twin cannot be serialized.
    pub fn put_twin(&mut self, twin: &Twin) -> Result<(), StoreError> {
        self.push_put(twin, None)
    }

    /// Stores a twin's whole state and the fleet-wide revision of its last change.
    ///
    /// # Errors
    /// `Encode` if the twin cannot be serialized.
    pub fn put_twin_at(&mut self, twin: &Twin, revision: u64) -> Result<(), StoreError> {
        self.push_put(twin, Some(revision))
    }

    fn push_put(&mut self, twin: &Twin, revision: Option<u64>) -> Result<(), StoreError> {
        let state = twin.encode().map_err(|source| StoreError::Encode {
            twin_id: twin.id().to_owned(),
            source,
        })?;
        self.operations.push(Operation::Put {
            twin_id: twin.id().to_owned(),
            state,
            revision,
        });
        Ok(())
    }

    /// Records `revision` as the last fleet-wide revision committed.
    pub fn set_revision(&mut self, revision: u64) {
        self.operations.push(Operation::Revision(revision));
    }

    /// Deletes a twin, keeping `version` (the version of the deletion) as its high-water mark.
    pub fn delete_twin(&mut self, twin_id: &str, version: u64) {
        self.operations.push(Operation::Delete {
            twin_id: twin_id.to_owned(),
            version,
        });
    }

    /// Stores one telemetry batch of `device_id` (protobuf bytes). The committer gives it its
    /// storage time: the commit's wall-clock time in Unix nanoseconds, or one past the device's
    /// newest stored batch when that is later, so times strictly increase per device (also
    /// across restarts and clock steps back). Removes the device's batches stored more than
    /// `retention_nanos` before it (0 keeps all).
    pub fn put_telemetry(&mut self, device_id: &str, batch: Vec<u8>, retention_nanos: u64) {
        self.operations.push(Operation::Telemetry {
            device_id: device_id.to_owned(),
            batch,
            retention_nanos,
        });
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.operations.len()
    }

    /// Whether the batch has no operation.
    pub fn is_empty(&self) -> bool {
        self.operations.is_empty()
    }
}

/// The fleet-wide revisions restored by [`Store::open_with_revisions`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revisions {
    /// The last revision committed (0 when none was ever recorded).
    pub last: u64,
    /// The revision of each live twin's last change, for twins stored with one.
    pub per_twin: HashMap<String, u64>,
}

/// The commit that made a write durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// The commit's sequence number since the store was opened (1, 2, ...).
    pub commit: u64,
    /// How many writes (batches) shared that commit.
    pub writes_in_commit: usize,
}

/// Counters of the store since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Write transactions committed.
    pub commits: u64,
    /// Writes (batches) acknowledged.
    pub writes: u64,
    /// Operations (twin puts and deletes) stored.
    pub operations: u64,
    /// The most writes that shared one commit.
    pub largest_commit: u64,
}

#[derive(Debug, Default)]
struct Counters {
    commits: AtomicU64,
    writes: AtomicU64,
    operations: AtomicU64,
    largest_commit: AtomicU64,
}

type Reply = oneshot::Sender<Result<Committed, StoreError>>;

enum Request {
    Write { batch: WriteBatch, reply: Reply },
    Close { reply: oneshot::Sender<()> },
}

/// A write submitted and not yet acknowledged.
#[derive(Debug)]
pub struct PendingWrite {
    reply: oneshot::Receiver<Result<Committed, StoreError>>,
}

impl PendingWrite {
    /// Waits for the commit.
    ///
    /// # Errors
    /// The commit's error, or `Closed` if the store stopped before committing the write.
    pub async fn wait(self) -> Result<Committed, StoreError> {
        self.reply.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Waits for the commit without giving the write up, so a caller can wait for it or for
    /// something else (`select!`) and keep it when the other thing comes first. After it
    /// returned, the write is answered: later calls return `Closed`.
    ///
    /// # Errors
    /// As [`PendingWrite::wait`].
    pub async fn wait_mut(&mut self) -> Result<Committed, StoreError> {
        if self.reply.is_terminated() {
            return Err(StoreError::Closed);
        }
        (&mut self.reply).await.unwrap_or(Err(StoreError::Closed))
    }

    /// The commit's result if it is done, without waiting (`None`: still pending). After it
    /// returned `Some`, the write is answered: later calls return `Closed`.
    pub fn try_wait(&mut self) -> Option<Result<Committed, StoreError>> {
        match self.reply.try_recv() {
            Ok(result) => Some(result),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(StoreError::Closed)),
        }
    }

    /// Waits for the commit, blocking the thread (not from inside an async runtime).
    ///
    /// # Errors
    /// As [`PendingWrite::wait`].
    pub fn wait_blocking(self) -> Result<Committed, StoreError> {
        self.reply.blocking_recv().unwrap_or(Err(StoreError::Closed))
    }
}

/// One stored telemetry batch, as [`Store::read_telemetry`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTelemetry {
    /// When the server stored it, Unix nanoseconds (strictly increasing per device).
    pub stored_at: u64,
    /// The batch as received (`twin.v1.TelemetryBatch`, protobuf bytes).
    pub batch: Vec<u8>,
}

/// A handle to the durable store; clones share the one committer.
#[derive(Clone)]
pub struct Store {
    /// For reads beside the committer; taken out by [`Store::close`] so that the file is
    /// closed (and can be opened again) once the committer and any read in progress are done.
    database: Arc<std::sync::RwLock<Option<Arc<Database>>>>,
    requests: mpsc::Sender<Request>,
    counters: Arc<Counters>,
    committer: Arc<Mutex<Option<JoinHandle<()>>>>,
    capacity: usize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Store")
            .field("capacity", &self.capacity)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Request {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Write { batch, .. } => write!(formatter, "Write({} operations)", batch.len()),
            Request::Close { .. } => formatter.write_str("Close"),
        }
    }
}

impl Store {
    /// Opens (or creates) the database at `path`, creating its folder, and restores every twin
    /// and tombstone into a [`Twins`] with `limits`. Starts the committer thread.
    ///
    /// # Errors
    /// `Open`, `Schema`, `Decode`, `Storage` or `Spawn`.
    pub fn open(path: &Path, options: StoreOptions, limits: Limits) -> Result<(Store, Twins), StoreError> {
        Store::open_with_revisions(path, options, limits).map(|(store, twins, _revisions)| (store, twins))
    }

    /// As [`Store::open`], and also restores the fleet-wide revisions the live server records.
    ///
    /// # Errors
    /// As [`Store::open`].
    pub fn open_with_revisions(
        path: &Path,
        options: StoreOptions,
        limits: Limits,
    ) -> Result<(Store, Twins, Revisions), StoreError> {
        let open_error = |source: redb::Error| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        if let Some(folder) = path.parent().filter(|folder| !folder.as_os_str().is_empty()) {
            std::fs::create_dir_all(folder).map_err(|error| open_error(error.into()))?;
        }
        let database = redb::Builder::new()
            .set_cache_size(options.cache_bytes)
            .create(path)
            .map_err(|error| open_error(error.into()))?;
        ensure_schema(&database, path)?;
        let twins = restore(&database, path, limits)?;
        let revisions = restore_revisions(&database)?;

        let (sender, receiver) = mpsc::channel(options.queue_capacity.max(1));
        let counters = Arc::new(Counters::default());
        let committer_counters = Arc::clone(&counters);
        let max_batch = options.max_batch.max(1);
        let database = Arc::new(database);
        let committer_database = Arc::clone(&database);
        let committer = std::thread::Builder::new()
            .name("twin-store-committer".to_owned())
            .spawn(move || run_committer(&committer_database, receiver, max_batch, &committer_counters))
            .map_err(StoreError::Spawn)?;
        let store = Store {
            database: Arc::new(std::sync::RwLock::new(Some(database))),
            requests: sender,
            counters,
            committer: Arc::new(Mutex::new(Some(committer))),
            capacity: options.queue_capacity.max(1),
        };
        Ok((store, twins, revisions))
    }

    /// Submits a write and waits for its commit.
    ///
    /// # Errors
    /// The commit's error, or `Closed`.
    pub async fn write(&self, batch: WriteBatch) -> Result<Committed, StoreError> {
        let (reply, receiver) = oneshot::channel();
        self.requests
            .send(Request::Write { batch, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        PendingWrite { reply: receiver }.wait().await
    }

    /// Submits a write, waiting for room in the queue, without waiting for its commit: the
    /// returned [`PendingWrite`] resolves at its commit.
    ///
    /// # Errors
    /// `Closed` when the store is closed.
    pub async fn submit(&self, batch: WriteBatch) -> Result<PendingWrite, StoreError> {
        let (reply, receiver) = oneshot::channel();
        self.requests
            .send(Request::Write { batch, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(PendingWrite { reply: receiver })
    }

    /// The telemetry batches of `device_id` stored after `after` and at or before `until` (Unix
    /// nanoseconds), oldest first, at most `limit`. Reads committed data only, beside the
    /// committer (a read transaction); blocks the thread on the file.
    ///
    /// # Errors
    /// `Storage` when the file cannot be read.
    pub fn read_telemetry(
        &self,
        device_id: &str,
        after: u64,
        until: u64,
        limit: usize,
    ) -> Result<Vec<StoredTelemetry>, StoreError> {
        let mut found = Vec::new();
        let Some(from) = after.checked_add(1) else {
            return Ok(found);
        };
        if from > until || limit == 0 {
            return Ok(found);
        }
        let transaction = self.reader()?.begin_read()?;
        let table = transaction.open_table(TELEMETRY)?;
        for entry in table.range((device_id, from)..=(device_id, until))? {
            let (key, value) = entry?;
            found.push(StoredTelemetry {
                stored_at: key.value().1,
                batch: value.value().to_vec(),
            });
            if found.len() >= limit {
                break;
            }
        }
        Ok(found)
    }

    fn reader(&self) -> Result<Arc<Database>, StoreError> {
        self.database
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(StoreError::Closed)
    }

    /// Submits a write and waits for its commit, blocking the thread (not from inside an async
    /// runtime). Waits for room when the queue is full.
    ///
    /// # Errors
    /// The commit's error, or `Closed`.
    pub fn write_blocking(&self, batch: WriteBatch) -> Result<Committed, StoreError> {
        self.submit_blocking(batch)?.wait_blocking()
    }

    /// Submits a write, waiting for room in the queue (not from inside an async runtime), without
    /// waiting for its commit: the returned [`PendingWrite`] resolves at its commit. Lets one
    /// writer keep several writes in flight.
    ///
    /// # Errors
    /// `Closed` when the store is closed.
    pub fn submit_blocking(&self, batch: WriteBatch) -> Result<PendingWrite, StoreError> {
        let (reply, receiver) = oneshot::channel();
        self.requests
            .blocking_send(Request::Write { batch, reply })
            .map_err(|_| StoreError::Closed)?;
        Ok(PendingWrite { reply: receiver })
    }

    /// Submits a write without waiting; the returned [`PendingWrite`] resolves at its commit.
    /// Usable from any thread or task.
    ///
    /// # Errors
    /// `Busy` when the queue is full, `Closed` when the store is closed.
    pub fn try_submit(&self, batch: WriteBatch) -> Result<PendingWrite, StoreError> {
        let (reply, receiver) = oneshot::channel();
        self.requests
            .try_send(Request::Write { batch, reply })
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => StoreError::Busy {
                    capacity: self.capacity,
                },
                mpsc::error::TrySendError::Closed(_) => StoreError::Closed,
            })?;
        Ok(PendingWrite { reply: receiver })
    }

    /// Counters since the store was opened.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            commits: self.counters.commits.load(Ordering::Acquire),
            writes: self.counters.writes.load(Ordering::Acquire),
            operations: self.counters.operations.load(Ordering::Acquire),
            largest_commit: self.counters.largest_commit.load(Ordering::Acquire),
        }
    }

    /// Commits every write submitted before this call, stops the committer and closes the
    /// database. Later writes from any clone fail with `Closed`. Blocks the thread (not from
    /// inside an async runtime); calling it twice is harmless.
    pub fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.requests.blocking_send(Request::Close { reply }).is_ok() {
            let _closed = done.blocking_recv();
        }
        let handle = match self.committer.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(handle) = handle {
            let _joined = handle.join();
        }
        self.database
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}

fn ensure_schema(database: &Database, path: &Path) -> Result<(), StoreError> {
    let transaction = database.begin_write()?;
    let found = {
        transaction.open_table(TWINS)?;
        transaction.open_table(TOMBSTONES)?;
        transaction.open_table(REVISIONS)?;
        transaction.open_table(TELEMETRY)?;
        let mut meta = transaction.open_table(META)?;
        let found = meta.get(SCHEMA_VERSION_KEY)?.map(|value| value.value());
        if found.is_none_or(|found| found != SCHEMA_VERSION && READABLE_SCHEMAS.contains(&found)) {
            meta.insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION)?;
        }
        found
    };
    transaction.commit()?;
    match found {
        Some(found) if !READABLE_SCHEMAS.contains(&found) => Err(StoreError::Schema {
            path: path.to_owned(),
            found,
            expected: SCHEMA_VERSION,
        }),
        _ => Ok(()),
    }
}

fn restore(database: &Database, path: &Path, limits: Limits) -> Result<Twins, StoreError> {
    let transaction = database.begin_read()?;
    let twins_table = transaction.open_table(TWINS)?;
    let mut twins = Vec::new();
    for entry in twins_table.iter()? {
        let (key, value) = entry?;
        let twin = Twin::decode(value.value()).map_err(|source| StoreError::Decode {
            path: path.to_owned(),
            twin_id: key.value().to_owned(),
            source,
        })?;
        twins.push(twin);
    }
    let tombstones_table = transaction.open_table(TOMBSTONES)?;
    let mut tombstones = Vec::new();
    for entry in tombstones_table.iter()? {
        let (key, value) = entry?;
        tombstones.push((key.value().to_owned(), value.value()));
    }
    Ok(Twins::restore(limits, twins, tombstones))
}

fn restore_revisions(database: &Database) -> Result<Revisions, StoreError> {
    let transaction = database.begin_read()?;
    let meta = transaction.open_table(META)?;
    let last = meta.get(REVISION_KEY)?.map_or(0, |value| value.value());
    let table = transaction.open_table(REVISIONS)?;
    let mut per_twin = HashMap::new();
    for entry in table.iter()? {
        let (key, value) = entry?;
        per_twin.insert(key.value().to_owned(), value.value());
    }
    Ok(Revisions { last, per_twin })
}

/// The committer: take every pending write, commit them together, answer each writer.
fn run_committer(database: &Database, mut requests: mpsc::Receiver<Request>, max_batch: usize, counters: &Counters) {
    let mut writes: Vec<(WriteBatch, Reply)> = Vec::with_capacity(max_batch);
    loop {
        let mut close = None;
        match requests.blocking_recv() {
            None => return,
            Some(Request::Write { batch, reply }) => writes.push((batch, reply)),
            Some(Request::Close { reply }) => close = Some(reply),
        }
        while close.is_none() && writes.len() < max_batch {
            match requests.try_recv() {
                Ok(Request::Write { batch, reply }) => writes.push((batch, reply)),
                Ok(Request::Close { reply }) => close = Some(reply),
                Err(_) => break,
            }
        }
        if !writes.is_empty() {
            commit_and_reply(database, &mut writes, counters);
        }
        if let Some(reply) = close {
            requests.close();
            let _sent = reply.send(());
            return;
        }
    }
}

fn commit_and_reply(database: &Database, writes: &mut Vec<(WriteBatch, Reply)>, counters: &Counters) {
    let outcome = commit(database, writes.iter().map(|(batch, _)| batch));
    let writes_in_commit = writes.len();
    match outcome {
        Ok(operations) => {
            let commit = counters.commits.fetch_add(1, Ordering::AcqRel) + 1;
            counters.writes.fetch_add(writes_in_commit as u64, Ordering::AcqRel);
            counters.operations.fetch_add(operations, Ordering::AcqRel);
            counters
                .largest_commit
                .fetch_max(writes_in_commit as u64, Ordering::AcqRel);
            for (_, reply) in writes.drain(..) {
                let _sent = reply.send(Ok(Committed {
                    commit,
                    writes_in_commit,
                }));
            }
        }
        Err(error) => {
            let shared = match error {
                StoreError::Storage(shared) => shared,
                other => Arc::new(redb::Error::Io(std::io::Error::other(other.to_string()))),
            };
            for (_, reply) in writes.drain(..) {
                let _sent = reply.send(Err(StoreError::Storage(Arc::clone(&shared))));
            }
        }
    }
}

/// The telemetry table of a commit's transaction.
type TelemetryTable<'t> = redb::Table<'t, (&'static str, u64), &'static [u8]>;

/// The telemetry table, opened on first use: most commits carry no telemetry and no deletion,
/// and opening it costs them time (measured on the delta tail).
fn open_once<'a, 't>(
    transaction: &'t redb::WriteTransaction,
    table: &'a mut Option<TelemetryTable<'t>>,
) -> Result<&'a mut TelemetryTable<'t>, StoreError> {
    match table {
        Some(table) => Ok(table),
        None => Ok(table.insert(transaction.open_table(TELEMETRY)?)),
    }
}

/// Applies every batch in one write transaction with immediate durability. Returns the number
/// of operations.
fn commit<'a>(database: &Database, batches: impl Iterator<Item = &'a WriteBatch>) -> Result<u64, StoreError> {
    let mut transaction = database.begin_write()?;
    transaction.set_durability(Durability::Immediate)?;
    let mut operations = 0;
    {
        let mut twins = transaction.open_table(TWINS)?;
        let mut tombstones = transaction.open_table(TOMBSTONES)?;
        let mut revisions = transaction.open_table(REVISIONS)?;
        let mut meta = transaction.open_table(META)?;
        let mut telemetry = None;
        // The storage time of the commit's telemetry batches.
        let now = crate::clock::unix_nanos_now();
        let mut any_tombstone = !tombstones.is_empty()?;
        for batch in batches {
            for operation in &batch.operations {
                operations += 1;
                match operation {
                    Operation::Put {
                        twin_id,
                        state,
                        revision,
                    } => {
                        twins.insert(twin_id.as_str(), state.as_slice())?;
                        if let Some(revision) = revision {
                            revisions.insert(twin_id.as_str(), *revision)?;
                        }
                        if any_tombstone {
                            tombstones.remove(twin_id.as_str())?;
                        }
                    }
                    Operation::Delete { twin_id, version } => {
                        twins.remove(twin_id.as_str())?;
                        tombstones.insert(twin_id.as_str(), *version)?;
                        revisions.remove(twin_id.as_str())?;
                        any_tombstone = true;
                        let table = open_once(&transaction, &mut telemetry)?;
                        let id = twin_id.as_str();
                        table.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
                    }
                    Operation::Telemetry {
                        device_id,
                        batch,
                        retention_nanos,
                    } => {
                        let table = open_once(&transaction, &mut telemetry)?;
                        let id = device_id.as_str();
                        let newest = match table.range((id, 0)..=(id, u64::MAX))?.next_back() {
                            Some(entry) => Some(entry?.0.value().1),
                            None => None,
                        };
                        let stored_at = newest.map_or(now, |newest| now.max(newest.saturating_add(1)));
                        table.insert((id, stored_at), batch.as_slice())?;
                        if *retention_nanos > 0 {
                            let keep_from = stored_at.saturating_sub(*retention_nanos);
                            table.retain_in((id, 0)..(id, keep_from), |_, _| false)?;
                        }
                    }
                    Operation::Revision(revision) => {
                        meta.insert(REVISION_KEY, *revision)?;
                    }
                }
            }
        }
    }
    transaction.commit()?;
    Ok(operations)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_of_another_schema_version_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("twin.redb");
        {
            let database = Database::create(&path).expect("create");
            let transaction = database.begin_write().expect("begin");
            transaction
                .open_table(META)
                .expect("meta")
                .insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION + 1)
                .expect("insert");
            transaction.commit().expect("commit");
        }
        let error = Store::open(&path, StoreOptions::default(), Limits::default()).expect_err("schema");
        assert!(
            matches!(
                error,
                StoreError::Schema {
                    found: 3,
                    expected: 2,
                    ..
                }
            ),
            "{error}"
        );
    }

    /// A twin as schema 1 stored it (JSON), with reported state, metadata, an acknowledgement
    /// and reconciliation.
    const SCHEMA_1_TWIN: &str = r#"{"id":"cam-1","group":"cameras","version":4,"desired_version":2,"reported_version":3,"created_at":1000,"updated_at":4000,"tags":{"site":"a"},"desired":{"rate":10},"reported":{"rate":5},"metadata":{"desired":{"last_updated":2000,"children":{"rate":{"last_updated":2000}}},"reported":{"last_updated":3000,"children":{"rate":{"last_updated":3000,"source_time":2900}}},"tags":{"last_updated":1000,"children":{"site":{"last_updated":1000}}}},"acknowledgements":{"rate":{"status":400,"version":2,"description":"too fast","received_at":4000}},"reconciliation":{"rate":{"state":"failed","desired_version":2,"desired_at":2000,"pending_since":2000,"resolved_at":4000}}}"#;

    #[test]
    fn a_schema_1_file_opens_its_json_twins_and_becomes_schema_2() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("twin.redb");
        {
            let database = Database::create(&path).expect("create");
            let transaction = database.begin_write().expect("begin");
            transaction
                .open_table(META)
                .expect("meta")
                .insert(SCHEMA_VERSION_KEY, 1)
                .expect("insert");
            transaction
                .open_table(TWINS)
                .expect("twins")
                .insert("cam-1", SCHEMA_1_TWIN.as_bytes())
                .expect("insert");
            transaction.commit().expect("commit");
        }
        let (store, twins) = Store::open(&path, StoreOptions::default(), Limits::default()).expect("open");
        let twin = twins.get("cam-1").expect("restored").clone();
        assert_eq!(
            (twin.version(), twin.desired_version(), twin.reported_version()),
            (4, 2, 3)
        );
        assert_eq!(twin.group(), Some("cameras"));
        assert_eq!(twin.reported()["rate"], 5);
        let metadata = twin.metadata();
        assert_eq!(
            metadata.reported.get(&["rate"]).and_then(|leaf| leaf.source_time),
            Some(crate::twins::Timestamp::from_unix_nanos(2900))
        );
        assert_eq!(twin.acknowledgements()["rate"].description, "too fast");
        assert_eq!(twin.reconciliation_state(), crate::twins::ReconciliationState::Failed);
        // Rewritten packed, then read back equal.
        store
            .write_blocking(WriteBatch::put(&twin).expect("encode"))
            .expect("commit");
        store.close();
        let (store, again) = Store::open(&path, StoreOptions::default(), Limits::default()).expect("reopen");
        assert_eq!(again.get("cam-1"), Some(&twin));
        store.close();
        drop(store);
        let database = Database::open(&path).expect("open file");
        let read = database.begin_read().expect("read");
        let schema = read
            .open_table(META)
            .expect("meta")
            .get(SCHEMA_VERSION_KEY)
            .expect("get")
            .map(|value| value.value());
        assert_eq!(schema, Some(SCHEMA_VERSION));
        let stored = read.open_table(TWINS).expect("twins");
        let row = stored.get("cam-1").expect("get").expect("row");
        assert_ne!(row.value().first(), Some(&b'{'), "stored packed after the rewrite");
    }

    #[test]
    fn a_corrupt_twin_row_is_a_decode_error_naming_the_twin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("twin.redb");
        {
            let database = Database::create(&path).expect("create");
            let transaction = database.begin_write().expect("begin");
            let twin = Twins::new(Limits::default())
                .create(
                    crate::twins::NewTwin {
                        id: "dev-1".to_owned(),
                        ..crate::twins::NewTwin::default()
                    },
                    crate::twins::Timestamp::from_unix_nanos(1),
                )
                .expect("create")
                .encode()
                .expect("encode");
            transaction
                .open_table(TWINS)
                .expect("twins")
                .insert("dev-1", &twin[..twin.len() - 1])
                .expect("insert");
            transaction.commit().expect("commit");
        }
        let error = Store::open(&path, StoreOptions::default(), Limits::default()).expect_err("corrupt");
        assert!(
            matches!(&error, StoreError::Decode { twin_id, .. } if twin_id == "dev-1"),
            "{error}"
        );
    }

    #[test]
    fn telemetry_is_read_by_device_and_time_and_pruned_by_retention() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("twin.redb");
        let (store, _twins) = Store::open(&path, StoreOptions::default(), Limits::default()).expect("open");
        let mut write = WriteBatch::new();
        for byte in [10, 20, 30] {
            write.put_telemetry("d1", vec![byte], 0);
        }
        write.put_telemetry("d2", vec![1, 2, 3], 0);
        store.write_blocking(write).expect("commit");
        let times = |found: &[StoredTelemetry]| found.iter().map(|entry| entry.stored_at).collect::<Vec<_>>();
        let bytes = |found: &[StoredTelemetry]| found.iter().map(|entry| entry.batch.clone()).collect::<Vec<_>>();
        let all = store.read_telemetry("d1", 0, u64::MAX, 100).expect("read");
        // Three batches of one device in one commit: in order, times strictly increasing.
        assert_eq!(bytes(&all), [vec![10], vec![20], vec![30]]);
        let t = times(&all);
        assert!(t[0] < t[1] && t[1] < t[2], "{t:?}");
        assert_eq!(
            times(&store.read_telemetry("d1", t[0], t[2], 100).expect("read")),
            t[1..]
        );
        assert_eq!(
            times(&store.read_telemetry("d1", 0, u64::MAX, 2).expect("read")),
            t[..2]
        );
        assert!(
            store
                .read_telemetry("d1", t[2], u64::MAX, 100)
                .expect("read")
                .is_empty()
        );
        assert_eq!(
            bytes(&store.read_telemetry("d2", 0, u64::MAX, 100).expect("read")),
            [vec![1, 2, 3]]
        );
        // A later batch is stored after the newest; a retention of 1 ns then removes every
        // earlier batch of d1 (they are older than that), not d2's.
        let mut write = WriteBatch::new();
        write.put_telemetry("d1", vec![40], u64::MAX);
        store.write_blocking(write).expect("commit");
        let kept = store.read_telemetry("d1", 0, u64::MAX, 100).expect("read");
        assert_eq!(kept.len(), 4);
        assert!(kept[3].stored_at > t[2]);
        let mut write = WriteBatch::new();
        write.put_telemetry("d1", vec![50], 1);
        store.write_blocking(write).expect("commit");
        let kept = store.read_telemetry("d1", 0, u64::MAX, 100).expect("read");
        assert_eq!(bytes(&kept), [vec![50]]);
        assert_eq!(store.read_telemetry("d2", 0, u64::MAX, 100).expect("read").len(), 1);
        // Deleting a twin removes its telemetry; the rest survives a reopen.
        let mut write = WriteBatch::new();
        write.delete_twin("d2", 3);
        store.write_blocking(write).expect("commit");
        store.close();
        let (store, _twins) = Store::open(&path, StoreOptions::default(), Limits::default()).expect("reopen");
        assert_eq!(store.read_telemetry("d1", 0, u64::MAX, 100).expect("read"), kept);
        assert!(store.read_telemetry("d2", 0, u64::MAX, 100).expect("read").is_empty());
        store.close();
    }

    #[test]
    fn an_empty_batch_commits_and_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, twins) = Store::open(
            &dir.path().join("twin.redb"),
            StoreOptions::default(),
            Limits::default(),
        )
        .expect("open");
        assert!(twins.is_empty());
        let committed = store.write_blocking(WriteBatch::new()).expect("commit");
        assert_eq!(committed.commit, 1);
        assert_eq!(store.stats().writes, 1);
        store.close();
        store.close();
    }
}
