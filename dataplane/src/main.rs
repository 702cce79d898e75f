//! rzab-dataplane: runs one node of an rzab cluster. See `rzab-dataplane --help`.
//!
//! A follower that fell further behind the leader than the leader keeps prepares for (it was
//! stopped or descheduled for longer than the leader waits) starts again as a new process with
//! the same arguments (`--on-fall-behind rejoin`, the default): the new process is a new
//! instance, which the leader catches up by snapshot, exactly as after a restart.

use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rzab_dataplane::config::{OnFallBehind, Options};
use rzab_dataplane::worker::WorkerError;

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let options = Options::load(std::env::args().collect()).unwrap_or_else(|error| match error {
        rzab_dataplane::config::ConfigError::Options(clap_error) => clap_error.exit(),
        other => {
            eprintln!("error: {other}");
            std::process::exit(2);
        }
    });
    // A stop asked for by a signal must not be undone by a rejoin.
    let signalled = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&signalled))
            .context("installing a signal handler")?;
    }
    let summary = match rzab_dataplane::node::run(&options) {
        Ok(summary) => summary,
        Err(error) => {
            let may_rejoin = options.on_fall_behind == OnFallBehind::Rejoin
                && fell_behind(&error)
                && !signalled.load(Ordering::Relaxed);
            let error = error.context(format!(
                "node {} of cluster {}",
                options.node, options.cluster
            ));
            return Err(
                match remaining_seconds(options.duration, started.elapsed()) {
                    Some(seconds) if may_rejoin => rejoin(&options, &error, seconds),
                    _ => error,
                },
            );
        }
    };
    println!("summary {}", serde_json::to_string(&summary)?);
    Ok(())
}

fn fell_behind(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<WorkerError>(),
            Some(WorkerError::FellBehind(_))
        )
    })
}

/// The `--duration` the new process gets: what is left of this one's (`Some(0)`: no limit), or
/// `None` when nothing is left.
fn remaining_seconds(duration: u64, elapsed: Duration) -> Option<u64> {
    if duration == 0 {
        return Some(0);
    }
    duration
        .checked_sub(elapsed.as_secs())
        .filter(|left| *left > 0)
}

/// Replaces this process with a new one of the same arguments; returns only if that failed.
fn rejoin(options: &Options, error: &anyhow::Error, duration: u64) -> anyhow::Error {
    eprintln!("{error:#}");
    println!(
        "node {} fell behind the leader: starting again as a new process, which catches up by snapshot",
        options.node
    );
    // Sessions number their writes from the second a process starts (node.rs): the new process
    // must start in a later second than this one for its write ids to be new.
    let into_second = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|now| now.subsec_nanos())
        .unwrap_or(0);
    std::thread::sleep(Duration::from_nanos(u64::from(1_000_000_000 - into_second)));
    let executable = match std::env::current_exe() {
        Ok(path) => path,
        Err(source) => return anyhow::Error::new(source).context("finding this executable"),
    };
    // The last --duration on the command line wins.
    let failure = std::process::Command::new(executable)
        .args(std::env::args_os().skip(1))
        .args(["--duration", &duration.to_string()])
        .exec();
    anyhow::Error::new(failure).context("starting again as a new process")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_new_process_gets_what_is_left_of_the_duration() {
        assert_eq!(remaining_seconds(0, Duration::from_secs(90)), Some(0));
        assert_eq!(remaining_seconds(10, Duration::from_millis(3_500)), Some(7));
        assert_eq!(remaining_seconds(10, Duration::from_secs(10)), None);
        assert_eq!(remaining_seconds(10, Duration::from_secs(11)), None);
    }

    #[test]
    fn only_a_fall_behind_is_rejoined() {
        let behind = anyhow::Error::new(WorkerError::FellBehind(1)).context("node 2");
        assert!(fell_behind(&behind));
        let stopped = anyhow::Error::new(WorkerError::Stopped(0)).context("node 2");
        assert!(!fell_behind(&stopped));
        assert!(!fell_behind(&anyhow::anyhow!("fell behind, in words only")));
    }
}
