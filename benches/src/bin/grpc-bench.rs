//! `grpc-bench`: the live twin server measured through its gRPC API, over loopback.
//!
//! ```text
//! cargo build --release -p twin-benches --bin grpc-bench -p twin-server --bin twin
//! target/release/grpc-bench updates --postgres "host=127.0.0.1 user=postgres dbname=test"
//! target/release/grpc-bench delta-latency --devices 10000 --rate 5000 --seconds 20
//! target/release/grpc-bench memory --twin-bin target/release/twin --twins 1000000
//! ```
//!
//! - `updates`: durable desired updates per second from `--in-flight` concurrent callers
//!   over `--connections` HTTP/2 connections, side by side in one run: the server with its
//!   default group commit called with `UpdateDesired` (one update per call) and with
//!   `UpdateDesiredBatch` (`--batch` updates per call), the same server configured to commit
//!   each update on its own (`engine.max_round = 1`, `engine.max_in_flight = 1`,
//!   `store.max_batch = 1`), and, with `--postgres`, the same updates against PostgreSQL (a
//!   JSONB row per twin, one `UPDATE ... RETURNING` per update, in autocommit, and `--batch` of
//!   them in one transaction, so each is durable before it returns, from the same number of
//!   concurrent connections). Medians of `--runs` rounds, the modes interleaved in each round.
//! - `delta-latency`: `--devices` devices each hold a `DeviceSync` stream; an operator sends
//!   `UpdateDesired` open loop at `--rate` per second (update `k` is due at `k / rate`, sent on
//!   its own task when due whatever the earlier ones are doing, so a slow server is not hidden:
//!   no coordinated omission), round robin over the devices. Each update's patch carries its
//!   number; the device that receives the delta looks up when that update was due. Latency =
//!   delta received - update due; percentiles over every update after the first second.
//! - `memory`: starts the `twin` binary (`--twin-bin`) as its own process, measures its
//!   resident memory empty, creates `--twins` twins (desired and tags documents of a typical
//!   idle device), then restarts it so that it holds exactly what it restores from disk, and
//!   reports (resident with the twins - resident empty) / twins.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use twin_proto::v1 as pb;
use twin_proto::v1::device_sync_client::DeviceSyncClient;
use twin_proto::v1::twins_client::TwinsClient;
use twin_server::serve::{ServeConfig, serve};

/// The allocator of the `twin` binary (jemalloc), so the in-process server runs as `twin serve`
/// does; `--features system-allocator` or `--features mimalloc` build the others for
/// side-by-side runs.
#[cfg(not(any(feature = "system-allocator", feature = "mimalloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// mimalloc, for a side-by-side run (`--features mimalloc`).
#[cfg(all(feature = "mimalloc", not(feature = "system-allocator")))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The global allocator this binary was built with, printed before each result.
const ALLOCATOR_NAME: &str = if cfg!(feature = "system-allocator") {
    "system (glibc malloc)"
} else if cfg!(feature = "mimalloc") {
    "mimalloc"
} else {
    "jemalloc"
};

/// The live twin server measured through its gRPC API.
#[derive(Parser, Debug)]
struct Args {
    #[command(subcommand)]
    command: Bench,
    /// Tokio worker threads (server and client share them in `updates` and `delta-latency`).
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Durable UpdateDesired calls per second: group commit vs one by one (vs PostgreSQL).
    Updates(UpdatesArgs),
    /// Desired update to delta received on the device's stream, open loop.
    DeltaLatency(LatencyArgs),
    /// Resident memory per idle twin, `twin serve` as its own process.
    Memory(MemoryArgs),
}

