//! The `Twins` service: reads from the published snapshot, changes through the engine, and
//! Watch streams from the change history.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};
use twin_proto::v1 as pb;
use twin_proto::v1::twins_server::Twins;

use super::convert::{
    ERROR_DOMAIN, invalid_argument, parse_document, parse_patch, timestamp, twin_message, twin_status,
};
use super::engine::{Applied, Command, DesiredUpdate, EngineHandle, Shared};
use super::filter::Filter;
use super::history::{ChangeRecord, ResumeError};
use crate::twins::{Limits, NewTwin, Section, TwinError};

/// The most twins per ListTwins page.
const MAX_PAGE_SIZE: usize = 1000;
/// Twins per page when the request names none.
const DEFAULT_PAGE_SIZE: usize = 100;
/// The most twins one page examines; a selective filter over a large fleet returns a short page
/// with a next_page_token rather than holding the snapshot lock for long.
const MAX_SCANNED_PER_PAGE: usize = 50_000;
/// The most updates in one UpdateDesiredBatch call (Azure IoT Hub's bulk registry operations
/// take 100 devices; a larger batch amortizes more per call while one call's patches, at the
/// 32 KiB desired limit, stay within tonic's 4 MiB default message size only for small patches).
const MAX_BATCH_UPDATES: usize = 1000;
/// Shortest progress interval a watcher may ask for.
const MIN_PROGRESS_INTERVAL: Duration = Duration::from_millis(10);

/// The Twins service.
#[derive(Debug, Clone)]
pub struct TwinsService {
    engine: EngineHandle,
    shared: Arc<Shared>,
    limits: Limits,
    watch_buffer: usize,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl TwinsService {
    /// The service over an engine, its published state and the server's shutdown token and
    /// task tracker (Watch streams are tracked tasks that end at shutdown).
    pub fn new(
        engine: EngineHandle,
        shared: Arc<Shared>,
        limits: Limits,
        watch_buffer: usize,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        TwinsService {
            engine,
            shared,
            limits,
            watch_buffer,
            shutdown,
            tasks,
        }
    }
}

fn desired_response(applied: &Applied) -> pb::UpdateDesiredResponse {
    pb::UpdateDesiredResponse {
        version: applied.version,
        revision: applied.revision,
        delta_empty: applied.delta_empty,
        updated_at: Some(timestamp(applied.at)),
    }
}

fn domain(result: Result<impl Sized, TwinError>) -> Result<(), Status> {
    result.map(|_| ()).map_err(|error| twin_status(&error))
}

fn view_is_full(view: i32, default_full: bool) -> Result<bool, Status> {
    match pb::TwinView::try_from(view) {
        Ok(pb::TwinView::Unspecified) => Ok(default_full),
        Ok(pb::TwinView::Basic) => Ok(false),
        Ok(pb::TwinView::Full) => Ok(true),
        Err(_) => Err(invalid_argument("view", format!("unknown value {view}"))),
    }
}

#[tonic::async_trait]
impl Twins for TwinsService {
    async fn get_twin(&self, request: Request<pb::GetTwinRequest>) -> Result<Response<pb::Twin>, Status> {
        let request = request.into_inner();
        let full = view_is_full(request.view, true)?;
        let Some(published) = self.shared.snapshot.get(&request.device_id) else {
            domain(self.limits.check_id("device_id", &request.device_id))?;
            return Err(twin_status(&TwinError::NotFound {
                twin_id: request.device_id,
            }));
        };
        Ok(Response::new(twin_message(&published, full)))
    }

