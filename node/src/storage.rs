//! Durable storage on RocksDB: the protocol's records (chain records by digest, the
//! safety state), the committed log, and application snapshots. Every value is encoded
//! through the codec module; every write that the protocol needs durable is synced.
//!
//! Column families:
//! - `meta`: the chain id and the storage format version the store was created with;
//! - `chain`: chain records (blocks) by digest;
//! - `safety`: the latest safety record;
//! - `log`: committed height -> block digest;
//! - `snapshot`: the latest application snapshot with its height;
//! - `batches`: where each transaction batch is in the batch log ([`crate::batch_log`],
//!   beside RocksDB), by digest, written with the first chain record that names it
//!   (after the batch's bytes are durable, so a block is never durable without its
//!   transactions).

use std::path::{Path, PathBuf};

use bulwark_consensus::{Height, StoredRecord};
use bulwark_crypto::{ChainId, Digest, codec};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, IngestExternalFileOptions,
    Options, SstFileWriter, WriteBatch, WriteOptions,
};
use serde::{Deserialize, Serialize};

use crate::batch_log::{BatchLocation, BatchLog, SEGMENT_BYTES, direct_io_supported};

/// Bumped when the on-disk format changes incompatibly.
pub const STORAGE_VERSION: u32 = 4;
const CFS: [&str; 6] = ["meta", "chain", "safety", "log", "snapshot", "batches"];
/// Bytes of memtables (writes not yet flushed to files) across all column families.
const MEMTABLE_BUDGET: usize = 64 << 20;
/// Memtable size of the column families of small records (blocks, safety state, log):
/// a few hundred KB/s at most, so a small memtable fills and flushes within a minute
/// instead of creeping up to a large one for ten.
const SMALL_MEMTABLE: usize = 2 << 20;
/// One block cache for all column families; index and filter blocks live in it too,
/// so table readers' memory is bounded by it instead of growing with the files.
const BLOCK_CACHE: usize = 32 << 20;
/// Column families whose values are large and written once: stored in blob files.
const LARGE_VALUES: [&str; 1] = ["snapshot"];
/// The batch log's directory, inside the store's.
const BATCH_LOG_DIR: &str = "batches";
/// Values from this size on go to blob files in those column families.
const MIN_BLOB_BYTES: u64 = 1024;
/// Where a snapshot's table file is built before it is ingested (not a name RocksDB
/// manages; a crash may leave it, and the next snapshot overwrites it).
const SNAPSHOT_STAGING: &str = "snapshot-staging.sst";
/// Write-ahead log files kept for reuse once their memtables are flushed.
const WAL_FILES_RECYCLED: usize = 4;
/// Largest stored value accepted when reading back.
const MAX_RECORD_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage at {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error(
        "storage at {path} belongs to chain {found}, not {expected}: refusing to use another committee's data"
    )]
    WrongChain { path: PathBuf, found: String, expected: String },
    #[error("storage at {path} has format version {found}; this build reads version {expected}")]
    WrongVersion { path: PathBuf, found: u32, expected: u32 },
    #[error("corrupted record in column family {cf} (key {key}): {reason}")]
    Corrupt { cf: &'static str, key: String, reason: String },
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("batch log at {path}: {source}")]
    BatchLog { path: PathBuf, source: std::io::Error },
    #[error("encoding: {0}")]
    Encode(#[from] codec::CodecError),
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
struct Meta {
    chain_id: Digest,
    version: u32,
}

/// An application snapshot with the position in the log it was taken at.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StoredSnapshot {
    pub height: Height,
    pub block: Digest,
    pub state_digest: Digest,
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
}

pub struct Store {
    db: DB,
    cache: Cache,
    batch_log: BatchLog,
    path: PathBuf,
}

/// RocksDB's memory, for metrics: what the process holds beyond its own heap.
#[derive(Debug, Clone, Copy, Default)]
pub struct StorageMemory {
    pub memtables: u64,
    pub table_readers: u64,
    pub block_cache: u64,
}

