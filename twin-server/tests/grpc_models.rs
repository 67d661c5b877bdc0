//! Black-box tests of the `Models` and `Simulation` services and of the live inference check,
//! over real gRPC: a server started in-process on a port-0 listener on 127.0.0.1, with the
//! shipped model registry (`scenarios/models`) and scenario folder (`scenarios`).

use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tonic_types::StatusExt;
use twin_core::LoadOptions;
use twin_core::inference::CompiledModel;
use twin_proto::v1 as pb;
use twin_proto::v1::device_sync_client::DeviceSyncClient;
use twin_proto::v1::simulation_client::SimulationClient;
use twin_proto::v1::twins_client::TwinsClient;

/// Longest wait for any one message; a test that needs longer has failed.
const PATIENCE: Duration = Duration::from_secs(60);

mod common;

use common::{Server, workspace};

async fn next<T>(stream: &mut Streaming<T>) -> Result<T, Status> {
    match tokio::time::timeout(PATIENCE, stream.message()).await {
        Ok(Ok(Some(message))) => Ok(message),
        Ok(Ok(None)) => Err(Status::cancelled("stream ended")),
        Ok(Err(status)) => Err(status),
        Err(_) => panic!("no message within {PATIENCE:?}"),
    }
}

async fn http_get(address: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect metrics");
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut response))
        .await
        .expect("metrics answer in time")
        .expect("read");
    response
}

async fn metric(server: &Server, name: &str) -> String {
    let response = http_get(server.metrics, "/metrics").await;
    response
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} in {response}"))
        .to_owned()
}

fn create(id: &str, group: &str) -> pb::CreateTwinRequest {
    pb::CreateTwinRequest {
        device_id: id.to_owned(),
        group: group.to_owned(),
        ..pb::CreateTwinRequest::default()
    }
}

async fn get(client: &mut TwinsClient<Channel>, id: &str) -> pb::Twin {
    client
        .get_twin(pb::GetTwinRequest {
            device_id: id.to_owned(),
            view: pb::TwinView::Full as i32,
        })
        .await
        .expect("get twin")
        .into_inner()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).expect("json")
}

fn groups(names: &[&str]) -> Option<pb::TwinFilter> {
    Some(pb::TwinFilter {
        groups: names.iter().map(|name| (*name).to_owned()).collect(),
        ..pb::TwinFilter::default()
    })
}

fn field_of(status: &Status) -> String {
    status
        .get_details_bad_request()
        .and_then(|details| details.field_violations.into_iter().next())
        .map(|violation| violation.field)
        .unwrap_or_default()
}

struct Device {
    outbox: mpsc::Sender<pb::DeviceMessage>,
    inbox: Streaming<pb::ServerMessage>,
    sequence: u64,
}

impl Device {
    async fn connect(server: &Server, hello: pb::Hello) -> Device {
        let (outbox, receiver) = mpsc::channel(16);
        outbox
            .send(pb::DeviceMessage {
                sequence: 0,
                body: Some(pb::device_message::Body::Hello(hello)),
            })
            .await
            .expect("queue hello");
        let inbox = DeviceSyncClient::new(server.channel().await)
            .sync(ReceiverStream::new(receiver))
            .await
            .expect("sync")
            .into_inner();
        let mut device = Device {
            outbox,
            inbox,
            sequence: 0,
        };
        let connected = device.delta().await;
        assert_eq!(connected.reason, pb::DeltaReason::Connected as i32);
        device
    }

    async fn send(&mut self, body: pb::device_message::Body) -> u64 {
        self.sequence += 1;
        self.outbox
            .send(pb::DeviceMessage {
                sequence: self.sequence,
                body: Some(body),
            })
            .await
            .expect("send");
        self.sequence
    }

    async fn message(&mut self) -> pb::server_message::Body {
        next(&mut self.inbox).await.expect("message").body.expect("body")
    }

    async fn delta(&mut self) -> pb::DesiredDelta {
        match self.message().await {
            pb::server_message::Body::Delta(delta) => delta,
            other => panic!("expected a delta, got {other:?}"),
        }
    }

