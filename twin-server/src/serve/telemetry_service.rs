//! The `Telemetry` service: checks, counts and stores columnar telemetry batches from gateways,
//! off the engine thread, and reads stored batches back.
//!
//! Ingest changes no twin state (no version, no revision), so batches never go through the
//! engine's command queue: a handler checks each batch against the published snapshot (is the
//! device a live twin?) and the proto's array rules, counts it in the shared atomic counters and
//! in the per-device [`TelemetryLedger`], and submits it to the store ([`TelemetryStorage`]),
//! whose committer shares its group commits with the engine's writes. An ingest call answers
//! only after every batch it accepted is committed. A client stream is read one batch at a time
//! with at most [`STORE_WINDOW`] batches awaiting their commit, so a saturated server stops
//! reading and HTTP/2 flow control holds the sender back.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use twin_proto::v1 as pb;
use twin_proto::v1::telemetry_server::Telemetry;

use super::convert::twin_status;
use super::engine::Shared;
use crate::store::{PendingWrite, Store, StoreError, WriteBatch};
use crate::twins::{Limits, TwinError};

/// Batches of one ingest stream submitted to the store and not yet committed, at most.
pub const STORE_WINDOW: usize = 64;
/// The page size of `Read` when the request leaves it 0.
pub const DEFAULT_READ_PAGE: u32 = 100;
/// The largest page of `Read`.
pub const MAX_READ_PAGE: u32 = 1000;

/// Where accepted telemetry is stored: the twin store, and for how long (the store's committer
/// gives each batch its storage time).
#[derive(Debug, Clone)]
pub struct TelemetryStorage {
    store: Store,
    /// How long batches are kept; 0: telemetry is not stored.
    retention_nanos: u64,
}

impl TelemetryStorage {
    /// Stores into `store`, keeping each batch `retention_s` seconds (0: nothing is stored).
    pub fn new(store: Store, retention_s: u64) -> Self {
        TelemetryStorage {
            store,
            retention_nanos: retention_s.saturating_mul(1_000_000_000),
        }
    }

    /// The store the batches go to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The write that stores `batch` of `device_id` (the stamp's device id filled in when it is
    /// empty), or `None` when telemetry is not stored.
    pub fn write(&self, device_id: &str, batch: &pb::TelemetryBatch) -> Option<WriteBatch> {
        if self.retention_nanos == 0 {
            return None;
        }
        let bytes = if batch.stamp.as_ref().is_some_and(|stamp| stamp.device_id.is_empty()) {
            let mut filled = batch.clone();
            if let Some(stamp) = filled.stamp.as_mut() {
                device_id.clone_into(&mut stamp.device_id);
            }
            filled.encode_to_vec()
        } else {
            batch.encode_to_vec()
        };
        let mut write = WriteBatch::new();
        write.put_telemetry(device_id, bytes, self.retention_nanos);
        Some(write)
    }
}

fn store_status(error: &StoreError) -> Status {
    Status::unavailable(format!("telemetry could not be stored: {error}"))
}

/// At most this many rejections are described in an `IngestSummary` (the proto's "first
/// rejections (at most 100)"); later ones are only counted.
pub const MAX_DESCRIBED_REJECTIONS: usize = 100;

/// What one device has sent through the Telemetry service since the server started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceTelemetry {
    /// Batches accepted.
    pub batches: u64,
    /// Samples accepted (timestamps times channels).
    pub samples: u64,
    /// The highest batch sequence accepted.
    pub last_sequence: u64,
    /// Batches whose sequence was not above `last_sequence` (duplicates or reordered).
    pub out_of_order: u64,
}

/// Per-device telemetry counts. Only live twins are recorded, so the map holds at most one entry
/// per twin the server has known; one short lock per accepted batch.
#[derive(Debug, Default)]
pub struct TelemetryLedger {
    devices: Mutex<HashMap<String, DeviceTelemetry>>,
}

