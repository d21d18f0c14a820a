//! The batch log: transaction batches appended to segment files beside RocksDB, written
//! around the page cache (direct I/O where the file system allows it) and synced.
//!
//! Batches are most of what a replica stores (every transaction's bytes, on every
//! replica). Through RocksDB each byte was copied into the write-ahead log's page cache,
//! into a memtable and into a blob file at flush; on a VM whose host backs guest memory
//! lazily, the fresh pages of those copies were a fifth of the machine at 65,000 tx/s.
//! Here they are copied once into a reused, aligned buffer and written (in pieces of at
//! most 8 MiB) with one sync per protocol step. RocksDB keeps only each batch's
//! [`BatchLocation`], written in the same synced write as the records that name it,
//! after the batch bytes are durable: a crash in between leaves unreferenced bytes in a
//! segment, never a location without its batch.
//!
//! A segment file holds, from offset 0, groups of records padded to [`ALIGN`]; a record
//! is a header (magic, length, batch digest) and the batch bytes. The header lets a
//! segment be read without RocksDB (inspection, repair); a read goes by location and
//! checks the header (execution checks the bytes against their digest). Each open
//! starts a new segment, so a torn tail from a crash is never appended to.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use bulwark_crypto::Digest;
use serde::{Deserialize, Serialize};

/// Offsets, lengths and the staging buffer's address of a direct write are multiples of
/// this (the largest logical block size of common devices).
pub const ALIGN: usize = 4096;
/// A segment is closed once it holds this many bytes (a larger single write still goes
/// to one segment).
pub const SEGMENT_BYTES: u64 = 64 << 20;
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"BWB1");
const HEADER_BYTES: usize = 4 + 4 + 32;
const SEGMENT_SUFFIX: &str = ".batches";

/// Where a batch's bytes are: segment number, byte offset in it, length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchLocation {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
}

pub struct BatchLog {
    dir: PathBuf,
    segment_bytes: u64,
    writer: Mutex<Writer>,
}

struct Writer {
    /// The segment being appended to (created at the first append after an open).
    file: Option<File>,
    segment: u64,
    offset: u64,
    /// Whether segments are written with direct I/O (probed when the first one is made).
    direct: Option<bool>,
    /// The aligned staging buffer, kept between appends so its pages stay resident: at
    /// most the larger of [`MAX_WRITE`] and one record, plus [`ALIGN`].
    buffer: Vec<u8>,
    /// Bytes in all segments.
    bytes: u64,
}

/// An append is written in pieces of at most this many bytes (a larger single record
/// is one piece), so the staging buffer stays small whatever a step stores.
const MAX_WRITE: usize = 8 << 20;

