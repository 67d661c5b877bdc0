//! `twin serve`: the live twin gRPC server.
//!
//! - [`engine`]: one thread owns the twins; commands in over a bounded channel, replies after
//!   the durable commit; publishes the snapshot, the change history and device deltas.
//! - [`twins_service`] and [`sync_service`]: the `Twins` and `DeviceSync` gRPC services.
//! - [`telemetry_service`]: the `Telemetry` gRPC service (batched ingest, off the engine).
//! - [`models_service`]: the `Models` gRPC service (the registry; deployment through the
//!   engine).
//! - [`simulation_service`]: the `Simulation` gRPC service (what-if runs on worker threads,
//!   optionally forked from live twins).
//! - [`inference_check`]: the live inference check's worker (tract off the engine thread).
//! - [`convert`]: protobuf <-> domain, and domain errors -> gRPC status codes.
//! - [`config`]: the settings, their defaults and the TOML file.
//!
//! - [`metrics`]: Prometheus text on a small HTTP endpoint of its own.
//! - [`tls`]: rustls on the gRPC port when a certificate is configured.
//!
//! [`serve`] takes bound listeners and a shutdown future (tests pass port-0 listeners; only
//! `main` binds the configured addresses and installs signal handlers).

pub mod auth;
pub mod config;
pub mod convert;
pub mod engine;
pub mod filter;
pub mod history;
pub mod inference_check;
pub mod metrics;
pub mod models_service;
pub mod simulation_service;
pub mod snapshot;
pub mod sync_service;
pub mod telemetry_service;
pub mod tls;
pub mod twins_service;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;
use twin_proto::v1::device_sync_server::DeviceSyncServer;
use twin_proto::v1::models_server::ModelsServer;
use twin_proto::v1::simulation_server::SimulationServer;
use twin_proto::v1::telemetry_server::TelemetryServer;
use twin_proto::v1::twins_server::TwinsServer;

pub use config::ServeConfig;
use engine::{Command, Shared};
use history::History;
use inference_check::InferenceChecker;
use models_service::{ModelCatalog, ModelsService};
use simulation_service::SimulationService;
use sync_service::SyncService;
use telemetry_service::{TelemetryService, TelemetryStorage};
use twins_service::TwinsService;

use crate::store::{Store, StoreError};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The database could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A thread or the reflection service could not be set up.
    #[error("cannot start the server: {0}")]
    Start(String),
    /// The gRPC transport failed.
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The TLS settings or files cannot be used.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// The sockets the server serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC API.
    pub grpc: TcpListener,
    /// The Prometheus endpoint, if any.
    pub metrics: Option<TcpListener>,
}

/// Serves the twin API on `listener` (no metrics endpoint) until `shutdown` completes; see
/// [`serve_listeners`].
///
/// # Errors
/// As [`serve_listeners`].
pub async fn serve(
    listener: TcpListener,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listeners = Listeners {
        grpc: listener,
        metrics: None,
    };
    serve_listeners(listeners, config, shutdown).await
}

/// Serves the twin API (and metrics) until `shutdown` completes, then shuts down in order:
/// stop accepting calls and end streams (a cancellation token), wait for every stream task (a
/// task tracker), let the engine finish the commands already queued (their writes are
/// committed), and close the store.
///
/// # Errors
/// When the TLS files cannot be used (checked first), the database cannot be opened, a thread
/// cannot start, or the transport fails.
pub async fn serve_listeners(
    listeners: Listeners,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let tls = config.tls.load()?;
    let catalog = Arc::new(ModelCatalog::load(&config.models_dir)?);
    let path = config.database_path();
    let options = config.store_options();
    let limits = config.limits;
    let opened = tokio::task::spawn_blocking(move || Store::open_with_revisions(&path, options, limits))
        .await
        .map_err(|error| ServeError::Start(format!("the store opener panicked: {error}")))?;
    let (store, twins, revisions) = opened?;
    tracing::info!(
        path = %config.database_path().display(),
        twins = twins.len(),
        revision = revisions.last,
        "twin database opened"
    );
    let history = History::new(revisions.last, config.watch.history, config.watch.lag);
    let (engine, shared, engine_thread) = engine::start(
        twins,
        revisions,
        store.clone(),
        config.engine.queue_capacity,
        config.engine.max_round,
        config.engine.max_in_flight,
        history,
    )
    .map_err(|error| ServeError::Start(format!("cannot start the engine thread: {error}")))?;

    let token = CancellationToken::new();
    let tasks = TaskTracker::new();
    if let Some(listener) = listeners.metrics {
        let sources = metrics::Sources {
            shared: Arc::clone(&shared),
            engine: engine.clone(),
            store: store.clone(),
        };
        tasks.spawn(metrics::run(listener, sources, token.clone(), tasks.clone()));
    }
    let storage = TelemetryStorage::new(store.clone(), config.store.telemetry_retention_s);
    let outcome = run_grpc(
        listeners.grpc,
        &config,
        tls.as_ref(),
        engine.clone(),
        &shared,
        storage,
        catalog,
        token.clone(),
        tasks.clone(),
        shutdown,
    )
    .await;

    // Tell: every stream ends; wait: for their tasks; then the engine drains its queue.
    token.cancel();
    tasks.close();
    tasks.wait().await;
    engine.notify(Command::Shutdown).await;
    drop(engine);
    let closed = tokio::task::spawn_blocking(move || {
        let _joined = engine_thread.join();
        store.close();
    })
    .await;
    if let Err(error) = closed {
        tracing::error!(%error, "closing the store failed");
    }
    tracing::info!("server stopped");
    outcome
}

