//! Fuzz target `protocol`: client protocol (protocol::parse_command / parse_publish_body / reply encoders / payload_to_json): every output is valid JSON.
//! The body is `harness::protocol` in tests/fuzz_harness/mod.rs, shared with tests/fuzz_corpus.rs.
#![no_main]

#[path = "../../tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::protocol(data));
