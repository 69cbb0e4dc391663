//! The parameters a repository is created with and keeps for its whole life.
//!
//! Chunk boundaries and ids depend on these, so they are written into the catalog at `init` and every later
//! command reads them from there rather than from compiled-in defaults: a future release that changes its
//! defaults still deduplicates against, and reads, today's repositories.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, Result};

/// The newest repository format this build reads and writes. Format 2 adds byte-grouped chunk blobs (pack
/// flag 2); a format 1 repository is read and written as format 1, so that older builds can still read it.
pub const FORMAT_VERSION: u32 = 2;

/// The only chunker algorithm so far: FastCDC 2020 as implemented by the `fastcdc` crate at the exact version
/// pinned in Cargo.toml (its cut points changed between releases, so the version is part of the name).
pub const CHUNKER_FASTCDC_2020: &str = "fastcdc-v2020/5.0.0";

/// How a repository cuts, names and compresses chunks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RepoParams {
    /// Repository format version.
    pub format_version: u32,
    /// Chunker algorithm, see `CHUNKER_FASTCDC_2020`.
    pub chunker: String,
    /// Smallest chunk in bytes (except a file's last).
    pub chunk_min: u32,
    /// Target average chunk size in bytes.
    pub chunk_avg: u32,
    /// Largest chunk in bytes.
    pub chunk_max: u32,
    /// FastCDC normalization level (0 to 3).
    pub normalization: u32,
    /// Hash naming chunks and objects; always `blake3` in format 1.
    pub hash: String,
    /// zstd compression level for new chunks.
    pub compression_level: i32,
    /// Pack files are closed once they reach this many bytes.
    pub pack_target_size: u64,
}

impl Default for RepoParams {
    /// Defaults chosen by measurement (see docs/benchmarks.md): a 64 KiB average keeps the cost of a 4 KiB
    /// in-place write in a VM image to about one chunk, while keeping the index small enough (16 Ki chunks per
    /// GiB) that per-chunk overhead does not dominate throughput. Normalization 2 (chunk sizes held closer
    /// to the average) stores a VM image's scattered writes in fewer bytes and costs the other workloads
    /// nothing measurable once numeric chunks are grouped.
    fn default() -> Self {
        RepoParams {
            format_version: FORMAT_VERSION,
            chunker: CHUNKER_FASTCDC_2020.to_string(),
            chunk_min: 16 * 1024,
            chunk_avg: 64 * 1024,
            chunk_max: 256 * 1024,
            normalization: 2,
            hash: "blake3".to_string(),
            compression_level: 3,
            pack_target_size: 32 * 1024 * 1024,
        }
    }
}

impl RepoParams {
    /// Whether chunks may be stored as byte planes (format 2 onwards).
    pub fn groups_bytes(&self) -> bool {
        self.format_version >= 2
    }

    /// Checks that the parameters are ones this build can honour.
    pub fn validate(&self) -> Result<()> {
        use fastcdc::v2020::{AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN};
        if self.format_version == 0 || self.format_version > FORMAT_VERSION {
            return Err(Error::Format(format!(
                "repository format version {} is not supported by this snapstore (it reads up to {}); upgrade snapstore",
                self.format_version, FORMAT_VERSION
            )));
        }
        if self.chunker != CHUNKER_FASTCDC_2020 {
            return Err(Error::Format(format!("unknown chunker '{}'", self.chunker)));
        }
        if self.hash != "blake3" {
            return Err(Error::Format(format!("unknown hash '{}'", self.hash)));
        }
        let (min, avg, max) = (self.chunk_min as usize, self.chunk_avg as usize, self.chunk_max as usize);
        let in_range = (MINIMUM_MIN..=MINIMUM_MAX).contains(&min)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&avg)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max)
            && min <= avg
            && avg <= max;
        // fastcdc 5 scans in byte pairs: odd sizes silently shift the boundaries.
        if !in_range || min % 2 + avg % 2 + max % 2 != 0 {
            return Err(Error::Format(format!("invalid chunk sizes {min}/{avg}/{max}")));
        }
        if self.normalization > 3 {
            return Err(Error::Format(format!("invalid normalization level {}", self.normalization)));
        }
        if !(1..=22).contains(&self.compression_level) {
            return Err(Error::Format(format!("invalid zstd level {}", self.compression_level)));
        }
        if self.pack_target_size < self.chunk_max as u64 {
            return Err(Error::Format("pack target size is smaller than the largest chunk".into()));
        }
        Ok(())
    }

    /// The parameters as key/value pairs, the form they take in the catalog's `meta` table.
    pub(crate) fn to_pairs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("format_version", self.format_version.to_string()),
            ("chunker", self.chunker.clone()),
            ("chunk_min", self.chunk_min.to_string()),
            ("chunk_avg", self.chunk_avg.to_string()),
            ("chunk_max", self.chunk_max.to_string()),
            ("normalization", self.normalization.to_string()),
            ("hash", self.hash.clone()),
            ("compression", "zstd".to_string()),
            ("compression_level", self.compression_level.to_string()),
            ("pack_target_size", self.pack_target_size.to_string()),
        ]
    }

    /// Rebuilds the parameters from the catalog's key/value pairs.
    pub(crate) fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        fn need<T: std::str::FromStr>(get: &impl Fn(&str) -> Option<String>, key: &str) -> Result<T> {
            get(key).and_then(|v| v.parse().ok()).ok_or_else(|| Error::Format(format!("no valid '{key}' parameter")))
        }
        let compression: String = need(&get, "compression")?;
        if compression != "zstd" {
            return Err(Error::Format(format!("unknown compression '{compression}'")));
        }
        let p = RepoParams {
            format_version: need(&get, "format_version")?,
            chunker: need(&get, "chunker")?,
            chunk_min: need(&get, "chunk_min")?,
            chunk_avg: need(&get, "chunk_avg")?,
            chunk_max: need(&get, "chunk_max")?,
            normalization: need(&get, "normalization")?,
            hash: need(&get, "hash")?,
            compression_level: need(&get, "compression_level")?,
            pack_target_size: need(&get, "pack_target_size")?,
        };
        p.validate()?;
        Ok(p)
    }
}

