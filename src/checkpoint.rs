//! A checkpoint's record: what was committed, when, and what it cost.

use crate::id::{ObjectId, domain_hasher, finish, to_hex};

/// How many hex digits of an id are shown by default; any unique prefix of 4 or more is accepted.
pub const SHORT_ID_LEN: usize = 8;

/// Refuses a tag that would not survive a listing: empty, or holding a control character (the catalog lists
/// tags one per line), or longer than 255 bytes.
pub(crate) fn validate_tag(tag: &str) -> crate::error::Result<()> {
    if tag.is_empty() || tag.len() > 255 || tag.chars().any(char::is_control) {
        return Err(crate::error::Error::InvalidInput(format!(
            "invalid tag {tag:?}: a tag is 1 to 255 bytes without control characters"
        )));
    }
    Ok(())
}

/// [`validate_tag`], and no comma, for a tag a commit or a tag change adds: the CLI splits `--tag a,b` into two
/// tags, as restic does, so a tag holding a comma could be neither given there nor told from two in `log`
/// (round 35 review, F3). Tags added before are still taken from records and still listed.
pub(crate) fn validate_new_tag(tag: &str) -> crate::error::Result<()> {
    validate_tag(tag)?;
    if tag.contains(',') {
        return Err(crate::error::Error::InvalidInput(format!(
            "invalid tag {tag:?}: a tag cannot hold a comma, which separates tags (give them as two)"
        )));
    }
    Ok(())
}

/// One checkpoint as the catalog records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Checkpoint {
    /// 64 hex digits.
    pub id: String,
    /// The previous checkpoint of the same path on the same host, if any.
    pub parent: Option<String>,
    /// Commit time, nanoseconds since the Unix epoch: the committing machine's clock, but always after the
    /// newest earlier checkpoint of the same path, so that a path's checkpoints sort in commit order whatever
    /// the clocks. In JSON also as `time`, in RFC 3339 (see [`format_rfc3339`]).
    #[serde(flatten, serialize_with = "json_time::time_ns")]
    pub time_ns: i64,
    /// The message given at commit.
    pub message: String,
    /// Tags, sorted.
    pub tags: Vec<String>,
    /// Host the commit ran on.
    pub host: String,
    /// The committed path (absolute), or `stdin:NAME` for a stream committed from stdin.
    pub path: String,
    /// Root tree id (a one-entry tree holding the committed file or directory), as hex.
    pub root: String,
    /// Regular files in the checkpoint.
    pub files: u64,
    /// Directories in the checkpoint.
    pub dirs: u64,
    /// Symbolic links in the checkpoint.
    pub symlinks: u64,
    /// Sum of file sizes.
    pub logical_bytes: u64,
    /// Raw bytes of chunks this checkpoint added to the store (as [`crate::CommitSummary::bytes_new`]).
    pub bytes_new: u64,
    /// Bytes those new chunks occupy after compression.
    pub bytes_stored: u64,
    /// Files that could not be read and were skipped (`--skip-unreadable`).
    pub skipped: u64,
}

impl Checkpoint {
    /// The id's first [`SHORT_ID_LEN`] digits.
    pub fn short_id(&self) -> &str {
        &self.id[..SHORT_ID_LEN.min(self.id.len())]
    }
}

/// A checkpoint's id: the hash of what identifies it, so that two commits never share one by chance.
pub(crate) fn checkpoint_id(
    root: &ObjectId,
    parent: Option<&str>,
    time_ns: i64,
    host: &str,
    path: &str,
    nonce: u64,
) -> String {
    let mut h = domain_hasher("snapstore-checkpoint-v1");
    h.update(&root.0);
    h.update(parent.unwrap_or("").as_bytes());
    h.update(&[0]);
    h.update(&time_ns.to_le_bytes());
    h.update(host.as_bytes());
    h.update(&[0]);
    h.update(path.as_bytes());
    h.update(&[0]);
    h.update(&nonce.to_le_bytes());
    to_hex(&finish(&h).0)
}

/// A time in nanoseconds since the Unix epoch in RFC 3339, in UTC to the nanosecond, as restic and borg give
/// times in JSON: exact where `time_ns`, a number above 2^53, is rounded by JSON readers that hold numbers
/// as doubles (jq, JavaScript).
///
/// ```
/// assert_eq!(snapstore::format_rfc3339(1_795_843_607_436_396_286), "2026-11-28T05:26:47.436396286Z");
/// assert_eq!(snapstore::format_rfc3339(-1), "1969-12-31T23:59:59.999999999Z");
/// ```
pub fn format_rfc3339(ns: i64) -> String {
    let mut s = format_utc(ns).replacen(' ', "T", 1);
    s.push_str(&format!(".{:09}Z", ns.rem_euclid(1_000_000_000)));
    s
}

/// Times in JSON: each `*_ns` field beside its RFC 3339 form, named without the `_ns`. The fields are
/// flattened into their struct, so each function here writes its own keys.
pub(crate) mod json_time {
    use serde::ser::{SerializeMap, Serializer};

    fn entries<S: Serializer>(s: S, key: &'static str, ns: Option<i64>) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry(key, &ns)?;
        map.serialize_entry(key.strip_suffix("_ns").unwrap_or(key), &ns.map(super::format_rfc3339))?;
        map.end()
    }

    pub fn time_ns<S: Serializer>(ns: &i64, s: S) -> Result<S::Ok, S::Error> {
        entries(s, "time_ns", Some(*ns))
    }

    pub fn created_ns<S: Serializer>(ns: &i64, s: S) -> Result<S::Ok, S::Error> {
        entries(s, "created_ns", Some(*ns))
    }

    pub fn complete_ns<S: Serializer>(ns: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
        entries(s, "complete_ns", *ns)
    }
}

/// A time in nanoseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS`, in UTC.
///
/// ```
/// assert_eq!(snapstore::format_utc(0), "1970-01-01 00:00:00");
/// ```
pub fn format_utc(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = crate::retention::civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}
