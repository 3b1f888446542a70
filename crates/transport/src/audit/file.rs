//! The trail's current file: opening it (the chain's head found at its end, or at the end of
//! the newest rotated file; a torn last line cut off), appending a batch (a partial write cut
//! back off), and rotating it to the next `<path>.NNNNNN`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use privlink_protocol::audit::settings::AuditSettings;
use privlink_protocol::audit::{ChainHead, GENESIS, Sealer};
use tracing::warn;

use super::TrailError;

/// Most bytes read back from the end of a file to find its last record.
const TAIL_READ: u64 = 64 * 1024;

/// The current file of a trail.
pub(super) struct TrailFile {
    path: PathBuf,
    pub(super) file: File,
    pub(super) len: u64,
    pub(super) rotate_size: u64,
    /// The number the next rotated file gets.
    next_index: u32,
}

impl TrailFile {
    /// Opens (or creates) the current file, finds the chain's head in it or, when it is empty,
    /// in the newest rotated file.
    pub(super) fn open(
        settings: &AuditSettings,
        sealer: &Sealer,
    ) -> Result<(Self, ChainHead), TrailError> {
        let path = &settings.path;
        let io_error = |source| TrailError::Io { path: path.clone(), source };
        let rotated = rotated_files(path).map_err(io_error)?;
        let mut file =
            OpenOptions::new().read(true).append(true).create(true).open(path).map_err(io_error)?;
        let mut last = last_line(&mut file, true).map_err(io_error)?;
        let mut last_path = path.clone();
        if last.is_none() {
            if let Some((_, newest)) = rotated.last() {
                let mut old = File::open(newest)
                    .map_err(|source| TrailError::Io { path: newest.clone(), source })?;
                last = last_line(&mut old, false)
                    .map_err(|source| TrailError::Io { path: newest.clone(), source })?;
                last_path = newest.clone();
            }
        }
        let head = match last {
            Some(line) => ChainHead::after(sealer, &line)
                .map_err(|why| TrailError::Unfollowable { path: last_path, why })?,
            None => ChainHead { seq: 1, prev: GENESIS },
        };
        let len = file.metadata().map_err(io_error)?.len();
        let next_index = rotated.last().map_or(1, |(index, _)| index + 1);
        let file =
            Self { path: path.clone(), file, len, rotate_size: settings.rotate_size, next_index };
        Ok((file, head))
    }

    pub(super) fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self.file.write_all(bytes) {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Cut a partial write, so the next record starts on a line of its own.
                let _ = self.file.set_len(self.len);
                Err(e)
            }
        }
    }

    /// Renames the current file to the next `<path>.NNNNNN` and starts a new one.
    pub(super) fn rotate(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        let rotated = rotated_name(&self.path, self.next_index);
        std::fs::rename(&self.path, &rotated)?;
        self.file = OpenOptions::new().read(true).append(true).create_new(true).open(&self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename and the new file survive a crash.
            File::open(dir)?.sync_all()?;
        }
        self.len = 0;
        self.next_index += 1;
        Ok(())
    }
}

/// `<path>.000007`.
fn rotated_name(path: &Path, index: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{index:06}"));
    PathBuf::from(name)
}

/// The rotated files of `path`, oldest first, with their numbers.
pub(super) fn rotated_files(path: &Path) -> io::Result<Vec<(u32, PathBuf)>> {
    let Some(base) = path.file_name().and_then(|n| n.to_str()) else { return Ok(Vec::new()) };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(suffix) = name.to_str().and_then(|n| n.strip_prefix(base)?.strip_prefix('.'))
        else {
            continue;
        };
        if suffix.len() == 6 && suffix.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(index) = suffix.parse() {
                found.push((index, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The last complete line of a file (the last [`TAIL_READ`] bytes are read). A torn last line
/// — no newline at its end, a write the crash interrupted — is cut off when `cut_torn`.
fn last_line(file: &mut File, cut_torn: bool) -> io::Result<Option<String>> {
    let len = file.metadata()?.len();
    let start = len.saturating_sub(TAIL_READ);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.take(TAIL_READ).read_to_end(&mut tail)?;
    if !tail.is_empty() && !tail.ends_with(b"\n") {
        let keep = tail.iter().rposition(|&b| b == b'\n').map_or(0, |at| at + 1);
        if !cut_torn {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "its last line is torn"));
        }
        if keep == 0 && start > 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "no line end near its end"));
        }
        warn!(
            bytes = tail.len() - keep,
            "audit trail: a torn last line (an interrupted write) cut off"
        );
        file.set_len(start + keep as u64)?;
        tail.truncate(keep);
    }
    let text = String::from_utf8_lossy(&tail);
    Ok(text.trim_end_matches('\n').rsplit('\n').next().filter(|l| !l.is_empty()).map(str::to_owned))
}
