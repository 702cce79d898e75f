//! Fuzz target: `EndpointAddress` binary decoding and `EndpointRecord` / `EndpointAddress`
//! JSON decoding, with round trips. See `rzab_dataplane::fuzzing::endpoint_decode`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = rzab_dataplane::fuzzing::endpoint_decode(data) {
        panic!("{violation}");
    }
});