impl TelemetryLedger {
    /// Records one accepted batch of `samples` samples from `device_id`.
    pub fn record(&self, device_id: &str, sequence: u64, samples: u64) {
        let mut devices = self.devices.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = match devices.get_mut(device_id) {
            Some(entry) => entry,
            None => devices.entry(device_id.to_owned()).or_default(),
        };
        entry.batches = entry.batches.saturating_add(1);
        entry.samples = entry.samples.saturating_add(samples);
        if sequence > entry.last_sequence {
            entry.last_sequence = sequence;
        } else {
            entry.out_of_order = entry.out_of_order.saturating_add(1);
        }
    }

    /// What `device_id` has sent, if it sent anything.
    pub fn device(&self, device_id: &str) -> Option<DeviceTelemetry> {
        let devices = self.devices.lock().unwrap_or_else(PoisonError::into_inner);
        devices.get(device_id).copied()
    }

    /// How many devices have sent telemetry.
    pub fn device_count(&self) -> usize {
        self.devices.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// Telemetry notices for `Twins.Watch` with `include_telemetry`: each accepted batch's stamp,
/// sample count and acceptance time, broadcast to the watchers that asked (nothing is built
/// when no watcher listens). Live only: a watcher that falls [`NOTICE_CAPACITY`] notices behind
/// is ended with RESOURCE_EXHAUSTED rather than silently missing some.
#[derive(Debug)]
pub struct TelemetryNotices {
    sender: tokio::sync::broadcast::Sender<Arc<pb::TelemetryNotice>>,
}

/// Notices kept for the slowest telemetry watcher.
pub const NOTICE_CAPACITY: usize = 16_384;

impl Default for TelemetryNotices {
    fn default() -> Self {
        Self {
            sender: tokio::sync::broadcast::channel(NOTICE_CAPACITY).0,
        }
    }
}

impl TelemetryNotices {
    /// Announces an accepted batch of `device_id` (the stream's device when the stamp leaves it
    /// empty) to the telemetry watchers, if any.
    pub fn publish(&self, device_id: &str, batch: &pb::TelemetryBatch, samples: u64) {
        if self.sender.receiver_count() == 0 {
            return;
        }
        let mut stamp = batch.stamp.clone().unwrap_or_default();
        if stamp.device_id.is_empty() {
            device_id.clone_into(&mut stamp.device_id);
        }
        let received_unix_nanos = i64::try_from(crate::clock::unix_nanos_now()).unwrap_or(i64::MAX);
        let _receivers = self.sender.send(Arc::new(pb::TelemetryNotice {
            stamp: Some(stamp),
            samples,
            received_unix_nanos,
        }));
    }

    /// A receiver of the notices from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<pb::TelemetryNotice>> {
        self.sender.subscribe()
    }
}

/// Where a batch sits in its request, for field paths: the unary request is the batch itself,
/// a stream's batch is `batches[index]`.
#[derive(Debug, Clone, Copy)]
pub enum BatchPath {
    /// The request of `IngestBatch`.
    Unary,
    /// Batch `index` (from 0) of an `Ingest` stream.
    Stream(u64),
}

impl BatchPath {
    fn field(self, rest: &str) -> String {
        match self {
            BatchPath::Unary => rest.to_owned(),
            BatchPath::Stream(index) => format!("batches[{index}].{rest}"),
        }
    }
}

/// Checks one batch and returns its sample count: timestamps times channels, summed over
/// sensors.
///
/// # Errors
/// `InvalidArgument` with the field path (under `path`) for a missing stamp, a bad device id,
/// decreasing offsets, a channel whose values are not as many as the offsets, or a NaN or
/// infinite value; `NotFound` when the device is not a live twin (`is_live` says).
pub fn check_batch(
    batch: &pb::TelemetryBatch,
    path: BatchPath,
    limits: &Limits,
    is_live: impl FnOnce(&str) -> bool,
) -> Result<u64, TwinError> {
    let Some(stamp) = &batch.stamp else {
        return Err(TwinError::invalid(
            path.field("stamp"),
            "missing: every batch names its device",
        ));
    };
    limits.check_id(&path.field("stamp.device_id"), &stamp.device_id)?;
    if !is_live(&stamp.device_id) {
        return Err(TwinError::NotFound {
            twin_id: stamp.device_id.clone(),
        });
    }
    let mut samples: u64 = 0;
    for (sensor_index, series) in batch.sensors.iter().enumerate() {
        let offsets = &series.offsets_nanos;
        for (position, pair) in offsets.windows(2).enumerate() {
            if let [earlier, later] = pair
                && later < earlier
            {
                return Err(TwinError::invalid(
                    path.field(&format!("sensors[{sensor_index}].offsets_nanos")),
                    format!(
                        "offsets must not decrease: [{}] = {later} after [{position}] = {earlier}",
                        position + 1
                    ),
                ));
            }
        }
        for (channel_index, channel) in series.channels.iter().enumerate() {
            let values_field = || format!("sensors[{sensor_index}].channels[{channel_index}].values");
            if channel.values.len() != offsets.len() {
                return Err(TwinError::invalid(
                    path.field(&values_field()),
                    format!(
                        "has {} values for {} offsets_nanos: each channel needs one value per timestamp",
                        channel.values.len(),
                        offsets.len()
                    ),
                ));
            }
            if let Some(position) = channel.values.iter().position(|value| !value.is_finite()) {
                let value = channel.values.get(position).copied().unwrap_or(f64::NAN);
                return Err(TwinError::invalid(
                    path.field(&values_field()),
                    format!("[{position}] is {value}: NaN and infinities are rejected"),
                ));
            }
        }
        let rows = offsets.len() as u64;
        samples = samples.saturating_add(rows.saturating_mul(series.channels.len() as u64));
    }
    Ok(samples)
}

/// The Telemetry service.
#[derive(Debug, Clone)]
pub struct TelemetryService {
    shared: Arc<Shared>,
    limits: Limits,
    storage: TelemetryStorage,
    shutdown: CancellationToken,
}

impl TelemetryService {
    /// The service over the engine's published state (its snapshot for the live twins, its
    /// counters and telemetry ledger to count into), storing into `storage`; streams end with
    /// UNAVAILABLE when `shutdown` is cancelled.
    pub fn new(shared: Arc<Shared>, limits: Limits, storage: TelemetryStorage, shutdown: CancellationToken) -> Self {
        TelemetryService {
            shared,
            limits,
            storage,
            shutdown,
        }
    }