#[derive(clap::Args, Debug)]
struct UpdatesArgs {
    /// Twins the updates are spread over.
    #[arg(long, default_value_t = 10_000)]
    twins: u64,
    /// Updates per group-commit run (and per PostgreSQL run).
    #[arg(long, default_value_t = 200_000)]
    updates: u64,
    /// Updates per one-by-one run (each is its own commit, so fewer suffice).
    #[arg(long, default_value_t = 10_000)]
    single_updates: u64,
    /// Concurrent callers (and PostgreSQL connections).
    #[arg(long, default_value_t = 64)]
    in_flight: u64,
    /// HTTP/2 connections the callers share.
    #[arg(long, default_value_t = 4)]
    connections: u64,
    /// Rounds; the median of each mode is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// A PostgreSQL connection string (tokio-postgres format); omitted: no PostgreSQL run.
    #[arg(long)]
    postgres: Option<String>,
    /// Updates per UpdateDesiredBatch call (and per PostgreSQL transaction) in the batched
    /// runs; 0 or 1: no batched runs.
    #[arg(long, default_value_t = 100)]
    batch: u64,
    /// Skip the twin's unary (UpdateDesired, group commit) runs, e.g. to profile the batched
    /// path alone.
    #[arg(long)]
    skip_unary: bool,
}

#[derive(clap::Args, Debug)]
struct LatencyArgs {
    /// Devices connected, each with its own DeviceSync stream.
    #[arg(long, default_value_t = 10_000)]
    devices: u64,
    /// Desired updates per second, open loop.
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// Seconds of updates.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// HTTP/2 connections the device streams share.
    #[arg(long, default_value_t = 100)]
    connections: u64,
}

#[derive(clap::Args, Debug)]
struct MemoryArgs {
    /// The `twin` binary (`cargo build --release -p twin-server --bin twin`).
    #[arg(long, default_value = "target/release/twin")]
    twin_bin: PathBuf,
    /// Twins to create.
    #[arg(long, default_value_t = 1_000_000)]
    twins: u64,
    /// Concurrent CreateTwin callers.
    #[arg(long, default_value_t = 256)]
    in_flight: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    eprintln!("grpc-bench: allocator {ALLOCATOR_NAME}");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(async move {
        match args.command {
            Bench::Updates(updates) => updates_bench(updates).await,
            Bench::DeltaLatency(latency) => latency_bench(latency).await,
            Bench::Memory(memory) => memory_bench(memory).await,
        }
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn device_id(index: u64) -> String {
    format!("bench-dev-{index:07}")
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX))
}

/// A server in this process on 127.0.0.1:0 with a fresh database.
struct InProcess {
    address: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), twin_server::serve::ServeError>>,
    _data: tempfile::TempDir,
}

impl InProcess {
    async fn start(configure: impl FnOnce(&mut ServeConfig)) -> Result<InProcess> {
        let data = tempfile::tempdir().context("temp folder")?;
        let listener = TcpListener::bind("127.0.0.1:0").await.context("bind 127.0.0.1:0")?;
        let address = listener.local_addr().context("local address")?;
        let mut config = ServeConfig {
            listen: address,
            data_dir: data.path().to_owned(),
            ..ServeConfig::default()
        };
        configure(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, config, async {
            let _stopped = stopped.await;
        }));
        Ok(InProcess {
            address,
            stop: Some(stop),
            task,
            _data: data,
        })
    }

    async fn channels(&self, count: u64) -> Result<Vec<Channel>> {
        connect_channels(&format!("http://{}", self.address), count).await
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _sent = stop.send(());
        }
        (&mut self.task).await.context("server task")?.context("server")?;
        Ok(())
    }
}