    async fn list_twins(
        &self,
        request: Request<pb::ListTwinsRequest>,
    ) -> Result<Response<pb::ListTwinsResponse>, Status> {
        let request = request.into_inner();
        let full = view_is_full(request.view, false)?;
        let filter = Filter::new("filter", request.filter)?;
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            size => usize::try_from(size).unwrap_or(MAX_PAGE_SIZE).min(MAX_PAGE_SIZE),
        };
        let after = if request.page_token.is_empty() {
            None
        } else {
            match request.page_token.strip_prefix("after:") {
                Some(id) => Some(id.to_owned()),
                None => return Err(invalid_argument("page_token", "not a token this server returned")),
            }
        };
        let mut page = Vec::with_capacity(page_size.min(64));
        let mut next_page_token = String::new();
        let revision;
        {
            let snapshot = self.shared.snapshot.read();
            revision = snapshot.revision;
            let range = match &after {
                Some(id) => snapshot
                    .twins
                    .range::<str, _>((std::ops::Bound::Excluded(id.as_str()), std::ops::Bound::Unbounded)),
                None => snapshot.twins.range::<str, _>(..),
            };
            let mut last_scanned = None;
            for (scanned, (id, published)) in range.enumerate() {
                if page.len() == page_size || scanned == MAX_SCANNED_PER_PAGE {
                    if let Some(last) = last_scanned {
                        next_page_token = format!("after:{last}");
                    }
                    break;
                }
                last_scanned = Some(id.as_str());
                if filter.matches(published) {
                    page.push(Arc::clone(published));
                }
            }
        }
        let twins = page.iter().map(|published| twin_message(published, full)).collect();
        Ok(Response::new(pb::ListTwinsResponse {
            twins,
            next_page_token,
            revision,
        }))
    }

    async fn create_twin(&self, request: Request<pb::CreateTwinRequest>) -> Result<Response<pb::Twin>, Status> {
        let request = request.into_inner();
        let desired = parse_document("desired_json", &request.desired_json, Section::Desired, &self.limits)
            .map_err(|error| twin_status(&error))?;
        let tags = parse_document("tags_json", &request.tags_json, Section::Tags, &self.limits)
            .map_err(|error| twin_status(&error))?;
        let new = NewTwin {
            id: request.device_id,
            group: Some(request.group).filter(|group| !group.is_empty()),
            tags,
            desired,
        };
        let applied = self.engine.call(|reply| Command::Create { new, reply }).await?;
        Ok(Response::new(twin_message(&applied.twin, true)))
    }

    async fn update_desired(
        &self,
        request: Request<pb::UpdateDesiredRequest>,
    ) -> Result<Response<pb::UpdateDesiredResponse>, Status> {
        let request = request.into_inner();
        let patch = parse_patch("patch_json", &request.patch_json, Section::Desired, &self.limits)
            .map_err(|error| twin_status(&error))?;
        let update = DesiredUpdate {
            device_id: request.device_id,
            patch,
            patch_json: request.patch_json,
            expected: request.expected_version,
        };
        let applied = self
            .engine
            .call(|reply| Command::UpdateDesired { update, reply })
            .await?;
        Ok(Response::new(desired_response(&applied)))
    }

    async fn update_desired_batch(
        &self,
        request: Request<pb::UpdateDesiredBatchRequest>,
    ) -> Result<Response<pb::UpdateDesiredBatchResponse>, Status> {
        let requests = request.into_inner().updates;
        if requests.is_empty() || requests.len() > MAX_BATCH_UPDATES {
            return Err(invalid_argument(
                "updates",
                format!("{} updates; a batch holds 1 to {MAX_BATCH_UPDATES}", requests.len()),
            ));
        }
        // Updates whose patch does not parse are answered here; the rest go to the engine as
        // one command and come back in the same order.
        let mut refused: Vec<Option<Status>> = Vec::with_capacity(requests.len());
        let mut updates = Vec::with_capacity(requests.len());
        for (index, request) in requests.into_iter().enumerate() {
            let field = format!("updates[{index}].patch_json");
            match parse_patch(&field, &request.patch_json, Section::Desired, &self.limits) {
                Ok(patch) => {
                    refused.push(None);
                    updates.push(DesiredUpdate {
                        device_id: request.device_id,
                        patch,
                        patch_json: request.patch_json,
                        expected: request.expected_version,
                    });
                }
                Err(error) => refused.push(Some(twin_status(&error))),
            }
        }
        let applied = if updates.is_empty() {
            Vec::new()
        } else {
            self.engine
                .call(|reply| Command::UpdateDesiredBatch { updates, reply })
                .await?
        };
        let mut applied = applied.into_iter();
        let results = refused
            .into_iter()
            .map(|refused| {
                let result = match refused {
                    Some(status) => Err(status),
                    None => applied
                        .next()
                        .unwrap_or_else(|| Err(Status::internal("the engine answered fewer updates than it was sent"))),
                };
                let outcome = match result {
                    Ok(applied) => pb::update_desired_result::Outcome::Applied(desired_response(&applied)),
                    Err(status) => pb::update_desired_result::Outcome::Error(pb::ItemError {
                        code: status.code() as i32,
                        message: status.message().to_owned(),
                        details: status.details().to_vec(),
                    }),
                };
                pb::UpdateDesiredResult { outcome: Some(outcome) }
            })
            .collect();
        Ok(Response::new(pb::UpdateDesiredBatchResponse { results }))
    }