    /// Checks, counts and submits one batch for storage; returns its samples and the pending
    /// write (none when telemetry is not stored).
    async fn accept_and_store(
        &self,
        batch: &pb::TelemetryBatch,
        path: BatchPath,
    ) -> Result<Result<(u64, Option<PendingWrite>), TwinError>, Status> {
        let samples = match self.accept(batch, path) {
            Ok(samples) => samples,
            Err(error) => return Ok(Err(error)),
        };
        let device_id = batch.stamp.as_ref().map_or("", |stamp| stamp.device_id.as_str());
        let pending = match self.storage.write(device_id, batch) {
            Some(write) => Some(
                self.storage
                    .store()
                    .submit(write)
                    .await
                    .map_err(|error| store_status(&error))?,
            ),
            None => None,
        };
        Ok(Ok((samples, pending)))
    }

    /// Checks and counts one batch; returns its samples.
    fn accept(&self, batch: &pb::TelemetryBatch, path: BatchPath) -> Result<u64, TwinError> {
        let snapshot = &self.shared.snapshot;
        let samples = check_batch(batch, path, &self.limits, |device_id| {
            snapshot.read().twins.contains_key(device_id)
        })?;
        let (device_id, sequence) = batch
            .stamp
            .as_ref()
            .map_or(("", 0), |stamp| (stamp.device_id.as_str(), stamp.sequence));
        self.shared.telemetry.record(device_id, sequence, samples);
        self.shared.telemetry_notices.publish(device_id, batch, samples);
        let counters = &self.shared.counters;
        counters.telemetry_batches.fetch_add(1, Ordering::Relaxed);
        counters.telemetry_samples.fetch_add(samples, Ordering::Relaxed);
        Ok(samples)
    }

