//! Fuzz target: a sequence of datagrams and local writes through the worker's decode into the
//! real leader or follower state machines of one node, with a real replica and store, checking
//! the apply order and the store after every step. See
//! `rzab_dataplane::fuzzing::pipeline_input`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = rzab_dataplane::fuzzing::pipeline_input(data) {
        panic!("{violation}");
    }
});