impl Store {
    /// Opens (or creates) the store at `path` for `chain`. Refuses a store made for
    /// another chain or by an incompatible version.
    pub fn open(path: &Path, chain: ChainId) -> Result<Store, StorageError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        // Memory flat from the start: all memtables together stay under one budget
        // (RocksDB's default lets each column family grow two 64 MiB memtables).
        options.set_db_write_buffer_size(MEMTABLE_BUDGET);
        // Table and blob files are written once by flushes and compactions and not read
        // back soon: written around the page cache where the file system allows it (on a
        // VM whose host backs memory lazily each fresh page costs a fault and a clear:
        // the flush threads' copies were 14% of the machine at 40,000 tx/s).
        // Write-ahead log files are reused instead of created, so their writes can land
        // in pages that are already there.
        options.set_use_direct_io_for_flush_and_compaction(direct_io_supported(path));
        options.set_recycle_log_file_num(WAL_FILES_RECYCLED);
        // Flushes and compactions (and the snapshot flush) run at the lowest CPU
        // priority: on a busy machine they wait for idle CPU instead of delaying the
        // consensus path, which all replicas feel at once at a snapshot height.
        let mut env = rocksdb::Env::new()
            .map_err(|e| StorageError::Open { path: path.to_path_buf(), reason: e.to_string() })?;
        env.lower_thread_pool_cpu_priority();
        env.lower_high_priority_thread_pool_cpu_priority();
        options.set_env(&env);
        let cache = Cache::new_lru_cache(BLOCK_CACHE);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        let cfs = CFS.iter().map(|name| {
            let mut cf = Options::default();
            cf.set_block_based_table_factory(&table);
            let large = LARGE_VALUES.contains(name);
            cf.set_write_buffer_size(if large { MEMTABLE_BUDGET / 4 } else { SMALL_MEMTABLE });
            if large {
                // Key-value separation: values go to blob files once, at flush, and
                // compactions move only keys and blob references (a snapshot is tens of
                // megabytes; rewriting it at every compaction level costs CPU and disk).
                cf.set_enable_blob_files(true);
                cf.set_min_blob_size(MIN_BLOB_BYTES);
            }
            ColumnFamilyDescriptor::new(*name, cf)
        });
        let db = DB::open_cf_descriptors(&options, path, cfs)
            .map_err(|e| StorageError::Open { path: path.to_path_buf(), reason: e.to_string() })?;
        let log_dir = path.join(BATCH_LOG_DIR);
        let batch_log = BatchLog::open(&log_dir, SEGMENT_BYTES)
            .map_err(|source| StorageError::BatchLog { path: log_dir, source })?;
        let store = Store { db, cache, batch_log, path: path.to_path_buf() };
        let expected = Meta { chain_id: chain.0, version: STORAGE_VERSION };
        match store.get::<Meta>("meta", b"meta")? {
            None => store.put_synced("meta", b"meta", &expected)?,
            Some(meta) if meta.chain_id != expected.chain_id => {
                return Err(StorageError::WrongChain {
                    path: store.path.clone(),
                    found: meta.chain_id.to_string(),
                    expected: expected.chain_id.to_string(),
                });
            }
            Some(meta) if meta.version != STORAGE_VERSION => {
                return Err(StorageError::WrongVersion {
                    path: store.path.clone(),
                    found: meta.version,
                    expected: STORAGE_VERSION,
                });
            }
            Some(_) => {}
        }
        Ok(store)
    }

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, StorageError> {
        self.db.cf_handle(name).ok_or_else(|| StorageError::Open {
            path: self.path.clone(),
            reason: format!("column family {name} is missing"),
        })
    }

    fn get<T: serde::de::DeserializeOwned>(
        &self,
        cf: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        self.get_limited(cf, key, MAX_RECORD_BYTES)
    }

    fn get_limited<T: serde::de::DeserializeOwned>(
        &self,
        cf: &'static str,
        key: &[u8],
        limit: usize,
    ) -> Result<Option<T>, StorageError> {
        match self.db.get_cf(self.cf(cf)?, key)? {
            None => Ok(None),
            Some(bytes) => codec::decode_large(&bytes, limit).map(Some).map_err(|e| StorageError::Corrupt {
                cf,
                key: hex_key(key),
                reason: e.to_string(),
            }),
        }
    }

    fn put_synced<T: Serialize>(&self, cf: &'static str, key: &[u8], value: &T) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(cf)?, key, codec::encode(value)?);
        self.write(batch, true)
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StorageError> {
        let mut options = WriteOptions::default();
        options.set_sync(sync);
        Ok(self.db.write_opt(batch, &options)?)
    }

    /// Persists a protocol step's records atomically and durably (fsync) before the
    /// step's messages may leave. Chain records go by digest, the others replace the
    /// safety state.
    pub fn persist<R: StoredRecord>(&self, records: &[R]) -> Result<(), StorageError> {
        self.persist_with_batches(records, &[])
    }

    /// [`Store::persist`], with the transaction batches the records name: their bytes
    /// appended to the batch log and synced first, their locations then written in the
    /// same atomic, synced write as the records.
    pub fn persist_with_batches<R: StoredRecord>(
        &self,
        records: &[R],
        batches: &[(Digest, &[u8])],
    ) -> Result<(), StorageError> {
        if records.is_empty() && batches.is_empty() {
            return Ok(());
        }
        let locations = self.batch_log.append(batches).map_err(|source| self.batch_log_error(source))?;
        let mut batch = WriteBatch::default();
        for ((digest, _), at) in batches.iter().zip(&locations) {
            batch.put_cf(self.cf("batches")?, digest.as_bytes(), codec::encode(at)?);
        }
        for record in records {
            let bytes = codec::encode(record)?;
            match record.chain_link() {
                Some((digest, _)) => batch.put_cf(self.cf("chain")?, digest.as_bytes(), bytes),
                None => batch.put_cf(self.cf("safety")?, b"latest", bytes),
            }
        }
        self.write(batch, true)
    }

    fn batch_log_error(&self, source: std::io::Error) -> StorageError {
        StorageError::BatchLog { path: self.path.join(BATCH_LOG_DIR), source }
    }

    /// A stored transaction batch (its encoded bytes, not checked against `digest`:
    /// see [`crate::executor::checked_batch`]). A location whose bytes cannot be read
    /// is a corrupted store.
    pub fn batch(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StorageError> {
        let Some(at) = self.get::<BatchLocation>("batches", digest.as_bytes())? else { return Ok(None) };
        self.batch_log.read(&at, digest).map(Some).map_err(|e| StorageError::Corrupt {
            cf: "batches",
            key: digest.to_string(),
            reason: format!("its bytes at {at:?} in the batch log cannot be read: {e}"),
        })
    }

    /// Whether the store holds the batch `digest` (its location; the bytes are not read).
    pub fn has_batch(&self, digest: &Digest) -> Result<bool, StorageError> {
        Ok(self.db.get_pinned_cf(self.cf("batches")?, digest.as_bytes())?.is_some())
    }

    /// The latest safety record, if any.
    pub fn safety<R: StoredRecord>(&self) -> Result<Option<R>, StorageError> {
        self.get("safety", b"latest")
    }

    pub fn chain_record<R: StoredRecord>(&self, digest: &Digest) -> Result<Option<R>, StorageError> {
        self.get("chain", digest.as_bytes())
    }

    /// `key` and up to `max - 1` ancestors, newest first (for a lagging peer).
    pub fn chain_ending_at<R: StoredRecord>(&self, key: Digest, max: usize) -> Result<Vec<R>, StorageError> {
        let mut out = Vec::new();
        let mut cursor = key;
        while out.len() < max {
            let Some(record) = self.chain_record::<R>(&cursor)? else { break };
            let Some((_, parent)) = record.chain_link() else { break };
            out.push(record);
            cursor = parent;
        }
        Ok(out)
    }

    /// Every stored chain record. Fails on the first one that does not decode.
    pub fn all_chain_records<R: StoredRecord>(&self) -> Result<Vec<R>, StorageError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf("chain")?, rocksdb::IteratorMode::Start) {
            let (key, value) = item?;
            let record = codec::decode(&value, MAX_RECORD_BYTES).map_err(|e| StorageError::Corrupt {
                cf: "chain",
                key: hex_key(&key),
                reason: e.to_string(),
            })?;
            out.push(record);
        }
        Ok(out)
    }

    /// Records that `height` committed `block` (not synced: the log can be re-derived
    /// from the chain; the snapshot that depends on it is).
    pub fn append_log(&self, height: Height, block: Digest) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf("log")?, height.0.to_be_bytes(), codec::encode(&block)?);
        self.write(batch, false)
    }

    pub fn log_entry(&self, height: Height) -> Result<Option<Digest>, StorageError> {
        self.get("log", &height.0.to_be_bytes())
    }

    /// The highest height in the committed log.
    pub fn last_logged_height(&self) -> Result<Height, StorageError> {
        let mut iter = self.db.iterator_cf(self.cf("log")?, rocksdb::IteratorMode::End);
        match iter.next() {
            None => Ok(Height(0)),
            Some(item) => {
                let (key, _) = item?;
                let bytes: [u8; 8] = key.as_ref().try_into().map_err(|_| StorageError::Corrupt {
                    cf: "log",
                    key: hex_key(&key),
                    reason: "a log key is 8 bytes".into(),
                })?;
                Ok(Height(u64::from_be_bytes(bytes)))
            }
        }
    }

    /// Stores the application snapshot durably (the applied height goes with it).
    ///
    /// The snapshot (tens of MB) bypasses the write-ahead log and the memtables: a
    /// synced WAL write of it held every other write (the core's per-block records)
    /// behind it for seconds, and a memtable write of it pushed every column family past
    /// the shared memtable budget and stalled those writes (and so every round, about a
    /// second at each snapshot height) while it was flushed. It is built as a table file
    /// beside the store (the writer syncs it) and ingested (linked in and recorded in the
    /// synced MANIFEST); this returns once it is durable. A crash before then loses only
    /// this snapshot: the previous one stays, and the log is replayed from it.
    pub fn save_snapshot(&self, snapshot: &StoredSnapshot) -> Result<(), StorageError> {
        let bytes = codec::encode(snapshot)?;
        let staging = self.path.join(SNAPSHOT_STAGING);
        let mut options = Options::default();
        options.set_compression_type(DBCompressionType::None);
        let mut writer = SstFileWriter::create(&options);
        writer.open(&staging)?;
        writer.put(b"latest", &bytes)?;
        writer.finish()?;
        let mut ingest = IngestExternalFileOptions::default();
        ingest.set_move_files(true);
        Ok(self.db.ingest_external_file_cf_opts(self.cf("snapshot")?, &ingest, vec![&staging])?)
    }

    /// Installs a snapshot fetched from peers, atomically and durably: the snapshot,
    /// the chain record of its block (`anchor`, for protocols that restart from it) and
    /// the log entry of its height. A restart then recovers from it.
    pub fn install_snapshot<R: StoredRecord>(
        &self,
        snapshot: &StoredSnapshot,
        anchor: Option<&R>,
    ) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf("snapshot")?, b"latest", codec::encode(snapshot)?);
        if let Some(record) = anchor
            && let Some((digest, _)) = record.chain_link()
        {
            batch.put_cf(self.cf("chain")?, digest.as_bytes(), codec::encode(record)?);
        }
        batch.put_cf(self.cf("log")?, snapshot.height.0.to_be_bytes(), codec::encode(&snapshot.block)?);
        self.write(batch, true)
    }

    /// The encoded chain record stored under `digest`, as stored.
    pub fn chain_record_bytes(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.get_cf(self.cf("chain")?, digest.as_bytes())?)
    }

    pub fn snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError> {
        self.get_limited("snapshot", b"latest", crate::app::MAX_SNAPSHOT_BYTES + 4096)
    }

    /// Approximate bytes on disk (table and blob files, the batch log), for metrics.
    pub fn size_bytes(&self) -> u64 {
        let files = ["rocksdb.total-sst-files-size", "rocksdb.total-blob-file-size"];
        CFS.iter()
            .filter_map(|name| self.db.cf_handle(name))
            .flat_map(|cf| files.map(|property| (cf, property)))
            .filter_map(|(cf, property)| self.db.property_int_value_cf(cf, property).ok().flatten())
            .sum::<u64>()
            + self.batch_log.bytes()
    }

    /// What RocksDB holds in memory (memtables, table readers, block cache).
    pub fn memory(&self) -> StorageMemory {
        match rocksdb::perf::get_memory_usage_stats(Some(&[&self.db]), Some(&[&self.cache])) {
            Ok(stats) => StorageMemory {
                memtables: stats.mem_table_total,
                table_readers: stats.mem_table_readers_total,
                block_cache: stats.cache_total,
            },
            Err(_) => StorageMemory::default(),
        }
    }
}

