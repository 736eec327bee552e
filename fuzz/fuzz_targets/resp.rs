//! Fuzz target `resp`: RESP parser (resp::Parser / resp::parse): chunked vs. whole, as_pubsub, re-encoding and encode_command round trips.
//! The body is `harness::resp` in tests/fuzz_harness/mod.rs, shared with tests/fuzz_corpus.rs.
#![no_main]

#[path = "../../tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::resp(data));
