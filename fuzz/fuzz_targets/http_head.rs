//! Fuzz target `http_head`: HTTP request-head parser (http::parse_head) over growing prefixes, accept_upgrade and response builders.
//! The body is `harness::http_head` in tests/fuzz_harness/mod.rs, shared with tests/fuzz_corpus.rs.
#![no_main]

#[path = "../../tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::http_head(data));