fn hex_key(key: &[u8]) -> String {
    key.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_consensus::hotstuff::{Block, Record};
    use bulwark_crypto::Committee;

    #[test]
    fn a_store_for_another_chain_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), ChainId::from_name("a")).unwrap());
        let err = Store::open(dir.path(), ChainId::from_name("b")).err().unwrap();
        assert!(matches!(err, StorageError::WrongChain { .. }), "{err}");
        assert!(err.to_string().contains("another committee"));
    }

    #[test]
    fn an_ingested_snapshot_replaces_the_last_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let chain = ChainId::from_name("s");
        let snapshot = |height: u64, byte: u8| StoredSnapshot {
            height: Height(height),
            block: Digest([byte; 32]),
            state_digest: Digest([byte ^ 1; 32]),
            state: vec![byte; 8 << 20],
        };
        {
            let store = Store::open(dir.path(), chain).unwrap();
            store.save_snapshot(&snapshot(1000, 1)).unwrap();
            store.save_snapshot(&snapshot(2000, 2)).unwrap();
            assert_eq!(store.snapshot().unwrap(), Some(snapshot(2000, 2)));
        }
        // Dropped without a flush: the newest snapshot is what a restart reads, and a
        // staging file left behind (a crash while building one) is overwritten.
        std::fs::write(dir.path().join(SNAPSHOT_STAGING), b"torn").unwrap();
        let store = Store::open(dir.path(), chain).unwrap();
        assert_eq!(store.snapshot().unwrap(), Some(snapshot(2000, 2)));
        store.save_snapshot(&snapshot(3000, 3)).unwrap();
        assert_eq!(store.snapshot().unwrap(), Some(snapshot(3000, 3)));
    }

    #[test]
    fn a_store_on_tmpfs_flushes_with_or_without_direct_io() {
        // tmpfs refuses O_DIRECT before Linux 6.6; a flush with direct I/O there would
        // fail the store. Whichever this kernel does, the store keeps working.
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            eprintln!("skipped: no /dev/shm (tmpfs) on this machine");
            return;
        }
        let dir = tempfile::tempdir_in(shm).unwrap();
        eprintln!("direct I/O on tmpfs here: {}", direct_io_supported(dir.path()));
        let (committee, _) = Committee::deterministic("s", 4, 7000).unwrap();
        let genesis = Block::genesis(&committee);
        let batch = vec![7u8; 4096];
        {
            let store = Store::open(dir.path(), committee.chain_id()).unwrap();
            store
                .persist_with_batches(&[Record::Block(genesis.clone())], &[(Digest([1; 32]), &batch)])
                .unwrap();
            store
                .db
                .flush_cfs_opt(&CFS.map(|cf| store.cf(cf).unwrap()), &rocksdb::FlushOptions::default())
                .unwrap();
        }
        let store = Store::open(dir.path(), committee.chain_id()).unwrap();
        assert_eq!(store.batch(&Digest([1; 32])).unwrap(), Some(batch));
        assert!(!dir.path().join(crate::batch_log::DIRECT_IO_PROBE).exists());
    }

    #[test]
    fn a_damaged_or_missing_batch_log_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let (committee, _) = Committee::deterministic("s", 4, 7000).unwrap();
        let genesis = Block::genesis(&committee);
        let bytes = vec![5u8; 3000];
        let digest = crate::wire::batch_digest(&bytes);
        {
            let store = Store::open(dir.path(), committee.chain_id()).unwrap();
            store.persist_with_batches(&[Record::Block(genesis)], &[(digest, &bytes)]).unwrap();
            assert!(store.has_batch(&digest).unwrap());
        }
        let store = Store::open(dir.path(), committee.chain_id()).unwrap();
        assert_eq!(store.batch(&digest).unwrap().as_deref(), Some(bytes.as_slice()));
        let segment = std::fs::read_dir(dir.path().join(BATCH_LOG_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "batches"))
            .unwrap();
        // A flipped byte: read back, then refused against the digest.
        let mut content = std::fs::read(&segment).unwrap();
        content[100] ^= 1;
        std::fs::write(&segment, &content).unwrap();
        let err =
            crate::executor::checked_batch(&digest, store.batch(&digest).unwrap(), Height(1)).unwrap_err();
        assert!(err.to_string().contains("does not match its digest"), "{err}");
        // A missing segment: the location is there, the bytes are not.
        std::fs::remove_file(&segment).unwrap();
        let err = store.batch(&digest).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { cf: "batches", .. }), "{err}");
        assert!(err.to_string().contains("batch log"), "{err}");
    }

    #[test]
    fn records_persist_and_corruption_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let (committee, _) = Committee::deterministic("s", 4, 7000).unwrap();
        let genesis = Block::genesis(&committee);
        let digest = genesis.digest();
        {
            let store = Store::open(dir.path(), committee.chain_id()).unwrap();
            store.persist(&[Record::Block(genesis.clone())]).unwrap();
            let back: Option<Record> = store.chain_record(&digest).unwrap();
            assert_eq!(back, Some(Record::Block(genesis)));
            // Corrupt the record behind the store's back.
            store.db.put_cf(store.cf("chain").unwrap(), digest.as_bytes(), [0xff, 0xff, 0x01]).unwrap();
        }
        let store = Store::open(dir.path(), committee.chain_id()).unwrap();
        let err = store.all_chain_records::<Record>().unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { cf: "chain", .. }), "{err}");
    }
}
