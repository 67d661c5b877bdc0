//! `twin serve` and `twin print-config` as a subprocess: the compiled-in defaults, config
//! errors with exit 2, and a clean exit 0 on SIGTERM with the writes made before it kept.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use twin_proto::v1 as pb;
use twin_proto::v1::twins_client::TwinsClient;
use twin_server::serve::ServeConfig;

fn twin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_twin"))
}

#[test]
fn print_config_prints_the_defaults_and_refuses_unknown_keys_with_exit_2() {
    let output = twin().arg("print-config").output().expect("twin runs");
    assert_eq!(output.status.code(), Some(0));
    let text = String::from_utf8(output.stdout).expect("utf-8");
    let parsed: ServeConfig = toml::from_str(&text).expect("print-config output parses");
    assert_eq!(parsed, ServeConfig::default());
    assert!(text.contains("listen = \"127.0.0.1:7878\""), "{text}");

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[store]\nqueue = 3\n").expect("write");
    for command in ["print-config", "serve"] {
        let output = twin()
            .args([command, "--config"])
            .arg(&bad)
            .output()
            .expect("twin runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{command}: {stderr}");
        assert!(
            stderr.contains("bad.toml") && stderr.contains("unknown field `queue`"),
            "{stderr}"
        );
    }
    let missing = twin()
        .args(["serve", "--config", "/nonexistent/twin.toml"])
        .output()
        .expect("twin runs");
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn serve_stops_on_sigterm_despite_a_client_that_no_longer_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("twin.toml");
    std::fs::write(&config, "shutdown_grace_ms = 300\n").expect("write config");
    let mut child = twin()
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("twin serve starts");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    // The log line "serving twin.v1 address=127.0.0.1:PORT" says the server accepts calls.
    let mut address = None;
    let mut line = String::new();
    while address.is_none() {
        line.clear();
        if stderr.read_line(&mut line).expect("read log") == 0 {
            panic!("twin serve exited before serving");
        }
        if line.contains("serving twin.v1") {
            address = line
                .split_whitespace()
                .find_map(|field| field.strip_prefix("address="))
                .map(str::to_owned);
        }
    }
    let address = address.expect("address");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let created = runtime.block_on(async {
        let mut client = TwinsClient::connect(format!("http://{address}"))
            .await
            .expect("connect");
        client
            .create_twin(pb::CreateTwinRequest {
                device_id: "dev-1".to_owned(),
                desired_json: r#"{"a": 1}"#.to_owned(),
                ..pb::CreateTwinRequest::default()
            })
            .await
            .expect("create")
            .into_inner()
    });
    assert_eq!(created.version, 1);
    // The runtime is kept but no longer driven: the client's connection stays open and never
    // answers the server's GOAWAY, so the server must give up waiting after its grace period.

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).expect("read log");
    let status = child.wait().expect("twin serve exits");
    assert_eq!(status.code(), Some(0), "{rest}");
    assert!(
        rest.contains("SIGTERM received") && rest.contains("server stopped"),
        "{rest}"
    );
    assert!(rest.contains("shutdown grace period"), "{rest}");
    drop(runtime);

    // What was acknowledged is there after a restart.
    let database = dir.path().join("data").join("twin.redb");
    let (store, twins) = twin_server::store::Store::open(
        &database,
        twin_server::store::StoreOptions::default(),
        twin_server::twins::Limits::default(),
    )
    .expect("reopen");
    assert_eq!(twins.get("dev-1").map(|twin| twin.version()), Some(1));
    store.close();
}
