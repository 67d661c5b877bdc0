//! The in-process server the black-box gRPC tests share: `twin serve` on port-0 listeners on
//! 127.0.0.1 (gRPC and metrics), a fresh data folder from the caller, the shipped model registry
//! (`scenarios/models`) and scenario folder (`scenarios`).

// Each test file uses part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use twin_proto::v1::device_sync_client::DeviceSyncClient;
use twin_proto::v1::models_client::ModelsClient;
use twin_proto::v1::simulation_client::SimulationClient;
use twin_proto::v1::telemetry_client::TelemetryClient;
use twin_proto::v1::twins_client::TwinsClient;
use twin_server::serve::{Listeners, ServeConfig, ServeError, serve_listeners};

/// Longest wait for the server to stop and close its store.
const STOP_PATIENCE: Duration = Duration::from_secs(60);

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub struct Server {
    pub address: std::net::SocketAddr,
    pub metrics: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl Server {
    pub async fn start(data: &Path) -> Server {
        Server::start_with(data, |_| {}).await
    }

    pub async fn start_with(data: &Path, adjust: impl FnOnce(&mut ServeConfig)) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let metrics_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind metrics");
        let metrics = metrics_listener.local_addr().expect("metrics address");
        let mut config = ServeConfig {
            listen: address,
            data_dir: data.to_owned(),
            models_dir: workspace().join("scenarios/models"),
            scenario_dir: workspace().join("scenarios"),
            ..ServeConfig::default()
        };
        adjust(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let listeners = Listeners {
            grpc: listener,
            metrics: Some(metrics_listener),
        };
        let task = tokio::spawn(serve_listeners(listeners, config, async {
            let _ = stopped.await;
        }));
        Server {
            address,
            metrics,
            stop: Some(stop),
            task,
        }
    }

    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.address))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn twins(&self) -> TwinsClient<Channel> {
        TwinsClient::new(self.channel().await)
    }

    pub async fn sync(&self) -> DeviceSyncClient<Channel> {
        DeviceSyncClient::new(self.channel().await)
    }

    pub async fn telemetry(&self) -> TelemetryClient<Channel> {
        TelemetryClient::new(self.channel().await)
    }

    pub async fn models(&self) -> ModelsClient<Channel> {
        ModelsClient::new(self.channel().await)
    }

    pub async fn simulation(&self) -> SimulationClient<Channel> {
        SimulationClient::new(self.channel().await)
    }

    /// Stops the server and waits until it has closed its store.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(STOP_PATIENCE, &mut self.task)
            .await
            .expect("server stops in time")
            .expect("server task")
            .expect("server result");
    }
}
