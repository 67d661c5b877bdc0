//! Black-box tests of `twin serve` over real gRPC: a server started in-process on a port-0
//! listener on 127.0.0.1, called with the generated tonic clients.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tonic_types::StatusExt;
use twin_proto::v1 as pb;
use twin_proto::v1::twins_client::TwinsClient;

/// Longest wait for any one message; a test that needs longer has failed.
const PATIENCE: Duration = Duration::from_secs(10);

mod common;

use common::Server;

fn create(id: &str, group: &str, desired: &str, tags: &str) -> pb::CreateTwinRequest {
    pb::CreateTwinRequest {
        device_id: id.to_owned(),
        group: group.to_owned(),
        desired_json: desired.to_owned(),
        tags_json: tags.to_owned(),
    }
}

fn desired(id: &str, patch: &str, expected: Option<u64>) -> pb::UpdateDesiredRequest {
    pb::UpdateDesiredRequest {
        device_id: id.to_owned(),
        patch_json: patch.to_owned(),
        expected_version: expected,
    }
}

async fn get(client: &mut TwinsClient<Channel>, id: &str) -> Result<pb::Twin, Status> {
    client
        .get_twin(pb::GetTwinRequest {
            device_id: id.to_owned(),
            view: pb::TwinView::Full as i32,
        })
        .await
        .map(tonic::Response::into_inner)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).expect("json")
}

