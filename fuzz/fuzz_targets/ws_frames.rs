//! Fuzz target `ws_frames`: WebSocket frame decoder (codec::Decoder): raw chunked bytes and generated masked frame sequences checked against a model.
//! The body is `harness::ws_frames` in tests/fuzz_harness/mod.rs, shared with tests/fuzz_corpus.rs.
#![no_main]

#[path = "../../tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::ws_frames(data));
