//! rzab-check-history: checks the histories an rzab cluster recorded with `--history-dir`
//! (see `rzab_tests::history` for what is verified). Prints a summary; exits 0 when the history
//! is consistent, 1 when it holds violations, 2 when it cannot be read.
//!
//! Touches only the files in the directories it is given, read-only.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use rzab_tests::history::{CheckOptions, check_dirs};

const USAGE: &str = "usage: rzab-check-history [--allow-lagging-replicas] [--show N] DIR...

Checks every node<N>-worker<W>[.<instance>].hist file in the DIRs (one run of one cluster;
several directories when the nodes recorded to different ones). A file without its trailer
(a killed process) is checked as a crashed process's, as far as its records go.
  --allow-lagging-replicas  accept node processes that stopped before the last zxid
  --show N                  print up to N violations (default 10)";

fn parse(
    args: impl Iterator<Item = String>,
) -> anyhow::Result<(CheckOptions, usize, Vec<PathBuf>)> {
    let mut options = CheckOptions::default();
    let mut show = 10;
    let mut dirs = Vec::new();
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--allow-lagging-replicas" => options.allow_lagging_replicas = true,
            "--show" => {
                let value = args.next().context("--show needs a number")?;
                show = value
                    .parse()
                    .with_context(|| format!("--show {value}: not a number"))?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            flag if flag.starts_with('-') => bail!("unknown option {flag}\n{USAGE}"),
            dir => dirs.push(PathBuf::from(dir)),
        }
    }
    if dirs.is_empty() {
        bail!("no directory given\n{USAGE}");
    }
    options.keep_violations = options.keep_violations.max(show);
    Ok((options, show, dirs))
}

fn run() -> anyhow::Result<bool> {
    let (options, show, dirs) = parse(std::env::args().skip(1))?;
    let report = check_dirs(&dirs, &options)?;
    print!("{}", report.summary(show));
    Ok(report.is_clean())
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("rzab-check-history: {error:#}");
            ExitCode::from(2)
        }
    }
}