    async fn update_tags(
        &self,
        request: Request<pb::UpdateTagsRequest>,
    ) -> Result<Response<pb::UpdateTagsResponse>, Status> {
        let request = request.into_inner();
        let patch = parse_patch("patch_json", &request.patch_json, Section::Tags, &self.limits)
            .map_err(|error| twin_status(&error))?;
        let applied = self
            .engine
            .call(|reply| Command::UpdateTags {
                device_id: request.device_id,
                patch,
                patch_json: request.patch_json,
                expected: request.expected_version,
                reply,
            })
            .await?;
        Ok(Response::new(pb::UpdateTagsResponse {
            version: applied.version,
            revision: applied.revision,
        }))
    }

    async fn delete_twin(
        &self,
        request: Request<pb::DeleteTwinRequest>,
    ) -> Result<Response<pb::DeleteTwinResponse>, Status> {
        let request = request.into_inner();
        let applied = self
            .engine
            .call(|reply| Command::Delete {
                device_id: request.device_id,
                expected: request.expected_version,
                reply,
            })
            .await?;
        Ok(Response::new(pb::DeleteTwinResponse {
            version: applied.version,
            revision: applied.revision,
        }))
    }

    type WatchStream = ReceiverStream<Result<pb::WatchResponse, Status>>;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let filter = Filter::new("filter", request.filter)?;
        let interval = match request.progress_interval_ms {
            0 => Duration::from_millis(1000),
            millis => Duration::from_millis(u64::from(millis)).max(MIN_PROGRESS_INTERVAL),
        };
        let subscription = self
            .shared
            .history
            .subscribe(request.after_revision)
            .map_err(|error| match error {
                ResumeError::TooOld { oldest_revision } => Status::with_error_details(
                    Code::OutOfRange,
                    format!(
                        "after_revision: {} is older than the history kept (the oldest revision to resume after is {oldest_revision}); list the twins again and watch from the listing's revision",
                        request.after_revision.unwrap_or_default()
                    ),
                    ErrorDetails::with_error_info(
                        "HISTORY_GONE",
                        ERROR_DOMAIN,
                        [("oldest_revision".to_owned(), oldest_revision.to_string())],
                    ),
                ),
                ResumeError::Ahead { revision } => Status::with_error_details(
                    Code::OutOfRange,
                    format!(
                        "after_revision: {} is past the last revision {revision}",
                        request.after_revision.unwrap_or_default()
                    ),
                    ErrorDetails::with_error_info(
                        "REVISION_AHEAD",
                        ERROR_DOMAIN,
                        [("revision".to_owned(), revision.to_string())],
                    ),
                ),
            })?;
        let telemetry = request
            .include_telemetry
            .then(|| (self.shared.telemetry_notices.subscribe(), Arc::clone(&self.shared)));
        let (sender, receiver) = mpsc::channel(self.watch_buffer.max(1));
        let shutdown = self.shutdown.clone();
        let start = request.after_revision.unwrap_or(subscription.revision);
        self.tasks.spawn(async move {
            let watcher = Watcher {
                sender,
                filter,
                considered: start,
                shutdown,
            };
            watcher.run(subscription, telemetry, interval).await;
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// One Watch stream's task: started, replay, then live events, with progress when idle.
struct Watcher {
    sender: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    filter: Filter,
    /// Every revision up to this one has been considered.
    considered: u64,
    shutdown: CancellationToken,
}

/// A telemetry watcher's notices and the published twins its filter is checked against.
type TelemetryFeed = (broadcast::Receiver<Arc<pb::TelemetryNotice>>, Arc<Shared>);

/// The next telemetry notice, or never when the watcher did not ask for them.
async fn next_notice(
    feed: &mut Option<TelemetryFeed>,
) -> Result<Arc<pb::TelemetryNotice>, broadcast::error::RecvError> {
    match feed {
        Some((notices, _)) => notices.recv().await,
        None => std::future::pending().await,
    }
}

enum Next {
    /// The event was sent.
    Sent,
    /// Nothing to send, or a message other than an event was sent.
    Continue,
    /// The watcher is done (client gone, shutdown, error sent).
    Stop,
}

impl Watcher {
    async fn run(
        mut self,
        subscription: super::history::Subscription,
        mut telemetry: Option<TelemetryFeed>,
        interval: Duration,
    ) {
        let started = pb::watch_response::Event::Started(pb::WatchStarted {
            revision: subscription.revision,
            oldest_revision: subscription.oldest_revision,
        });
        if matches!(self.send(Ok(started)).await, Next::Stop) {
            return;
        }
        for record in subscription.replay {
            if matches!(self.offer(&record).await, Next::Stop) {
                return;
            }
        }
        // Progress is due at each tick with no event sent since the previous tick.
        let mut live = subscription.live;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent_since_tick = false;
        loop {
            let next = tokio::select! {
                () = self.shutdown.cancelled() => {
                    let _sent = self.sender.send(Err(Status::unavailable("the server is shutting down"))).await;
                    return;
                }
                () = self.sender.closed() => return,
                _ = ticker.tick() => {
                    if sent_since_tick {
                        sent_since_tick = false;
                        Next::Continue
                    } else {
                        let progress = pb::watch_response::Event::Progress(pb::WatchProgress { revision: self.considered });
                        self.send(Ok(progress)).await
                    }
                }
                notice = next_notice(&mut telemetry) => match notice {
                    Ok(notice) => {
                        let device_id = notice.stamp.as_ref().map_or("", |s| s.device_id.as_str());
                        let matches = telemetry
                            .as_ref()
                            .and_then(|(_, shared)| shared.snapshot.get(device_id))
                            .is_some_and(|published| self.filter.matches(&published));
                        if matches {
                            self.send(Ok(pb::watch_response::Event::Telemetry(notice.as_ref().clone()))).await
                        } else {
                            Next::Continue
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        let status = Status::resource_exhausted(format!(
                            "watcher fell {missed} telemetry notices behind; telemetry notices are live only"
                        ));
                        let _sent = self.sender.send(Err(status)).await;
                        Next::Stop
                    }
                    Err(broadcast::error::RecvError::Closed) => Next::Stop,
                },
                received = live.recv() => match received {
                    Ok(record) => match self.offer(&record).await {
                        Next::Sent => {
                            sent_since_tick = true;
                            Next::Continue
                        }
                        other => other,
                    },
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        let status = Status::resource_exhausted(format!(
                            "watcher fell {missed} events behind; resume after revision {}",
                            self.considered
                        ));
                        let _sent = self.sender.send(Err(status)).await;
                        Next::Stop
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let _sent = self.sender.send(Err(Status::unavailable("the server is shutting down"))).await;
                        Next::Stop
                    }
                },
            };
            if matches!(next, Next::Stop) {
                return;
            }
        }
    }

    /// Sends the event if it is new and matches; advances the resume point either way.
    async fn offer(&mut self, record: &ChangeRecord) -> Next {
        if record.event.revision <= self.considered {
            return Next::Continue;
        }
        self.considered = record.event.revision;
        if !self.filter.matches(&record.twin) {
            return Next::Continue;
        }
        let change = pb::watch_response::Event::Change(Box::new(record.event.clone()));
        match self.send(Ok(change)).await {
            Next::Continue => Next::Sent,
            other => other,
        }
    }

    async fn send(&self, event: Result<pb::watch_response::Event, Status>) -> Next {
        let message = event.map(|event| pb::WatchResponse { event: Some(event) });
        tokio::select! {
            sent = self.sender.send(message) => if sent.is_ok() { Next::Continue } else { Next::Stop },
            () = self.shutdown.cancelled() => Next::Stop,
        }
    }
}