async fn next<T>(stream: &mut Streaming<T>) -> Result<T, Status> {
    match tokio::time::timeout(PATIENCE, stream.message()).await {
        Ok(Ok(Some(message))) => Ok(message),
        Ok(Ok(None)) => Err(Status::cancelled("stream ended")),
        Ok(Err(status)) => Err(status),
        Err(_) => panic!("no message within {PATIENCE:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Twins: every RPC and its errors

#[tokio::test]
async fn create_get_list_update_tags_delete_and_recreate() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;

    let created = twins
        .create_twin(create("dev-1", "line-a", r#"{"rate": 10}"#, r#"{"site": "plant-a"}"#))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.version, 1);
    assert_eq!(created.group, "line-a");
    assert_eq!(json(&created.delta_json), json(r#"{"rate": 10}"#));
    assert_eq!(created.reconciliation_state, pb::ReconciliationState::Pending as i32);
    for (id, group) in [
        ("dev-2", "line-a"),
        ("dev-3", "line-b"),
        ("dev-4", ""),
        ("dev-5", "line-b"),
    ] {
        twins.create_twin(create(id, group, "", "")).await.expect("create");
    }

    let updated = twins
        .update_desired(desired("dev-1", r#"{"mode": "eco"}"#, Some(1)))
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.version, 2);
    assert!(!updated.delta_empty);
    assert!(updated.revision > created.revision);
    let tagged = twins
        .update_tags(pb::UpdateTagsRequest {
            device_id: "dev-1".to_owned(),
            patch_json: r#"{"hall": 3}"#.to_owned(),
            expected_version: Some(2),
        })
        .await
        .expect("tags")
        .into_inner();
    assert_eq!(tagged.version, 3);

    let full = get(&mut twins, "dev-1").await.expect("get");
    assert_eq!(full.version, 3);
    assert_eq!(full.revision, tagged.revision);
    assert_eq!(json(&full.desired_json), json(r#"{"rate": 10, "mode": "eco"}"#));
    assert_eq!(json(&full.tags_json), json(r#"{"site": "plant-a", "hall": 3}"#));
    assert_eq!(json(&full.reported_json), json("{}"));
    let paths: Vec<&str> = full.desired_metadata.iter().map(|leaf| leaf.path.as_str()).collect();
    assert_eq!(paths, ["/mode", "/rate"]);
    let keys: Vec<&str> = full.reconciliation.iter().map(|entry| entry.key.as_str()).collect();
    assert_eq!(keys, ["mode", "rate"]);
    let basic = twins
        .get_twin(pb::GetTwinRequest {
            device_id: "dev-1".to_owned(),
            view: pb::TwinView::Basic as i32,
        })
        .await
        .expect("basic")
        .into_inner();
    assert!(basic.desired_json.is_empty() && basic.tags_json.is_empty());
    assert_eq!(basic.version, 3);

    // Paging: 5 twins, 2 per page, in id order.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = twins
            .list_twins(pb::ListTwinsRequest {
                page_size: 2,
                page_token: token.clone(),
                ..pb::ListTwinsRequest::default()
            })
            .await
            .expect("list")
            .into_inner();
        assert!(page.twins.len() <= 2);
        seen.extend(page.twins.into_iter().map(|twin| twin.device_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["dev-1", "dev-2", "dev-3", "dev-4", "dev-5"]);

    let list = |filter: pb::TwinFilter| pb::ListTwinsRequest {
        filter: Some(filter),
        ..pb::ListTwinsRequest::default()
    };
    let ids = |response: pb::ListTwinsResponse| {
        response
            .twins
            .into_iter()
            .map(|twin| twin.device_id)
            .collect::<Vec<_>>()
    };
    let by_group = twins
        .list_twins(list(pb::TwinFilter {
            groups: vec!["line-b".to_owned()],
            ..pb::TwinFilter::default()
        }))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(ids(by_group), ["dev-3", "dev-5"]);
    let by_tag = twins
        .list_twins(list(pb::TwinFilter {
            tags: vec![pb::TagMatch {
                path: "/hall".to_owned(),
                value_json: Some("3.0".to_owned()),
            }],
            ..pb::TwinFilter::default()
        }))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(ids(by_tag), ["dev-1"]);
    let pending = twins
        .list_twins(list(pb::TwinFilter {
            reconciliation_state: pb::ReconciliationState::Pending as i32,
            connected: Some(false),
            ..pb::TwinFilter::default()
        }))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(ids(pending), ["dev-1"]);

    let deleted = twins
        .delete_twin(pb::DeleteTwinRequest {
            device_id: "dev-1".to_owned(),
            expected_version: None,
        })
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(deleted.version, 4);
    let gone = get(&mut twins, "dev-1").await.expect_err("deleted");
    assert_eq!(gone.code(), Code::NotFound);
    let again = twins
        .create_twin(create("dev-1", "", "", ""))
        .await
        .expect("recreate")
        .into_inner();
    assert_eq!(again.version, 5, "a version is never reused after delete and re-create");

    server.stop().await;
}

#[tokio::test]
async fn refused_requests_get_their_codes_with_the_field_and_change_nothing() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(data.path(), |config| config.limits.max_desired_bytes = 64).await;
    let mut twins = server.twins().await;
    twins
        .create_twin(create("dev-1", "", r#"{"a": 1}"#, ""))
        .await
        .expect("create");

    let exists = twins
        .create_twin(create("dev-1", "", "", ""))
        .await
        .expect_err("duplicate");
    assert_eq!(exists.code(), Code::AlreadyExists);
    let bad_id = twins
        .create_twin(create("dev 1", "", "", ""))
        .await
        .expect_err("bad id");
    assert_eq!(bad_id.code(), Code::InvalidArgument);
    assert!(bad_id.message().starts_with("twin_id:"), "{}", bad_id.message());
    let bad_key = twins
        .update_desired(desired("dev-1", r#"{"cfg": {"$v": 1}}"#, None))
        .await
        .expect_err("bad key");
    assert_eq!(bad_key.code(), Code::InvalidArgument);
    assert!(bad_key.message().starts_with("desired.cfg"), "{}", bad_key.message());
    let violation = bad_key.get_details_bad_request().expect("bad request details");
    assert_eq!(violation.field_violations[0].field, "desired.cfg[\"$v\"]");
    let not_json = twins
        .update_desired(desired("dev-1", "{", None))
        .await
        .expect_err("not json");
    assert_eq!(not_json.code(), Code::InvalidArgument);
    assert!(
        not_json.message().starts_with("patch_json: not valid JSON"),
        "{}",
        not_json.message()
    );
    let empty = twins
        .update_desired(desired("dev-1", "", None))
        .await
        .expect_err("empty");
    assert_eq!(empty.code(), Code::InvalidArgument);
    let too_big = twins
        .update_desired(desired("dev-1", &format!(r#"{{"b": "{}"}}"#, "x".repeat(60)), None))
        .await
        .expect_err("too big");
    assert_eq!(too_big.code(), Code::ResourceExhausted);
    assert!(too_big.message().contains("max_desired_bytes"), "{}", too_big.message());
    let unknown = twins
        .update_desired(desired("dev-9", "{}", None))
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), Code::NotFound);
    let unknown_get = get(&mut twins, "dev-9").await.expect_err("unknown");
    assert_eq!(unknown_get.code(), Code::NotFound);
    let unknown_delete = twins
        .delete_twin(pb::DeleteTwinRequest {
            device_id: "dev-9".to_owned(),
            expected_version: None,
        })
        .await
        .expect_err("unknown");
    assert_eq!(unknown_delete.code(), Code::NotFound);
    let bad_token = twins
        .list_twins(pb::ListTwinsRequest {
            page_token: "nonsense".to_owned(),
            ..pb::ListTwinsRequest::default()
        })
        .await
        .expect_err("token");
    assert_eq!(bad_token.code(), Code::InvalidArgument);
    let bad_pointer = twins
        .list_twins(pb::ListTwinsRequest {
            filter: Some(pb::TwinFilter {
                tags: vec![pb::TagMatch {
                    path: "site".to_owned(),
                    value_json: None,
                }],
                ..pb::TwinFilter::default()
            }),
            ..pb::ListTwinsRequest::default()
        })
        .await
        .expect_err("pointer");
    assert_eq!(bad_pointer.code(), Code::InvalidArgument);
    assert!(
        bad_pointer.message().starts_with("filter.tags[0].path"),
        "{}",
        bad_pointer.message()
    );

    let twin = get(&mut twins, "dev-1").await.expect("get");
    assert_eq!(twin.version, 1, "refused requests change nothing");
    assert_eq!(json(&twin.desired_json), json(r#"{"a": 1}"#));
    server.stop().await;
}

#[tokio::test]
async fn a_wrong_expected_version_is_aborted_with_the_current_version_and_one_of_two_racers_wins() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    twins.create_twin(create("dev-1", "", "", "")).await.expect("create");
    twins
        .update_desired(desired("dev-1", r#"{"a": 1}"#, None))
        .await
        .expect("update");

    let conflict = twins
        .update_desired(desired("dev-1", r#"{"a": 2}"#, Some(1)))
        .await
        .expect_err("conflict");
    assert_eq!(conflict.code(), Code::Aborted);
    let info = conflict.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "VERSION_CONFLICT");
    assert_eq!(info.metadata.get("current_version").map(String::as_str), Some("2"));
    let twin = get(&mut twins, "dev-1").await.expect("get");
    assert_eq!((twin.version, json(&twin.desired_json)), (2, json(r#"{"a": 1}"#)));
    let delete_conflict = twins
        .delete_twin(pb::DeleteTwinRequest {
            device_id: "dev-1".to_owned(),
            expected_version: Some(7),
        })
        .await
        .expect_err("conflict");
    assert_eq!(delete_conflict.code(), Code::Aborted);

    // Eight writers race with the same expected version: exactly one wins.
    let mut racers = Vec::new();
    for racer in 0..8 {
        let mut client = server.twins().await;
        racers.push(tokio::spawn(async move {
            client
                .update_desired(desired("dev-1", &format!(r#"{{"winner": {racer}}}"#), Some(2)))
                .await
        }));
    }
    let mut won = 0;
    for racer in racers {
        match racer.await.expect("racer") {
            Ok(response) => {
                won += 1;
                assert_eq!(response.into_inner().version, 3);
            }
            Err(status) => assert_eq!(status.code(), Code::Aborted),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(get(&mut twins, "dev-1").await.expect("get").version, 3);
    server.stop().await;
}

/// The status an item of a batch carries, rebuilt as a unary call's status.
fn item_status(result: &pb::UpdateDesiredResult) -> Option<Status> {
    match &result.outcome {
        Some(pb::update_desired_result::Outcome::Error(error)) => Some(Status::with_details(
            Code::from(error.code),
            error.message.clone(),
            error.details.clone().into(),
        )),
        _ => None,
    }
}

fn item_applied(result: &pb::UpdateDesiredResult) -> &pb::UpdateDesiredResponse {
    match &result.outcome {
        Some(pb::update_desired_result::Outcome::Applied(applied)) => applied,
        other => panic!("expected an applied update, got {other:?}"),
    }
}

#[tokio::test]
async fn a_batch_applies_each_update_on_its_own_in_order_with_per_item_errors() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    let mut device = Device::connect(&server, hello("dev-1", 0)).await.expect("connect");
    let connected = device.delta().await;
    assert_eq!(connected.version, 1);
    twins.create_twin(create("dev-2", "", "", "")).await.expect("create");
    let mut stream = watch(&server, None, None).await.expect("watch");
    match next(&mut stream).await.expect("started").event {
        Some(pb::watch_response::Event::Started(started)) => assert_eq!(started.revision, 2),
        other => panic!("expected started, got {other:?}"),
    }

    let response = twins
        .update_desired_batch(pb::UpdateDesiredBatchRequest {
            updates: vec![
                desired("dev-1", r#"{"a": 1}"#, None),
                desired("dev-2", "{", None),
                desired("dev-9", "{}", None),
                desired("dev-1", r#"{"a": 2}"#, Some(1)),
                desired("dev-1", r#"{"b": 3}"#, Some(2)),
                desired("dev-2", r#"{"c": 4}"#, Some(1)),
            ],
        })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(response.results.len(), 6);
    let first = item_applied(&response.results[0]);
    assert!(!first.delta_empty);
    assert_eq!(first.version, 2);
    let bad = item_status(&response.results[1]).expect("a bad patch is refused");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("updates[1].patch_json"), "{}", bad.message());
    let violations = bad.get_details_bad_request().expect("bad request").field_violations;
    assert_eq!(violations[0].field, "updates[1].patch_json");
    let missing = item_status(&response.results[2]).expect("an unknown twin is refused");
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("dev-9"), "{}", missing.message());
    let conflict = item_status(&response.results[3]).expect("a stale version is refused");
    assert_eq!(conflict.code(), Code::Aborted);
    let info = conflict.get_details_error_info().expect("error info");
    assert_eq!(info.metadata.get("current_version").map(String::as_str), Some("2"));
    // Later updates of the same twin see the earlier ones of the batch.
    let third = item_applied(&response.results[4]);
    assert_eq!(third.version, 3);
    assert_eq!(third.revision, first.revision + 1);
    let other = item_applied(&response.results[5]);
    assert_eq!((other.version, other.revision), (2, first.revision + 2));

    // Each accepted update is a change of its own: on the Watch stream, in order, and as a
    // delta on the device's stream.
    let changes = [
        next_change(&mut stream).await,
        next_change(&mut stream).await,
        next_change(&mut stream).await,
    ];
    let seen: Vec<(&str, u64, u64)> = changes
        .iter()
        .map(|change| (change.device_id.as_str(), change.version, change.revision))
        .collect();
    assert_eq!(
        seen,
        [
            ("dev-1", 2, first.revision),
            ("dev-1", 3, first.revision + 1),
            ("dev-2", 2, first.revision + 2),
        ]
    );
    assert_eq!(json(&changes[1].patch_json), json(r#"{"b": 3}"#));
    let pushed = [device.delta().await, device.delta().await];
    assert_eq!(
        (pushed[0].version, json(&pushed[0].delta_json)),
        (2, json(r#"{"a": 1}"#))
    );
    assert_eq!(
        (pushed[1].version, json(&pushed[1].delta_json)),
        (3, json(r#"{"a": 1, "b": 3}"#))
    );
    let twin = get(&mut twins, "dev-2").await.expect("get");
    assert_eq!((twin.version, json(&twin.desired_json)), (2, json(r#"{"c": 4}"#)));

    // A call with no update, or with more than 1000, is refused whole and changes nothing.
    for count in [0, 1001] {
        let refused = twins
            .update_desired_batch(pb::UpdateDesiredBatchRequest {
                updates: (0..count).map(|_| desired("dev-2", r#"{"c": 5}"#, None)).collect(),
            })
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(refused.message().starts_with("updates:"), "{}", refused.message());
    }
    assert_eq!(get(&mut twins, "dev-2").await.expect("get").version, 2);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// DeviceSync

struct Device {
    outbox: mpsc::Sender<pb::DeviceMessage>,
    inbox: Streaming<pb::ServerMessage>,
    sequence: u64,
}

impl Device {
    async fn connect(server: &Server, hello: pb::Hello) -> Result<Device, Status> {
        let (outbox, receiver) = mpsc::channel(16);
        outbox
            .send(pb::DeviceMessage {
                sequence: 0,
                body: Some(pb::device_message::Body::Hello(hello)),
            })
            .await
            .expect("queue hello");
        let inbox = server
            .sync()
            .await
            .sync(ReceiverStream::new(receiver))
            .await?
            .into_inner();
        Ok(Device {
            outbox,
            inbox,
            sequence: 0,
        })
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

    async fn delta(&mut self) -> pb::DesiredDelta {
        match next(&mut self.inbox).await.expect("message").body {
            Some(pb::server_message::Body::Delta(delta)) => delta,
            other => panic!("expected a delta, got {other:?}"),
        }
    }
}

fn hello(id: &str, last_desired_version: u64) -> pb::Hello {
    pb::Hello {
        device_id: id.to_owned(),
        last_desired_version,
        ..pb::Hello::default()
    }
}

#[tokio::test]
async fn a_device_registers_reports_acknowledges_and_receives_deltas() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;

    let mut device = Device::connect(
        &server,
        pb::Hello {
            device_id: "cam-1".to_owned(),
            group: "cams".to_owned(),
            firmware: "1.2.0".to_owned(),
            model: Some(pb::ModelRef {
                name: "digits".to_owned(),
                version: 2,
                sha256: String::new(),
            }),
            ..pb::Hello::default()
        },
    )
    .await
    .expect("connect");
    let connected = device.delta().await;
    assert_eq!(connected.reason, pb::DeltaReason::Connected as i32);
    assert_eq!(json(&connected.delta_json), json("{}"));
    assert_eq!(
        connected.version, 2,
        "created at 1, the Hello's model and firmware reported at 2"
    );

    let twin = get(&mut twins, "cam-1").await.expect("registered by its hello");
    assert_eq!(twin.group, "cams");
    assert_eq!(twin.reported_model.as_ref().map(|model| model.version), Some(2));
    assert_eq!(json(&twin.reported_json)["firmware"], json(r#""1.2.0""#));
    assert!(twin.connection.as_ref().is_some_and(|connection| connection.connected));

    let update = twins
        .update_desired(desired("cam-1", r#"{"fps": 30, "mode": "night"}"#, None))
        .await
        .expect("update")
        .into_inner();
    let pushed = device.delta().await;
    assert_eq!(pushed.reason, pb::DeltaReason::DesiredChanged as i32);
    assert_eq!(pushed.version, update.version);
    assert_eq!(json(&pushed.delta_json), json(r#"{"fps": 30, "mode": "night"}"#));

    let sequence = device
        .send(pb::device_message::Body::Reported(pb::ReportedPatch {
            patch_json: r#"{"fps": 30}"#.to_owned(),
            source_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
        }))
        .await;
    match next(&mut device.inbox).await.expect("ack").body {
        Some(pb::server_message::Body::ReportedAck(ack)) => {
            assert_eq!(ack.sequence, sequence);
            assert_eq!(ack.version, update.version + 1);
        }
        other => panic!("expected a reported ack, got {other:?}"),
    }
    device
        .send(pb::device_message::Body::Acks(pb::DesiredAcks {
            acks: vec![pb::DesiredAck {
                key: "mode".to_owned(),
                status_code: 400,
                acknowledged_version: update.version,
                description: "no night mode on this sensor".to_owned(),
            }],
        }))
        .await;
    // Refused messages answer with a SyncError and the stream goes on.
    let bad = device
        .send(pb::device_message::Body::Reported(pb::ReportedPatch {
            patch_json: "[1]".to_owned(),
            source_time: None,
        }))
        .await;
    match next(&mut device.inbox).await.expect("error").body {
        Some(pb::server_message::Body::Error(error)) => {
            assert_eq!(error.sequence, bad);
            assert_eq!(error.code, Code::InvalidArgument as i32);
            assert_eq!(error.field_path, "reported.patch_json");
        }
        other => panic!("expected a sync error, got {other:?}"),
    }
    let bad_key = device
        .send(pb::device_message::Body::Reported(pb::ReportedPatch {
            patch_json: r#"{"cfg": {"a b": 1}}"#.to_owned(),
            source_time: None,
        }))
        .await;
    match next(&mut device.inbox).await.expect("error").body {
        Some(pb::server_message::Body::Error(error)) => {
            assert_eq!(error.sequence, bad_key);
            assert_eq!(error.code, Code::InvalidArgument as i32);
            assert_eq!(error.field_path, "reported.cfg[\"a b\"]");
        }
        other => panic!("expected a sync error, got {other:?}"),
    }
    let foreign = device
        .send(pb::device_message::Body::Telemetry(pb::TelemetryBatch {
            stamp: Some(pb::BatchStamp {
                device_id: "cam-2".to_owned(),
                ..pb::BatchStamp::default()
            }),
            sensors: Vec::new(),
        }))
        .await;
    match next(&mut device.inbox).await.expect("error").body {
        Some(pb::server_message::Body::Error(error)) => {
            assert_eq!(error.sequence, foreign);
            assert_eq!(error.code, Code::PermissionDenied as i32);
        }
        other => panic!("expected a sync error, got {other:?}"),
    }

    let twin = get(&mut twins, "cam-1").await.expect("get");
    let states: Vec<(String, i32)> = twin
        .reconciliation
        .iter()
        .map(|entry| (entry.key.clone(), entry.state))
        .collect();
    assert_eq!(
        states,
        [
            ("fps".to_owned(), pb::ReconciliationState::Succeeded as i32),
            ("mode".to_owned(), pb::ReconciliationState::Failed as i32)
        ]
    );
    assert_eq!(twin.reconciliation_state, pb::ReconciliationState::Failed as i32);
    let fps = twin
        .reported_metadata
        .iter()
        .find(|leaf| leaf.path == "/fps")
        .expect("fps metadata");
    assert_eq!(fps.source_time.as_ref().map(|time| time.seconds), Some(1_700_000_000));
    server.stop().await;
}

#[tokio::test]
async fn a_stream_must_start_with_hello_and_a_second_stream_ends_the_first() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;

    let (outbox, receiver) = mpsc::channel(1);
    outbox
        .send(pb::DeviceMessage {
            sequence: 1,
            body: Some(pb::device_message::Body::Reported(pb::ReportedPatch {
                patch_json: "{}".to_owned(),
                source_time: None,
            })),
        })
        .await
        .expect("queue");
    let refused = server
        .sync()
        .await
        .sync(ReceiverStream::new(receiver))
        .await
        .expect_err("no hello");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let bad_id = Device::connect(&server, hello("bad id", 0))
        .await
        .err()
        .expect("bad id");
    assert_eq!(bad_id.code(), Code::InvalidArgument);

    let mut first = Device::connect(&server, hello("dev-1", 0)).await.expect("first");
    first.delta().await;
    let mut second = Device::connect(&server, hello("dev-1", 0)).await.expect("second");
    second.delta().await;
    let ended = next(&mut first.inbox).await.expect_err("first stream ends");
    assert_eq!(ended.code(), Code::Aborted);

    // The second stream is the live one: it gets the next delta.
    let mut twins = server.twins().await;
    twins
        .update_desired(desired("dev-1", r#"{"x": 1}"#, None))
        .await
        .expect("update");
    assert_eq!(json(&second.delta().await.delta_json), json(r#"{"x": 1}"#));
    server.stop().await;
}

#[tokio::test]
async fn a_reconnecting_device_gets_the_whole_delta_and_no_delta_twice() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    twins
        .create_twin(create("dev-1", "", r#"{"rate": 1}"#, ""))
        .await
        .expect("create");

    let mut device = Device::connect(&server, hello("dev-1", 0)).await.expect("connect");
    let first = device.delta().await;
    assert_eq!(json(&first.delta_json), json(r#"{"rate": 1}"#));
    let last_seen = first.version;
    drop(device);

    // Offline: two desired changes.
    twins
        .update_desired(desired("dev-1", r#"{"mode": "eco"}"#, None))
        .await
        .expect("offline 1");
    let offline = twins
        .update_desired(desired("dev-1", r#"{"rate": 20}"#, None))
        .await
        .expect("offline 2")
        .into_inner();

    let mut device = Device::connect(&server, hello("dev-1", last_seen))
        .await
        .expect("reconnect");
    let connected = device.delta().await;
    assert_eq!(connected.reason, pb::DeltaReason::Connected as i32);
    assert_eq!(connected.version, offline.version);
    assert_eq!(json(&connected.delta_json), json(r#"{"mode": "eco", "rate": 20}"#));
    let twin = get(&mut twins, "dev-1").await.expect("get");
    assert_eq!(
        twin.connection.map(|connection| connection.last_desired_version),
        Some(last_seen)
    );

    // Online again: every later change arrives once, versions strictly increasing.
    let mut versions = Vec::new();
    for step in 0..5 {
        let response = twins
            .update_desired(desired("dev-1", &format!(r#"{{"step": {step}}}"#), None))
            .await
            .expect("update")
            .into_inner();
        versions.push(response.version);
    }
    let mut received = Vec::new();
    for _ in 0..5 {
        received.push(device.delta().await.version);
    }
    assert_eq!(received, versions);
    // Nothing else is queued: a reported patch is answered by its ack, not by a stale delta.
    let sequence = device
        .send(pb::device_message::Body::Reported(pb::ReportedPatch {
            patch_json: r#"{"rate": 20}"#.to_owned(),
            source_time: None,
        }))
        .await;
    match next(&mut device.inbox).await.expect("ack").body {
        Some(pb::server_message::Body::ReportedAck(ack)) => assert_eq!(ack.sequence, sequence),
        other => panic!("expected the reported ack next, got {other:?}"),
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Durability

#[tokio::test]
async fn twins_versions_tags_and_revisions_survive_a_restart() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    twins
        .create_twin(create("dev-1", "g", r#"{"a": 1}"#, r#"{"site": "x"}"#))
        .await
        .expect("create");
    twins
        .update_desired(desired("dev-1", r#"{"b": [1, 2]}"#, None))
        .await
        .expect("update");
    twins.create_twin(create("dev-2", "", "", "")).await.expect("create");
    let deleted = twins
        .delete_twin(pb::DeleteTwinRequest {
            device_id: "dev-2".to_owned(),
            expected_version: None,
        })
        .await
        .expect("delete")
        .into_inner();
    let before = get(&mut twins, "dev-1").await.expect("get");
    drop(twins);
    server.stop().await;

    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    let after = get(&mut twins, "dev-1").await.expect("get after restart");
    assert_eq!(after.version, before.version);
    assert_eq!(after.revision, before.revision);
    assert_eq!(after.desired_json, before.desired_json);
    assert_eq!(after.tags_json, before.tags_json);
    assert_eq!(after.group, "g");
    assert_eq!(after.reconciliation, before.reconciliation);
    assert_eq!(
        get(&mut twins, "dev-2").await.expect_err("deleted").code(),
        Code::NotFound
    );
    let recreated = twins
        .create_twin(create("dev-2", "", "", ""))
        .await
        .expect("recreate")
        .into_inner();
    assert_eq!(recreated.version, deleted.version + 1);
    assert_eq!(
        recreated.revision,
        deleted.revision + 1,
        "revisions continue after a restart"
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Watch

async fn watch(
    server: &Server,
    after_revision: Option<u64>,
    filter: Option<pb::TwinFilter>,
) -> Result<Streaming<pb::WatchResponse>, Status> {
    server
        .twins()
        .await
        .watch(pb::WatchRequest {
            filter,
            after_revision,
            include_telemetry: false,
            progress_interval_ms: 0,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn next_change(stream: &mut Streaming<pb::WatchResponse>) -> pb::ChangeEvent {
    loop {
        match next(stream).await.expect("watch message").event {
            Some(pb::watch_response::Event::Change(change)) => return *change,
            Some(pb::watch_response::Event::Progress(_)) => continue,
            other => panic!("expected a change, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn watch_streams_changes_in_order_and_resumes_without_gaps() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;

    let mut stream = watch(&server, None, None).await.expect("watch");
    let started = match next(&mut stream).await.expect("started").event {
        Some(pb::watch_response::Event::Started(started)) => started,
        other => panic!("expected started, got {other:?}"),
    };
    assert_eq!(started.revision, 0);
    twins.create_twin(create("dev-1", "g", "", "")).await.expect("create");
    twins
        .update_desired(desired("dev-1", r#"{"a": 1}"#, None))
        .await
        .expect("update");
    let created = next_change(&mut stream).await;
    assert_eq!((created.revision, created.kind), (1, pb::ChangeKind::Created as i32));
    assert!(created.twin.is_some());
    let updated = next_change(&mut stream).await;
    assert_eq!((updated.revision, updated.version), (2, 2));
    assert_eq!(updated.kind, pb::ChangeKind::DesiredUpdated as i32);
    assert_eq!(json(&updated.delta_json), json(r#"{"a": 1}"#));
    drop(stream);

    // While nobody watches: more changes, on two twins.
    twins.create_twin(create("dev-2", "h", "", "")).await.expect("create");
    for value in 2..6 {
        twins
            .update_desired(desired("dev-1", &format!(r#"{{"a": {value}}}"#), None))
            .await
            .expect("update");
    }
    twins
        .update_tags(pb::UpdateTagsRequest {
            device_id: "dev-2".to_owned(),
            patch_json: r#"{"t": true}"#.to_owned(),
            expected_version: None,
        })
        .await
        .expect("tags");

    let mut resumed = watch(&server, Some(updated.revision), None).await.expect("resume");
    let _started = next(&mut resumed).await.expect("started");
    let mut revisions = Vec::new();
    for _ in 0..6 {
        revisions.push(next_change(&mut resumed).await.revision);
    }
    assert_eq!(revisions, [3, 4, 5, 6, 7, 8], "every missed change, once, in order");
    twins
        .delete_twin(pb::DeleteTwinRequest {
            device_id: "dev-2".to_owned(),
            expected_version: None,
        })
        .await
        .expect("delete");
    let live = next_change(&mut resumed).await;
    assert_eq!((live.revision, live.kind), (9, pb::ChangeKind::Deleted as i32));

    // A filtered watcher sees only its group, and versions step by one per document change.
    let mut filtered = watch(
        &server,
        Some(0),
        Some(pb::TwinFilter {
            groups: vec!["g".to_owned()],
            ..pb::TwinFilter::default()
        }),
    )
    .await
    .expect("filtered");
    let _started = next(&mut filtered).await.expect("started");
    let mut versions = Vec::new();
    for _ in 0..6 {
        let change = next_change(&mut filtered).await;
        assert_eq!(change.device_id, "dev-1");
        versions.push(change.version);
    }
    assert_eq!(versions, [1, 2, 3, 4, 5, 6]);

    let ahead = watch(&server, Some(1000), None).await.expect_err("ahead");
    assert_eq!(ahead.code(), Code::OutOfRange);
    server.stop().await;
}

#[tokio::test]
async fn concurrent_writers_give_a_gap_free_stream_and_ordered_deltas() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    const TWINS: usize = 4;
    const WRITERS: usize = 8;
    const UPDATES: usize = 40;
    for twin in 0..TWINS {
        twins
            .create_twin(create(&format!("dev-{twin}"), "", "", ""))
            .await
            .expect("create");
    }
    let mut device = Device::connect(&server, hello("dev-0", 0)).await.expect("connect");
    let connected = device.delta().await;
    let mut stream = watch(&server, Some(0), None).await.expect("watch");
    let _started = next(&mut stream).await.expect("started");

    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let mut client = server.twins().await;
        writers.push(tokio::spawn(async move {
            for update in 0..UPDATES {
                let id = format!("dev-{}", (writer + update) % TWINS);
                let patch = format!(r#"{{"w{writer}": {update}}}"#);
                client.update_desired(desired(&id, &patch, None)).await.expect("update");
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }

    let total = TWINS + WRITERS * UPDATES;
    let mut last_version = [0u64; TWINS];
    let mut device_changes = Vec::new();
    for expected_revision in 1..=total as u64 {
        let change = next_change(&mut stream).await;
        assert_eq!(change.revision, expected_revision, "gap-free, in order");
        let twin: usize = change.device_id.trim_start_matches("dev-").parse().expect("index");
        assert_eq!(
            change.version,
            last_version[twin] + 1,
            "{}: versions step by one",
            change.device_id
        );
        last_version[twin] = change.version;
        if twin == 0 && change.kind == pb::ChangeKind::DesiredUpdated as i32 {
            device_changes.push(change.version);
        }
    }
    // The device got one whole delta per desired change of its twin, in version order.
    assert_eq!(device_changes.len(), WRITERS * UPDATES / TWINS);
    assert!(connected.version < device_changes[0]);
    let mut deltas = Vec::new();
    for _ in 0..device_changes.len() {
        deltas.push(device.delta().await.version);
    }
    assert_eq!(deltas, device_changes);
    let twin = get(&mut twins, "dev-0").await.expect("get");
    assert_eq!(json(&twin.delta_json), json(&twin.desired_json));
    server.stop().await;
}

#[tokio::test]
async fn watch_from_a_revision_older_than_the_history_is_out_of_range_with_the_oldest_kept() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(data.path(), |config| config.watch.history = 4).await;
    let mut twins = server.twins().await;
    twins.create_twin(create("dev-1", "", "", "")).await.expect("create");
    for value in 0..9 {
        twins
            .update_desired(desired("dev-1", &format!(r#"{{"a": {value}}}"#), None))
            .await
            .expect("update");
    }
    // Revisions 1..=10; the last 4 are kept, so resuming after 6 works and after 5 does not.
    let gone = watch(&server, Some(5), None).await.expect_err("too old");
    assert_eq!(gone.code(), Code::OutOfRange);
    let info = gone.get_details_error_info().expect("error info");
    assert_eq!(info.metadata.get("oldest_revision").map(String::as_str), Some("6"));
    let mut stream = watch(&server, Some(6), None).await.expect("resume at the oldest kept");
    let _started = next(&mut stream).await.expect("started");
    assert_eq!(next_change(&mut stream).await.revision, 7);
    server.stop().await;
}

#[tokio::test]
async fn a_filtered_watcher_gets_progress_past_changes_it_does_not_match() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    let mut stream = server
        .twins()
        .await
        .watch(pb::WatchRequest {
            filter: Some(pb::TwinFilter {
                groups: vec!["nobody".to_owned()],
                ..pb::TwinFilter::default()
            }),
            after_revision: None,
            include_telemetry: false,
            progress_interval_ms: 10,
        })
        .await
        .expect("watch")
        .into_inner();
    let _started = next(&mut stream).await.expect("started");
    twins.create_twin(create("dev-1", "g", "", "")).await.expect("create");
    let last = twins
        .update_desired(desired("dev-1", r#"{"a": 1}"#, None))
        .await
        .expect("update")
        .into_inner()
        .revision;
    loop {
        match next(&mut stream).await.expect("watch message").event {
            Some(pb::watch_response::Event::Progress(progress)) if progress.revision == last => break,
            Some(pb::watch_response::Event::Progress(progress)) => assert!(progress.revision < last),
            other => panic!("expected only progress, got {other:?}"),
        }
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Shutdown

#[tokio::test]
async fn shutdown_during_a_stream_of_writes_keeps_every_acknowledged_write() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    const WRITERS: usize = 16;
    for writer in 0..WRITERS {
        twins
            .create_twin(create(&format!("dev-{writer}"), "", r#"{"n": 0}"#, ""))
            .await
            .expect("create");
    }
    // Each writer updates its own twin with 1, 2, 3, ... until the server refuses; it returns
    // the last value acknowledged. The server is stopped once 200 writes were acknowledged.
    let (acked, mut acks) = mpsc::channel::<()>(1024);
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let mut client = server.twins().await;
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            let mut last = 0u64;
            for value in 1..=10_000u64 {
                let update = desired(&format!("dev-{writer}"), &format!(r#"{{"n": {value}}}"#), None);
                if client.update_desired(update).await.is_err() {
                    break;
                }
                last = value;
                let _ = acked.try_send(());
            }
            last
        }));
    }
    drop(acked);
    for _ in 0..200 {
        acks.recv().await.expect("acknowledged writes");
    }
    server.stop().await;
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.push(writer.await.expect("writer"));
    }
    assert!(
        acknowledged.iter().all(|last| *last < 10_000),
        "every writer was stopped"
    );

    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    for (writer, last) in acknowledged.iter().enumerate() {
        let twin = get(&mut twins, &format!("dev-{writer}")).await.expect("get");
        let stored = json(&twin.desired_json)["n"].as_u64().expect("n");
        // Every acknowledged write is there; at most one more (applied, but its reply lost).
        assert!(
            stored == *last || stored == *last + 1,
            "dev-{writer}: stored {stored}, acknowledged {last}"
        );
        assert_eq!(twin.version, stored + 1);
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Authentication

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {token}").parse().expect("header value");
    request.metadata_mut().insert("authorization", value);
    request
}

async fn open_sync(
    server: &Server,
    device_id: &str,
    token: Option<&str>,
) -> Result<(mpsc::Sender<pb::DeviceMessage>, Streaming<pb::ServerMessage>), Status> {
    let hello = pb::DeviceMessage {
        sequence: 0,
        body: Some(pb::device_message::Body::Hello(hello(device_id, 0))),
    };
    // The stream stays open as long as the caller keeps the sender.
    let (outbox, receiver) = mpsc::channel(1);
    outbox.send(hello).await.expect("queue hello");
    let stream = ReceiverStream::new(receiver);
    let request = match token {
        Some(token) => with_token(stream, token),
        None => tonic::Request::new(stream),
    };
    let inbox = server.sync().await.sync(request).await?.into_inner();
    Ok((outbox, inbox))
}

#[tokio::test]
async fn tokens_give_operators_everything_and_devices_only_their_own_stream() {
    use twin_server::serve::auth::{AuthConfig, DeviceToken};
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(data.path(), |config| {
        config.auth = AuthConfig {
            operator_tokens: vec!["op-secret".to_owned()],
            devices: vec![DeviceToken {
                device_id: "cam-1".to_owned(),
                token: "cam-1-secret".to_owned(),
            }],
        };
    })
    .await;
    let mut twins = server.twins().await;
    let get_request = |id: &str| pb::GetTwinRequest {
        device_id: id.to_owned(),
        view: 0,
    };

    let anonymous = twins.get_twin(get_request("cam-1")).await.expect_err("no token");
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let wrong = twins
        .get_twin(with_token(get_request("cam-1"), "guess"))
        .await
        .expect_err("wrong token");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    let device_on_twins = twins
        .get_twin(with_token(get_request("cam-1"), "cam-1-secret"))
        .await
        .expect_err("device token on Twins");
    assert_eq!(device_on_twins.code(), Code::PermissionDenied);
    twins
        .create_twin(with_token(create("cam-2", "", "", ""), "op-secret"))
        .await
        .expect("operator creates");

    let no_token = open_sync(&server, "cam-1", None).await.expect_err("no token");
    assert_eq!(no_token.code(), Code::Unauthenticated);
    let other_device = open_sync(&server, "cam-2", Some("cam-1-secret"))
        .await
        .expect_err("another device");
    assert_eq!(other_device.code(), Code::PermissionDenied);
    let (_own_outbox, mut own) = open_sync(&server, "cam-1", Some("cam-1-secret"))
        .await
        .expect("own stream");
    assert!(matches!(
        next(&mut own).await.expect("delta").body,
        Some(pb::server_message::Body::Delta(_))
    ));
    let (_operator_outbox, mut operator) = open_sync(&server, "cam-2", Some("op-secret"))
        .await
        .expect("operator stream");
    assert!(matches!(
        next(&mut operator).await.expect("delta").body,
        Some(pb::server_message::Body::Delta(_))
    ));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Metrics

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

#[tokio::test]
async fn metrics_count_twins_changes_connections_and_pending_keys() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    twins
        .create_twin(create("dev-1", "", r#"{"a": 1}"#, ""))
        .await
        .expect("create");
    twins
        .update_desired(desired("dev-1", r#"{"b": 2}"#, None))
        .await
        .expect("update");
    let mut device = Device::connect(&server, hello("dev-1", 0)).await.expect("connect");
    device.delta().await;

    let response = http_get(server.metrics, "/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    let value = |name: &str| {
        response
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} in {response}"))
            .to_owned()
    };
    assert_eq!(value("twin_twins"), "1");
    assert_eq!(value("twin_changes_total"), "2");
    assert_eq!(value("twin_revision"), "2");
    assert_eq!(value("twin_connected_devices"), "1");
    assert_eq!(value("twin_reconciliation_pending_keys"), "2");
    assert_eq!(value("twin_deltas_sent_total"), "1");
    assert!(response.contains("# TYPE twin_changes_total counter"));
    let missing = http_get(server.metrics, "/other").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Health and reflection

#[tokio::test]
async fn health_and_reflection_answer_for_the_twin_services() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["twin.v1.Twins", "twin.v1.DeviceSync", "twin.v1.Telemetry"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("health")
            .into_inner();
        assert_eq!(status.status, ServingStatus::Serving as i32, "{service}");
    }

    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses.next().await.expect("one response").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|service| service.name).collect();
    for wanted in ["twin.v1.Twins", "twin.v1.DeviceSync", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|name| name == wanted), "{wanted} in {names:?}");
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Telemetry

/// A batch of one sensor with `rows` timestamps and `channels` channels of finite values.
fn telemetry_batch(device_id: &str, sequence: u64, rows: usize, channels: usize) -> pb::TelemetryBatch {
    let offsets: Vec<u64> = (0..rows as u64).map(|row| row * 1_000_000).collect();
    pb::TelemetryBatch {
        stamp: Some(pb::BatchStamp {
            device_id: device_id.to_owned(),
            sequence,
            ..pb::BatchStamp::default()
        }),
        sensors: vec![pb::SensorSeries {
            sensor: "vibration".to_owned(),
            start_unix_nanos: 1_700_000_000_000_000_000,
            offsets_nanos: offsets,
            channels: (0..channels)
                .map(|channel| pb::ChannelValues {
                    channel: format!("c{channel}"),
                    values: (0..rows).map(|row| row as f64 * 0.5).collect(),
                })
                .collect(),
        }],
    }
}

async fn metric(server: &Server, name: &str) -> String {
    let response = http_get(server.metrics, "/metrics").await;
    response
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} in {response}"))
        .to_owned()
}

#[tokio::test]
async fn telemetry_ingest_counts_exact_samples_and_describes_rejected_batches() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    for id in ["gw-dev-1", "gw-dev-2"] {
        twins.create_twin(create(id, "", "", "")).await.expect("create");
    }
    let mut telemetry = server.telemetry().await;

    // 0: 100 x 3 = 300, 1: 50 x 1 = 50, 2: unknown device, 3: a short channel,
    // 4: a NaN, 5: no stamp, 6: 10 x 2 = 20.
    let mut short = telemetry_batch("gw-dev-1", 3, 4, 2);
    short.sensors[0].channels[1].values.pop();
    let mut not_a_number = telemetry_batch("gw-dev-2", 2, 4, 1);
    not_a_number.sensors[0].channels[0].values[2] = f64::NAN;
    let mut unstamped = telemetry_batch("gw-dev-1", 4, 1, 1);
    unstamped.stamp = None;
    let batches = vec![
        telemetry_batch("gw-dev-1", 1, 100, 3),
        telemetry_batch("gw-dev-2", 1, 50, 1),
        telemetry_batch("nobody", 1, 5, 1),
        short,
        not_a_number,
        unstamped,
        telemetry_batch("gw-dev-1", 2, 10, 2),
    ];
    let summary = telemetry
        .ingest(tokio_stream::iter(batches))
        .await
        .expect("ingest")
        .into_inner();
    assert_eq!(summary.batches_accepted, 3);
    assert_eq!(summary.samples_accepted, 370);
    assert_eq!(summary.batches_rejected, 4);
    let described: Vec<(u64, &str, i32)> = summary
        .rejected
        .iter()
        .map(|rejected| (rejected.index, rejected.device_id.as_str(), rejected.code))
        .collect();
    assert_eq!(
        described,
        vec![
            (2, "nobody", Code::NotFound as i32),
            (3, "gw-dev-1", Code::InvalidArgument as i32),
            (4, "gw-dev-2", Code::InvalidArgument as i32),
            (5, "", Code::InvalidArgument as i32),
        ]
    );
    let message = |index: usize| summary.rejected[index].message.as_str();
    assert!(message(0).contains("nobody"), "{}", message(0));
    assert!(
        message(1).starts_with("batches[3].sensors[0].channels[1].values:"),
        "{}",
        message(1)
    );
    assert!(
        message(2).starts_with("batches[4].sensors[0].channels[0].values:"),
        "{}",
        message(2)
    );
    assert!(message(3).starts_with("batches[5].stamp:"), "{}", message(3));

    assert_eq!(metric(&server, "twin_telemetry_samples_total").await, "370");
    assert_eq!(metric(&server, "twin_telemetry_batches_total").await, "3");
    assert_eq!(metric(&server, "twin_telemetry_rejected_total").await, "4");
    assert_eq!(metric(&server, "twin_telemetry_devices").await, "2");
    // Ingest changes no twin: no revision was taken.
    assert_eq!(metric(&server, "twin_revision").await, "2");
    server.stop().await;
}

#[tokio::test]
async fn a_telemetry_watcher_gets_a_notice_per_accepted_batch_of_the_twins_it_matches() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    for id in ["tw-1", "tw-2"] {
        twins.create_twin(create(id, "g", "", "")).await.expect("create");
    }
    let mut notices = twins
        .watch(pb::WatchRequest {
            filter: Some(pb::TwinFilter {
                device_ids: vec!["tw-1".to_owned()],
                ..pb::TwinFilter::default()
            }),
            include_telemetry: true,
            ..pb::WatchRequest::default()
        })
        .await
        .expect("watch")
        .into_inner();
    assert!(matches!(
        next(&mut notices).await.expect("started").event,
        Some(pb::watch_response::Event::Started(_))
    ));
    let mut telemetry = server.telemetry().await;
    telemetry
        .ingest_batch(telemetry_batch("tw-2", 1, 2, 1))
        .await
        .expect("tw-2 batch");
    telemetry
        .ingest_batch(telemetry_batch("tw-1", 7, 4, 3))
        .await
        .expect("tw-1 batch");
    // A device's own stream counts too; its stamp may leave the device id empty.
    let mut device = Device::connect(&server, hello("tw-1", 0)).await.expect("sync");
    device.delta().await;
    let mut batch = telemetry_batch("", 8, 1, 1);
    batch.stamp.get_or_insert_default().intended_send_unix_nanos = 42;
    device.send(pb::device_message::Body::Telemetry(batch)).await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match next(&mut notices).await.expect("notice").event {
            Some(pb::watch_response::Event::Telemetry(notice)) => {
                let stamp = notice.stamp.expect("stamp");
                assert_eq!(stamp.device_id, "tw-1", "tw-2 does not match the filter");
                assert!(notice.received_unix_nanos > 0);
                seen.push((stamp.sequence, notice.samples, stamp.intended_send_unix_nanos));
            }
            Some(pb::watch_response::Event::Progress(_) | pb::watch_response::Event::Change(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, [(7, 12, 0), (8, 1, 42)]);
    server.stop().await;
}

#[tokio::test]
async fn telemetry_ingest_batch_answers_one_batch_or_fails_with_the_field_path() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    twins.create_twin(create("gw-dev-1", "", "", "")).await.expect("create");
    let mut telemetry = server.telemetry().await;

    let summary = telemetry
        .ingest_batch(telemetry_batch("gw-dev-1", 1, 7, 3))
        .await
        .expect("ingest batch")
        .into_inner();
    assert_eq!(
        (
            summary.batches_accepted,
            summary.samples_accepted,
            summary.batches_rejected
        ),
        (1, 21, 0)
    );

    let mut short = telemetry_batch("gw-dev-1", 2, 4, 2);
    short.sensors[0].channels[1].values.pop();
    let refused = telemetry.ingest_batch(short).await.expect_err("short channel");
    assert_eq!(refused.code(), Code::InvalidArgument);
    let violation = refused
        .get_details_bad_request()
        .and_then(|details| details.field_violations.into_iter().next())
        .expect("a field violation");
    assert_eq!(violation.field, "sensors[0].channels[1].values");

    let mut infinite = telemetry_batch("gw-dev-1", 3, 2, 1);
    infinite.sensors[0].channels[0].values[1] = f64::INFINITY;
    let refused = telemetry.ingest_batch(infinite).await.expect_err("infinity");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().starts_with("sensors[0].channels[0].values:"),
        "{}",
        refused.message()
    );

    let mut decreasing = telemetry_batch("gw-dev-1", 4, 3, 1);
    decreasing.sensors[0].offsets_nanos[2] = 0;
    let refused = telemetry
        .ingest_batch(decreasing)
        .await
        .expect_err("decreasing offsets");
    assert!(
        refused.message().starts_with("sensors[0].offsets_nanos:"),
        "{}",
        refused.message()
    );

    let refused = telemetry
        .ingest_batch(telemetry_batch("bad id!", 1, 1, 1))
        .await
        .expect_err("bad id");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().starts_with("stamp.device_id:"),
        "{}",
        refused.message()
    );

    let refused = telemetry
        .ingest_batch(telemetry_batch("gw-dev-9", 1, 1, 1))
        .await
        .expect_err("unknown device");
    assert_eq!(refused.code(), Code::NotFound);

    assert_eq!(metric(&server, "twin_telemetry_samples_total").await, "21");
    assert_eq!(metric(&server, "twin_telemetry_rejected_total").await, "5");
    server.stop().await;
}

/// Reads every stored batch of `device_id`, `page_size` at a time.
async fn read_all_telemetry(server: &Server, device_id: &str, page_size: u32) -> Vec<pb::StoredTelemetryBatch> {
    let mut telemetry = server.telemetry().await;
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = telemetry
            .read(pb::ReadTelemetryRequest {
                device_id: device_id.to_owned(),
                after_unix_nanos: after,
                until_unix_nanos: 0,
                page_size,
            })
            .await
            .expect("read")
            .into_inner();
        assert!(page.batches.len() <= page_size as usize);
        all.extend(page.batches);
        if page.next_after_unix_nanos == 0 {
            return all;
        }
        after = page.next_after_unix_nanos;
    }
}

#[tokio::test]
async fn telemetry_is_stored_durably_read_back_in_pages_and_removed_with_its_twin() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path()).await;
    let mut twins = server.twins().await;
    for id in ["tw-1", "tw-2"] {
        twins.create_twin(create(id, "g", "", "")).await.expect("create");
    }
    // Values no float formatting would keep: stored bytes must come back bit for bit.
    let sent: Vec<pb::TelemetryBatch> = (1..=5)
        .map(|sequence| {
            let mut batch = telemetry_batch("tw-1", sequence, 3, 2);
            batch.sensors[0].channels[1].values = vec![0.1 * sequence as f64, 1.0 / 3.0, -2.5e-300];
            batch
        })
        .collect();
    let mut stream = sent.clone();
    stream.insert(2, telemetry_batch("tw-2", 1, 2, 1));
    stream.insert(3, telemetry_batch("nobody", 1, 2, 1));
    let mut telemetry = server.telemetry().await;
    let summary = telemetry
        .ingest(tokio_stream::iter(stream))
        .await
        .expect("ingest")
        .into_inner();
    assert_eq!((summary.batches_accepted, summary.batches_rejected), (6, 1));
    let unary = telemetry_batch("tw-1", 6, 1, 1);
    telemetry.ingest_batch(unary.clone()).await.expect("ingest batch");
    // Acknowledged ingest is stored: readable at once, oldest first, in pages.
    let stored = read_all_telemetry(&server, "tw-1", 4).await;
    let batches: Vec<pb::TelemetryBatch> = stored.iter().map(|entry| entry.batch.clone().expect("batch")).collect();
    let mut expected = sent.clone();
    expected.push(unary.clone());
    assert_eq!(batches, expected);
    assert!(
        stored
            .windows(2)
            .all(|pair| pair[0].stored_unix_nanos < pair[1].stored_unix_nanos),
        "storage times strictly increase"
    );
    assert_eq!(read_all_telemetry(&server, "tw-2", 100).await.len(), 1);
    // A time window: only the batches stored after the second and up to the fourth.
    let window = telemetry
        .read(pb::ReadTelemetryRequest {
            device_id: "tw-1".to_owned(),
            after_unix_nanos: stored[1].stored_unix_nanos,
            until_unix_nanos: stored[3].stored_unix_nanos,
            page_size: 0,
        })
        .await
        .expect("read window")
        .into_inner();
    assert_eq!(window.batches, stored[2..4].to_vec());
    assert_eq!(window.next_after_unix_nanos, 0);

    // A device's own stream stores its telemetry too, with the device id filled in.
    let mut device = Device::connect(&server, hello("tw-1", 0)).await.expect("sync");
    device.delta().await;
    let from_stream = telemetry_batch("", 7, 2, 1);
    device
        .send(pb::device_message::Body::Telemetry(from_stream.clone()))
        .await;
    let mut filled = from_stream;
    filled.stamp.get_or_insert_default().device_id = "tw-1".to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stored = read_all_telemetry(&server, "tw-1", 100).await;
        if stored.len() == 7 {
            assert_eq!(stored[6].batch.as_ref(), Some(&filled));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream's batch was not stored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(device);

    // Bad reads.
    let refused = telemetry
        .read(pb::ReadTelemetryRequest {
            device_id: "tw-1".to_owned(),
            page_size: 1001,
            ..pb::ReadTelemetryRequest::default()
        })
        .await
        .expect_err("page too large");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().starts_with("page_size:"), "{}", refused.message());
    let refused = telemetry
        .read(pb::ReadTelemetryRequest {
            device_id: "bad id!".to_owned(),
            ..pb::ReadTelemetryRequest::default()
        })
        .await
        .expect_err("bad id");
    assert_eq!(refused.code(), Code::InvalidArgument);
    let refused = telemetry
        .read(pb::ReadTelemetryRequest {
            device_id: "nobody".to_owned(),
            ..pb::ReadTelemetryRequest::default()
        })
        .await
        .expect_err("unknown device");
    assert_eq!(refused.code(), Code::NotFound);
    server.stop().await;

    // A restart keeps every stored batch; new ones are stored after them.
    let server = Server::start(data.path()).await;
    let before = read_all_telemetry(&server, "tw-1", 100).await;
    assert_eq!(before.len(), 7);
    let mut telemetry = server.telemetry().await;
    telemetry
        .ingest_batch(telemetry_batch("tw-1", 8, 1, 1))
        .await
        .expect("ingest after restart");
    let after = read_all_telemetry(&server, "tw-1", 100).await;
    assert_eq!(after.len(), 8);
    assert_eq!(after[..7], before[..]);
    assert!(after[7].stored_unix_nanos > before[6].stored_unix_nanos);
    // Deleting the twin deletes its telemetry; a twin created again under the id starts empty.
    let mut twins = server.twins().await;
    twins
        .delete_twin(pb::DeleteTwinRequest {
            device_id: "tw-1".to_owned(),
            ..pb::DeleteTwinRequest::default()
        })
        .await
        .expect("delete");
    twins
        .create_twin(create("tw-1", "g", "", ""))
        .await
        .expect("create again");
    assert!(read_all_telemetry(&server, "tw-1", 100).await.is_empty());
    assert_eq!(read_all_telemetry(&server, "tw-2", 100).await.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn with_no_retention_telemetry_is_counted_not_stored() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(data.path(), |config| config.store.telemetry_retention_s = 0).await;
    let mut twins = server.twins().await;
    twins.create_twin(create("tw-1", "g", "", "")).await.expect("create");
    let mut telemetry = server.telemetry().await;
    let summary = telemetry
        .ingest_batch(telemetry_batch("tw-1", 1, 4, 2))
        .await
        .expect("ingest")
        .into_inner();
    assert_eq!(summary.samples_accepted, 8);
    assert!(read_all_telemetry(&server, "tw-1", 100).await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn telemetry_needs_an_operator_token() {
    use twin_server::serve::auth::{AuthConfig, DeviceToken};
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(data.path(), |config| {
        config.auth = AuthConfig {
            operator_tokens: vec!["op-secret".to_owned()],
            devices: vec![DeviceToken {
                device_id: "cam-1".to_owned(),
                token: "cam-1-secret".to_owned(),
            }],
        };
    })
    .await;
    let mut twins = server.twins().await;
    twins
        .create_twin(with_token(create("cam-1", "", "", ""), "op-secret"))
        .await
        .expect("operator creates");
    let mut telemetry = server.telemetry().await;

    let anonymous = telemetry
        .ingest_batch(telemetry_batch("cam-1", 1, 1, 1))
        .await
        .expect_err("no token");
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let anonymous_stream = telemetry
        .ingest(tokio_stream::iter([telemetry_batch("cam-1", 1, 1, 1)]))
        .await
        .expect_err("no token on the stream");
    assert_eq!(anonymous_stream.code(), Code::Unauthenticated);
    let device = telemetry
        .ingest_batch(with_token(telemetry_batch("cam-1", 1, 1, 1), "cam-1-secret"))
        .await
        .expect_err("a device token, even for its own device");
    assert_eq!(device.code(), Code::PermissionDenied);

    let summary = telemetry
        .ingest_batch(with_token(telemetry_batch("cam-1", 1, 4, 2), "op-secret"))
        .await
        .expect("operator")
        .into_inner();
    assert_eq!(summary.samples_accepted, 8);
    let summary = telemetry
        .ingest(with_token(
            tokio_stream::iter([telemetry_batch("cam-1", 2, 4, 2), telemetry_batch("cam-1", 3, 1, 1)]),
            "op-secret",
        ))
        .await
        .expect("operator stream")
        .into_inner();
    assert_eq!((summary.batches_accepted, summary.samples_accepted), (2, 9));
    server.stop().await;
}

#[tokio::test]
async fn an_open_ingest_stream_ends_unavailable_at_shutdown_without_holding_the_server() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(data.path(), |config| config.shutdown_grace_ms = 60_000).await;
    let mut twins = server.twins().await;
    twins.create_twin(create("gw-dev-1", "", "", "")).await.expect("create");
    let mut telemetry = server.telemetry().await;
    let (outbox, receiver) = mpsc::channel(1);
    outbox
        .send(telemetry_batch("gw-dev-1", 1, 10, 1))
        .await
        .expect("queue a batch");
    let call = tokio::spawn(async move { telemetry.ingest(ReceiverStream::new(receiver)).await });
    // The batch is counted once the handler has read it; the stream stays open (outbox kept).
    let counted = async {
        while metric(&server, "twin_telemetry_batches_total").await != "1" {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(PATIENCE, counted)
        .await
        .expect("the batch is counted");
    // The grace period is a minute: the server stops in time only if the stream ends on shutdown.
    server.stop().await;
    let ended = tokio::time::timeout(PATIENCE, call)
        .await
        .expect("the call ends")
        .expect("call task")
        .expect_err("no summary for a stream cut by shutdown");
    assert_eq!(ended.code(), Code::Unavailable);
    drop(outbox);
}
