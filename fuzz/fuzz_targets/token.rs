//! Fuzz target `token`: JWT inspection, claim checks and HMAC verification (auth::token): raw
//! tokens and harness-signed payloads; verification agrees with the claim checks.
//! The body is `harness::token` in tests/fuzz_harness/mod.rs, shared with tests/fuzz_corpus.rs.
#![no_main]

#[path = "../../tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::token(data));
