//! rzab-dataplane: runs one node of an rzab cluster. See `rzab-dataplane --help`.

use anyhow::Context;
use rzab_dataplane::config::Options;

fn main() -> anyhow::Result<()> {
    let options = Options::load(std::env::args().collect()).unwrap_or_else(|error| match error {
        rzab_dataplane::config::ConfigError::Options(clap_error) => clap_error.exit(),
        other => {
            eprintln!("error: {other}");
            std::process::exit(2);
        }
    });
    let summary = rzab_dataplane::node::run(&options)
        .with_context(|| format!("node {} of cluster {}", options.node, options.cluster))?;
    println!("summary {}", serde_json::to_string(&summary)?);
    Ok(())
}
