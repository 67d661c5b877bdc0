//! TLS on the gRPC port: a server on a port-0 listener with a certificate made by the test
//! (rcgen), a tonic client that trusts it, a plaintext client that cannot talk to it, and
//! `twin serve`'s exit 2 for TLS settings or files it cannot use.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use twin_proto::v1 as pb;
use twin_proto::v1::twins_client::TwinsClient;
use twin_server::serve::{ServeConfig, serve};

/// Longest wait for a connection or call; a test that needs longer has failed.
const PATIENCE: Duration = Duration::from_secs(10);

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM into `dir`:
/// (certificate file, key file, certificate PEM).
fn write_certificate(dir: &Path) -> (PathBuf, PathBuf, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("generate a certificate");
    let cert_pem = certified.cert.pem();
    let cert_file = dir.join("server.pem");
    let key_file = dir.join("server.key");
    std::fs::write(&cert_file, &cert_pem).expect("write the certificate");
    std::fs::write(&key_file, certified.signing_key.serialize_pem()).expect("write the key");
    (cert_file, key_file, cert_pem)
}

#[tokio::test]
async fn a_client_trusting_the_certificate_calls_over_tls_and_a_plaintext_client_cannot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_file, key_file, cert_pem) = write_certificate(dir.path());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let mut config = ServeConfig {
        listen: address,
        data_dir: dir.path().join("data"),
        ..ServeConfig::default()
    };
    config.tls.cert_file = Some(cert_file);
    config.tls.key_file = Some(key_file);
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, config, async {
        let _ = stopped.await;
    }));

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cert_pem))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{address}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("client tls")
        .connect_timeout(PATIENCE)
        .timeout(PATIENCE)
        .connect()
        .await
        .expect("a client trusting the certificate connects");
    let mut client = TwinsClient::new(channel);
    client
        .create_twin(pb::CreateTwinRequest {
            device_id: "dev-tls".to_owned(),
            desired_json: r#"{"mode": "eco"}"#.to_owned(),
            ..pb::CreateTwinRequest::default()
        })
        .await
        .expect("create over tls");
    let twin = client
        .get_twin(pb::GetTwinRequest {
            device_id: "dev-tls".to_owned(),
            ..pb::GetTwinRequest::default()
        })
        .await
        .expect("get over tls")
        .into_inner();
    assert_eq!(twin.device_id, "dev-tls");
    assert_eq!(twin.version, 1);

    // Plaintext HTTP/2 against the TLS port: the handshake fails, so connecting or the first
    // call fails (never hangs: both are bounded).
    let plaintext = async {
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|error| error.to_string())?
            .connect_timeout(PATIENCE)
            .timeout(PATIENCE)
            .connect()
            .await
            .map_err(|error| format!("connect: {error}"))?;
        TwinsClient::new(channel)
            .get_twin(pb::GetTwinRequest {
                device_id: "dev-tls".to_owned(),
                ..pb::GetTwinRequest::default()
            })
            .await
            .map(|_| ())
            .map_err(|status| format!("call: {status}"))
    };
    let outcome = tokio::time::timeout(PATIENCE * 2, plaintext)
        .await
        .expect("the plaintext attempt ends");
    assert!(outcome.is_err(), "a plaintext client was served over the TLS port");

    // A client that does not trust the certificate (no CA given) is refused too.
    let untrusted = Endpoint::from_shared(format!("https://{address}"))
        .expect("endpoint")
        .tls_config(ClientTlsConfig::new().domain_name("localhost"))
        .expect("client tls")
        .connect_timeout(PATIENCE)
        .connect()
        .await;
    assert!(untrusted.is_err(), "a client without the CA connected");

    let _ = stop.send(());
    tokio::time::timeout(PATIENCE, server)
        .await
        .expect("the server stops")
        .expect("server task")
        .expect("server ok");
}

fn twin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_twin"))
}

#[test]
fn serve_exits_2_naming_the_file_or_setting_it_cannot_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_file, key_file, _) = write_certificate(dir.path());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not pem at all\n").expect("write");
    let missing = dir.path().join("missing.key");
    let data = dir.path().join("data");

    let cases: [(&Path, &Path, &str); 3] = [
        (
            &garbage,
            &key_file,
            "garbage.pem: invalid tls certificate: no PEM certificate",
        ),
        (&cert_file, &missing, "missing.key: cannot read the tls private key"),
        (
            &cert_file,
            &garbage,
            "garbage.pem: invalid tls private key: no PEM private key",
        ),
    ];
    for (cert, key, expected) in cases {
        let output = twin()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--data",
            ])
            .arg(&data)
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .output()
            .expect("twin runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(expected), "expected {expected:?} in: {stderr}");
    }

    // A key that is not the certificate's: rustls refuses the pair.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let (_, other_key, _) = write_certificate(other_dir.path());
    let output = twin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(&data)
        .arg("--tls-cert")
        .arg(&cert_file)
        .arg("--tls-key")
        .arg(&other_key)
        .output()
        .expect("twin runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("tls refused the certificate and key"), "{stderr}");

    // One file without the other, in a config file: the missing setting is named.
    let config = dir.path().join("twin.toml");
    std::fs::write(
        &config,
        format!("[tls]\ncert_file = {:?}\n", cert_file.display().to_string()),
    )
    .expect("write");
    for command in ["print-config", "serve"] {
        let output = twin()
            .args([command, "--config"])
            .arg(&config)
            .output()
            .expect("twin runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{command}: {stderr}");
        assert!(
            stderr.contains("twin.toml: tls.key_file: must be set together with tls.cert_file"),
            "{stderr}"
        );
    }
    // And on the command line, clap refuses one flag without the other.
    let output = twin()
        .args(["serve", "--tls-cert"])
        .arg(&cert_file)
        .output()
        .expect("twin runs");
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn print_config_shows_the_tls_settings() {
    let output = twin().arg("print-config").output().expect("twin runs");
    let text = String::from_utf8(output.stdout).expect("utf-8");
    assert!(
        text.contains("[tls]\n# unset: plaintext gRPC; set both to serve TLS\n# cert_file = "),
        "{text}"
    );
    let parsed: ServeConfig = toml::from_str(&text).expect("print-config output parses");
    assert_eq!(parsed, ServeConfig::default());

    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("twin.toml");
    std::fs::write(&config, "[tls]\ncert_file = \"a.pem\"\nkey_file = \"a.key\"\n").expect("write");
    let output = twin()
        .args(["print-config", "--config"])
        .arg(&config)
        .output()
        .expect("twin runs");
    let text = String::from_utf8(output.stdout).expect("utf-8");
    assert!(
        text.contains("[tls]\ncert_file = \"a.pem\"\nkey_file = \"a.key\"\n"),
        "{text}"
    );
}