impl BatchLog {
    /// Opens the log in `dir`. Nothing is created until the first append, which goes to
    /// a new segment after the highest one there.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<BatchLog> {
        let mut highest = None;
        let mut bytes = 0;
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry?;
                    let name = entry.file_name();
                    let Some(number) = name.to_str().and_then(segment_number) else { continue };
                    highest = highest.max(Some(number));
                    bytes += entry.metadata()?.len();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let segment = highest.map_or(0, |n| n + 1);
        let writer = Writer { file: None, segment, offset: 0, direct: None, buffer: Vec::new(), bytes };
        Ok(BatchLog {
            dir: dir.to_path_buf(),
            segment_bytes: segment_bytes.max(ALIGN as u64),
            writer: Mutex::new(writer),
        })
    }

    /// Bytes in all segments (for metrics).
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn segment_path(&self, segment: u64) -> PathBuf {
        self.dir.join(format!("{segment:016}{SEGMENT_SUFFIX}"))
    }

    /// Appends `batches` and syncs them; returns where each one is. On an error
    /// nothing that was returned before is affected (the failed bytes are left
    /// unreferenced and the next append starts after them).
    pub fn append(&self, batches: &[(Digest, &[u8])]) -> io::Result<Vec<BatchLocation>> {
        let mut guard = self.lock();
        let writer = &mut *guard;
        let mut locations = Vec::with_capacity(batches.len());
        let mut rest = batches;
        while !rest.is_empty() {
            // The longest run of records that fits in one write (at least one record).
            let mut total = 0;
            let mut count = 0;
            for (_, bytes) in rest {
                if u32::try_from(bytes.len()).is_err() {
                    return Err(io::Error::other("a batch over 4 GiB"));
                }
                let record = HEADER_BYTES + bytes.len();
                if count > 0 && total + record > MAX_WRITE {
                    break;
                }
                total += record;
                count += 1;
            }
            let (piece, after) = rest.split_at(count);
            rest = after;
            self.write_piece(writer, piece, total.next_multiple_of(ALIGN), &mut locations)?;
        }
        if let Some(file) = &writer.file
            && !locations.is_empty()
            && let Err(e) = file.sync_data()
        {
            // A later sync may report success for pages whose write-back failed: this
            // segment is not appended to again.
            writer.file = None;
            writer.segment += 1;
            return Err(e);
        }
        Ok(locations)
    }

    /// Writes one run of records (`padded` bytes with their headers and padding) at the
    /// end of the current segment, or of a new one if it would not fit.
    fn write_piece(
        &self,
        writer: &mut Writer,
        piece: &[(Digest, &[u8])],
        padded: usize,
        locations: &mut Vec<BatchLocation>,
    ) -> io::Result<()> {
        let full = writer.offset > 0 && writer.offset + padded as u64 > self.segment_bytes;
        if writer.file.is_none() || full {
            if let Some(old) = writer.file.take() {
                writer.segment += 1;
                // What this append wrote there must be durable before it is named.
                old.sync_data()?;
            }
            writer.offset = 0;
            match self.create_segment(writer) {
                Ok(file) => writer.file = Some(file),
                Err(e) => {
                    // The name may exist now: the next try takes the next one.
                    writer.segment += 1;
                    return Err(e);
                }
            }
        }
        let needed = padded + ALIGN;
        if writer.buffer.len() < needed {
            // Doubling up to the write limit (each new page costs a fault and a clear).
            let doubled = needed.next_power_of_two().min(MAX_WRITE + ALIGN);
            writer.buffer = vec![0; needed.max(doubled)];
        }
        let start = writer.buffer.as_ptr().align_offset(ALIGN);
        let Some(out) = start.checked_add(padded).and_then(|end| writer.buffer.get_mut(start..end)) else {
            return Err(io::Error::other("no aligned window in the staging buffer"));
        };
        let mut pos = 0;
        for (digest, bytes) in piece {
            let len = bytes.len() as u32; // checked in `append`
            out[pos..pos + HEADER_BYTES].copy_from_slice(&header(len, digest));
            pos += HEADER_BYTES;
            out[pos..pos + bytes.len()].copy_from_slice(bytes);
            locations.push(BatchLocation {
                segment: writer.segment,
                offset: writer.offset + pos as u64,
                len,
            });
            pos += bytes.len();
        }
        out[pos..].fill(0);
        let file = writer.file.as_ref().ok_or_else(|| io::Error::other("no open segment"))?;
        // Whatever happens, the next write starts after this one's space.
        let at = writer.offset;
        writer.offset += padded as u64;
        writer.bytes += padded as u64;
        file.write_all_at(out, at)
    }

    fn create_segment(&self, writer: &mut Writer) -> io::Result<File> {
        if writer.direct.is_none() {
            // The first segment since the open: the directory may be new, and its own
            // name must survive a crash too (synced even if an earlier process made it:
            // it may have crashed before its sync).
            std::fs::create_dir_all(&self.dir)?;
            if let Some(parent) = self.dir.parent() {
                File::open(parent)?.sync_all()?;
            }
            writer.direct = Some(direct_io_supported(&self.dir));
        }
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        if writer.direct == Some(true) {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(self.segment_path(writer.segment))?;
        // The new name must survive a crash as well as the bytes written under it.
        File::open(&self.dir)?.sync_all()?;
        Ok(file)
    }

    /// The batch `digest` at `at`, with its record header checked (magic, length,
    /// digest): a location that points elsewhere is an error. The bytes themselves are
    /// not hashed here (execution checks them against the digest).
    pub fn read(&self, at: &BatchLocation, digest: &Digest) -> io::Result<Vec<u8>> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let file = File::open(self.segment_path(at.segment))?;
        let start = at
            .offset
            .checked_sub(HEADER_BYTES as u64)
            .ok_or_else(|| invalid("a location inside a record header"))?;
        // A damaged location must not make a huge allocation: the record must be there.
        if at.offset.saturating_add(u64::from(at.len)) > file.metadata()?.len() {
            return Err(invalid("a location past the end of its segment"));
        }
        let mut head = [0; HEADER_BYTES];
        file.read_exact_at(&mut head, start)?;
        if head != header(at.len, digest) {
            return Err(invalid("the record header there does not name this batch and length"));
        }
        let mut bytes = vec![0; at.len as usize];
        file.read_exact_at(&mut bytes, at.offset)?;
        Ok(bytes)
    }
}

/// A record's header: magic, length, batch digest.
fn header(len: u32, digest: &Digest) -> [u8; HEADER_BYTES] {
    let mut out = [0; HEADER_BYTES];
    out[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&len.to_le_bytes());
    out[8..].copy_from_slice(digest.as_bytes());
    out
}

fn segment_number(name: &str) -> Option<u64> {
    name.strip_suffix(SEGMENT_SUFFIX)?.parse().ok()
}

/// The file [`direct_io_supported`] makes and removes.
pub(crate) const DIRECT_IO_PROBE: &str = "direct-io-probe";

