//! Fuzz target: arbitrary bytes through `Message::decode` (under the capture configuration,
//! under parameters the first bytes choose, and under the tag and value length the header
//! claims), reading every accessor of what decodes. See `rzab_dataplane::fuzzing::wire_decode`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = rzab_dataplane::fuzzing::wire_decode(data) {
        panic!("{violation}");
    }
});
