//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the same harness
//! functions as the cargo-fuzz targets, on stable, as part of `cargo test`; plus the inputs
//! the fuzzers found (regression tests with the bytes inline).
//!
//! A missing or empty corpus directory fails the test, so deleting a corpus is noticed.

mod fuzz_harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Run `harness` on every file of `fuzz/corpus/<target>/`; returns how many files ran.
fn replay(target: &str, harness: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus directory {} missing: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        // Skip editor/cargo-fuzz temporaries (e.g. `.tmpXXXX` left by an interrupted cmin).
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "corpus directory {} is empty",
        dir.display()
    );
    for path in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| harness(&data))).is_err() {
            panic!("{target}: corpus file {} fails", path.display());
        }
    }
    files.len()
}

#[test]
fn ws_frames_corpus() {
    replay("ws_frames", fuzz_harness::ws_frames);
}

#[test]
fn resp_corpus() {
    replay("resp", fuzz_harness::resp);
}

#[test]
fn protocol_corpus() {
    replay("protocol", fuzz_harness::protocol);
}

#[test]
fn http_head_corpus() {
    replay("http_head", fuzz_harness::http_head);
}

#[test]
fn token_corpus() {
    replay("token", fuzz_harness::token);
}