/// Whether files in `dir` can be opened for direct I/O (tmpfs before Linux 6.6, for
/// one, refuses it).
pub(crate) fn direct_io_supported(dir: &Path) -> bool {
    let probe = dir.join(DIRECT_IO_PROBE);
    let supported = std::fs::create_dir_all(dir).is_ok()
        && OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe)
            .is_ok();
    let _ = std::fs::remove_file(&probe);
    if !supported {
        tracing::info!(dir = %dir.display(), "no direct I/O here: files are written through the page cache");
    }
    supported
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(byte: u8, len: usize) -> (Digest, Vec<u8>) {
        (Digest([byte; 32]), vec![byte; len])
    }

    #[test]
    fn batches_read_back_across_segments_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let batches: Vec<_> = (1..=20u8).map(|i| batch(i, 1000 * i as usize + 7)).collect();
        let mut locations = Vec::new();
        {
            let log = BatchLog::open(dir.path(), 3 * ALIGN as u64).unwrap();
            for pair in batches.chunks(2) {
                let refs: Vec<_> = pair.iter().map(|(d, b)| (*d, b.as_slice())).collect();
                locations.extend(log.append(&refs).unwrap());
            }
            assert!(locations.iter().any(|l| l.segment > 0), "small segments rotate");
            assert!(locations.windows(2).all(|w| w[0].segment <= w[1].segment));
        }
        let log = BatchLog::open(dir.path(), SEGMENT_BYTES).unwrap();
        for ((digest, bytes), at) in batches.iter().zip(&locations) {
            assert_eq!(&log.read(at, digest).unwrap(), bytes);
        }
        // A reopened log appends to a new segment, never after a possibly torn tail.
        let (digest, bytes) = batch(99, 10);
        let at = log.append(&[(digest, &bytes)]).unwrap()[0];
        assert!(at.segment > locations.last().unwrap().segment);
        assert_eq!(log.read(&at, &digest).unwrap(), bytes);
        let on_disk: u64 =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        assert_eq!(log.bytes(), on_disk);
        assert_eq!(on_disk % ALIGN as u64, 0);
    }

    #[test]
    fn a_location_past_the_end_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let log = BatchLog::open(dir.path(), SEGMENT_BYTES).unwrap();
        let (digest, bytes) = batch(1, 100);
        let at = log.append(&[(digest, &bytes)]).unwrap()[0];
        assert!(log.read(&BatchLocation { offset: at.offset + (1 << 20), ..at }, &digest).is_err());
        assert!(log.read(&BatchLocation { len: u32::MAX, ..at }, &digest).is_err(), "no 4 GiB buffer");
        assert!(log.read(&BatchLocation { segment: 7, ..at }, &digest).is_err());
        assert!(log.read(&BatchLocation { offset: 3, ..at }, &digest).is_err(), "inside a header");
    }

    #[test]
    fn a_location_that_names_another_record_or_length_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = BatchLog::open(&dir.path().join("batches"), SEGMENT_BYTES).unwrap();
        let (a, b) = (batch(1, 100), batch(2, 300));
        let at = log.append(&[(a.0, &a.1), (b.0, &b.1)]).unwrap();
        assert_eq!(log.read(&at[1], &b.0).unwrap(), b.1);
        let wrong = [
            log.read(&at[0], &b.0),                                               // another digest
            log.read(&BatchLocation { len: 99, ..at[0] }, &a.0),                  // another length
            log.read(&BatchLocation { offset: at[0].offset + 1, ..at[0] }, &a.0), // shifted
        ];
        for result in wrong {
            assert_eq!(result.unwrap_err().kind(), io::ErrorKind::InvalidData);
        }
    }

    #[test]
    fn a_segment_that_cannot_be_created_fails_one_append_not_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let log = BatchLog::open(dir.path(), SEGMENT_BYTES).unwrap();
        // Something else took the name the first segment would get.
        std::fs::write(log.segment_path(0), b"not ours").unwrap();
        let (digest, bytes) = batch(3, 500);
        assert_eq!(log.append(&[(digest, &bytes)]).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        let at = log.append(&[(digest, &bytes)]).unwrap()[0];
        assert_eq!(at.segment, 1);
        assert_eq!(log.read(&at, &digest).unwrap(), bytes);
    }

    #[test]
    fn a_large_append_is_written_in_pieces_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        // Nothing is created before the first append.
        let log = BatchLog::open(&dir.path().join("batches"), SEGMENT_BYTES).unwrap();
        assert!(!dir.path().join("batches").exists());
        let batches: Vec<_> = (1..=20u8).map(|i| batch(i, (1 << 20) - i as usize)).collect();
        let refs: Vec<_> = batches.iter().map(|(d, b)| (*d, b.as_slice())).collect();
        let locations = log.append(&refs).unwrap();
        for ((digest, bytes), at) in batches.iter().zip(&locations) {
            assert_eq!(&log.read(at, digest).unwrap(), bytes);
        }
        let buffer = log.lock().buffer.len();
        assert!(buffer <= MAX_WRITE + ALIGN, "the staging buffer stays bounded: {buffer}");
        assert!(log.bytes() >= 20 << 20);
    }
}