async fn connect_channels(url: &str, count: u64) -> Result<Vec<Channel>> {
    let mut channels = Vec::new();
    for _ in 0..count.max(1) {
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
            .context("endpoint")?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connect to {url}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Creates `count` twins from `in_flight` concurrent callers.
async fn create_twins(channels: &[Channel], count: u64, in_flight: u64, documents: bool) -> Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..in_flight.max(1) {
        let mut client = TwinsClient::new(channels[(caller as usize) % channels.len()].clone());
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count {
                    return Ok::<(), tonic::Status>(());
                }
                let (desired_json, tags_json) = if documents {
                    (
                        format!(
                            r#"{{"sampling":{{"rate_hz":10,"window_s":60}},"upload":"summary","model":{{"name":"vibration-anomaly","version":2}},"threshold":0.{:02}}}"#,
                            index % 100
                        ),
                        format!(r#"{{"site":"plant-{}","line":{}}}"#, index % 17, index % 5),
                    )
                } else {
                    (String::new(), String::new())
                };
                client
                    .create_twin(pb::CreateTwinRequest {
                        device_id: device_id(index),
                        group: "compressors".to_owned(),
                        desired_json,
                        tags_json,
                    })
                    .await?;
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("create caller")?.context("create twin")?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// updates

/// Update `index` of a run: the twin it changes and its patch.
fn update_request(index: u64, twins: u64, round: u64) -> pb::UpdateDesiredRequest {
    pb::UpdateDesiredRequest {
        device_id: device_id(index % twins),
        patch_json: format!(r#"{{"setpoint":{index},"round":{round}}}"#),
        expected_version: None,
    }
}

/// `updates` durable desired updates from `in_flight` callers, each call one UpdateDesired
/// (`batch` <= 1) or one UpdateDesiredBatch of `batch` updates; updates per second.
async fn grpc_updates(
    channels: &[Channel],
    twins: u64,
    updates: u64,
    in_flight: u64,
    batch: u64,
    round: u64,
) -> Result<f64> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let batch = batch.max(1);
    for caller in 0..in_flight.max(1) {
        let mut client = TwinsClient::new(channels[(caller as usize) % channels.len()].clone());
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            let mut done = 0u64;
            loop {
                let first = next.fetch_add(batch, Ordering::Relaxed);
                if first >= updates {
                    return Ok::<u64, tonic::Status>(done);
                }
                let last = (first + batch).min(updates);
                if batch == 1 {
                    client.update_desired(update_request(first, twins, round)).await?;
                } else {
                    let request = pb::UpdateDesiredBatchRequest {
                        updates: (first..last).map(|index| update_request(index, twins, round)).collect(),
                    };
                    let response = client.update_desired_batch(request).await?.into_inner();
                    for result in response.results {
                        if let Some(pb::update_desired_result::Outcome::Error(error)) = result.outcome {
                            return Err(tonic::Status::new(tonic::Code::from(error.code), error.message));
                        }
                    }
                }
                done += last - first;
            }
        });
    }
    let mut done = 0u64;
    while let Some(joined) = tasks.join_next().await {
        done += joined.context("update caller")?.context("update desired")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    if done != updates {
        bail!("{done} of {updates} updates acknowledged");
    }
    Ok(updates as f64 / seconds)
}

/// The PostgreSQL side: a table of JSONB rows, one `UPDATE` per update in autocommit.
struct Postgres {
    clients: Vec<Arc<tokio_postgres::Client>>,
}

impl Postgres {
    async fn connect(config: &str, connections: u64, twins: u64) -> Result<Postgres> {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            let (client, connection) = tokio_postgres::connect(config, tokio_postgres::NoTls)
                .await
                .with_context(|| format!("connect to PostgreSQL ({config})"))?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    eprintln!("postgres connection: {error}");
                }
            });
            clients.push(Arc::new(client));
        }
        let first = &clients[0];
        let settings = first
            .query_one(
                "SELECT current_setting('fsync'), current_setting('synchronous_commit'), version()",
                &[],
            )
            .await
            .context("read PostgreSQL settings")?;
        let (fsync, synchronous_commit, version): (String, String, String) =
            (settings.get(0), settings.get(1), settings.get(2));
        eprintln!("postgres: {version}; fsync={fsync}, synchronous_commit={synchronous_commit}");
        if fsync != "on" || synchronous_commit == "off" {
            bail!("PostgreSQL does not commit durably here (fsync={fsync}, synchronous_commit={synchronous_commit})");
        }
        first
            .batch_execute(
                "DROP TABLE IF EXISTS twin_bench;
                 CREATE TABLE twin_bench (id text PRIMARY KEY, version bigint NOT NULL, desired jsonb NOT NULL);",
            )
            .await
            .context("create table twin_bench")?;
        first
            .execute(
                "INSERT INTO twin_bench SELECT 'bench-dev-' || lpad(i::text, 7, '0'), 1, '{}'::jsonb
                 FROM generate_series(0, $1::bigint - 1) AS i",
                &[&i64::try_from(twins).unwrap_or(i64::MAX)],
            )
            .await
            .context("insert twins")?;
        Ok(Postgres { clients })
    }

    /// `updates` updates from one task per connection, each `UPDATE` in autocommit
    /// (`batch` <= 1) or `batch` of them, one after the other, in one transaction.
    async fn updates(&self, twins: u64, updates: u64, batch: u64, round: u64) -> Result<f64> {
        let next = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let batch = batch.max(1);
        for client in &self.clients {
            let client = Arc::clone(client);
            let next = Arc::clone(&next);
            tasks.spawn(async move {
                let statement = client
                    .prepare(
                        "UPDATE twin_bench SET desired = desired || $2::text::jsonb, version = version + 1
                         WHERE id = $1 RETURNING version",
                    )
                    .await?;
                let mut done = 0u64;
                loop {
                    let first = next.fetch_add(batch, Ordering::Relaxed);
                    if first >= updates {
                        return Ok::<u64, tokio_postgres::Error>(done);
                    }
                    let last = (first + batch).min(updates);
                    let update = |index: u64| {
                        let id = device_id(index % twins);
                        let patch = format!(r#"{{"setpoint":{index},"round":{round}}}"#);
                        (id, patch)
                    };
                    if batch == 1 {
                        let (id, patch) = update(first);
                        let row = client.query_one(&statement, &[&id, &patch]).await?;
                        let _version: i64 = row.get(0);
                    } else {
                        client.batch_execute("BEGIN").await?;
                        for index in first..last {
                            let (id, patch) = update(index);
                            let row = client.query_one(&statement, &[&id, &patch]).await?;
                            let _version: i64 = row.get(0);
                        }
                        client.batch_execute("COMMIT").await?;
                    }
                    done += last - first;
                }
            });
        }
        let mut done = 0u64;
        while let Some(joined) = tasks.join_next().await {
            done += joined.context("postgres caller")?.context("postgres update")?;
        }
        let seconds = started.elapsed().as_secs_f64();
        if done != updates {
            bail!("{done} of {updates} PostgreSQL updates returned");
        }
        Ok(updates as f64 / seconds)
    }

    async fn drop_table(&self) -> Result<()> {
        self.clients[0]
            .batch_execute("DROP TABLE IF EXISTS twin_bench")
            .await
            .context("drop table twin_bench")
    }
}