#[expect(clippy::too_many_arguments, reason = "the server's parts, each passed once")]
async fn run_grpc(
    listener: TcpListener,
    config: &ServeConfig,
    tls: Option<&tls::LoadedTls>,
    engine: engine::EngineHandle,
    shared: &Arc<Shared>,
    storage: TelemetryStorage,
    catalog: Arc<ModelCatalog>,
    token: CancellationToken,
    tasks: TaskTracker,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let twins = TwinsService::new(
        engine.clone(),
        Arc::clone(shared),
        config.limits,
        config.watch.buffer,
        token.clone(),
        tasks.clone(),
    );
    let telemetry = TelemetryService::new(Arc::clone(shared), config.limits, storage.clone(), token.clone());
    let models = ModelsService::new(Arc::clone(&catalog), engine.clone(), Arc::clone(shared));
    let simulation = SimulationService::new(
        config.scenario_dir.clone(),
        config.simulation,
        Arc::clone(shared),
        token.clone(),
        tasks.clone(),
    );
    let checker = InferenceChecker::start(Arc::clone(&catalog), config.inference, token.clone(), &tasks);
    let sync = SyncService::new(
        engine,
        Arc::clone(shared),
        config.limits,
        config.sync.outbound_capacity,
        sync_service::Inference { catalog, checker },
        storage,
        token.clone(),
        tasks,
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TwinsServer<TwinsService>>().await;
    health.set_serving::<DeviceSyncServer<SyncService>>().await;
    health.set_serving::<TelemetryServer<TelemetryService>>().await;
    health.set_serving::<ModelsServer<ModelsService>>().await;
    health.set_serving::<SimulationServer<SimulationService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(twin_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|error| ServeError::Start(format!("reflection: {error}")))?;

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = tls.apply(builder)?;
        tracing::info!(cert_file = %tls.cert_file.display(), certificates = tls.chain_len, "tls on");
    }
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, tls = tls.is_some(), "serving twin.v1");
    }
    // The first of: the caller's shutdown, or a cancellation from inside.
    let stop = token.clone();
    let signal = async move {
        tokio::select! {
            () = shutdown => {}
            () = stop.cancelled() => {}
        }
        tracing::info!("shutting down: no new calls, ending streams");
        // Streams (Watch, DeviceSync) end on the token, so the transport's graceful shutdown
        // does not wait for them forever.
        stop.cancel();
        health.set_not_serving::<TwinsServer<TwinsService>>().await;
        health.set_not_serving::<DeviceSyncServer<SyncService>>().await;
        health.set_not_serving::<TelemetryServer<TelemetryService>>().await;
        health.set_not_serving::<ModelsServer<ModelsService>>().await;
        health.set_not_serving::<SimulationServer<SimulationService>>().await;
    };
    let authenticator = auth::Authenticator::new(&config.auth);
    if !authenticator.enabled() {
        tracing::warn!("no tokens configured: authentication is off");
    }
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(TwinsServer::with_interceptor(twins, authenticator.operator_only()))
        .add_service(DeviceSyncServer::with_interceptor(sync, authenticator.any_role()))
        .add_service(TelemetryServer::with_interceptor(
            telemetry,
            authenticator.operator_only(),
        ))
        .add_service(ModelsServer::with_interceptor(models, authenticator.operator_only()))
        .add_service(SimulationServer::with_interceptor(
            simulation,
            authenticator.operator_only(),
        ))
        .serve_with_incoming_shutdown(incoming, signal);
    // The transport's graceful shutdown waits for every connection to close; a client that
    // never answers the GOAWAY would hold the server forever, so the wait is bounded.
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let deadline = async move {
        token.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server => result?,
        () = deadline => {
            tracing::warn!(grace_ms = config.shutdown_grace_ms, "connections still open after the shutdown grace period: closing them");
        }
    }
    Ok(())
}
