use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::Path;
use std::sync::mpsc::sync_channel;

use privlink_protocol::audit::GENESIS;

use privlink_protocol::audit::ChainCheck;

use super::file::rotated_files;
use super::*;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("privlink-trail-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn record(n: u64) -> Record {
    Record::new(Code::ConnectionClosed, SystemTime::now()).number("n", n).text("endpoint", "kv")
}

fn opening() -> Record {
    Record::new(Code::TrailOpened, SystemTime::now()).text("role", "test")
}

/// Every line of the files, in order, checked as one chain; the seqs seen.
fn check_files(files: &[PathBuf], sealer: &Sealer) -> Vec<u64> {
    let mut chain = ChainCheck::new();
    let mut seqs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).expect("read");
        for (i, line) in text.lines().enumerate() {
            let seq = chain
                .next(sealer, line, false)
                .unwrap_or_else(|e| panic!("{}:{}: {e}", file.display(), i + 1));
            seqs.push(seq);
        }
    }
    seqs
}

fn codes_in(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json")["event"].to_string())
        .collect()
}

#[tokio::test]
async fn records_are_chained_synced_and_a_restart_continues_the_chain() {
    let dir = scratch("restart");
    let settings = AuditSettings::at(dir.join("audit.jsonl"));
    let trail = AuditTrail::open(&settings, opening()).expect("open");
    for n in 0..10 {
        assert!(trail.record(record(n)));
    }
    trail.close(Record::new(Code::TrailClosed, SystemTime::now())).await;
    let status = trail.status().expect("on");
    assert_eq!(status.last_seq, 12);
    assert_eq!(status.written[Code::ConnectionClosed.index()].1, 10);

    let again = AuditTrail::open(&settings, opening()).expect("reopen");
    assert!(again.record(record(10)));
    again.close(Record::new(Code::TrailClosed, SystemTime::now())).await;
    let seqs = check_files(std::slice::from_ref(&settings.path), &Sealer::Sha256);
    assert_eq!(seqs, (1..=15).collect::<Vec<_>>());
    let last = std::fs::read_to_string(&settings.path).expect("read");
    let last: serde_json::Value =
        serde_json::from_str(last.lines().last().expect("line")).expect("json");
    assert_eq!(last["hash"].as_str(), Some(again.status().expect("on").last_hash.as_str()));
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[tokio::test]
async fn rotation_numbers_files_oldest_first_and_the_chain_crosses_them() {
    let dir = scratch("rotate");
    let mut settings = AuditSettings::at(dir.join("audit.jsonl"));
    settings.rotate_size = 1024;
    settings.key = Some(
        privlink_protocol::audit::settings::AuditKey::from_file_bytes(&[7u8; 32]).expect("key"),
    );
    let trail = AuditTrail::open(&settings, opening()).expect("open");
    for n in 0..100 {
        // One at a time, so that each batch is small and rotation happens often.
        while !trail.record(record(n)) {
            std::thread::yield_now();
        }
        if n % 10 == 9 {
            while trail.status().expect("on").last_seq < n + 2 {
                tokio::task::yield_now().await;
            }
        }
    }
    trail.close(Record::new(Code::TrailClosed, SystemTime::now())).await;
    let mut files: Vec<PathBuf> =
        rotated_files(&settings.path).expect("list").into_iter().map(|(_, p)| p).collect();
    assert!(files.len() >= 3, "{files:?}");
    assert!(files[0].to_string_lossy().ends_with(".000001"));
    files.push(settings.path.clone());
    let seqs = check_files(&files, &settings.sealer());
    assert_eq!(seqs.len(), 102);
    // Restarted with another key, the trail cannot be continued.
    let mut other = settings.clone();
    other.key = None;
    let reopened = AuditTrail::open(&other, opening());
    assert!(matches!(reopened, Err(TrailError::Unfollowable { .. })), "{reopened:?}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[tokio::test]
async fn a_torn_last_line_is_cut_off_and_the_chain_goes_on() {
    let dir = scratch("torn");
    let settings = AuditSettings::at(dir.join("audit.jsonl"));
    let trail = AuditTrail::open(&settings, opening()).expect("open");
    trail.close(Record::new(Code::TrailClosed, SystemTime::now())).await;
    let mut file = OpenOptions::new().append(true).open(&settings.path).expect("open");
    file.write_all(b"{\"seq\":3,\"time\":\"2026-").expect("tear");
    drop(file);
    let trail = AuditTrail::open(&settings, opening()).expect("reopen");
    trail.close(Record::new(Code::TrailClosed, SystemTime::now())).await;
    assert_eq!(
        check_files(std::slice::from_ref(&settings.path), &Sealer::Sha256),
        vec![1, 2, 3, 4]
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn a_failed_write_loses_its_records_and_the_next_batch_tells_how_many() {
    let dir = scratch("fail");
    let settings = AuditSettings::at(dir.join("audit.jsonl"));
    let (mut file, head) = TrailFile::open(&settings, &Sealer::Sha256).expect("open");
    let shared = Arc::new(Shared {
        path: settings.path.clone(),
        require: true,
        queued: AtomicUsize::new(0),
        last: Mutex::new((0, GENESIS)),
        written: Code::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
        lost: AtomicU64::new(0),
        untold: AtomicU64::new(0),
        failing: AtomicBool::new(false),
    });
    let real = std::mem::replace(
        &mut file.file,
        OpenOptions::new().write(true).open("/dev/full").expect("/dev/full"),
    );
    let mut writer = Writer {
        file: &mut file,
        head,
        sealer: Sealer::Sha256,
        shared: Arc::clone(&shared),
        telling: 0,
    };
    let (sender, receiver) = sync_channel(16);
    let (mut batch, mut codes, mut closing) = (Vec::new(), Vec::new(), false);
    for n in 0..3 {
        shared.queued.fetch_add(1, Ordering::Relaxed);
        sender.send(Message::Record(record(n))).expect("send");
    }
    let first = match receiver.recv().expect("first") {
        Message::Record(r) => r,
        Message::Close => unreachable!(),
    };
    writer.batch(first, &receiver, &mut batch, &mut codes, &mut closing);
    writer.write(&batch, &codes);
    assert!(shared.failing.load(Ordering::Relaxed));
    assert_eq!(shared.lost.load(Ordering::Relaxed), 3);
    assert_eq!(writer.head.seq, 1, "the chain rewinds to what is on disk");

    writer.file.file = real;
    let (mut batch, mut codes) = (Vec::new(), Vec::new());
    writer.batch(record(3), &receiver, &mut batch, &mut codes, &mut closing);
    writer.write(&batch, &codes);
    assert!(!shared.failing.load(Ordering::Relaxed));
    assert_eq!(codes_in(&settings.path), ["\"trail.lost\"", "\"connection.closed\""]);
    let text = std::fs::read_to_string(&settings.path).expect("read");
    assert!(text.starts_with("{\"seq\":1,"), "{text}");
    assert!(text.contains("\"count\":3"), "{text}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn times_are_rfc3339_utc_in_microseconds() {
    let time = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_796_641_200_123_456_789);
    assert_eq!(rfc3339(time), "2026-12-07T11:00:00.123456Z");
}

#[test]
fn a_trail_keeps_its_last_records_for_the_status_page_even_when_off() {
    let trail = AuditTrail::off();
    trail.record(Record::new(Code::ConnectionOpened, SystemTime::now()).number("connection", 1));
    trail.record(Record::new(Code::ConnectionProgress, SystemTime::now()).number("connection", 1));
    for n in 0..(RECENT_RECORDS as u64 + 5) {
        trail.record(record(n).text("reason", "<b>\"quoted\"</b>"));
    }
    let recent = trail.recent();
    assert_eq!(recent.len(), RECENT_RECORDS, "bounded");
    for (i, text) in recent.iter().enumerate() {
        let value: serde_json::Value = serde_json::from_str(text).expect("one JSON object");
        assert_eq!(value["code"], "PL3003", "opened and progress are not kept: {text}");
        assert_eq!(value["n"], i as u64 + 5, "the oldest went first");
        assert_eq!(value["reason"], "<b>\"quoted\"</b>");
        assert!(text.starts_with("{\"time\":\""), "time first, then the fields in order: {text}");
        assert!(text.contains("\"code\":\"PL3003\",\"event\":\"connection.closed\",\"n\":"));
    }
}