async fn updates_bench(args: UpdatesArgs) -> Result<()> {
    let grouped = InProcess::start(|_| {}).await?;
    let single = InProcess::start(|config| {
        config.engine.max_round = 1;
        config.engine.max_in_flight = 1;
        config.store.max_batch = 1;
    })
    .await?;
    let grouped_channels = grouped.channels(args.connections).await?;
    let single_channels = single.channels(args.connections).await?;
    create_twins(&grouped_channels, args.twins, 256, false).await?;
    create_twins(&single_channels, args.twins, 256, false).await?;
    let postgres = match &args.postgres {
        Some(config) => Some(Postgres::connect(config, args.in_flight, args.twins).await?),
        None => None,
    };
    let batched = args.batch > 1;

    // Medians per mode: twin unary, twin batched, twin one by one, PostgreSQL autocommit,
    // PostgreSQL transactions of `batch`.
    let mut rates: [Vec<f64>; 5] = Default::default();
    for round in 0..args.runs {
        let round_number = round as u64;
        let (twins, updates, in_flight) = (args.twins, args.updates, args.in_flight);
        let mut line = format!("round {round}:");
        if !args.skip_unary {
            let unary = grpc_updates(&grouped_channels, twins, updates, in_flight, 1, round_number).await?;
            line.push_str(&format!(" group commit {unary:.0}/s"));
            rates[0].push(unary);
        }
        if batched {
            let batch = grpc_updates(&grouped_channels, twins, updates, in_flight, args.batch, round_number).await?;
            line.push_str(&format!(", batches of {} {batch:.0}/s", args.batch));
            rates[1].push(batch);
        }
        let single = grpc_updates(&single_channels, twins, args.single_updates, in_flight, 1, round_number).await?;
        line.push_str(&format!(", one by one {single:.0}/s"));
        rates[2].push(single);
        if let Some(postgres) = &postgres {
            if !args.skip_unary {
                let autocommit = postgres.updates(twins, updates, 1, round_number).await?;
                line.push_str(&format!(", PostgreSQL autocommit {autocommit:.0}/s"));
                rates[3].push(autocommit);
            }
            if batched {
                let transactions = postgres.updates(twins, updates, args.batch, round_number).await?;
                line.push_str(&format!(
                    ", PostgreSQL transactions of {} {transactions:.0}/s",
                    args.batch
                ));
                rates[4].push(transactions);
            }
        }
        eprintln!("{line}");
    }
    if let Some(postgres) = &postgres {
        postgres.drop_table().await?;
    }
    grouped.stop().await?;
    single.stop().await?;

    let [unary, batch, single, autocommit, transactions] =
        rates.map(|rates| (!rates.is_empty()).then(|| median(rates)));
    let single = single.unwrap_or_default();
    let mut summary = format!(
        "{} twins, {} callers over {} connections | one by one {:.0} updates/s",
        args.twins, args.in_flight, args.connections, single
    );
    if let Some(unary) = unary {
        summary.push_str(&format!(
            " | UpdateDesired, group commit {:.0} updates/s | ratio {:.1}x",
            unary,
            unary / single
        ));
    }
    if let Some(batch) = batch {
        summary.push_str(&format!(
            " | UpdateDesiredBatch of {}, group commit {:.0} updates/s | ratio to one by one {:.1}x",
            args.batch,
            batch,
            batch / single
        ));
    }
    if let (Some(unary), Some(autocommit)) = (unary, autocommit) {
        summary.push_str(&format!(
            " | PostgreSQL JSONB autocommit {:.0} updates/s ({} connections) | twin unary/PostgreSQL {:.2}x",
            autocommit,
            args.in_flight,
            unary / autocommit
        ));
    }
    if let (Some(batch), Some(transactions)) = (batch, transactions) {
        summary.push_str(&format!(
            " | PostgreSQL JSONB transactions of {} {:.0} updates/s | twin batch/PostgreSQL batch {:.2}x",
            args.batch,
            transactions,
            batch / transactions
        ));
    }
    println!("{summary} (medians of {} rounds)", args.runs);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// delta-latency

/// One delta received: the update behind it and its latencies in nanoseconds.
struct Latency {
    update: u64,
    /// From when the update was due to when the device received the delta.
    from_due: u64,
    /// From when the server accepted the update (DesiredDelta.desired_changed_unix_nanos).
    from_accepted: u64,
}

/// One device's stream: counts the deltas it receives and records each update's latency.
async fn device_loop(
    client: &mut DeviceSyncClient<Channel>,
    id: String,
    due: Arc<Vec<AtomicU64>>,
    latencies: Arc<std::sync::Mutex<Vec<Latency>>>,
    received_count: Arc<AtomicU64>,
    ready: mpsc::Sender<()>,
) -> Result<()> {
    let (outbox, receiver) = mpsc::channel(1);
    outbox
        .send(pb::DeviceMessage {
            sequence: 0,
            body: Some(pb::device_message::Body::Hello(pb::Hello {
                device_id: id.clone(),
                ..pb::Hello::default()
            })),
        })
        .await
        .map_err(|_| anyhow!("queue hello"))?;
    let mut inbox = client
        .sync(ReceiverStream::new(receiver))
        .await
        .with_context(|| format!("open the sync stream of {id}"))?
        .into_inner();
    let mut mine = Vec::new();
    // The stream ends when the server shuts down at the end of the run (UNAVAILABLE).
    while let Ok(Some(message)) = inbox.message().await {
        let Some(pb::server_message::Body::Delta(delta)) = message.body else {
            continue;
        };
        let received = unix_nanos();
        if delta.reason == pb::DeltaReason::Connected as i32 {
            let _ready = ready.send(()).await;
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&delta.delta_json).context("delta json")?;
        if let Some(update) = value.get("seq").and_then(serde_json::Value::as_u64) {
            let due_at = due
                .get(usize::try_from(update).unwrap_or(usize::MAX))
                .map_or(0, |slot| slot.load(Ordering::Acquire));
            if due_at != 0 {
                received_count.fetch_add(1, Ordering::Relaxed);
                mine.push(Latency {
                    update,
                    from_due: received.saturating_sub(due_at),
                    from_accepted: received
                        .saturating_sub(u64::try_from(delta.desired_changed_unix_nanos).unwrap_or(0)),
                });
            }
        }
    }
    drop(outbox);
    latencies.lock().map_err(|_| anyhow!("lock"))?.append(&mut mine);
    Ok(())
}

fn percentile(sorted: &[u64], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64 * quantile).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1e6
}

