//! `twin`: run and validate fleet scenarios, and serve the live twin gRPC API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use twin_core::LoadOptions;
use twin_core::time::ClockMode;
use twin_server::files::load_scenario;
use twin_server::run::{RunRequest, default_out_dir, run_scenario};
use twin_server::serve::{Listeners, ServeConfig, serve_listeners};
use twin_server::{EXIT_CRITERIA_FAILED, EXIT_INVALID, EXIT_OK, models, summary};

/// jemalloc rather than glibc's malloc: a desired update allocates and frees many small objects
/// (patches, documents, change events, protobuf messages) on the engine, store and tokio
/// threads, and glibc's malloc/free/realloc were a visible share of the update path's profile.
/// Side by side with glibc malloc and mimalloc (`grpc-bench`, BENCHMARKS.md, allocators),
/// jemalloc had the highest batched update rate and the lowest delta p99; mimalloc was as fast
/// but doubled the delta p99.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Digital twin of an edge-AI fleet: run what-if scenarios far faster than real time.
#[derive(Parser, Debug)]
#[command(name = "twin", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a scenario and write its report (exit 0: criteria pass, 1: a criterion fails, 2: invalid input).
    Run {
        /// Scenario file (TOML).
        file: PathBuf,
        /// Override the scenario's master seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Output folder (default: `out/<scenario name>/`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write every reading to recording.jsonl (the replay format).
        #[arg(long)]
        record: bool,
        /// Override the pacing: virtual, realtime, or scaled:FACTOR.
        #[arg(long, value_parser = parse_pace)]
        clock: Option<ClockMode>,
        /// Worker threads for the sensor pass (default: all cores). Results do not depend on it.
        #[arg(long)]
        threads: Option<usize>,
        /// Largest estimated fleet memory accepted, in MiB.
        #[arg(long, default_value_t = 8192)]
        max_memory: u64,
    },
    /// Check scenario files (exit 0: all valid, 2: any invalid; problems on stderr).
    Validate {
        /// Scenario files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Largest estimated fleet memory accepted, in MiB.
        #[arg(long, default_value_t = 8192)]
        max_memory: u64,
    },
    /// List the metric names a scenario's criteria can use.
    Metrics {
        /// Scenario file.
        file: PathBuf,
    },
    /// Serve the live twin gRPC API until SIGINT or SIGTERM (exit 2: bad config, cannot bind or
    /// open the database).
    Serve {
        /// Config file (TOML); settings it does not name keep their defaults (see print-config).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address, overriding the config (default 127.0.0.1:7878).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Data folder holding twin.redb, overriding the config (default ./twin-data).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Prometheus endpoint address, overriding the config (default 127.0.0.1:7879).
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
        /// PEM certificate chain: serve TLS (with --tls-key), overriding tls.cert_file.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of the certificate (with --tls-cert), overriding tls.key_file.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Print the server's effective configuration as TOML: the compiled-in defaults, or a config
    /// file merged over them.
    PrintConfig {
        /// Config file (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The model registry: list, inspect and run ONNX models (exit 2 on any error).
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ModelsCommand {
    /// Every model version in the registry: aliases, file, sha256 (verified), inputs, outputs.
    List {
        /// Registry folder (holds manifest.json).
        #[arg(long, default_value = models::DEFAULT_MODELS_DIR)]
        dir: PathBuf,
    },
    /// Operators, shapes and metadata of an ONNX file, and whether tract can run it (exit 1 if not).
    Inspect {
        /// The .onnx file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a model: a JSON array of input rows in, a JSON array of output rows on stdout.
    Run {
        /// MODEL, MODEL@VERSION, MODEL@ALIAS, or a path to an .onnx file.
        model: String,
        /// JSON array of rows (each an array of numbers), or one row.
        #[arg(long)]
        input: String,
        /// Registry folder (holds manifest.json).
        #[arg(long, default_value = models::DEFAULT_MODELS_DIR)]
        dir: PathBuf,
    },
}

fn parse_pace(text: &str) -> Result<ClockMode, String> {
    match text {
        "virtual" => Ok(ClockMode::Virtual),
        "realtime" => Ok(ClockMode::Realtime),
        _ => match text.strip_prefix("scaled:").map(str::parse::<f64>) {
            Some(Ok(factor)) if factor > 0.0 && factor.is_finite() => Ok(ClockMode::Scaled { factor }),
            _ => Err(format!(
                "`{text}` is not virtual, realtime or scaled:FACTOR (FACTOR > 0)"
            )),
        },
    }
}

fn load_options(max_memory_mib: u64, seed: Option<u64>) -> LoadOptions {
    LoadOptions {
        max_memory_bytes: max_memory_mib.saturating_mul(1 << 20),
        seed,
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() { EXIT_INVALID } else { EXIT_OK });
        }
    };
    // The server logs at info by default (RUST_LOG overrides); the batch commands stay quiet.
    let filter = match cli.command {
        Command::Serve { .. } => tracing_subscriber::EnvFilter::builder()
            .with_default_directive(tracing_subscriber::filter::LevelFilter::INFO.into())
            .from_env_lossy(),
        _ => tracing_subscriber::EnvFilter::from_default_env(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    ExitCode::from(match cli.command {
        Command::Run {
            file,
            seed,
            out,
            record,
            clock,
            threads,
            max_memory,
        } => {
            let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
            twin_core::init_threads(threads);
            let scenario = match load_scenario(&file, load_options(max_memory, seed)) {
                Ok(s) => s,
                Err(err) => {
                    eprintln!("{err}");
                    return ExitCode::from(EXIT_INVALID);
                }
            };
            let out_dir = out.unwrap_or_else(|| default_out_dir(&scenario));
            let request = RunRequest {
                out_dir,
                record,
                pace: clock,
                progress: true,
                threads,
            };
            match run_scenario(scenario, &request) {
                Ok(outcome) => {
                    print!("{}", summary::render(&outcome));
                    if outcome.report.passed {
                        EXIT_OK
                    } else {
                        EXIT_CRITERIA_FAILED
                    }
                }
                Err(err) => {
                    eprintln!("error: {err:#}");
                    EXIT_INVALID
                }
            }
        }
        Command::Validate { files, max_memory } => {
            let mut all_valid = true;
            for file in &files {
                match load_scenario(file, load_options(max_memory, None)) {
                    Ok(scenario) => println!(
                        "{}: ok ({} devices, {} sensors, {} events, {} criteria)",
                        file.display(),
                        scenario.device_count(),
                        scenario.sensor_count(),
                        scenario.events.len(),
                        scenario.criteria.len()
                    ),
                    Err(err) => {
                        eprintln!("{err}");
                        all_valid = false;
                    }
                }
            }
            if all_valid { EXIT_OK } else { EXIT_INVALID }
        }
        Command::Models { command } => run_models(command),
        Command::Serve {
            config,
            listen,
            data,
            metrics_listen,
            tls_cert,
            tls_key,
        } => run_serve(config.as_deref(), listen, data, metrics_listen, tls_cert.zip(tls_key)),
        Command::PrintConfig { config } => match load_config(config.as_deref()).and_then(|config| {
            config
                .to_toml()
                .map_err(|error| format!("cannot print the config: {error}"))
        }) {
            Ok(text) => {
                print!("{text}");
                EXIT_OK
            }
            Err(message) => {
                eprintln!("error: {message}");
                EXIT_INVALID
            }
        },
        Command::Metrics { file } => match load_scenario(&file, LoadOptions::default()) {
            Ok(scenario) => {
                let (numbers, texts) = twin_core::report::metric_names(&scenario);
                for name in numbers {
                    println!("{name}");
                }
                for name in texts {
                    println!("{name}  (text: compare with equals)");
                }
                EXIT_OK
            }
            Err(err) => {
                eprintln!("{err}");
                EXIT_INVALID
            }
        },
    })
}

fn load_config(path: Option<&std::path::Path>) -> Result<ServeConfig, String> {
    match path {
        Some(path) => ServeConfig::load(path).map_err(|error| error.to_string()),
        None => Ok(ServeConfig::default()),
    }
}

fn run_serve(
    config: Option<&std::path::Path>,
    listen: Option<std::net::SocketAddr>,
    data: Option<PathBuf>,
    metrics_listen: Option<std::net::SocketAddr>,
    tls: Option<(PathBuf, PathBuf)>,
) -> u8 {
    let mut config = match load_config(config) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("error: {message}");
            return EXIT_INVALID;
        }
    };
    if let Some(listen) = listen {
        config.listen = listen;
    }
    if let Some(data) = data {
        config.data_dir = data;
    }
    if let Some(metrics_listen) = metrics_listen {
        config.metrics.listen = metrics_listen;
    }
    if let Some((cert_file, key_file)) = tls {
        config.tls.cert_file = Some(cert_file);
        config.tls.key_file = Some(key_file);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return EXIT_INVALID;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("error: cannot listen on {}: {error}", config.listen);
                return EXIT_INVALID;
            }
        };
        let metrics = if config.metrics.enabled {
            match tokio::net::TcpListener::bind(config.metrics.listen).await {
                Ok(listener) => Some(listener),
                Err(error) => {
                    eprintln!("error: cannot listen for metrics on {}: {error}", config.metrics.listen);
                    return EXIT_INVALID;
                }
            }
        } else {
            None
        };
        let listeners = Listeners {
            grpc: listener,
            metrics,
        };
        match serve_listeners(listeners, config, shutdown_signal()).await {
            Ok(()) => EXIT_OK,
            Err(error) => {
                eprintln!("error: {error}");
                EXIT_INVALID
            }
        }
    })
}

/// Completes at the first SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}

fn run_models(command: ModelsCommand) -> u8 {
    let outcome = match command {
        ModelsCommand::List { dir } => models::list(&dir).map(|text| (text, true)),
        ModelsCommand::Inspect { file, json } => models::inspect_file(&file, json),
        ModelsCommand::Run { model, input, dir } => models::run(&model, &input, &dir).map(|text| (text, true)),
    };
    match outcome {
        Ok((text, ok)) => {
            print!("{text}");
            if ok { EXIT_OK } else { EXIT_CRITERIA_FAILED }
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            EXIT_INVALID
        }
    }
}