    fn count_rejection(&self) {
        self.shared.counters.telemetry_rejected.fetch_add(1, Ordering::Relaxed);
    }
}

#[tonic::async_trait]
impl Telemetry for TelemetryService {
    async fn ingest(
        &self,
        request: Request<Streaming<pb::TelemetryBatch>>,
    ) -> Result<Response<pb::IngestSummary>, Status> {
        let mut inbound = request.into_inner();
        let mut summary = pb::IngestSummary::default();
        let mut index: u64 = 0;
        let mut pending: VecDeque<PendingWrite> = VecDeque::with_capacity(STORE_WINDOW + 1);
        loop {
            let message = tokio::select! {
                message = inbound.message() => message?,
                () = self.shutdown.cancelled() => return Err(Status::unavailable("the server is shutting down")),
            };
            let Some(batch) = message else {
                break;
            };
            match self.accept_and_store(&batch, BatchPath::Stream(index)).await? {
                Ok((samples, write)) => {
                    summary.batches_accepted += 1;
                    summary.samples_accepted = summary.samples_accepted.saturating_add(samples);
                    if let Some(write) = write {
                        pending.push_back(write);
                    }
                    if pending.len() > STORE_WINDOW
                        && let Some(oldest) = pending.pop_front()
                    {
                        oldest.wait().await.map_err(|error| store_status(&error))?;
                    }
                }
                Err(error) => {
                    self.count_rejection();
                    summary.batches_rejected += 1;
                    if summary.rejected.len() < MAX_DESCRIBED_REJECTIONS {
                        let (device_id, sequence) = batch
                            .stamp
                            .map_or((String::new(), 0), |stamp| (stamp.device_id, stamp.sequence));
                        let status = twin_status(&error);
                        tracing::debug!(index, device_id = %device_id, %error, "telemetry batch rejected");
                        summary.rejected.push(pb::RejectedBatch {
                            index,
                            device_id,
                            sequence,
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                        });
                    }
                }
            }
            index += 1;
        }
        // Answer only when every accepted batch is durable.
        for write in pending {
            write.wait().await.map_err(|error| store_status(&error))?;
        }
        Ok(Response::new(summary))
    }

    async fn ingest_batch(&self, request: Request<pb::TelemetryBatch>) -> Result<Response<pb::IngestSummary>, Status> {
        let batch = request.into_inner();
        match self.accept_and_store(&batch, BatchPath::Unary).await? {
            Ok((samples, write)) => {
                if let Some(write) = write {
                    write.wait().await.map_err(|error| store_status(&error))?;
                }
                Ok(Response::new(pb::IngestSummary {
                    batches_accepted: 1,
                    samples_accepted: samples,
                    batches_rejected: 0,
                    rejected: Vec::new(),
                }))
            }
            Err(error) => {
                self.count_rejection();
                Err(twin_status(&error))
            }
        }
    }