/// A copy of the parameters beside the catalog, `REPO/params`: the catalog is their home, but a repository whose
/// catalog is lost still needs them to cut and compress as before (`repair index` creates the new catalog
/// with them), and the packs do not record them.
pub(crate) const PARAMS_FILE: &str = "params";

impl RepoParams {
    /// Writes `root/params` durably: a temporary in `root/tmp`, fsynced, renamed, the directory fsynced.
    pub(crate) fn write_copy(&self, root: &Path) -> std::io::Result<()> {
        let mut text = String::from("# snapstore repository parameters: a copy of the catalog's meta table\n");
        for (k, v) in self.to_pairs() {
            text.push_str(&format!("{k}={v}\n"));
        }
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        crate::backend::local_dir(&root.join("tmp"))?;
        // Unique among threads too (two repositories opened in one process may both write their copy), and
        // past a name left by a crashed process whose pid this one now has.
        let (temp, mut f) = loop {
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let temp = root.join("tmp").join(format!("params-{}-{n}", std::process::id()));
            match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp) {
                Ok(f) => break (temp, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        };
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&temp, root.join(PARAMS_FILE))?;
        crate::backend::sync_local_dir(root)
    }

    /// The parameters in `root/params`; `None` if there is no such file. One that does not hold a whole set
    /// this build can honour is an error, never a reason to guess: cutting with other parameters than the
    /// repository's would store everything again.
    pub(crate) fn read_copy(root: &Path) -> Result<Option<Self>> {
        let path = root.join(PARAMS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            r => r.map_err(|e| Error::io(&path, e))?,
        };
        let map: HashMap<&str, &str> =
            text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split_once('=')).collect();
        Self::from_lookup(|k| map.get(k).map(|v| v.to_string())).map(Some).map_err(|e| {
            let why = match e {
                Error::Format(why) => why,
                other => other.to_string(),
            };
            Error::Format(format!(
                "{}: {why}. If a newer snapstore wrote it, use that; else restore it, or move it away to rebuild \
                 the catalog with the default parameters",
                path.display()
            ))
        })
    }
}

/// The most worker threads a commit, checkout or verify takes when told how many: each holds buffers and a
/// catalog connection, and a number the system cannot start aborts the process instead of failing the call.
pub(crate) const MAX_THREADS: usize = 4096;

/// Refuses a thread count above [`MAX_THREADS`] (0 is "as many as suits the machine").
pub(crate) fn check_threads(threads: usize) -> crate::error::Result<()> {
    if threads > MAX_THREADS {
        return Err(crate::error::Error::InvalidInput(format!(
            "{threads} threads asked for; at most {MAX_THREADS} (0 picks a number for this machine)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_roundtrip() {
        let p = RepoParams::default();
        p.validate().unwrap();
        let map: HashMap<_, _> = p.to_pairs().into_iter().collect();
        let back = RepoParams::from_lookup(|k| map.get(k).cloned()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn the_copy_beside_the_catalog_roundtrips() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        assert_eq!(RepoParams::read_copy(dir.path()).unwrap(), None);
        let p =
            RepoParams { chunk_avg: 32768, chunk_min: 8192, chunk_max: 131072, normalization: 0, ..Default::default() };
        p.write_copy(dir.path()).unwrap();
        assert_eq!(RepoParams::read_copy(dir.path()).unwrap(), Some(p.clone()));
        p.write_copy(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "no temporary left");
        std::fs::write(dir.path().join(PARAMS_FILE), "chunk_avg=65536\n").unwrap();
        let err = RepoParams::read_copy(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no valid 'compression' parameter") && err.contains("move it away"), "{err}");
        let newer = RepoParams { format_version: FORMAT_VERSION + 1, ..Default::default() };
        newer.write_copy(dir.path()).unwrap();
        let err = RepoParams::read_copy(dir.path()).unwrap_err().to_string();
        assert!(err.contains("upgrade snapstore"), "{err}");
    }

    #[test]
    fn rejects_newer_format_and_odd_sizes() {
        let p = RepoParams { format_version: FORMAT_VERSION + 1, ..Default::default() };
        assert!(p.validate().unwrap_err().to_string().contains("upgrade snapstore"));
        let p = RepoParams { chunk_avg: 65535, ..Default::default() };
        assert!(p.validate().is_err());
    }
}
