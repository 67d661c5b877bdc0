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

/// A twin with every part (`TwinView::Full`).
async fn full_twin(twins: &mut TwinsClient<tonic::transport::Channel>, id: &str) -> pb::Twin {
    twins
        .get_twin(pb::GetTwinRequest {
            device_id: id.into(),
            view: pb::TwinView::Full as i32,
        })
        .await
        .expect("get")
        .into_inner()
}

impl Server {
    async fn twins(&self) -> TwinsClient<tonic::transport::Channel> {
        TwinsClient::connect(format!("http://{}", self.address))
            .await
            .expect("connect")
    }

    /// Runs a shipped scenario against this server with the command line's defaults.
    async fn run_shipped(&self, name: &str) -> device_sim::report::LoadReport {
        let scenario =
            device_sim::fleet::load(&common::scenarios().join(name), twin_core::LoadOptions::default(), None)
                .unwrap_or_else(|err| panic!("{name} is invalid: {err}"));
        let settings = settings(&format!("grpc://{}", self.address), "unused");
        run(scenario, settings, CancellationToken::new()).await.expect("run")
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
    let pump = full_twin(&mut twins, "pump-00").await;
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
            patch_json: r#"{"sampling":{"rate_hz":2}}"#.into(),
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
    // Half-second summaries; and a sampling rate faster than the scenario's 4 Hz: the device
    // cannot, and says why.
    twins
        .update_desired(pb::UpdateDesiredRequest {
            device_id: "thermo-02".into(),
            patch_json: r#"{"sampling":{"rate_hz":10},"upload":{"mode":"summary","window":"500ms"}}"#.into(),
            expected_version: None,
        })
        .await
        .expect("update thermo-02");
    // Every device acknowledges.
    let mut acknowledged = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while acknowledged.len() < 3 {
            let message = watch.message().await.expect("watch").expect("open");
            if let Some(pb::watch_response::Event::Change(change)) = message.event
                && change.kind == pb::ChangeKind::Acknowledged as i32
            {
                if change.device_id == "thermo-02" {
                    let mut acks: Vec<(&str, i32)> =
                        change.acks.iter().map(|a| (a.key.as_str(), a.status_code)).collect();
                    acks.sort_unstable();
                    assert_eq!(acks, [("sampling", 400), ("upload", 200)], "{change:?}");
                    let refused = change.acks.iter().find(|a| a.key == "sampling").expect("sampling ack");
                    assert!(
                        refused
                            .description
                            .contains("10 Hz is above sensor `temperature`'s 4 Hz"),
                        "{}",
                        refused.description
                    );
                } else {
                    assert!(change.acks.iter().all(|a| a.status_code == 200), "{change:?}");
                }
                acknowledged.push(change.device_id.clone());
            }
        }
    })
    .await
    .expect("the devices acknowledge");
    acknowledged.sort();
    assert_eq!(acknowledged, ["pump-01", "thermo-01", "thermo-02"]);
    let report = fleet.await.expect("task").expect("run");
    assert_eq!(report.messages.converged, 3, "{}", report.summary());
    assert_eq!(report.convergence.count, 3);
    // The sampling change took effect on the wire: the server stored thermo-01's readings at
    // 2 Hz once the change had reached its schedule (well before simulated second 1, at half
    // speed), thermo-00's at the scenario's 4 Hz all along.
    // The reading times of each batch the server stored for a device, in storage order.
    let batches = |id: &'static str| {
        let address = server.address;
        async move {
            let mut client = twin_proto::v1::telemetry_client::TelemetryClient::connect(format!("http://{address}"))
                .await
                .expect("connect");
            let page = client
                .read(pb::ReadTelemetryRequest {
                    device_id: id.into(),
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .expect("read")
                .into_inner();
            page.batches
                .iter()
                .filter_map(|b| b.batch.as_ref())
                .map(|b| {
                    b.sensors
                        .iter()
                        .flat_map(|s| s.offsets_nanos.iter().map(move |o| s.start_unix_nanos + *o as i64))
                        .collect::<Vec<i64>>()
                })
                .collect::<Vec<_>>()
        }
    };
    let times = |batches: Vec<Vec<i64>>| {
        let mut times: Vec<i64> = batches.into_iter().flatten().collect();
        times.sort_unstable();
        times
    };
    let steady = times(batches("thermo-00").await);
    let sampled = times(batches("thermo-01").await);
    assert_eq!(steady.len(), 8, "4 Hz for 2 s: {steady:?}");
    let start = steady[0];
    let late = |times: &[i64]| -> Vec<i64> {
        times
            .iter()
            .map(|t| t - start)
            .filter(|t| *t >= 1_000_000_000)
            .collect()
    };
    assert_eq!(
        late(&steady),
        [1_000_000_000, 1_250_000_000, 1_500_000_000, 1_750_000_000]
    );
    let sampled_late = late(&sampled);
    assert_eq!(sampled_late.len(), 2, "{sampled:?}");
    assert_eq!(sampled_late[1] - sampled_late[0], 500_000_000, "{sampled:?}");
    assert!(sampled.len() < steady.len(), "{sampled:?}");
    // thermo-02 switched to half-second summaries (well before simulated second 1): its last
    // stored batch is the window [1 s, 1.5 s) with its two readings (the window ending with
    // the run is not due in it).
    let summaries = batches("thermo-02").await;
    let last: Vec<i64> = summaries
        .last()
        .map(|b| b.iter().map(|t| t - start).collect())
        .unwrap_or_default();
    assert_eq!(last, [1_000_000_000, 1_250_000_000], "{summaries:?}");
    assert!(summaries.len() < 8, "fewer batches than readings: {summaries:?}");
    for (id, key) in [("thermo-01", "sampling"), ("pump-01", "model")] {
        let twin = full_twin(&mut twins, id).await;
        assert_eq!(twin.delta_json, "{}", "{id} reports what it was asked");
        assert_eq!(
            twin.reconciliation_state,
            pb::ReconciliationState::Succeeded as i32,
            "{id}: {twin:?}"
        );
        let reported: serde_json::Value = serde_json::from_str(&twin.reported_json).expect("json");
        assert!(reported.get(key).is_some(), "{id} reports {key}: {reported}");
    }
    let pump = full_twin(&mut twins, "pump-01").await;
    assert_eq!(
        pump.reported_model.map(|m| m.version),
        Some(1),
        "pump-01 runs version 1 now"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cameras_classify_every_frame_and_the_server_agrees() {
    let server = start_server().await;
    let report = server.run_shipped("device-sim-camera.toml").await;
    let m = &report.messages;
    // 2 cameras x 4 frames/s, in half-second windows: the windows ending at 0.5, 1 and 1.5 s
    // are sent within the 2 s run (the one ending at 2 s is not), 2 frames each.
    assert_eq!(m.sent, 6, "{}", report.summary());
    assert_eq!(m.samples_sent, 12, "{}", report.summary());
    assert_eq!(m.lost, Some(0), "{}", report.summary());
    assert_eq!(m.inferences, 12, "one report per frame: {}", report.summary());
    let mut twins = server.twins().await;
    for id in ["cam-00", "cam-01"] {
        let twin = full_twin(&mut twins, id).await;
        assert_eq!(twin.reported_model.as_ref().map(|m| m.name.as_str()), Some("digits"));
        // The server re-ran each frame's 64 pixels with the digits model and got the same class
        // and probabilities.
        let check = twin.inference.expect("inference check");
        assert_eq!(
            (check.checked, check.agreed, check.diverged),
            (6, 6, 0),
            "{id}: {check:?}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_gateway_holds_loses_and_delivers_on_heal() {
    let server = start_server().await;
    let report = server.run_shipped("device-sim-partition.toml").await;
    let m = &report.messages;
    let summary = report.summary();
    // 3 devices x 10 Hz x 2 s; the two behind the gateway produce 20 messages in [0.5 s, 1.5 s):
    // the 480-byte buffer holds 15 (32 bytes each), the other 5 are lost at the gateway.
    assert_eq!(m.sent, 60, "{summary}");
    assert_eq!(
        (
            m.partition_buffered,
            m.partition_lost,
            m.partition_delivered,
            m.partition_remaining
        ),
        (15, 5, 15, 0),
        "{summary}"
    );
    assert_eq!(m.received, Some(55), "{summary}");
    assert_eq!(m.lost, Some(5), "{summary}");
    assert_eq!((m.duplicates, m.reordered), (Some(0), Some(0)), "{summary}");
    // The first held message (0.5 s) went out at the heal (1.5 s): its latency shows the wait.
    assert!(report.e2e.max_ms.is_some_and(|max| max >= 950.0), "{summary}");
    assert!(report.passed, "the scenario's load criteria: {summary}");
    server.stop().await;
}
