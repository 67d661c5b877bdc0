//! device-sim against twin-server in-process (`serve_listeners` on a port-0 listener with a
//! temporary data folder): each device's DeviceSync stream, telemetry counted end to end by
//! the server's Watch telemetry notices, inference reports, and desired changes applied,
//! reported and acknowledged.

mod common;

use std::time::Duration;

use common::{SMOKE_MESSAGES, settings, smoke};
use device_sim::run::run;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use twin_proto::v1 as pb;
use twin_proto::v1::twins_client::TwinsClient;
use twin_server::serve::{Listeners, ServeConfig, serve_listeners};

/// Longest wait for any one event; a test that needs longer has failed.
const PATIENCE: Duration = Duration::from_secs(20);

struct Server {
    address: std::net::SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), twin_server::serve::ServeError>>,
    _data: tempfile::TempDir,
}

async fn start_server() -> Server {
    let data = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let config = ServeConfig {
        listen: address,
        data_dir: data.path().to_owned(),
        // The server re-runs the devices' inference reports with the shipped models.
        models_dir: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/models"),
        ..ServeConfig::default()
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let listeners = Listeners {
        grpc: listener,
        metrics: None,
    };
    let task = tokio::spawn(serve_listeners(listeners, config, async {
        let _ = stopped.await;
    }));
    Server {
        address,
        stop,
        task,
        _data: data,
    }
}

impl Server {
    async fn twins(&self) -> TwinsClient<tonic::transport::Channel> {
        TwinsClient::connect(format!("http://{}", self.address))
            .await
            .expect("connect")
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("server stops")
            .expect("task")
            .expect("serve");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_syncs_and_every_batch_reaches_the_server() {
    let server = start_server().await;
    let settings = settings(&format!("grpc://{}", server.address), "unused");
    let report = run(smoke(), settings, CancellationToken::new()).await.expect("run");
    let m = &report.messages;
    assert_eq!(m.sent, SMOKE_MESSAGES, "{}", report.summary());
    assert_eq!(m.received, Some(SMOKE_MESSAGES), "{}", report.summary());
    assert_eq!(m.lost, Some(0));
    assert_eq!(m.duplicates, Some(0));
    assert_eq!(m.reordered, Some(0));
    assert_eq!(m.errors, 0);
    assert_eq!(report.connections.connects, 5, "one stream per device");
    // Each pump's windows [0, 0.5) and [0.5, 1) close within the run (the next window's first
    // reading arrives), and the edge model scores each.
    assert_eq!(m.inferences, 4);
    assert!(report.passed, "{}", report.summary());
    let mut twins = server.twins().await;
    let listed = twins
        .list_twins(pb::ListTwinsRequest::default())
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<&str> = listed.twins.iter().map(|t| t.device_id.as_str()).collect();
    assert_eq!(ids, ["pump-00", "pump-01", "thermo-00", "thermo-01", "thermo-02"]);
    let pump = twins
        .get_twin(pb::GetTwinRequest {
            device_id: "pump-00".into(),
            view: pb::TwinView::Full as i32,
        })
        .await
        .expect("get")
        .into_inner();
    let model = pump.reported_model.expect("the pump's Hello names its model");
    assert_eq!(model.name, "vibration-anomaly");
    // The server re-ran each of the pump's inference reports with tract and got the same outputs.
    let check = pump.inference.expect("inference check");
    assert_eq!((check.checked, check.agreed, check.diverged), (2, 2, 0), "{check:?}");
    assert!(!check.inference_divergence);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_apply_desired_changes_and_acknowledge_them() {
    let server = start_server().await;
    let mut twins = server.twins().await;
    let mut watch = twins
        .watch(pb::WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let mut settings = settings(&format!("grpc://{}", server.address), "unused");
    // Slower than real time, so the run is still on when the change arrives.
    settings.clock = Some(twin_core::time::ClockMode::Scaled { factor: 0.5 });
    let fleet = tokio::spawn(run(smoke(), settings, CancellationToken::new()));
    // Wait for both devices' Hello (it registers the twins).
    let mut created = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while created.len() < 2 {
            let message = watch.message().await.expect("watch").expect("open");
            if let Some(pb::watch_response::Event::Change(change)) = message.event
                && change.kind == pb::ChangeKind::Created as i32
                && (change.device_id == "thermo-01" || change.device_id == "pump-01")
            {
                created.push(change.device_id.clone());
            }
        }
    })
    .await
    .expect("the devices connect");
    twins
        .update_desired(pb::UpdateDesiredRequest {
            device_id: "thermo-01".into(),
            patch_json: r#"{"sampling":{"rate_hz":2},"upload":{"mode":"summary","window":"1s"}}"#.into(),
            expected_version: None,
        })
        .await
        .expect("update thermo-01");
    twins
        .update_desired(pb::UpdateDesiredRequest {
            device_id: "pump-01".into(),
            patch_json: r#"{"model":{"name":"vibration-anomaly","version":1}}"#.into(),
            expected_version: None,
        })
        .await
        .expect("update pump-01");
    // Both devices acknowledge.
    let mut acknowledged = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while acknowledged.len() < 2 {
            let message = watch.message().await.expect("watch").expect("open");
            if let Some(pb::watch_response::Event::Change(change)) = message.event
                && change.kind == pb::ChangeKind::Acknowledged as i32
            {
                assert!(change.acks.iter().all(|a| a.status_code == 200), "{change:?}");
                acknowledged.push(change.device_id.clone());
            }
        }
    })
    .await
    .expect("the devices acknowledge");
    acknowledged.sort();
    assert_eq!(acknowledged, ["pump-01", "thermo-01"]);
    let report = fleet.await.expect("task").expect("run");
    assert_eq!(report.messages.converged, 2, "{}", report.summary());
    assert_eq!(report.convergence.count, 2);
    for (id, key) in [("thermo-01", "sampling"), ("pump-01", "model")] {
        let twin = twins
            .get_twin(pb::GetTwinRequest {
                device_id: id.into(),
                view: pb::TwinView::Full as i32,
            })
            .await
            .expect("get")
            .into_inner();
        assert_eq!(twin.delta_json, "{}", "{id} reports what it was asked");
        assert_eq!(
            twin.reconciliation_state,
            pb::ReconciliationState::Succeeded as i32,
            "{id}: {twin:?}"
        );
        let reported: serde_json::Value = serde_json::from_str(&twin.reported_json).expect("json");
        assert!(reported.get(key).is_some(), "{id} reports {key}: {reported}");
    }
    let pump = twins
        .get_twin(pb::GetTwinRequest {
            device_id: "pump-01".into(),
            view: pb::TwinView::Full as i32,
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        pump.reported_model.map(|m| m.version),
        Some(1),
        "pump-01 runs version 1 now"
    );
    server.stop().await;
}
