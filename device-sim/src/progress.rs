//! The live progress line, on a terminal only: messages per second, sent, received, p99 of the
//! end-to-end latency so far, errors.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::measure::Counters;
use crate::shared::Shared;

/// How often the line is redrawn.
const REFRESH: Duration = Duration::from_millis(500);

/// Starts the progress line if stderr is a terminal and `enabled`; it stops with `done`.
pub fn start(shared: Arc<Shared>, enabled: bool, done: CancellationToken) -> Option<JoinHandle<()>> {
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed} {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    Some(tokio::spawn(async move {
        let mut last_sent = 0u64;
        let mut last = Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(REFRESH) => {}
                () = done.cancelled() => break,
            }
            let sent = Counters::get(&shared.counters.sent);
            let rate = (sent - last_sent) as f64 / last.elapsed().as_secs_f64().max(1e-3);
            last_sent = sent;
            last = Instant::now();
            let p99 = shared
                .latencies
                .e2e
                .snapshot()
                .quantile_ms(0.99)
                .map_or_else(|| "n/a".to_owned(), |v| format!("{v:.1} ms"));
            bar.set_message(format!(
                "{rate:.0} msgs/s, sent {sent}, received {}, e2e p99 {p99}, errors {}",
                Counters::get(&shared.counters.received),
                Counters::get(&shared.counters.errors)
            ));
            bar.tick();
        }
        bar.finish_and_clear();
    }))
}
