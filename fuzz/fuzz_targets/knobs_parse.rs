//! Fuzz target: knob values as JSON (`parse_json`, as REST bodies carry them) and as text
//! (`parse_text`, as `--knob NAME=VALUE`). See `rzab_dataplane::fuzzing::knobs_parse`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = rzab_dataplane::fuzzing::knobs_parse(data) {
        panic!("{violation}");
    }
});