    /// Sends a reported patch and waits for its acknowledgement: every message sent before it
    /// has then been handled (a stream is read one message at a time).
    async fn reported(&mut self, patch: &str) -> pb::ReportedAck {
        let sequence = self
            .send(pb::device_message::Body::Reported(pb::ReportedPatch {
                patch_json: patch.to_owned(),
                source_time: None,
            }))
            .await;
        match self.message().await {
            pb::server_message::Body::ReportedAck(ack) => {
                assert_eq!(ack.sequence, sequence);
                ack
            }
            other => panic!("expected a reported ack, got {other:?}"),
        }
    }

    async fn error(&mut self) -> pb::SyncError {
        match self.message().await {
            pb::server_message::Body::Error(error) => error,
            other => panic!("expected a SyncError, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Models

#[tokio::test]
async fn list_models_returns_the_shipped_registry_with_aliases_and_shapes() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut models = server.models().await;

    let all = models
        .list_models(pb::ListModelsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .models;
    let names: Vec<&str> = all.iter().map(|model| model.name.as_str()).collect();
    assert_eq!(names, ["digits", "vibration-anomaly"]);

    let vibration = &all[1];
    let versions: Vec<u32> = vibration.versions.iter().map(|version| version.version).collect();
    assert_eq!(versions, [1, 2, 3]);
    assert_eq!(vibration.aliases.get("champion"), Some(&2));
    assert_eq!(vibration.aliases.get("challenger"), Some(&3));
    assert_eq!(vibration.versions[1].aliases, ["champion"]);
    assert!(vibration.versions[0].aliases.is_empty());
    let v1 = &vibration.versions[0];
    assert_eq!(v1.sha256.len(), 64);
    assert!(!v1.description.is_empty());
    assert_eq!(v1.inputs.len(), 1);
    assert_eq!(v1.inputs[0].name, "features");
    assert_eq!(v1.inputs[0].shape, [-1, 9]);
    assert_eq!(v1.inputs[0].element_type, "float32");
    assert_eq!(v1.outputs[0].shape, [-1]);

    let digits = &all[0];
    assert_eq!(digits.versions.len(), 1);
    assert_eq!(digits.aliases.get("champion"), Some(&1));
    let outputs: Vec<(&str, &[i64])> = digits.versions[0]
        .outputs
        .iter()
        .map(|output| (output.name.as_str(), output.shape.as_slice()))
        .collect();
    assert_eq!(outputs, [("probabilities", &[-1, 10][..]), ("class", &[-1][..])]);

    let one = models
        .list_models(pb::ListModelsRequest {
            name: "digits".to_owned(),
        })
        .await
        .expect("one")
        .into_inner()
        .models;
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].name, "digits");
    let none = models
        .list_models(pb::ListModelsRequest {
            name: "no-such-model".to_owned(),
        })
        .await
        .expect("unknown name is an empty list")
        .into_inner()
        .models;
    assert!(none.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn deploy_model_changes_desired_model_on_exactly_the_selected_twins() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    let mut models = server.models().await;
    for (id, group) in [("a-1", "line-a"), ("a-2", "line-a"), ("b-1", "line-b")] {
        twins.create_twin(create(id, group)).await.expect("create");
    }
    let mut device = Device::connect(
        &server,
        pb::Hello {
            device_id: "a-1".to_owned(),
            ..pb::Hello::default()
        },
    )
    .await;
    let before: Vec<u64> = [
        get(&mut twins, "a-1").await,
        get(&mut twins, "a-2").await,
        get(&mut twins, "b-1").await,
    ]
    .iter()
    .map(|twin| twin.version)
    .collect();

    let dry = models
        .deploy_model(pb::DeployModelRequest {
            model: "vibration-anomaly@champion".to_owned(),
            selector: groups(&["line-a"]),
            dry_run: true,
        })
        .await
        .expect("dry run")
        .into_inner();
    assert_eq!((dry.twins_targeted, dry.twins_changed, dry.revision), (2, 2, 0));
    let resolved = dry.model.expect("resolved model");
    assert_eq!((resolved.name.as_str(), resolved.version), ("vibration-anomaly", 2));
    assert_eq!(resolved.sha256.len(), 64);
    for (id, version) in ["a-1", "a-2", "b-1"].iter().zip(&before) {
        let twin = get(&mut twins, id).await;
        assert_eq!(twin.version, *version, "dry run changed {id}");
        assert!(json(&twin.desired_json).get("model").is_none());
    }

    let deployed = models
        .deploy_model(pb::DeployModelRequest {
            model: "vibration-anomaly@champion".to_owned(),
            selector: groups(&["line-a"]),
            dry_run: false,
        })
        .await
        .expect("deploy")
        .into_inner();
    assert_eq!((deployed.twins_targeted, deployed.twins_changed), (2, 2));
    assert!(deployed.revision > 0);
    let expected = serde_json::json!({"name": "vibration-anomaly", "version": 2, "sha256": resolved.sha256});
    for (id, version) in ["a-1", "a-2"].iter().zip(&before) {
        let twin = get(&mut twins, id).await;
        assert_eq!(twin.version, version + 1, "{id} takes one version");
        assert_eq!(json(&twin.desired_json)["model"], expected);
    }
    let last = get(&mut twins, "a-2").await;
    let first = get(&mut twins, "a-1").await;
    assert_eq!(first.revision.max(last.revision), deployed.revision);
    assert_ne!(first.revision, last.revision, "each twin its own revision");
    let untouched = get(&mut twins, "b-1").await;
    assert_eq!(untouched.version, before[2]);
    assert!(json(&untouched.desired_json).get("model").is_none());

    let delta = device.delta().await;
    assert_eq!(delta.reason, pb::DeltaReason::DesiredChanged as i32);
    assert_eq!(json(&delta.delta_json)["model"], expected);
    assert_eq!(delta.version, first.version);

    let again = models
        .deploy_model(pb::DeployModelRequest {
            model: "vibration-anomaly@2".to_owned(),
            selector: groups(&["line-a"]),
            dry_run: false,
        })
        .await
        .expect("deploy again")
        .into_inner();
    assert_eq!((again.twins_targeted, again.twins_changed, again.revision), (2, 0, 0));
    assert_eq!(get(&mut twins, "a-1").await.version, first.version);

    let newest = models
        .deploy_model(pb::DeployModelRequest {
            model: "vibration-anomaly".to_owned(),
            selector: Some(pb::TwinFilter {
                device_ids: vec!["b-1".to_owned()],
                ..pb::TwinFilter::default()
            }),
            dry_run: true,
        })
        .await
        .expect("newest")
        .into_inner();
    assert_eq!(newest.model.expect("model").version, 3);
    assert_eq!((newest.twins_targeted, newest.twins_changed), (1, 1));

    for unknown in ["vibration-anomaly@9", "vibration-anomaly@nobody", "no-such-model"] {
        let error = models
            .deploy_model(pb::DeployModelRequest {
                model: unknown.to_owned(),
                selector: None,
                dry_run: false,
            })
            .await
            .expect_err(unknown);
        assert_eq!(error.code(), Code::NotFound, "{unknown}: {error:?}");
    }
    let empty = models
        .deploy_model(pb::DeployModelRequest::default())
        .await
        .expect_err("empty model");
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert_eq!(field_of(&empty), "model");
    let bad_selector = models
        .deploy_model(pb::DeployModelRequest {
            model: "digits".to_owned(),
            selector: Some(pb::TwinFilter {
                tags: vec![pb::TagMatch {
                    path: "site".to_owned(),
                    value_json: None,
                }],
                ..pb::TwinFilter::default()
            }),
            dry_run: false,
        })
        .await
        .expect_err("bad selector");
    assert_eq!(bad_selector.code(), Code::InvalidArgument);
    assert_eq!(field_of(&bad_selector), "selector.tags[0].path");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Simulation

async fn watch_to_end(client: &mut SimulationClient<Channel>, id: &str) -> Vec<pb::SimulationStatus> {
    let mut stream = client
        .watch_simulation(pb::WatchSimulationRequest {
            simulation_id: id.to_owned(),
        })
        .await
        .expect("watch")
        .into_inner();
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(PATIENCE, stream.message()).await {
            Ok(Ok(Some(status))) => seen.push(status),
            Ok(Ok(None)) => return seen,
            Ok(Err(status)) => panic!("watch failed: {status:?}"),
            Err(_) => panic!("watch: nothing within {PATIENCE:?}"),
        }
    }
}

#[tokio::test]
async fn a_scenario_by_path_finishes_with_the_report_twin_run_writes() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut simulation = server.simulation().await;
    let started = simulation
        .start_simulation(pb::StartSimulationRequest {
            scenario: Some(pb::start_simulation_request::Scenario::ScenarioPath(
                "quickstart.toml".to_owned(),
            )),
            seed: Some(7),
            fork: None,
            label: "what if".to_owned(),
        })
        .await
        .expect("start")
        .into_inner();
    assert_eq!(started.label, "what if");
    assert_eq!(started.seed, 7);
    assert_eq!(started.devices, 100);
    assert_eq!((started.forked_twins, started.fork_revision), (0, 0));
    assert_eq!(started.sim_duration_nanos, 3_600_000_000_000);
    assert!(started.created_at.is_some());

    let statuses = watch_to_end(&mut simulation, &started.simulation_id).await;
    let last = statuses.last().expect("at least one status");
    assert_eq!(last.state, pb::SimulationState::Finished as i32, "{last:?}");
    assert_eq!(last.progress, 1.0);
    assert!(last.finished_at.is_some());
    for pair in statuses.windows(2) {
        assert!(pair[0].sim_time_nanos <= pair[1].sim_time_nanos, "progress only grows");
    }
    let status = simulation
        .get_simulation(pb::GetSimulationRequest {
            simulation_id: started.simulation_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(status.state, pb::SimulationState::Finished as i32);
    // Watching a finished simulation gives its final status and ends.
    let again = watch_to_end(&mut simulation, &started.simulation_id).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].state, pb::SimulationState::Finished as i32);

    let report = simulation
        .get_report(pb::GetReportRequest {
            simulation_id: started.simulation_id.clone(),
        })
        .await
        .expect("report")
        .into_inner();

    // What `twin run --seed 7 scenarios/quickstart.toml` writes.
    let out = tempfile::tempdir().expect("out");
    let file = workspace().join("scenarios/quickstart.toml");
    let options = LoadOptions {
        seed: Some(7),
        ..LoadOptions::default()
    };
    let scenario = twin_server::files::load_scenario(&file, options).expect("quickstart validates");
    let request = twin_server::run::RunRequest {
        out_dir: out.path().to_owned(),
        record: false,
        pace: None,
        progress: false,
        threads: 1,
    };
    let outcome = tokio::task::spawn_blocking(move || twin_server::run::run_scenario(scenario, &request))
        .await
        .expect("run thread")
        .expect("twin run");
    let written = std::fs::read_to_string(&outcome.report_path).expect("report.json");
    assert!(
        report.report_json == written,
        "the report differs from twin run's report.json"
    );
    assert_eq!(report.criteria_passed, Some(outcome.report.passed));
    assert_eq!(status.criteria_passed, Some(outcome.report.passed));

    let unknown = simulation
        .get_report(pb::GetReportRequest {
            simulation_id: "sim-none".to_owned(),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(unknown.code(), Code::NotFound);
    let unknown = simulation
        .get_simulation(pb::GetSimulationRequest {
            simulation_id: "sim-none".to_owned(),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(unknown.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn bad_scenarios_and_paths_are_invalid_argument_with_every_problem() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut simulation = server.simulation().await;
    let start = |scenario: pb::start_simulation_request::Scenario| pb::StartSimulationRequest {
        scenario: Some(scenario),
        ..pb::StartSimulationRequest::default()
    };
    use pb::start_simulation_request::Scenario::{ScenarioPath, ScenarioToml};

    let syntax = simulation
        .start_simulation(start(ScenarioToml("seed = 1\n[meta\nname = \"x\"\n".to_owned())))
        .await
        .expect_err("bad toml");
    assert_eq!(syntax.code(), Code::InvalidArgument);
    assert!(syntax.message().contains("scenario_toml:2:"), "{}", syntax.message());

    let invalid = "[meta]\nname = \"bad\"\n[clock]\nduration = \"1m\"\n[[fleet]]\nname = \"g\"\ncount = 0\n[[fleet.sensors]]\nname = \"t\"\nrate_hz = -1.0\nconstant = { value = 1.0 }\n";
    let problems = simulation
        .start_simulation(start(ScenarioToml(invalid.to_owned())))
        .await
        .expect_err("invalid values");
    assert_eq!(problems.code(), Code::InvalidArgument);
    assert!(
        problems.message().contains("scenario_toml:7:")
            && problems.message().contains("fleet[0].count: must be at least 1, got 0"),
        "{}",
        problems.message()
    );
    let fields: Vec<String> = problems
        .get_details_bad_request()
        .expect("bad request details")
        .field_violations
        .into_iter()
        .map(|violation| violation.field)
        .collect();
    assert!(fields.len() >= 2, "every problem is listed: {fields:?}");
    assert!(fields.contains(&"fleet[0].count".to_owned()), "{fields:?}");
    assert!(fields.contains(&"fleet[0].sensors[0].rate_hz".to_owned()), "{fields:?}");

    for escaping in ["../Cargo.toml", "/etc/hostname", "models/../../Cargo.toml"] {
        let error = simulation
            .start_simulation(start(ScenarioPath(escaping.to_owned())))
            .await
            .expect_err(escaping);
        assert_eq!(error.code(), Code::InvalidArgument, "{escaping}: {error:?}");
        assert_eq!(field_of(&error), "scenario_path");
    }
    // Files a scenario names stay inside scenario_dir too.
    let reaching_out = format!(
        "{}\n[models]\nregistry = \"../Cargo.toml\"\n",
        FORKABLE.replace("[models]\nregistry = \"models/manifest.json\"\n", "")
    );
    let error = simulation
        .start_simulation(start(ScenarioToml(reaching_out)))
        .await
        .expect_err("registry outside scenario_dir");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("leaves the server's scenario_dir"),
        "{}",
        error.message()
    );
    let missing = simulation
        .start_simulation(start(ScenarioPath("no-such.toml".to_owned())))
        .await
        .expect_err("missing");
    assert_eq!(missing.code(), Code::NotFound);
    let unset = simulation
        .start_simulation(pb::StartSimulationRequest::default())
        .await
        .expect_err("no scenario");
    assert_eq!(unset.code(), Code::InvalidArgument);
    assert_eq!(field_of(&unset), "scenario");
    server.stop().await;
}

/// A scenario that runs far longer than any test: 1000 devices sampled at 10 Hz for ten years.
const ENDLESS: &str = r#"
[meta]
name = "endless"
[clock]
duration = "3650d"
tick = "1h"
[[fleet]]
name = "many"
count = 1000
upload = { mode = "summary", window = "1h" }
[[fleet.sensors]]
name = "t"
rate_hz = 10.0
gaussian = { mean = 1.0, std_dev = 0.1 }
"#;

#[tokio::test]
async fn a_running_simulation_has_no_report_and_the_running_limit_holds() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(data.path(), |config| config.simulation.max_running = 1).await;
    let mut simulation = server.simulation().await;
    let endless = || pb::StartSimulationRequest {
        scenario: Some(pb::start_simulation_request::Scenario::ScenarioToml(ENDLESS.to_owned())),
        ..pb::StartSimulationRequest::default()
    };
    let started = simulation
        .start_simulation(endless())
        .await
        .expect("start")
        .into_inner();
    assert_eq!(started.devices, 1000);
    let report = simulation
        .get_report(pb::GetReportRequest {
            simulation_id: started.simulation_id.clone(),
        })
        .await
        .expect_err("still running");
    assert_eq!(report.code(), Code::FailedPrecondition, "{report:?}");
    let second = simulation
        .start_simulation(endless())
        .await
        .expect_err("over the limit");
    assert_eq!(second.code(), Code::ResourceExhausted, "{second:?}");
    assert_eq!(metric(&server, "twin_simulations_running").await, "1");
    // Shutdown stops the run (it would take hours); the server still stops.
    server.stop().await;
}

/// A group of vibration monitors running vibration-anomaly v1 on 10 s windows, and a group of
/// pumps without a model.
const FORKABLE: &str = r#"
seed = 3
[meta]
name = "fork"
[clock]
duration = "2m"
tick = "10s"
[models]
registry = "models/manifest.json"
[[fleet]]
name = "line-a"
count = 2
id = "sim-a-{index}"
upload = { mode = "summary", window = "10s" }
model = { name = "vibration-anomaly", version = 1, sensor = "accel" }
[[fleet.sensors]]
name = "accel"
rate_hz = 50.0
vibration = { shaft_hz = 12.5, harmonics = [0.8, 0.3] }
noise = 0.05
[[fleet]]
name = "pumps"
count = 5
id = "pump-{index}"
[[fleet.sensors]]
name = "t"
rate_hz = 1.0
constant = { value = 20.0 }
[[storyboard]]
at = "1m"
for = "10s"
target = { ids = ["f-2"] }
crash = {}
"#;

#[tokio::test]
async fn a_fork_runs_the_selected_twins_and_leaves_them_untouched() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    let mut models = server.models().await;
    let mut simulation = server.simulation().await;
    for (id, group) in [
        ("f-1", "line-a"),
        ("f-2", "line-a"),
        ("f-3", "line-a"),
        ("x-1", "line-b"),
    ] {
        twins.create_twin(create(id, group)).await.expect("create");
    }
    // f-1 reports v1; f-2 is asked for v3 (a deployment pending as just sent); f-3 nothing.
    let device = Device::connect(
        &server,
        pb::Hello {
            device_id: "f-1".to_owned(),
            model: Some(pb::ModelRef {
                name: "vibration-anomaly".to_owned(),
                version: 1,
                sha256: String::new(),
            }),
            ..pb::Hello::default()
        },
    )
    .await;
    models
        .deploy_model(pb::DeployModelRequest {
            model: "vibration-anomaly@3".to_owned(),
            selector: Some(pb::TwinFilter {
                device_ids: vec!["f-2".to_owned()],
                ..pb::TwinFilter::default()
            }),
            dry_run: false,
        })
        .await
        .expect("deploy");
    let list = || pb::ListTwinsRequest {
        view: pb::TwinView::Full as i32,
        ..pb::ListTwinsRequest::default()
    };
    let before = twins.list_twins(list()).await.expect("list").into_inner();

    let start = |toml: &str, selector: Option<pb::TwinFilter>| pb::StartSimulationRequest {
        scenario: Some(pb::start_simulation_request::Scenario::ScenarioToml(toml.to_owned())),
        fork: Some(pb::Fork { selector }),
        ..pb::StartSimulationRequest::default()
    };
    let started = simulation
        .start_simulation(start(FORKABLE, groups(&["line-a"])))
        .await
        .expect("forked start")
        .into_inner();
    assert_eq!(started.forked_twins, 3);
    assert_eq!(
        started.devices,
        3 + 5,
        "the forked twins replace line-a; pumps keep theirs"
    );
    assert_eq!(started.fork_revision, before.revision);
    let last = watch_to_end(&mut simulation, &started.simulation_id).await;
    assert_eq!(
        last.last().expect("status").state,
        pb::SimulationState::Finished as i32,
        "{last:?}"
    );
    let report = simulation
        .get_report(pb::GetReportRequest {
            simulation_id: started.simulation_id.clone(),
        })
        .await
        .expect("report")
        .into_inner();
    // The same fork of the same snapshot gives the same report.
    let twice = simulation
        .start_simulation(start(FORKABLE, groups(&["line-a"])))
        .await
        .expect("forked again")
        .into_inner();
    watch_to_end(&mut simulation, &twice.simulation_id).await;
    let second = simulation
        .get_report(pb::GetReportRequest {
            simulation_id: twice.simulation_id.clone(),
        })
        .await
        .expect("second report")
        .into_inner();
    assert!(second.report_json == report.report_json, "a fork is deterministic");
    let report = json(&report.report_json);
    assert_eq!(report["run"]["devices"], 8, "{}", report["run"]);
    assert_eq!(report["models"]["vibration-anomaly@1"]["devices"], 2);
    assert_eq!(report["models"]["vibration-anomaly@3"]["devices"], 1);

    // Nothing live changed: same twins, versions, revision and documents.
    let after = twins.list_twins(list()).await.expect("list").into_inner();
    assert_eq!(after.revision, before.revision);
    assert_eq!(after.twins.len(), before.twins.len());
    for (old, new) in before.twins.iter().zip(&after.twins) {
        assert_eq!(
            (
                &old.device_id,
                old.version,
                old.revision,
                &old.desired_json,
                &old.reported_json
            ),
            (
                &new.device_id,
                new.version,
                new.revision,
                &new.desired_json,
                &new.reported_json
            )
        );
    }

    // The ids are the twins': a target naming a scenario id of line-a no longer resolves.
    let renamed = FORKABLE.replace(r#"ids = ["f-2"]"#, r#"ids = ["sim-a-0"]"#);
    let error = simulation
        .start_simulation(start(&renamed, groups(&["line-a"])))
        .await
        .expect_err("sim-a-0 is not in the fork");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("no device has id `sim-a-0`"),
        "{}",
        error.message()
    );
    // A twin whose group the scenario does not define.
    let error = simulation
        .start_simulation(start(FORKABLE, groups(&["line-a", "line-b"])))
        .await
        .expect_err("line-b is not a scenario group");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("`line-b`"), "{}", error.message());
    let error = simulation
        .start_simulation(start(FORKABLE, groups(&["nobody"])))
        .await
        .expect_err("selects nothing");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert_eq!(field_of(&error), "fork.selector");
    drop(device);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The live inference check

/// Rows of a shipped model's reference inputs and tract's outputs for them, flattened in
/// output order (int64 outputs as floats).
fn reference_rows(file: &str) -> Vec<(Vec<f32>, Vec<f32>)> {
    let models = workspace().join("scenarios/models");
    let reference = json(&std::fs::read_to_string(models.join("reference.json")).expect("reference.json"));
    let case = reference["models"]
        .as_array()
        .expect("models")
        .iter()
        .find(|case| case["file"] == file)
        .expect("case");
    let rows: Vec<Vec<f32>> = case["inputs"]
        .as_object()
        .expect("inputs")
        .values()
        .next()
        .expect("one input")
        .as_array()
        .expect("rows")
        .iter()
        .take(3)
        .map(|row| {
            row.as_array()
                .expect("row")
                .iter()
                .map(|value| value.as_f64().expect("number") as f32)
                .collect()
        })
        .collect();
    let model = CompiledModel::load(&std::fs::read(models.join(file)).expect("model")).expect("compiles");
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let outputs = model.run(&flat).expect("runs");
    rows.into_iter()
        .enumerate()
        .map(|(row, features)| {
            let mut values = Vec::new();
            twin_core::inference::extend_row_f32(&outputs, row, &mut values);
            (features, values)
        })
        .collect()
}

fn inference(name: &str, version: u32, features: &[f32], outputs: &[f32]) -> pb::device_message::Body {
    pb::device_message::Body::Inference(pb::InferenceReport {
        model: Some(pb::ModelRef {
            name: name.to_owned(),
            version,
            sha256: String::new(),
        }),
        sensor: "accel".to_owned(),
        features: features.to_vec(),
        outputs: outputs.to_vec(),
        ..pb::InferenceReport::default()
    })
}

#[tokio::test]
async fn the_twin_reruns_device_inference_and_marks_a_divergence() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    twins.create_twin(create("bystander", "")).await.expect("create");
    let mut device = Device::connect(
        &server,
        pb::Hello {
            device_id: "inf-1".to_owned(),
            model: Some(pb::ModelRef {
                name: "vibration-anomaly".to_owned(),
                version: 1,
                sha256: String::new(),
            }),
            ..pb::Hello::default()
        },
    )
    .await;
    let version = get(&mut twins, "inf-1").await.version;
    let rows = reference_rows("vibration-anomaly-v1.onnx");

    // Agreement: the device's outputs are tract's.
    for (features, outputs) in &rows {
        device.send(inference("vibration-anomaly", 1, features, outputs)).await;
    }
    device.reported(r#"{"probe": 1}"#).await;
    let twin = get(&mut twins, "inf-1").await;
    let check = twin.inference.expect("inference check");
    assert_eq!((check.checked, check.agreed, check.diverged), (3, 3, 0));
    assert!(!check.inference_divergence);
    assert!(check.max_abs_error <= 1e-4, "{}", check.max_abs_error);
    assert_eq!(twin.version, version + 1, "checks take no version; the probe does");

    // Tampering: a score moved by 0.25.
    let (features, outputs) = &rows[0];
    let tampered: Vec<f32> = outputs.iter().map(|value| value + 0.25).collect();
    device
        .send(inference("vibration-anomaly", 1, features, &tampered))
        .await;
    device.reported(r#"{"probe": 2}"#).await;
    let check = get(&mut twins, "inf-1").await.inference.expect("check");
    assert_eq!((check.checked, check.agreed, check.diverged), (4, 3, 1));
    assert!(check.inference_divergence);
    assert!(check.max_abs_error >= 0.24, "{}", check.max_abs_error);
    assert!(check.last_divergence_at.is_some());
    let marked = twins
        .list_twins(pb::ListTwinsRequest {
            filter: Some(pb::TwinFilter {
                inference_divergence: Some(true),
                ..pb::TwinFilter::default()
            }),
            ..pb::ListTwinsRequest::default()
        })
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<&str> = marked.twins.iter().map(|twin| twin.device_id.as_str()).collect();
    assert_eq!(ids, ["inf-1"]);
    let clean = twins
        .list_twins(pb::ListTwinsRequest {
            filter: Some(pb::TwinFilter {
                inference_divergence: Some(false),
                ..pb::TwinFilter::default()
            }),
            ..pb::ListTwinsRequest::default()
        })
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<&str> = clean.twins.iter().map(|twin| twin.device_id.as_str()).collect();
    assert_eq!(ids, ["bystander"]);
    assert_eq!(metric(&server, "twin_inference_checks_total").await, "4");
    assert_eq!(metric(&server, "twin_inference_divergences_total").await, "1");
    assert_eq!(metric(&server, "twin_inference_divergent_twins").await, "1");

    // Refused reports: a wrong width, wrong outputs, an unknown version. The stream goes on.
    let sequence = device
        .send(inference("vibration-anomaly", 1, &features[..8], outputs))
        .await;
    let error = device.error().await;
    assert_eq!(error.sequence, sequence);
    assert_eq!(error.code, Code::InvalidArgument as i32);
    assert_eq!(error.field_path, "inference.features");
    device
        .send(inference("vibration-anomaly", 1, features, &[0.1, 0.2]))
        .await;
    let error = device.error().await;
    assert_eq!(error.code, Code::InvalidArgument as i32);
    assert_eq!(error.field_path, "inference.outputs");
    device.send(inference("vibration-anomaly", 9, features, outputs)).await;
    let error = device.error().await;
    assert_eq!(error.code, Code::NotFound as i32);
    assert_eq!(error.field_path, "inference.model.version");
    device.send(inference("no-such-model", 1, features, outputs)).await;
    let error = device.error().await;
    assert_eq!(error.code, Code::NotFound as i32);
    assert_eq!(error.field_path, "inference.model.name");
    let check = get(&mut twins, "inf-1").await.inference.expect("check");
    assert_eq!(
        (check.checked, check.diverged),
        (6, 3),
        "unknown versions count as divergences"
    );

    // A redeployment (the device reports another model) clears the mark; the counts stay.
    device
        .reported(r#"{"model": {"name": "vibration-anomaly", "version": 2}}"#)
        .await;
    let check = get(&mut twins, "inf-1").await.inference.expect("check");
    assert!(!check.inference_divergence);
    assert_eq!(check.diverged, 3);
    server.stop().await;

    // Durable: the check is there after a restart.
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    let check = get(&mut twins, "inf-1").await.inference.expect("check");
    assert_eq!((check.checked, check.agreed, check.diverged), (6, 3, 3));
    server.stop().await;
}

#[tokio::test]
async fn a_model_with_several_outputs_is_compared_on_all_of_them() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    let mut device = Device::connect(
        &server,
        pb::Hello {
            device_id: "cam-1".to_owned(),
            ..pb::Hello::default()
        },
    )
    .await;
    let rows = reference_rows("digits-v1.onnx");
    for (features, outputs) in &rows {
        assert_eq!(outputs.len(), 11, "ten probabilities and the class");
        device.send(inference("digits", 1, features, outputs)).await;
    }
    // A wrong class with the right probabilities diverges.
    let (features, outputs) = &rows[0];
    let mut wrong_class = outputs.clone();
    wrong_class[10] = (wrong_class[10] + 1.0) % 10.0;
    device.send(inference("digits", 1, features, &wrong_class)).await;
    device.reported(r#"{"probe": 1}"#).await;
    let check = get(&mut twins, "cam-1").await.inference.expect("check");
    assert_eq!((check.checked, check.agreed, check.diverged), (4, 3, 1));
    assert!(check.inference_divergence);
    server.stop().await;
}