    async fn read(
        &self,
        request: Request<pb::ReadTelemetryRequest>,
    ) -> Result<Response<pb::ReadTelemetryResponse>, Status> {
        let request = request.into_inner();
        self.limits
            .check_id("device_id", &request.device_id)
            .map_err(|error| twin_status(&error))?;
        let page_size = match request.page_size {
            0 => DEFAULT_READ_PAGE,
            size if size > MAX_READ_PAGE => {
                return Err(twin_status(&TwinError::invalid(
                    "page_size",
                    format!("{size} is above the largest page, {MAX_READ_PAGE}"),
                )));
            }
            size => size,
        };
        if !self.shared.snapshot.read().twins.contains_key(&request.device_id) {
            return Err(twin_status(&TwinError::NotFound {
                twin_id: request.device_id,
            }));
        }
        let until = match request.until_unix_nanos {
            0 => u64::MAX,
            until => until,
        };
        let store = self.storage.store().clone();
        let device_id = request.device_id.clone();
        let after = request.after_unix_nanos;
        let stored =
            tokio::task::spawn_blocking(move || store.read_telemetry(&device_id, after, until, page_size as usize))
                .await
                .map_err(|error| Status::internal(format!("the telemetry reader failed: {error}")))?
                .map_err(|error| Status::unavailable(format!("telemetry could not be read: {error}")))?;
        let full = stored.len() == page_size as usize;
        let mut batches = Vec::with_capacity(stored.len());
        for entry in stored {
            let batch = pb::TelemetryBatch::decode(entry.batch.as_slice()).map_err(|error| {
                Status::data_loss(format!(
                    "the telemetry batch of {:?} stored at {} cannot be decoded: {error}",
                    request.device_id, entry.stored_at
                ))
            })?;
            batches.push(pb::StoredTelemetryBatch {
                stored_unix_nanos: entry.stored_at,
                batch: Some(batch),
            });
        }
        let next_after_unix_nanos = match batches.last() {
            Some(last) if full => last.stored_unix_nanos,
            _ => 0,
        };
        Ok(Response::new(pb::ReadTelemetryResponse {
            batches,
            next_after_unix_nanos,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(device_id: &str, offsets: Vec<u64>, channels: Vec<Vec<f64>>) -> pb::TelemetryBatch {
        pb::TelemetryBatch {
            stamp: Some(pb::BatchStamp {
                device_id: device_id.to_owned(),
                sequence: 1,
                ..pb::BatchStamp::default()
            }),
            sensors: vec![pb::SensorSeries {
                sensor: "vibration".to_owned(),
                start_unix_nanos: 0,
                offsets_nanos: offsets,
                channels: channels
                    .into_iter()
                    .map(|values| pb::ChannelValues {
                        channel: String::new(),
                        values,
                    })
                    .collect(),
            }],
        }
    }

    fn field_of(result: Result<u64, TwinError>) -> String {
        match result {
            Err(error) => error.field().unwrap_or("<none>").to_owned(),
            Ok(samples) => panic!("accepted with {samples} samples"),
        }
    }

    #[test]
    fn samples_are_timestamps_times_channels() {
        let limits = Limits::default();
        let good = batch("d1", vec![0, 1, 1, 5], vec![vec![1.0; 4], vec![2.0; 4], vec![3.0; 4]]);
        let samples = check_batch(&good, BatchPath::Unary, &limits, |_| true).expect("accepted");
        assert_eq!(samples, 12);
    }

    #[test]
    fn bad_batches_name_their_field_under_the_stream_index() {
        let limits = Limits::default();
        let short = batch("d1", vec![0, 1], vec![vec![1.0, 2.0], vec![1.0]]);
        assert_eq!(
            field_of(check_batch(&short, BatchPath::Stream(3), &limits, |_| true)),
            "batches[3].sensors[0].channels[1].values"
        );
        let not_finite = batch("d1", vec![0, 1], vec![vec![1.0, f64::INFINITY]]);
        assert_eq!(
            field_of(check_batch(&not_finite, BatchPath::Unary, &limits, |_| true)),
            "sensors[0].channels[0].values"
        );
        let decreasing = batch("d1", vec![5, 1], vec![]);
        assert_eq!(
            field_of(check_batch(&decreasing, BatchPath::Unary, &limits, |_| true)),
            "sensors[0].offsets_nanos"
        );
        let bad_id = batch("no spaces", vec![], vec![]);
        assert_eq!(
            field_of(check_batch(&bad_id, BatchPath::Unary, &limits, |_| true)),
            "stamp.device_id"
        );
        let unknown = batch("d2", vec![], vec![]);
        assert!(matches!(
            check_batch(&unknown, BatchPath::Unary, &limits, |_| false),
            Err(TwinError::NotFound { .. })
        ));
    }

    #[test]
    fn the_ledger_counts_per_device_and_notices_repeated_sequences() {
        let ledger = TelemetryLedger::default();
        ledger.record("d1", 1, 10);
        ledger.record("d1", 2, 5);
        ledger.record("d1", 2, 5);
        ledger.record("d2", 1, 1);
        assert_eq!(
            ledger.device("d1"),
            Some(DeviceTelemetry {
                batches: 3,
                samples: 20,
                last_sequence: 2,
                out_of_order: 1
            })
        );
        assert_eq!(ledger.device_count(), 2);
        assert_eq!(ledger.device("d3"), None);
    }
}
