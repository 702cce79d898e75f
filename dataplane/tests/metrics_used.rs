//! Every declared counter is updated somewhere in the data plane: a counter that nothing
//! increments would export a flat zero forever and mislead whoever graphs it. The test looks
//! for an `add` or `set` of each `Counter::Variant` in the data plane's sources.

#![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

use std::path::Path;

use rzab_shared::counters::COUNTERS;

fn sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
}

#[test]
fn every_declared_counter_is_updated_by_the_data_plane() {
    let mut text = String::new();
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut text,
    );
    // Counters are updated as `.add(Counter::X, ..)` or `.set(Counter::X, ..)`, or chosen by a
    // mapping (a match arm or a pair) whose result is what gets added.
    let compact: String = text.split_whitespace().collect();
    let mut unused = Vec::new();
    for spec in COUNTERS {
        let name = format!("Counter::{:?}", spec.counter);
        let updated = [
            format!("add({name},"),
            format!("set({name},"),
            format!("({name},"),
            format!("{name},Counter::"),
            format!("{name}]"),
            format!("{name},]"),
            format!(",{name})"),
            format!(",{name},)"),
            format!("=>{name},"),
        ]
        .iter()
        .any(|pattern| compact.contains(pattern.as_str()));
        if !updated {
            unused.push(name);
        }
    }
    assert!(unused.is_empty(), "declared but never updated: {unused:?}");
}
