//! `privlink audit verify` on a trail of three rotated files, sealed with the protocol crate's
//! chain (the one the relay's and agent's trail writers seal with): it follows, and each
//! tampering — a byte changed in a middle record, a record deleted, two swapped, a line
//! inserted, a rotated file left out, the tail cut (against `--expect-last`), a keyed trail
//! checked without its key — makes it fail naming the file, the line and why.

mod common;

use std::path::{Path, PathBuf};

use privlink_protocol::audit::{ChainHead, Sealer};

/// Writes a trail of `per_file` × 3 records into `dir` (`audit.jsonl.1` … `.3`), sealed by
/// `sealer`; returns the files oldest first and the last hash.
fn write_trail(dir: &Path, sealer: &Sealer, per_file: usize) -> (Vec<PathBuf>, String) {
    let mut head = ChainHead::default();
    let mut files = Vec::new();
    for n in 1..=3 {
        let mut text = String::new();
        for i in 0..per_file {
            let fields = format!(
                "\"code\":\"PL3001\",\"event\":\"connection.opened\",\"client\":\"198.51.100.{i}:50000\",\"endpoint\":\"kv\""
            );
            text.push_str(&head.seal(sealer, "2026-12-07T11:00:00Z", &fields));
            text.push('\n');
        }
        let file = dir.join(format!("audit.jsonl.{n}"));
        std::fs::write(&file, text).expect("write");
        files.push(file);
    }
    (files, head.prev.to_string())
}

use common::audit_verify as verify;

/// Rewrites `file`'s lines with `change`.
fn edit(file: &Path, change: impl FnOnce(&mut Vec<String>)) {
    let text = std::fs::read_to_string(file).expect("read");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    change(&mut lines);
    std::fs::write(file, lines.join("\n") + "\n").expect("write");
}

#[test]
fn verify_follows_a_rotated_trail_and_names_each_tampering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (files, last) = write_trail(dir.path(), &Sealer::Sha256, 4);
    let (code, out, err) = verify(&files, &["--expect-last", &last]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("12 records follow; last seq 12"), "{out}");

    let tamper = |what: &str, change: &dyn Fn(&Path), want: &str| {
        let copy = tempfile::tempdir().expect("tempdir");
        let files: Vec<PathBuf> = files
            .iter()
            .map(|f| {
                let to = copy.path().join(f.file_name().expect("name"));
                std::fs::copy(f, &to).expect("copy");
                to
            })
            .collect();
        change(&files[1]);
        let (code, out, err) = verify(&files, &[]);
        assert_eq!(code, 1, "{what} went unnoticed: {out}{err}");
        assert!(err.contains(want), "{what}: expected {want:?} in {err}");
    };
    tamper(
        "a byte changed",
        &|f| edit(f, |l| l[1] = l[1].replace("198.51.100.1:", "198.51.100.9:")),
        "audit.jsonl.2:2: its hash does not match its content",
    );
    tamper(
        "a record deleted",
        &|f| edit(f, |l| drop(l.remove(1))),
        "audit.jsonl.2:2: does not follow",
    );
    tamper("two swapped", &|f| edit(f, |l| l.swap(0, 1)), "audit.jsonl.2:1: does not follow");
    tamper(
        "a line inserted",
        &|f| edit(f, |l| l.insert(2, l[1].clone())),
        "audit.jsonl.2:3: does not follow",
    );

    // A rotated file left out: the next one does not follow.
    let (code, _, err) = verify(&[files[0].clone(), files[2].clone()], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("audit.jsonl.3:1: does not follow the record before it (seq 9 after 4"),
        "{err}"
    );
    // Only the later files, said so: they are checked from where they start.
    let (code, out, err) = verify(&files[1..], &["--continues"]);
    assert_eq!(code, 0, "{out}{err}");
    // The tail cut: the last hash is not the one kept outside.
    let (code, _, err) = verify(&files[..2], &["--expect-last", &last]);
    assert_eq!(code, 1);
    assert!(err.contains("records were cut off its end"), "{err}");
}

#[test]
fn a_keyed_trail_needs_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("audit.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").expect("key");
    let (files, _) =
        write_trail(dir.path(), &Sealer::keyed(b"0123456789abcdef0123456789abcdef"), 2);
    let key = key.to_str().expect("utf-8");
    let (code, out, err) = verify(&files, &["--key-file", key, "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!((report["ok"].as_bool(), report["records"].as_u64()), (Some(true), Some(6)));
    let (code, _, err) = verify(&files, &[]);
    assert_eq!(code, 1, "without the key the hashes do not match");
    assert!(err.contains("audit.jsonl.1:1: its hash does not match"), "{err}");
}