async fn latency_bench(args: LatencyArgs) -> Result<()> {
    let server = InProcess::start(|_| {}).await?;
    let operator_channels = server.channels(4).await?;
    create_twins(&operator_channels, args.devices, 256, false).await?;
    let device_channels = server.channels(args.connections).await?;

    let total = args.rate * args.seconds;
    let due: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(
        usize::try_from(total).unwrap_or(0),
    )));
    let received = Arc::new(AtomicU64::new(0));
    let (ready, mut readies) = mpsc::channel(1024);
    let mut devices = tokio::task::JoinSet::new();
    let connect_started = Instant::now();
    for index in 0..args.devices {
        let mut client = DeviceSyncClient::new(device_channels[(index % args.connections) as usize].clone());
        let (due, latencies, received, ready) = (
            Arc::clone(&due),
            Arc::clone(&latencies),
            Arc::clone(&received),
            ready.clone(),
        );
        devices.spawn(async move { device_loop(&mut client, device_id(index), due, latencies, received, ready).await });
    }
    drop(ready);
    for _ in 0..args.devices {
        readies
            .recv()
            .await
            .ok_or_else(|| anyhow!("a device stream ended before it was connected"))?;
    }
    eprintln!(
        "{} device streams connected in {:.2} s",
        args.devices,
        connect_started.elapsed().as_secs_f64()
    );

    let failures = Arc::new(AtomicU64::new(0));
    let mut updates = tokio::task::JoinSet::new();
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let start_unix = unix_nanos() + 100_000_000;
    for update in 0..total {
        let offset_nanos = update * 1_000_000_000 / args.rate;
        tokio::time::sleep_until(start + Duration::from_nanos(offset_nanos)).await;
        due[update as usize].store(start_unix + offset_nanos, Ordering::Release);
        let mut client = TwinsClient::new(operator_channels[(update as usize) % operator_channels.len()].clone());
        let failures = Arc::clone(&failures);
        updates.spawn(async move {
            let result = client
                .update_desired(pb::UpdateDesiredRequest {
                    device_id: device_id(update % args.devices),
                    patch_json: format!(r#"{{"seq":{update}}}"#),
                    expected_version: None,
                })
                .await;
            if result.is_err() {
                failures.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while updates.join_next().await.is_some() {}
    // Let the last deltas arrive, then close the streams by stopping the server.
    let settle = Instant::now();
    loop {
        if received.load(Ordering::Relaxed) >= total || settle.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await?;
    while let Some(joined) = devices.join_next().await {
        if let Ok(Err(error)) = joined {
            eprintln!("device: {error:#}");
        }
    }
    let failed = failures.load(Ordering::Relaxed);
    let received_all = std::mem::take(&mut *latencies.lock().map_err(|_| anyhow!("lock"))?);
    let received = received_all.len() as u64;
    // The first second (the first `rate` updates) is warm-up.
    let measured: Vec<&Latency> = received_all
        .iter()
        .filter(|latency| latency.update >= args.rate)
        .collect();
    let mut all: Vec<u64> = measured.iter().map(|latency| latency.from_due).collect();
    let mut server_all: Vec<u64> = measured.iter().map(|latency| latency.from_accepted).collect();
    all.sort_unstable();
    server_all.sort_unstable();
    println!(
        "{} devices, {} updates/s for {} s: {} updates, {} deltas received, {} failed | update due -> delta on the device: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms | accepted -> delta: p50 {:.2} ms, p99 {:.2} ms",
        args.devices,
        args.rate,
        args.seconds,
        total,
        received,
        failed,
        percentile(&all, 0.5),
        percentile(&all, 0.9),
        percentile(&all, 0.99),
        percentile(&all, 0.999),
        percentile(&all, 1.0),
        percentile(&server_all, 0.5),
        percentile(&server_all, 0.99),
    );
    if received != total || failed != 0 {
        bail!("{received} of {total} deltas received, {failed} updates failed");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// memory

/// `twin serve` as a child process.
struct ServerProcess {
    child: Child,
    url: String,
}

impl ServerProcess {
    async fn start(binary: &Path, data: &Path) -> Result<ServerProcess> {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
            probe.local_addr().context("local address")?.port()
        };
        let metrics_port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
            probe.local_addr().context("local address")?.port()
        };
        let child = Command::new(binary)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
            .arg(data)
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let url = format!("http://127.0.0.1:{port}");
        let mut process = ServerProcess { child, url };
        let started = Instant::now();
        loop {
            if let Some(status) = process.child.try_wait().context("server status")? {
                bail!("twin serve exited with {status}");
            }
            if let Ok(channels) = connect_channels(&process.url, 1).await {
                let mut client = TwinsClient::new(channels[0].clone());
                if client
                    .list_twins(pb::ListTwinsRequest {
                        page_size: 1,
                        ..pb::ListTwinsRequest::default()
                    })
                    .await
                    .is_ok()
                {
                    return Ok(process);
                }
            }
            if started.elapsed() > Duration::from_secs(300) {
                let _killed = process.child.kill();
                bail!("twin serve did not answer within 300 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn resident_bytes(&self) -> Result<u64> {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).context("read /proc status")?;
        let line = status
            .lines()
            .find(|line| line.starts_with("VmRSS:"))
            .ok_or_else(|| anyhow!("no VmRSS in /proc status"))?;
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .ok_or_else(|| anyhow!("bad VmRSS line {line:?}"))?
            .parse()
            .context("VmRSS value")?;
        Ok(kib * 1024)
    }

    fn stop(mut self) -> Result<()> {
        // SIGTERM: a clean shutdown.
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let exit = self.child.wait().context("wait for twin serve")?;
        if !exit.success() {
            bail!("twin serve exited with {exit}");
        }
        Ok(())
    }
}

async fn memory_bench(args: MemoryArgs) -> Result<()> {
    let data = tempfile::tempdir().context("temp folder")?;
    let server = ServerProcess::start(&args.twin_bin, data.path()).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let empty = server.resident_bytes()?;
    let channels = connect_channels(&server.url, 4).await?;
    let started = Instant::now();
    create_twins(&channels, args.twins, args.in_flight, true).await?;
    let created_in = started.elapsed().as_secs_f64();
    drop(channels);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_create = server.resident_bytes()?;
    server.stop()?;
    let database_bytes = std::fs::metadata(data.path().join("twin.redb")).map_or(0, |meta| meta.len());

    let restart_started = Instant::now();
    let server = ServerProcess::start(&args.twin_bin, data.path()).await?;
    let restored_in = restart_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restored = server.resident_bytes()?;
    server.stop()?;

    let per_twin = |resident: u64| resident.saturating_sub(empty) as f64 / args.twins as f64;
    println!(
        "{} twins (desired and tags of an idle device) | empty server {:.1} MiB | after creating them ({:.0} creates/s) {:.1} MiB = {:.0} B per twin | restarted and restored in {:.1} s: {:.1} MiB = {:.0} B per twin | database {:.1} MiB",
        args.twins,
        empty as f64 / 1048576.0,
        args.twins as f64 / created_in,
        after_create as f64 / 1048576.0,
        per_twin(after_create),
        restored_in,
        restored as f64 / 1048576.0,
        per_twin(restored),
        database_bytes as f64 / 1048576.0,
    );
    Ok(())
}
