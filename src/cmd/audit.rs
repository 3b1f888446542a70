//! `privlink audit verify FILE... [--key-file F] [--expect-last HASH] [--json]`: follows an
//! audit trail's hash chain through its files, oldest first, and names the first record that
//! does not follow (`privlink_protocol::audit` says what that means). Exit 0 with the count and
//! the last seq and hash; 1 naming file, line and seq of the first break, or a last hash other
//! than `--expect-last` (records cut off the end).

use std::io::BufRead as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use privlink_protocol::audit::settings::AuditKey;
use privlink_protocol::audit::{ChainCheck, Digest, Sealer};
use serde_json::json;

/// Longest line read: a record is far shorter; a longer one is not a record.
const MAX_LINE: usize = 64 * 1024;

/// A chain that does not hold (exit 1), with where.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ChainBroken(pub(crate) String);

pub(crate) struct VerifyArgs<'a> {
    pub(crate) files: &'a [PathBuf],
    pub(crate) key_file: Option<&'a Path>,
    pub(crate) expect_last: Option<&'a str>,
    pub(crate) continues: bool,
    pub(crate) json: bool,
}

pub(crate) fn verify(args: &VerifyArgs<'_>) -> anyhow::Result<()> {
    let sealer = match args.key_file {
        Some(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read the audit key {}", path.display()))?;
            AuditKey::from_file_bytes(&bytes)
                .map_err(|problem| anyhow::anyhow!("{}: {problem}", path.display()))?
                .sealer()
        }
        None => Sealer::Sha256,
    };
    let expect_last = args
        .expect_last
        .map(|hex| Digest::from_hex(hex).context("--expect-last takes 64 hex digits"))
        .transpose()?;
    let mut chain = ChainCheck::new();
    let mut records = 0u64;
    for (index, file) in args.files.iter().enumerate() {
        let opened =
            std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
        let mut reader = std::io::BufReader::new(opened);
        let mut line = Vec::new();
        let mut number = 0usize;
        loop {
            line.clear();
            let read = std::io::Read::take(&mut reader, MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
                .with_context(|| format!("reading {}", file.display()))?;
            if read == 0 {
                break;
            }
            number += 1;
            let continuing = args.continues && index == 0 && number == 1;
            let text = match std::str::from_utf8(&line) {
                Ok(text) if line.len() <= MAX_LINE => text.trim_end_matches('\n'),
                _ => return broken(args, file, number, "not a record (too long, or not UTF-8)"),
            };
            if let Err(why) = chain.next(&sealer, text, continuing) {
                return broken(args, file, number, &why.to_string());
            }
            records += 1;
        }
    }
    let Some((seq, hash)) = chain.last else { bail!("no record in the files given") };
    if let Some(expected) = expect_last {
        if expected != hash {
            let message = format!(
                "the trail ends at seq {seq} with hash {hash}, not the expected {expected}: \
                 records were cut off its end (or it was written on)"
            );
            return report_failure(args, &message);
        }
    }
    if args.json {
        let value =
            json!({"ok": true, "records": records, "last_seq": seq, "last_hash": hash.to_string()});
        println!("{value:#}");
    } else {
        println!("ok: {records} records follow; last seq {seq}, hash {hash}");
    }
    Ok(())
}

fn broken(args: &VerifyArgs<'_>, file: &Path, line: usize, why: &str) -> anyhow::Result<()> {
    report_failure(args, &format!("{}:{line}: {why}", file.display()))
}

fn report_failure(args: &VerifyArgs<'_>, message: &str) -> anyhow::Result<()> {
    if args.json {
        println!("{:#}", json!({"ok": false, "error": message}));
    }
    Err(ChainBroken(message.to_owned()).into())
}
