//! rzab-dataplane: runs one node of an rzab cluster. See `rzab-dataplane --help`.
//!
//! A follower that fell further behind the leader than the leader keeps prepares for (it was
//! stopped or descheduled for longer than the leader waits) starts again as a new process with
//! the same arguments (`--on-fall-behind rejoin`, the default): the new process is a new
//! instance, which the leader catches up by snapshot, exactly as after a restart.
//!
//! A configuration error (an option out of its range, a bad `--config` file, options that
//! contradict each other, more memory than the machine has: see `node::memory`) exits with
//! status 2 before anything starts. A run of some
//! `--duration` that completed no operation at all exits with status 1 after its summary:
//! every node has at least one session (`--sessions` starts at 1), so such a run did not work,
//! however cleanly it stopped. A run until a signal (`--duration 0`), or one cut short by
//! SIGINT or SIGTERM, may legitimately end before any operation and exits 0.

use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use rzab_dataplane::config::{ConfigError, OnFallBehind, Options};
use rzab_dataplane::node::{Summary, memory};
use rzab_dataplane::worker::WorkerError;

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let options = Options::load(std::env::args().collect())
        .and_then(|options| options.validate().map(|()| options))
        .unwrap_or_else(|error| match error {
            ConfigError::Options(clap_error) => clap_error.exit(),
            other => refuse(&other),
        });
    // node::run checks again (it is also a library entry); here a refusal is a usage error.
    if let Err(error) = memory::check(&options) {
        refuse(&error);
    }
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
    check_progress(&options, &summary, signalled.load(Ordering::Relaxed))
        .with_context(|| format!("node {} of cluster {}", options.node, options.cluster))
}

/// Fails a run that was to last `--duration` seconds and completed no operation: its sessions
/// had no read served and no write committed, so the node did not work (a follower that never
/// caught up, a leader without a quorum, peers on addresses that never answered), which an
/// exit status of 0 would hide.
fn check_progress(options: &Options, summary: &Summary, signalled: bool) -> anyhow::Result<()> {
    let operations = summary.reads + summary.writes;
    if operations > 0 || options.duration == 0 || options.sessions == 0 || signalled {
        return Ok(());
    }
    bail!(
        "completed no operation in {:.1} s (--duration {}, {} sessions on each of {} workers): no read was served and no write committed; see the stats lines above and the other nodes' output (did every follower catch up with the leader, and does the leader have a quorum?)",
        summary.seconds,
        options.duration,
        options.sessions,
        options.workers
    )
}

/// Ends the process for a configuration that cannot start, with the status of a usage error.
fn refuse(error: &dyn std::fmt::Display) -> ! {
    eprintln!("error: {error}");
    std::process::exit(2);
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

    fn summary(reads: u64, writes: u64) -> Summary {
        Summary {
            node: 0,
            seconds: 3.0,
            reads,
            writes,
            ops_per_second: 0.0,
            write_p50_ns: 0,
            write_p99_ns: 0,
            write_p999_ns: 0,
            write_max_ns: 0,
            applied_zxid: 0,
            digest: 0,
            store_digest: 0,
            retransmissions: 0,
            drain_seconds: 0.0,
            elections: 0,
            epoch: 1,
            history: None,
        }
    }

    #[test]
    fn a_timed_run_without_any_operation_fails() {
        let options = |duration: &str| {
            Options::load(
                ["rzab-dataplane", "--node", "0", "--duration", duration]
                    .map(String::from)
                    .to_vec(),
            )
            .unwrap_or_else(|error| panic!("{error}"))
        };
        let timed = options("3");
        let error = check_progress(&timed, &summary(0, 0), false).unwrap_err();
        assert!(
            error.to_string().contains("completed no operation"),
            "{error}"
        );
        assert!(check_progress(&timed, &summary(1, 0), false).is_ok());
        assert!(check_progress(&timed, &summary(0, 1), false).is_ok());
        // Stopped by a signal, or running until one: no operation may be what was asked for.
        assert!(check_progress(&timed, &summary(0, 0), true).is_ok());
        assert!(check_progress(&options("0"), &summary(0, 0), false).is_ok());
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
