//! Pack files in an S3 bucket, or anything speaking the S3 API (MinIO, moto, R2), through `object_store`.
//!
//! object_store is async; [`Bucket`] owns a small private tokio runtime and blocks on it, so callers stay
//! synchronous like the rest of the crate. Credentials are looked up here rather than by object_store, so that
//! a machine without any is told what to set instead of waiting on the EC2 instance metadata service, which
//! off EC2 costs seconds of timeouts before failing with an unhelpful message.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutPayload, RetryConfig,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{Backend, ObjectWriter, Replaced, Versioned, check_name};

/// Files from this size on are uploaded in parts of this size: big enough that a GiB costs 171 part requests,
/// small enough that the parts in flight hold little (three by default, 18 MiB; with four of 8 MiB a commit's
/// peak RSS went to 64-68 MiB) and a failed part is cheap to resend. S3 takes no part under 5 MiB but the last.
const PART_SIZE: usize = 6 << 20;
/// `get_to` fetches big objects in ranges of this size, so that every request can finish within the request
/// timeout however big the object is.
const GET_SEGMENT: u64 = 64 << 20;
/// Keys S3 returns per list request.
const LIST_PAGE: u64 = 1000;
/// Attempts at a conditional create that S3 answers with 409 (another conditional write in flight).
const CREATE_ATTEMPTS: u32 = 4;
/// Attempts at a conditional replace that fails for a reason that may pass (`replace` retries it itself).
const REPLACE_ATTEMPTS: u32 = 4;

/// Splits `s3://BUCKET/PREFIX` into bucket and prefix, trimming slashes around the prefix (which may be empty).
///
/// `None` if `url` is not an `s3://` URL, the bucket name is empty or has characters S3 does not allow, or the
/// prefix has empty, `.` or `..` segments.
pub fn parse_s3_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("s3://")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_matches('/');
    let bucket_ok =
        !bucket.is_empty() && bucket.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    let prefix_ok = prefix.is_empty() || ObjectPath::parse(prefix).is_ok();
    (bucket_ok && prefix_ok).then(|| (bucket.to_string(), prefix.to_string()))
}

/// Where credentials come from.
#[derive(Clone)]
pub enum Credentials {
    /// Access keys, from the environment or a profile file.
    Keys {
        /// `AWS_ACCESS_KEY_ID`.
        access_key_id: String,
        /// `AWS_SECRET_ACCESS_KEY`.
        secret_access_key: String,
        /// `AWS_SESSION_TOKEN`, for temporary keys.
        session_token: Option<String>,
    },
    /// Temporary credentials object_store fetches and refreshes itself: web identity (EKS service accounts) or
    /// ECS/EKS container credentials. Each pair is an `AWS_*` variable and its value.
    Ambient(Vec<(String, String)>),
    /// The EC2 instance metadata service (IMDSv2).
    InstanceMetadata,
}

impl std::fmt::Debug for Credentials {
    // Keeps secrets out of logs and panic messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Keys { access_key_id, session_token, .. } => f
                .debug_struct("Keys")
                .field("access_key_id", access_key_id)
                .field("secret_access_key", &"<redacted>")
                .field("session_token", &session_token.as_ref().map(|_| "<redacted>"))
                .finish(),
            Credentials::Ambient(vars) => {
                f.debug_tuple("Ambient").field(&vars.iter().map(|(k, _)| k).collect::<Vec<_>>()).finish()
            }
            Credentials::InstanceMetadata => f.write_str("InstanceMetadata"),
        }
    }
}

/// How to reach S3 and sign requests.
///
/// [`Settings::from_env`] reads the standard AWS environment; tests and embedders can fill one in directly.
#[derive(Clone, Debug)]
pub struct Settings {
    /// An S3-compatible endpoint such as `http://127.0.0.1:9000`; `None` means AWS itself. Plain `http://` is
    /// allowed exactly when the endpoint says so.
    pub endpoint: Option<String>,
    /// The region requests are signed for; without an endpoint it also picks the AWS endpoint.
    pub region: String,
    /// Where credentials come from.
    pub credentials: Credentials,
    /// Bucket in the host name (`https://BUCKET.host/key`) rather than in the path (`https://host/BUCKET/key`).
    /// `None` chooses: path style with an endpoint (MinIO and moto need it); on AWS, virtual-hosted unless the
    /// bucket name has a dot (which breaks the TLS wildcard certificate) or is not a valid host name.
    pub virtual_hosted_style: Option<bool>,
    /// Retries of a failed request (connection errors, timeouts, 5xx, throttling), with exponential backoff
    /// from 100 ms to 5 s.
    pub max_retries: usize,
    /// No retry starts later than this after the first attempt.
    pub retry_timeout: Duration,
    /// Limit for one whole request, body included.
    pub request_timeout: Duration,
    /// Limit for establishing a connection.
    pub connect_timeout: Duration,
    /// Parts of multipart uploads in memory and on their way at once, across all of the bucket's uploads; each
    /// part is 6 MiB. More can fill a fast, distant link better, at 6 MiB of memory each, held until the
    /// bucket is dropped. A commit leaves this memory out of what it cuts large files with, but only down to
    /// a floor: the default of 3 keeps a commit with its default threads (at most 4 into a bucket) under
    /// 64 MiB, and each part more adds 6 MiB. `SNAPSTORE_S3_UPLOAD_PARTS` sets it for [`Settings::from_env`].
    pub upload_parts: usize,
}

impl Settings {
    /// AWS in us-east-1 with `credentials`, and the default retries and timeouts: 6 retries within 120 s,
    /// 60 s per request, 5 s to connect; 3 upload parts at once (18 MiB).
    pub fn new(credentials: Credentials) -> Self {
        Settings {
            endpoint: None,
            region: "us-east-1".into(),
            credentials,
            virtual_hosted_style: None,
            max_retries: 6,
            retry_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            upload_parts: 3,
        }
    }

    /// Settings from the standard AWS environment variables and profile files, the environment winning.
    ///
    /// - endpoint: `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, else `endpoint_url` in the config file;
    /// - region: `AWS_REGION`, `AWS_DEFAULT_REGION`, else `region` in the config file, else `us-east-1`;
    /// - `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true|false` overrides the addressing style;
    /// - `SNAPSTORE_S3_UPLOAD_PARTS=N` sets [`Settings::upload_parts`];
    /// - profile: `AWS_PROFILE`, else `default`; its section is `[NAME]` in the credentials file
    ///   (`AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`) and `[profile NAME]` (or `[default]`) in
    ///   the config file (`AWS_CONFIG_FILE`, else `~/.aws/config`).
    ///
    /// Credentials, first found wins: `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`);
    /// `aws_access_key_id` + `aws_secret_access_key` (+ `aws_session_token`) in the profile, credentials file
    /// before config file; web identity (`AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`); ECS/EKS container
    /// credentials (`AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`, or `AWS_CONTAINER_CREDENTIALS_FULL_URI` +
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`); and the EC2 instance metadata service only when
    /// `AWS_EC2_METADATA_ENABLED=true`. Without any of these it fails, naming what to set.
    pub fn from_env() -> io::Result<Self> {
        Self::from_lookup(&|key| std::env::var(key).ok())
    }

    fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> io::Result<Self> {
        // An exported but empty variable means unset, as in the AWS CLI.
        let env = |key: &str| lookup(key).filter(|v| !v.is_empty());
        let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let home = env("HOME");
        let file = |var: &str, default: &str| {
            env(var).map(PathBuf::from).or_else(|| home.as_ref().map(|h| Path::new(h).join(default)))
        };
        let cred_file = file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials");
        let config_file = file("AWS_CONFIG_FILE", ".aws/config");
        let cred_sections = [profile.clone()];
        let config_sections = if profile == "default" {
            vec!["default".to_string(), "profile default".into()]
        } else {
            vec![format!("profile {profile}")]
        };
        let from_creds = read_profile(cred_file, &cred_sections)?;
        let from_config = read_profile(config_file, &config_sections)?;
        let config = from_config.section.clone().unwrap_or_default();

        let endpoint = env("AWS_ENDPOINT_URL_S3")
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| config.get("endpoint_url").cloned());
        let region = env("AWS_REGION")
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| config.get("region").cloned())
            .unwrap_or_else(|| "us-east-1".into());
        let virtual_hosted_style = env("AWS_VIRTUAL_HOSTED_STYLE_REQUEST")
            .map(|v| {
                let bad = || invalid(format!("AWS_VIRTUAL_HOSTED_STYLE_REQUEST={v:?}: expected true or false"));
                parse_bool(&v).ok_or_else(bad)
            })
            .transpose()?;

        let upload_parts = env("SNAPSTORE_S3_UPLOAD_PARTS")
            .map(|v| match v.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(invalid(format!("SNAPSTORE_S3_UPLOAD_PARTS={v:?}: expected a number of parts, 1 or more"))),
            })
            .transpose()?;

        let credentials = find_credentials(&env, &profile, &[from_creds, from_config])?;
        let defaults = Settings::new(credentials);
        Ok(Settings {
            endpoint,
            region,
            virtual_hosted_style,
            upload_parts: upload_parts.unwrap_or(defaults.upload_parts),
            ..defaults
        })
    }
}

/// The first credentials found, in the order [`Settings::from_env`] documents.
fn find_credentials(
    env: &dyn Fn(&str) -> Option<String>,
    profile: &str,
    profiles: &[ProfileFile],
) -> io::Result<Credentials> {
    match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        (Some(access_key_id), Some(secret_access_key)) => {
            let session_token = env("AWS_SESSION_TOKEN");
            return Ok(Credentials::Keys { access_key_id, secret_access_key, session_token });
        }
        (Some(_), None) => return Err(invalid("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: set both")),
        (None, Some(_)) => return Err(invalid("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not: set both")),
        (None, None) => {}
    }
    for ProfileFile { path, section } in profiles {
        let (Some(path), Some(section)) = (path, section) else { continue };
        let where_ = format!("profile {profile:?} in {}", path.display());
        match (section.get("aws_access_key_id"), section.get("aws_secret_access_key")) {
            (Some(id), Some(secret)) => {
                return Ok(Credentials::Keys {
                    access_key_id: id.clone(),
                    secret_access_key: secret.clone(),
                    session_token: section.get("aws_session_token").cloned(),
                });
            }
            (Some(_), None) => {
                return Err(invalid(format!("{where_} has aws_access_key_id but no aws_secret_access_key")));
            }
            (None, Some(_)) => {
                return Err(invalid(format!("{where_} has aws_secret_access_key but no aws_access_key_id")));
            }
            (None, None) => {}
        }
        let unsupported = ["sso_session", "sso_start_url", "credential_process", "role_arn", "source_profile"];
        if let Some(key) = unsupported.iter().find(|k| section.contains_key(**k)) {
            return Err(invalid(format!(
                "{where_} gets its credentials through {key}, which snapstore does not support; export keys \
                 instead, e.g. eval \"$(aws configure export-credentials --profile {profile} --format env)\""
            )));
        }
    }
    let pass = |keys: &[&str]| -> Option<Credentials> {
        let vars: Option<Vec<_>> = keys.iter().map(|k| env(k).map(|v| (k.to_string(), v))).collect();
        let mut vars = vars?;
        for optional in ["AWS_ROLE_SESSION_NAME", "AWS_ENDPOINT_URL_STS"] {
            if keys.contains(&"AWS_ROLE_ARN")
                && let Some(v) = env(optional)
            {
                vars.push((optional.to_string(), v));
            }
        }
        Some(Credentials::Ambient(vars))
    };
    let ambient = pass(&["AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"])
        .or_else(|| pass(&["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"]))
        .or_else(|| pass(&["AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]));
    if let Some(ambient) = ambient {
        return Ok(ambient);
    }
    let enabled = env("AWS_EC2_METADATA_ENABLED").and_then(|v| parse_bool(&v)).unwrap_or(false);
    let disabled = env("AWS_EC2_METADATA_DISABLED").and_then(|v| parse_bool(&v)).unwrap_or(false);
    if enabled && !disabled {
        return Ok(Credentials::InstanceMetadata);
    }
    let files: Vec<String> = profiles.iter().filter_map(|f| f.path.as_ref().map(|p| p.display().to_string())).collect();
    let files = if files.is_empty() { "no profile files (HOME is not set)".to_string() } else { files.join(" or ") };
    // Not NotFound: callers take that to mean a missing object.
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for \
             temporary keys), or put aws_access_key_id and aws_secret_access_key in profile {profile:?} of \
             {files} (choose the profile with AWS_PROFILE, the files with AWS_SHARED_CREDENTIALS_FILE and \
             AWS_CONFIG_FILE); on EC2, set AWS_EC2_METADATA_ENABLED=true to use the instance role"
        ),
    ))
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// One AWS profile file and the chosen profile's section in it.
struct ProfileFile {
    /// `None` when there is no file to look at (HOME unset).
    path: Option<PathBuf>,
    /// `None` when the file or the section is missing.
    section: Option<HashMap<String, String>>,
}

/// Reads the first of `sections` present in an AWS profile file; a missing file is no error.
fn read_profile(path: Option<PathBuf>, sections: &[String]) -> io::Result<ProfileFile> {
    let text = match path.as_deref().map(fs::read_to_string) {
        None => return Ok(ProfileFile { path, section: None }),
        Some(Ok(text)) => text,
        Some(Err(e)) if e.kind() == io::ErrorKind::NotFound => return Ok(ProfileFile { path, section: None }),
        Some(Err(e)) => {
            let shown = path.as_deref().unwrap_or(Path::new("")).display();
            return Err(io::Error::new(e.kind(), format!("reading AWS profile file {shown}: {e}")));
        }
    };
    Ok(ProfileFile { section: sections.iter().find_map(|s| ini_section(&text, s)), path })
}

/// The `key = value` pairs of `[section]` in an AWS-style INI file, later lines winning; `None` if absent.
///
/// Keys are lowercased. Whole-line `#` and `;` comments are skipped, as are indented lines, which in AWS files
/// are sub-properties of the key above (`s3 =` followed by indented settings) that only apply to one service.
fn ini_section(text: &str, section: &str) -> Option<HashMap<String, String>> {
    let mut found = None;
    let mut inside = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        if let Some(header) = trimmed.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            // "[profile   name]" names the same section as "[profile name]".
            inside = header.split_whitespace().collect::<Vec<_>>().join(" ") == section;
            if inside {
                found.get_or_insert_with(HashMap::new);
            }
            continue;
        }
        if !inside || line.starts_with(char::is_whitespace) {
            continue;
        }
        if let (Some(map), Some((key, value))) = (found.as_mut(), trimmed.split_once('=')) {
            map.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    found
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

/// Metadata of one object.
#[derive(Debug, Clone)]
pub struct ObjectMeta {
    /// Name relative to the bucket prefix.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, in nanoseconds since the Unix epoch.
    pub modified_ns: i64,
}

impl ObjectMeta {
    fn from_store(meta: object_store::ObjectMeta) -> Self {
        ObjectMeta {
            name: meta.location.to_string(),
            size: meta.size,
            modified_ns: meta.last_modified.timestamp_nanos_opt().unwrap_or(0),
        }
    }
}

/// A connection to one prefix of one bucket, with a synchronous API.
///
/// Safe to share between threads; each call blocks its caller until done, so it must not be called from async
/// code (tokio refuses to block inside a runtime). Object names are relative to the prefix and must pass the
/// backend's name check.
pub struct Bucket {
    url: String,
    /// What requests go to, for error messages.
    endpoint: String,
    store: PrefixStore<AmazonS3>,
    /// The same client without object_store's retries, for [`Bucket::replace`].
    store_once: PrefixStore<AmazonS3>,
    requests: AtomicU64,
    /// One permit per upload part that may be in memory ([`Settings::upload_parts`]): two packs uploading at
    /// once with four parts each and one filling held 67 MiB (docs/benchmarks.md, *Repositories in S3*).
    upload_slots: Arc<Semaphore>,
    /// How many permits `upload_slots` was made with.
    upload_parts: usize,
    /// Part buffers, kept for the next part: allocating each part afresh and freeing it on another thread left
    /// glibc's arenas holding far more than the parts in flight (a commit's peak RSS 86-99 MiB, against 64-68
    /// with the buffers kept). At most one per upload slot.
    spare_parts: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Parts alive at once, and the most ever: what the upload slots are to bound.
    #[cfg(test)]
    live_parts: Arc<tests::Live>,
    runtime: tokio::runtime::Runtime,
}

impl Bucket {
    /// Connects to `s3://BUCKET/PREFIX` with [`Settings::from_env`], failing if no credentials are found.
    ///
    /// No request is sent yet: a wrong endpoint or bucket shows up at the first operation.
    pub fn connect(url: &str) -> io::Result<Bucket> {
        let settings = Settings::from_env().map_err(|e| io::Error::new(e.kind(), format!("{url}: {e}")))?;
        Self::connect_with(url, &settings)
    }

    /// Connects to `s3://BUCKET/PREFIX` with explicit settings.
    pub fn connect_with(url: &str, settings: &Settings) -> io::Result<Bucket> {
        let (bucket, prefix) = parse_s3_url(url)
            .ok_or_else(|| invalid(format!("{url:?} is not an S3 URL: expected s3://BUCKET or s3://BUCKET/PREFIX")))?;
        let url = if prefix.is_empty() { format!("s3://{bucket}") } else { format!("s3://{bucket}/{prefix}") };
        let dns_safe = bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let virtual_hosted = settings.virtual_hosted_style.unwrap_or(settings.endpoint.is_none() && dns_safe);
        let endpoint = match settings.endpoint.as_deref().map(|e| e.trim_end_matches('/')) {
            Some(e) if !e.starts_with("http://") && !e.starts_with("https://") => {
                return Err(invalid(format!("{url}: S3 endpoint {e:?} must start with http:// or https://")));
            }
            // object_store takes a virtual-hosted endpoint to name the bucket already; AWS SDKs add it themselves.
            Some(e) if virtual_hosted => Some(bucket_host(e, &bucket)),
            e => e.map(String::from),
        };
        let allow_http = endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: settings.max_retries,
            retry_timeout: settings.retry_timeout,
        };
        // Conditional replaces are retried by `replace` itself: object_store would send a 501 (a server without
        // conditional writes) six times over two seconds before the fallback could start.
        let no_retries = RetryConfig { max_retries: 0, ..retry.clone() };
        // Built from scratch rather than from_env(): everything is decided above, and with_client_options()
        // would drop what from_env() had put in the client options anyway.
        let options = ClientOptions::new()
            .with_timeout(settings.request_timeout)
            .with_connect_timeout(settings.connect_timeout)
            .with_allow_http(allow_http);
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&bucket)
            .with_region(&settings.region)
            .with_virtual_hosted_style_request(virtual_hosted)
            .with_retry(retry)
            .with_client_options(options);
        if let Some(e) = &endpoint {
            builder = builder.with_endpoint(e);
        }
        builder = match &settings.credentials {
            Credentials::Keys { access_key_id, secret_access_key, session_token } => {
                let b = builder.with_access_key_id(access_key_id).with_secret_access_key(secret_access_key);
                match session_token {
                    Some(t) => b.with_token(t),
                    None => b,
                }
            }
            Credentials::Ambient(vars) => {
                for (key, value) in vars {
                    let key: AmazonS3ConfigKey =
                        key.to_ascii_lowercase().parse().map_err(|e| invalid(format!("{url}: {key}: {e}")))?;
                    builder = builder.with_config(key, value);
                }
                builder
            }
            // With no credentials configured object_store falls back to the metadata service.
            Credentials::InstanceMetadata => builder,
        };
        // reqwest is built without a TLS crypto provider of its own (Cargo.toml: it would bring aws-lc-rs) and
        // panics without a process default, so install ring's; Err only means one is installed already, which
        // then serves as well. A program linking this library that installs a provider of its own must do so
        // before it opens an S3 repository (docs/architecture.md).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let set_up = |b: AmazonS3Builder| {
            b.build().map_err(|e| io::Error::other(format!("{url}: cannot set up the S3 client: {e}")))
        };
        let s3_once = set_up(builder.clone().with_retry(no_retries))?;
        let s3 = set_up(builder)?;
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("snapstore-s3")
            .enable_all()
            .build()
            .map_err(|e| io::Error::new(e.kind(), format!("{url}: starting the S3 client's threads: {e}")))?;
        let endpoint = endpoint.unwrap_or_else(|| format!("AWS S3 ({})", settings.region));
        let upload_parts = settings.upload_parts.max(1);
        Ok(Bucket {
            url,
            endpoint,
            store: PrefixStore::new(s3, prefix.as_str()),
            store_once: PrefixStore::new(s3_once, prefix.as_str()),
            requests: AtomicU64::new(0),
            upload_slots: Arc::new(Semaphore::new(upload_parts)),
            upload_parts,
            spare_parts: Arc::default(),
            #[cfg(test)]
            live_parts: Arc::default(),
            runtime,
        })
    }

    /// The URL it was opened with, normalised: `s3://BUCKET/PREFIX`, or `s3://BUCKET` without a prefix.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The most memory uploads hold at once: a part per upload slot.
    pub fn upload_memory(&self) -> u64 {
        (self.upload_parts * PART_SIZE) as u64
    }

    /// Requests sent so far, counting each HTTP request a call makes (retries excepted): one per get, put,
    /// head or delete, one per page of a listing, parts + 2 for a multipart upload.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A whole object, read into memory: for small objects.
    pub fn get(&self, name: &str) -> io::Result<Vec<u8>> {
        let path = self.path(name)?;
        self.count(1);
        let bytes = self.runtime.block_on(async { self.store.get(&path).await?.bytes().await });
        bytes.map(Vec::from).map_err(|e| self.error(name, e))
    }

    /// Whole objects, read into memory, their requests in flight at once: for many small objects, where one at a
    /// time would wait out the server's latency once per object. The results are in the order of `names`.
    pub fn get_all(&self, names: &[&str]) -> Vec<io::Result<Vec<u8>>> {
        let fetches = names.iter().map(|name| async move {
            let path = self.path(name)?;
            self.count(1);
            let bytes = async { self.store.get(&path).await?.bytes().await }.await;
            bytes.map(Vec::from).map_err(|e| self.error(name, e))
        });
        self.runtime.block_on(futures_util::future::join_all(fetches))
    }

    /// Streams a whole object into `out` in bounded memory; returns its size.
    ///
    /// Big objects are fetched in 64 MiB ranges, each required to come from the same version of the object.
    pub fn get_to(&self, name: &str, out: &mut dyn Write) -> io::Result<u64> {
        self.get_in_ranges(name, out, GET_SEGMENT)
    }

    fn get_in_ranges(&self, name: &str, out: &mut dyn Write, segment: u64) -> io::Result<u64> {
        let path = self.path(name)?;
        self.runtime.block_on(async {
            let mut written = 0u64;
            let mut etag = None;
            loop {
                let options =
                    GetOptions::new().with_range(Some(written..written + segment)).with_if_match(etag.clone());
                self.count(1);
                let result = match self.store.get_opts(&path, options).await {
                    Ok(r) => r,
                    Err(e @ object_store::Error::Precondition { .. }) => {
                        return Err(io::Error::other(format!(
                            "{}: the object changed while being read ({e})",
                            self.object_url(name)
                        )));
                    }
                    Err(e) if written == 0 && !matches!(e, object_store::Error::NotFound { .. }) => {
                        // S3 rejects any range of an empty object as unsatisfiable.
                        return match self.head_async(&path).await {
                            Ok(Some(meta)) if meta.size == 0 => Ok(0),
                            _ => Err(self.error(name, e)),
                        };
                    }
                    Err(e) => return Err(self.error(name, e)),
                };
                let size = result.meta.size;
                etag = result.meta.e_tag.clone();
                let mut stream = result.into_stream();
                let start = written;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| self.error(name, e))?;
                    out.write_all(&chunk)?;
                    written += chunk.len() as u64;
                }
                if written == start && written < size {
                    return Err(io::Error::other(format!(
                        "{}: the server sent nothing from byte {written} of {size}",
                        self.object_url(name)
                    )));
                }
                if written >= size {
                    return Ok(written);
                }
            }
        })
    }

    /// Fills `buf` from `offset`; fails with [`io::ErrorKind::UnexpectedEof`] if the object is shorter.
    pub fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_range(name, offset, buf.len() as u64)?.read_exact(buf)
    }

    /// Streams `len` bytes from `offset` with one ranged GET, handing its body on as it arrives; see
    /// [`Backend::read_range`].
    pub fn read_range(&self, name: &str, offset: u64, len: u64) -> io::Result<RangeReader<'_>> {
        let path = self.path(name)?;
        let end = offset.checked_add(len).ok_or_else(|| invalid("read range overflows"))?;
        let reader = |stream, sent| RangeReader {
            bucket: self,
            name: name.to_string(),
            stream,
            chunk: Bytes::new(),
            pos: offset,
            sent,
            end,
        };
        if len == 0 {
            // No such thing as an empty range request; the object must still exist and reach `offset`.
            return match self.head(name)? {
                Some(meta) if meta.size >= offset => Ok(reader(futures_util::stream::empty().boxed(), offset)),
                Some(meta) => Err(self.past_end(name, offset, end, meta.size)),
                None => Err(self.missing(name)),
            };
        }
        self.count(1);
        let options = GetOptions::new().with_range(Some(offset..end));
        match self.runtime.block_on(self.store.get_opts(&path, options)) {
            // object_store hands back whatever part of the range exists: the reader fails where it stops.
            Ok(result) if result.range.start == offset => {
                let sent = result.range.end.min(end);
                Ok(reader(result.into_stream(), sent))
            }
            Ok(result) => Err(io::Error::other(format!(
                "{}: asked for bytes from {offset}, the server sent them from {}",
                self.object_url(name),
                result.range.start
            ))),
            Err(e @ object_store::Error::NotFound { .. }) => Err(self.error(name, e)),
            // S3 answers a range wholly past the end with 416; tell that apart from a real failure.
            Err(e) => match self.head(name) {
                Ok(Some(meta)) if meta.size <= offset => Ok(reader(futures_util::stream::empty().boxed(), meta.size)),
                _ => Err(self.error(name, e)),
            },
        }
    }

    /// Writes an object, replacing any of the same name.
    pub fn put(&self, name: &str, data: Vec<u8>) -> io::Result<()> {
        let path = self.path(name)?;
        self.count(1);
        let result = self.runtime.block_on(self.store.put(&path, PutPayload::from(data)));
        result.map(drop).map_err(|e| self.error(name, e))
    }

    /// Uploads a local file as an object, replacing any of the same name: in one request below 6 MiB, else as
    /// a multipart upload of 6 MiB parts, as many at a time as the bucket's upload slots allow, aborted if
    /// anything fails.
    pub fn put_file(&self, name: &str, local: &Path) -> io::Result<()> {
        let path = self.path(name)?;
        let context = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", local.display()));
        let mut file = File::open(local).map_err(context)?;
        let size = file.metadata().map_err(context)?.len();
        if size < PART_SIZE as u64 {
            let mut data = Vec::with_capacity(size as usize);
            file.read_to_end(&mut data).map_err(context)?;
            return self.put(name, data);
        }
        self.count(1);
        self.runtime.block_on(async {
            let mut upload = self.store.put_multipart(&path).await.map_err(|e| self.error(name, e))?;
            let mut sending = tokio::task::JoinSet::new();
            let sent = async {
                for _ in 0..size.div_ceil(PART_SIZE as u64) {
                    // A part is read into memory only once it may be sent: the slot is what bounds memory.
                    let slot = self.upload_slots.clone().acquire_owned().await.map_err(io::Error::other)?;
                    let spare = self.spare_parts.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    let mut data = spare.unwrap_or_else(|| Vec::with_capacity(PART_SIZE));
                    (&mut file).take(PART_SIZE as u64).read_to_end(&mut data).map_err(context)?;
                    if data.is_empty() {
                        let why = "the file shrank while it was uploaded";
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("{}: {why}", local.display()),
                        ));
                    }
                    self.count(1);
                    let part = Part::new(data, self, slot);
                    sending.spawn(upload.put_part(PutPayload::from(Bytes::from_owner(part))));
                    // Failures surface as they happen, not only once the whole file is read.
                    while let Some(done) = sending.try_join_next() {
                        done.map_err(io::Error::other)?.map_err(|e| self.error(name, e))?;
                    }
                }
                while let Some(done) = sending.join_next().await {
                    done.map_err(io::Error::other)?.map_err(|e| self.error(name, e))?;
                }
                self.count(1);
                upload.complete().await.map(drop).map_err(|e| self.error(name, e))
            };
            let failure = match sent.await {
                Ok(()) => return Ok(()),
                Err(failure) => failure,
            };
            sending.shutdown().await;
            self.count(1);
            // Left unfinished, the parts sent would be stored (and billed) until a lifecycle rule removes them.
            // The failure that stopped the upload is the one worth reporting, not the abort's.
            let _ = upload.abort().await;
            Err(failure)
        })
    }

    /// Writes an object only if none of that name exists (`If-None-Match: *`): `Ok(false)` if one does.
    ///
    /// Exactly one of several racing creators gets `true`.
    pub fn create(&self, name: &str, data: Vec<u8>) -> io::Result<bool> {
        let path = self.path(name)?;
        let payload = PutPayload::from(data);
        for attempt in 1..=CREATE_ATTEMPTS {
            self.count(1);
            let result = self.runtime.block_on(self.store.put_opts(&path, payload.clone(), PutMode::Create.into()));
            match result {
                Ok(_) => return Ok(true),
                // object_store reports both 412 (exists) and 409 (S3: a concurrent conditional write or delete
                // was in flight; AWS says retry) as AlreadyExists, wrapping its own error only for 412.
                Err(object_store::Error::AlreadyExists { source, .. })
                    if source.downcast_ref::<object_store::Error>().is_none() && attempt < CREATE_ATTEMPTS =>
                {
                    std::thread::sleep(Duration::from_millis(50 << attempt));
                }
                Err(object_store::Error::AlreadyExists { .. }) => return Ok(false),
                Err(e) => return Err(self.error(name, e)),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// A small object read whole, with the ETag of the version read; `None` if it does not exist.
    pub fn get_versioned(&self, name: &str) -> io::Result<Option<Versioned>> {
        let path = self.path(name)?;
        self.count(1);
        let result = self.runtime.block_on(async {
            let got = self.store.get(&path).await?;
            let meta = got.meta.clone();
            Ok::<_, object_store::Error>((got.bytes().await?, meta))
        });
        match result {
            Ok((body, meta)) => Ok(Some(Versioned {
                body: Vec::from(body),
                modified_ns: meta.last_modified.timestamp_nanos_opt().unwrap_or(0),
                e_tag: meta.e_tag,
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(name, e)),
        }
    }

    /// Writes `data` over an object only while it is still the version `e_tag` names (`If-Match`), so that
    /// of two writers who read the same version, one replaces it and the other learns it changed.
    ///
    /// [`Replaced::Unsupported`] (nothing written) where there is no ETag or the server answers that it does
    /// not implement conditional writes; a server that ignores `If-Match` instead writes unconditionally. A
    /// refused write finds the object holding `data` (its own earlier attempt landed, or another writer wrote
    /// the same bytes) reports [`Replaced::Done`].
    pub fn replace(&self, name: &str, data: Vec<u8>, e_tag: Option<&str>) -> io::Result<Replaced> {
        use object_store::Error as E;
        let Some(e_tag) = e_tag else { return Ok(Replaced::Unsupported) };
        let path = self.path(name)?;
        let data = Bytes::from(data);
        let payload = PutPayload::from(data.clone());
        for attempt in 1.. {
            self.count(1);
            let version = object_store::UpdateVersion { e_tag: Some(e_tag.to_string()), version: None };
            let mode = PutMode::Update(version).into();
            let refused = match self.runtime.block_on(self.store_once.put_opts(&path, payload.clone(), mode)) {
                Ok(_) => return Ok(Replaced::Done),
                // 412, or (object_store's reading of S3) 404 for an object deleted since.
                Err(E::Precondition { .. }) => true,
                Err(e) if refuses_conditions(&e) => return Ok(Replaced::Unsupported),
                // A 409 (another conditional write to it in flight), a 5xx or a lost connection: sent again.
                Err(e) if attempt < REPLACE_ATTEMPTS && transient(&e) => {
                    std::thread::sleep(Duration::from_millis(100 << attempt));
                    false
                }
                Err(E::AlreadyExists { .. }) => true,
                Err(e) => return Err(self.error(name, e)),
            };
            if refused {
                // An earlier attempt that landed although its answer was lost (S3 answers 500 now and then)
                // makes this one refused: the object then holds these very bytes.
                let landed = matches!(self.get_versioned(name), Ok(Some(now)) if now.body == data.as_ref());
                return Ok(if landed { Replaced::Done } else { Replaced::Changed });
            }
        }
        unreachable!("the last attempt returns")
    }

    /// An object's metadata; `None` if it does not exist.
    pub fn head(&self, name: &str) -> io::Result<Option<ObjectMeta>> {
        let path = self.path(name)?;
        self.runtime.block_on(self.head_async(&path)).map_err(|e| self.error(name, e))
    }

    async fn head_async(&self, path: &ObjectPath) -> object_store::Result<Option<ObjectMeta>> {
        self.count(1);
        match self.store.head(path).await {
            Ok(meta) => Ok(Some(ObjectMeta::from_store(meta))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every object whose name starts with `prefix` (`""` for all), sorted by name.
    pub fn list(&self, prefix: &str) -> io::Result<Vec<ObjectMeta>> {
        // S3 lists by any string prefix but object_store only by whole segments: list the last complete
        // directory and filter.
        let dir = prefix.rfind('/').map_or("", |i| &prefix[..i]);
        let dir = match dir {
            "" => None,
            d => Some(ObjectPath::parse(d).map_err(|e| invalid(format!("bad list prefix {prefix:?}: {e}")))?),
        };
        let (listed, result) = self.runtime.block_on(async {
            let mut stream = self.store.list(dir.as_ref());
            let (mut listed, mut out) = (0u64, Vec::new());
            while let Some(meta) = stream.next().await {
                let meta = match meta {
                    Ok(m) => m,
                    Err(e) => return (listed, Err(e)),
                };
                listed += 1;
                let meta = ObjectMeta::from_store(meta);
                if meta.name.starts_with(prefix) {
                    out.push(meta);
                }
            }
            (listed, Ok(out))
        });
        self.count(listed.div_ceil(LIST_PAGE).max(1));
        let mut out = result.map_err(|e| self.error(prefix, e))?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Deletes an object; deleting a missing object is not an error.
    pub fn delete(&self, name: &str) -> io::Result<()> {
        let path = self.path(name)?;
        self.count(1);
        match self.runtime.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(name, e)),
        }
    }

    fn count(&self, n: u64) {
        self.requests.fetch_add(n, Ordering::Relaxed);
    }

    fn path(&self, name: &str) -> io::Result<ObjectPath> {
        check_name(name)?;
        ObjectPath::parse(name).map_err(|e| invalid(format!("bad object name {name:?}: {e}")))
    }

    fn object_url(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }

    fn missing(&self, name: &str) -> io::Error {
        io::Error::new(io::ErrorKind::NotFound, format!("{}: no such object", self.object_url(name)))
    }

    fn past_end(&self, name: &str, offset: u64, end: u64, size: u64) -> io::Error {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "{}: reading bytes {offset}..{end} past the end of the object ({size} bytes)",
                self.object_url(name)
            ),
        )
    }

    /// An io::Error naming the object, keeping the error's kind where io has one.
    fn error(&self, name: &str, e: object_store::Error) -> io::Error {
        use object_store::Error as E;
        let text = describe(&e);
        let (kind, hint) = match &e {
            // Not a missing object, which callers take for "no repository here" or for damage.
            _ if text.contains("NoSuchBucket") => (
                io::ErrorKind::Other,
                format!(
                    " (the bucket of {} does not exist: create it first, with the storage provider's tools)",
                    self.url
                ),
            ),
            E::NotFound { .. } => (io::ErrorKind::NotFound, String::new()),
            E::AlreadyExists { .. } | E::Precondition { .. } => (io::ErrorKind::AlreadyExists, String::new()),
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => (
                io::ErrorKind::PermissionDenied,
                " (check the credentials, and that they may use this bucket and prefix)".to_string(),
            ),
            _ if connect_failed(&e) => (
                io::ErrorKind::Other,
                format!(" (cannot reach {}: check the endpoint and that the server is up)", self.endpoint),
            ),
            _ => (io::ErrorKind::Other, String::new()),
        };
        io::Error::new(kind, format!("{}: {text}{hint}", self.object_url(name)))
    }
}

/// An upload part's bytes, which go back to the spare parts, and free their slot, once sent.
struct Part {
    data: Vec<u8>,
    spares: Arc<Mutex<Vec<Vec<u8>>>>,
    _slot: OwnedSemaphorePermit,
    #[cfg(test)]
    live: Arc<tests::Live>,
}

impl Part {
    fn new(data: Vec<u8>, bucket: &Bucket, slot: OwnedSemaphorePermit) -> Self {
        #[cfg(test)]
        bucket.live_parts.add();
        Part {
            data,
            spares: bucket.spare_parts.clone(),
            _slot: slot,
            #[cfg(test)]
            live: bucket.live_parts.clone(),
        }
    }
}

impl AsRef<[u8]> for Part {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        #[cfg(test)]
        self.live.remove();
        let mut data = std::mem::take(&mut self.data);
        data.clear();
        self.spares.lock().unwrap_or_else(|e| e.into_inner()).push(data);
    }
}

/// The body of one ranged GET, read as it arrives ([`Bucket::read_range`]).
pub struct RangeReader<'a> {
    bucket: &'a Bucket,
    name: String,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    /// What is left of the piece of the body last received.
    chunk: Bytes,
    /// The offset in the object of the next byte to hand on.
    pos: u64,
    /// Where the bytes the server said it would send end (short of `end` if the object is).
    sent: u64,
    /// Where the range asked for ends.
    end: u64,
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            if self.pos >= self.end {
                return Ok(0);
            }
            if self.pos >= self.sent {
                return Err(self.bucket.past_end(&self.name, self.pos, self.end, self.sent));
            }
            match self.bucket.runtime.block_on(self.stream.next()) {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(self.bucket.error(&self.name, e)),
                None => {
                    // The server said it would send up to `sent`: a body cut short is the connection's fault, not
                    // a short object (which readers take as damage).
                    let why = format!("the server stopped sending at byte {} of {}", self.pos, self.sent);
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("{}: {why}", self.bucket.object_url(&self.name)),
                    ));
                }
            }
        }
        let n = buf.len().min(self.chunk.len()).min((self.end - self.pos) as usize);
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        self.pos += n as u64;
        Ok(n)
    }
}

/// `scheme://BUCKET.host/...` from `scheme://host/...`.
fn bucket_host(endpoint: &str, bucket: &str) -> String {
    match endpoint.split_once("://") {
        Some((scheme, host)) => format!("{scheme}://{bucket}.{host}"),
        None => endpoint.to_string(),
    }
}

/// An error and its causes in one line; object_store's own text stops at "error sending request".
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let cause = s.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = s.source();
    }
    compact_xml(&text)
}

/// Replaces an S3 XML error body with its code and message: the rest (request ids, the key again) is noise.
fn compact_xml(text: &str) -> String {
    let Some(start) = text.find("<?xml").or_else(|| text.find("<Error>")) else { return text.to_string() };
    let element = |tag: &str| {
        let from = text[start..].find(&format!("<{tag}>"))? + start + tag.len() + 2;
        let to = text[from..].find(&format!("</{tag}>"))? + from;
        Some(&text[from..to])
    };
    let end = text[start..].find("</Error>").map_or(text.len(), |i| start + i + "</Error>".len());
    let summary = match (element("Code"), element("Message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_string(),
        _ => return text.to_string(),
    };
    format!("{}{summary}{}", &text[..start], &text[end..])
}

/// The HTTP status in the text of a failed request's error ([`describe`]), where it had one. object_store keeps
/// the status in a private type, so its text is what can be read.
fn http_status(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

/// Whether a conditional write was refused for its condition, not its content: servers that speak S3 without
/// conditional writes answer `If-Match` with 501 (`NotImplemented`) or 400.
fn refuses_conditions(e: &object_store::Error) -> bool {
    if matches!(e, object_store::Error::NotImplemented { .. } | object_store::Error::NotSupported { .. }) {
        return true;
    }
    let text = describe(e);
    matches!(http_status(&text), Some(400 | 501)) || text.contains("NotImplemented")
}

/// Whether a failed write may go through if sent again: a conflict, a server error, throttling, or no answer.
fn transient(e: &object_store::Error) -> bool {
    match e {
        object_store::Error::AlreadyExists { .. } => true,
        object_store::Error::Generic { .. } => {
            http_status(&describe(e)).is_none_or(|s| s >= 500 || s == 429 || s == 408)
        }
        _ => false,
    }
}

fn connect_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<HttpError>().is_some_and(|h| h.kind() == HttpErrorKind::Connect) {
            return true;
        }
        source = s.source();
    }
    false
}

/// Pack files in a bucket.
///
/// A new object is spooled to an owner-only temporary file in the spool directory and uploaded when published,
/// so an abandoned writer leaves nothing in the bucket and an upload is all-or-nothing.
pub struct S3Backend {
    bucket: Arc<Bucket>,
    spool_dir: PathBuf,
}

impl S3Backend {
    /// A backend on `bucket`, spooling new objects in `spool_dir` (created if missing). Spool files left by a
    /// writer that was killed are removed: those of a process gone, untouched for an hour.
    pub fn new(bucket: Arc<Bucket>, spool_dir: PathBuf) -> Self {
        if let Ok(entries) = fs::read_dir(&spool_dir) {
            for e in entries.flatten() {
                if left_spool(&e) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        S3Backend { bucket, spool_dir }
    }

    /// The bucket objects live in.
    pub fn bucket(&self) -> &Arc<Bucket> {
        &self.bucket
    }
}

/// Whether a spool directory entry is a file a killed writer left (up to a pack each): named by a process
/// that no longer runs here, and untouched for an hour, which no upload in progress is (an hour also keeps it
/// from a writer in another pid namespace sharing the directory, whose pid means another process here).
fn left_spool(e: &fs::DirEntry) -> bool {
    let name = e.file_name();
    let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("s3-")).and_then(|n| n.split('-').next()) else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else { return false };
    let old = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|a| a.as_secs() > 3600));
    old && pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn spool_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("s3-{}-{nanos}-{}.spool", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

struct S3Writer {
    bucket: Arc<Bucket>,
    temp: PathBuf,
    file: Option<BufWriter<File>>,
}

impl Write for S3Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.as_mut().ok_or_else(|| io::Error::other("writer closed"))?.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().ok_or_else(|| io::Error::other("writer closed"))?.flush()
    }
}

impl ObjectWriter for S3Writer {
    fn publish(mut self: Box<Self>, name: &str) -> io::Result<()> {
        check_name(name)?;
        let file = self.file.take().ok_or_else(|| io::Error::other("writer closed"))?;
        // No fsync: the spool file only has to last until the upload, which reads it back through the cache.
        drop(file.into_inner().map_err(|e| e.into_error())?);
        self.bucket.put_file(name, &self.temp)
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        self.file.take();
        let _ = fs::remove_file(&self.temp);
    }
}

impl Backend for S3Backend {
    fn create(&self) -> io::Result<Box<dyn ObjectWriter>> {
        let context =
            |e: io::Error| io::Error::new(e.kind(), format!("S3 spool directory {}: {e}", self.spool_dir.display()));
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.spool_dir).map_err(context)?;
        let temp = self.spool_dir.join(spool_name());
        let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp).map_err(context)?;
        let file = Some(BufWriter::with_capacity(1 << 20, file));
        Ok(Box::new(S3Writer { bucket: self.bucket.clone(), temp, file }))
    }

    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.bucket.read_at(name, offset, buf)
    }

    fn read_range(&self, name: &str, offset: u64, len: u64) -> io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(self.bucket.read_range(name, offset, len)?))
    }

    fn size(&self, name: &str) -> io::Result<u64> {
        self.bucket.head(name)?.map(|m| m.size).ok_or_else(|| self.bucket.missing(name))
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        // Objects other tools left under the prefix with names the store could not address are not ours.
        let names = self.bucket.list(prefix)?.into_iter().map(|m| m.name);
        Ok(names.filter(|n| check_name(n).is_ok()).collect())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.bucket.delete(name)
    }

    fn concurrent_publish(&self) -> bool {
        true
    }

    fn reads_are_requests(&self) -> bool {
        true
    }

    fn write_memory(&self) -> u64 {
        self.bucket.upload_memory()
    }
}

/// The S3 server tests run against, from `SNAPSTORE_TEST_S3` (e.g. `http://127.0.0.1:9000`).
///
/// `None`, with a note on stderr, when it is unset; but under CI (`CI` set) a missing server is a failure,
/// so that S3 tests cannot silently stop running.
#[doc(hidden)]
pub fn test_endpoint() -> Option<String> {
    if let Some(endpoint) = std::env::var("SNAPSTORE_TEST_S3").ok().filter(|v| !v.is_empty()) {
        return Some(endpoint);
    }
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("CI is set but SNAPSTORE_TEST_S3 is not: start an S3 server (e.g. moto_server) and set it to its URL");
    }
    eprintln!("skipped: SNAPSTORE_TEST_S3 not set");
    None
}

/// Creates a fresh, uniquely named bucket on a test server with an unsigned `PUT /BUCKET` (moto accepts those)
/// and returns `s3://BUCKET/repo`. Panics on failure: it is for tests.
#[doc(hidden)]
pub fn create_test_bucket(endpoint: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let host = endpoint
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("test endpoint {endpoint:?} must be http://HOST:PORT"))
        .trim_end_matches('/');
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let name = format!("t-{}-{}-{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut conn = std::net::TcpStream::connect(host).unwrap_or_else(|e| panic!("connecting to {endpoint}: {e}"));
    // A wedged server should fail the test, not hang it.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let request = format!("PUT /{name} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).unwrap_or_else(|e| panic!("creating bucket {name} at {endpoint}: {e}"));
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap_or_else(|e| panic!("creating bucket {name} at {endpoint}: {e}"));
    let status = response.lines().next().unwrap_or("");
    assert!(status.split_whitespace().nth(1) == Some("200"), "creating bucket {name} at {endpoint}: {response}");
    format!("s3://{name}/repo")
}

/// Settings for the test server at `endpoint`: its keys from the environment, `test` where unset (moto's).
#[cfg(test)]
fn test_settings(endpoint: &str) -> Settings {
    let var = |k: &str, default: &str| std::env::var(k).ok().filter(|v| !v.is_empty()).unwrap_or(default.into());
    Settings {
        endpoint: Some(endpoint.into()),
        ..Settings::new(Credentials::Keys {
            access_key_id: var("AWS_ACCESS_KEY_ID", "test"),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY", "test"),
            session_token: None,
        })
    }
}

/// A fresh bucket on the test server; `None` (test skipped) without one.
#[cfg(test)]
pub(crate) fn test_bucket() -> Option<Bucket> {
    let endpoint = test_endpoint()?;
    let url = create_test_bucket(&endpoint);
    Some(Bucket::connect_with(&url, &test_settings(&endpoint)).unwrap())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    use super::*;

    /// A count of things alive, and the most alive at once.
    #[derive(Default)]
    pub(super) struct Live {
        now: AtomicUsize,
        most: AtomicUsize,
    }

    impl Live {
        pub(super) fn add(&self) {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
        }

        pub(super) fn remove(&self) {
            self.now.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn parses_s3_urls() {
        let parse = |u: &str| parse_s3_url(u).map(|(b, p)| format!("{b}|{p}"));
        assert_eq!(parse("s3://bucket"), Some("bucket|".into()));
        assert_eq!(parse("s3://bucket/"), Some("bucket|".into()));
        assert_eq!(parse("s3://bucket/a/b//"), Some("bucket|a/b".into()));
        assert_eq!(parse("s3://my.bucket-1/repo"), Some("my.bucket-1|repo".into()));
        for bad in ["", "s3://", "s3:///x", "http://bucket/x", "bucket/x", "s3://b/a//b", "s3://b/../x", "s3://b?x"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn reads_ini_sections() {
        let text = "# comment\n[default]\nregion = eu-west-1\n; other comment\n\n[profile  work]\n\
                    AWS_Access_Key_Id=AK\naws_secret_access_key = S=E/C+R\ns3 =\n  endpoint_url = http://ignored\n\
                    [default]\nregion=us-west-2\n";
        assert_eq!(ini_section(text, "default").unwrap()["region"], "us-west-2");
        let work = ini_section(text, "profile work").unwrap();
        assert_eq!(work["aws_access_key_id"], "AK");
        assert_eq!(work["aws_secret_access_key"], "S=E/C+R");
        assert_eq!(work["s3"], "");
        assert!(!work.contains_key("endpoint_url"));
        assert!(ini_section(text, "work").is_none());
        assert!(ini_section("[empty]\n", "empty").unwrap().is_empty());
    }

    /// Settings from a fake environment, with HOME in a fresh directory holding the given profile files.
    fn settings(vars: &[(&str, &str)], credentials: &str, config: &str) -> io::Result<Settings> {
        let home = tempfile::tempdir().unwrap();
        fs::create_dir(home.path().join(".aws")).unwrap();
        if !credentials.is_empty() {
            fs::write(home.path().join(".aws/credentials"), credentials).unwrap();
        }
        if !config.is_empty() {
            fs::write(home.path().join(".aws/config"), config).unwrap();
        }
        let mut env: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        env.insert("HOME".into(), home.path().to_str().unwrap().into());
        Settings::from_lookup(&|k| env.get(k).cloned())
    }

    fn keys(s: &Settings) -> (String, String, Option<String>) {
        match &s.credentials {
            Credentials::Keys { access_key_id, secret_access_key, session_token } => {
                (access_key_id.clone(), secret_access_key.clone(), session_token.clone())
            }
            other => panic!("expected keys, got {other:?}"),
        }
    }

    #[test]
    fn settings_come_from_profile_files() {
        let creds = "[default]\naws_access_key_id = D\naws_secret_access_key = DS\n\
                     [work]\naws_access_key_id = W\naws_secret_access_key = WS\naws_session_token = WT\n";
        let config =
            "[default]\nregion = eu-west-1\n[profile work]\nregion = ap-south-1\nendpoint_url = http://minio:9000\n";
        let s = settings(&[], creds, config).unwrap();
        assert_eq!(keys(&s), ("D".into(), "DS".into(), None));
        assert_eq!((s.region.as_str(), s.endpoint.as_deref()), ("eu-west-1", None));
        let s = settings(&[("AWS_PROFILE", "work")], creds, config).unwrap();
        assert_eq!(keys(&s), ("W".into(), "WS".into(), Some("WT".into())));
        assert_eq!((s.region.as_str(), s.endpoint.as_deref()), ("ap-south-1", Some("http://minio:9000")));
        // Keys may sit in the config file too.
        let s = settings(&[], "", "[default]\naws_access_key_id = C\naws_secret_access_key = CS\n").unwrap();
        assert_eq!(keys(&s).0, "C");
        assert_eq!(s.region, "us-east-1");
        // Other file locations.
        let dir = tempfile::tempdir().unwrap();
        let (c, f) = (dir.path().join("c"), dir.path().join("f"));
        fs::write(&c, "[default]\naws_access_key_id = X\naws_secret_access_key = XS\n").unwrap();
        fs::write(&f, "[default]\nregion = sa-east-1\n").unwrap();
        let vars = [("AWS_SHARED_CREDENTIALS_FILE", c.to_str().unwrap()), ("AWS_CONFIG_FILE", f.to_str().unwrap())];
        let s = settings(&vars, creds, config).unwrap();
        assert_eq!((keys(&s).0.as_str(), s.region.as_str()), ("X", "sa-east-1"));
    }

    #[test]
    fn environment_wins_over_profile_files() {
        let creds = "[default]\naws_access_key_id = D\naws_secret_access_key = DS\n";
        let config = "[default]\nregion = eu-west-1\nendpoint_url = http://file:1\n";
        let vars = [
            ("AWS_ACCESS_KEY_ID", "E"),
            ("AWS_SECRET_ACCESS_KEY", "ES"),
            ("AWS_SESSION_TOKEN", "ET"),
            ("AWS_DEFAULT_REGION", "us-west-1"),
            ("AWS_ENDPOINT_URL", "http://env:2"),
            ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "true"),
        ];
        let s = settings(&vars, creds, config).unwrap();
        assert_eq!(keys(&s), ("E".into(), "ES".into(), Some("ET".into())));
        assert_eq!((s.region.as_str(), s.endpoint.as_deref()), ("us-west-1", Some("http://env:2")));
        assert_eq!(s.virtual_hosted_style, Some(true));
        let more = [&vars[..], &[("AWS_REGION", "us-east-2"), ("AWS_ENDPOINT_URL_S3", "http://s3:3")]].concat();
        let s = settings(&more, creds, config).unwrap();
        assert_eq!((s.region.as_str(), s.endpoint.as_deref()), ("us-east-2", Some("http://s3:3")));
        // Empty variables count as unset.
        let s = settings(&[("AWS_ACCESS_KEY_ID", ""), ("AWS_REGION", "")], creds, config).unwrap();
        assert_eq!((keys(&s).0.as_str(), s.region.as_str()), ("D", "eu-west-1"));
        assert_eq!(s.upload_parts, 3);
        assert_eq!(settings(&[("SNAPSTORE_S3_UPLOAD_PARTS", "16")], creds, "").unwrap().upload_parts, 16);
        for bad in ["0", "-1", "many"] {
            let e = settings(&[("SNAPSTORE_S3_UPLOAD_PARTS", bad)], creds, "").unwrap_err();
            assert!(e.to_string().contains("SNAPSTORE_S3_UPLOAD_PARTS"), "{e}");
        }
    }

    #[test]
    fn missing_credentials_say_what_to_set() {
        let e = settings(&[], "", "[default]\nregion = eu-west-1\n").unwrap_err();
        let msg = e.to_string();
        for needle in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            ".aws/credentials",
            "AWS_PROFILE",
            "AWS_EC2_METADATA_ENABLED",
        ] {
            assert!(msg.contains(needle), "{needle} not in {msg}");
        }
        let e = settings(&[("AWS_ACCESS_KEY_ID", "A")], "", "").unwrap_err();
        assert!(e.to_string().contains("AWS_SECRET_ACCESS_KEY is not"), "{e}");
        let e = settings(&[], "[default]\naws_access_key_id = A\n", "").unwrap_err();
        assert!(e.to_string().contains("no aws_secret_access_key"), "{e}");
        let e = settings(&[("AWS_PROFILE", "sso")], "", "[profile sso]\nsso_session = corp\n").unwrap_err();
        assert!(e.to_string().contains("export-credentials"), "{e}");
        let e = settings(&[("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "maybe")], "", "").unwrap_err();
        assert!(e.to_string().contains("true or false"), "{e}");
    }

    #[test]
    fn other_credential_sources_need_their_variables() {
        let s = settings(&[("AWS_WEB_IDENTITY_TOKEN_FILE", "/t"), ("AWS_ROLE_ARN", "arn:r")], "", "").unwrap();
        assert!(matches!(&s.credentials, Credentials::Ambient(v) if v.len() == 2), "{:?}", s.credentials);
        let s = settings(&[("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/creds")], "", "").unwrap();
        assert!(matches!(&s.credentials, Credentials::Ambient(v) if v.len() == 1));
        // A full URI without its token file would make object_store fall through to the metadata service.
        assert!(settings(&[("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://x")], "", "").is_err());
        let s = settings(&[("AWS_EC2_METADATA_ENABLED", "true")], "", "").unwrap();
        assert!(matches!(s.credentials, Credentials::InstanceMetadata));
        let both = [("AWS_EC2_METADATA_ENABLED", "true"), ("AWS_EC2_METADATA_DISABLED", "true")];
        assert!(settings(&both, "", "").is_err());
        // Connecting with them needs no network.
        for vars in [
            &[("AWS_WEB_IDENTITY_TOKEN_FILE", "/t"), ("AWS_ROLE_ARN", "arn:r")][..],
            &[("AWS_EC2_METADATA_ENABLED", "1")],
        ] {
            Bucket::connect_with("s3://b/p", &settings(vars, "", "").unwrap()).unwrap();
        }
    }

    #[test]
    fn xml_error_bodies_are_compacted() {
        let text = "404 Not Found: <?xml version=\"1.0\"?>\n<Error><Code>NoSuchKey</Code><Message>The key does not \
                    exist.</Message><RequestId>R</RequestId></Error> (hint)";
        assert_eq!(compact_xml(text), "404 Not Found: NoSuchKey: The key does not exist. (hint)");
        assert_eq!(compact_xml("no xml here"), "no xml here");
        assert_eq!(compact_xml("bad: <Error>truncated"), "bad: <Error>truncated");
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let s = Settings::new(Credentials::Keys {
            access_key_id: "AKID".into(),
            secret_access_key: "SECRET".into(),
            session_token: Some("TOKEN".into()),
        });
        let text = format!("{s:?}");
        assert!(text.contains("AKID") && !text.contains("SECRET") && !text.contains("TOKEN"), "{text}");
    }

    #[test]
    fn connect_checks_its_arguments() {
        let settings = Settings::new(Credentials::Keys {
            access_key_id: "a".into(),
            secret_access_key: "b".into(),
            session_token: None,
        });
        let b = Bucket::connect_with("s3://bucket/some/prefix/", &settings).unwrap();
        assert_eq!(b.url(), "s3://bucket/some/prefix");
        assert_eq!(Bucket::connect_with("s3://bucket", &settings).unwrap().url(), "s3://bucket");
        let e = Bucket::connect_with("/local/path", &settings).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let ftp = Settings { endpoint: Some("ftp://x".into()), ..settings.clone() };
        assert!(Bucket::connect_with("s3://bucket", &ftp).is_err());
        for bad in ["../x", "/abs", "a//b", "a b"] {
            assert_eq!(b.get(bad).unwrap_err().kind(), io::ErrorKind::InvalidInput, "{bad}");
            assert_eq!(b.put(bad, vec![]).unwrap_err().kind(), io::ErrorKind::InvalidInput, "{bad}");
        }
        assert_eq!(b.requests(), 0);
        assert_eq!(bucket_host("https://minio.example:9000", "b"), "https://b.minio.example:9000");
    }

    /// A killed writer's spool file is removed by the next backend on the directory; a file that may still be
    /// in use (its process runs, or it was written within the hour), or that is not a spool file, stays.
    #[test]
    fn spool_files_a_killed_writer_left_are_removed() {
        let settings = Settings::new(Credentials::Keys {
            access_key_id: "a".into(),
            secret_access_key: "b".into(),
            session_token: None,
        });
        let bucket = Arc::new(Bucket::connect_with("s3://bucket/p", &settings).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        let me = std::process::id();
        let files = [
            ("s3-4194303-1-0.spool".to_string(), true, false),
            ("s3-4194303-2-0.spool".to_string(), false, true),
            (format!("s3-{me}-3-0.spool"), true, true),
            ("notes.txt".to_string(), true, true),
        ];
        for (name, old, _) in &files {
            let f = fs::File::create(dir.path().join(name)).unwrap();
            if *old {
                f.set_modified(hour_ago).unwrap();
            }
        }
        S3Backend::new(bucket, dir.path().to_path_buf());
        for (name, _, stays) in &files {
            assert_eq!(dir.path().join(name).exists(), *stays, "{name}");
        }
    }

    /// Settings for the test server, with whatever keys the environment has (moto takes any).
    #[test]
    fn s3_keeps_the_backend_contract() {
        let Some(bucket) = test_bucket() else { return };
        let spool = tempfile::tempdir().unwrap();
        let backend = S3Backend::new(Arc::new(bucket), spool.path().join("spool"));
        super::super::tests::exercise(&backend);
        assert_eq!(fs::read_dir(spool.path().join("spool")).unwrap().count(), 0, "spool files left behind");
        assert_eq!(backend.size("packs/00/missing.pack").unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    /// Of two writers that read one version, the second to write over it is refused and changes nothing.
    #[test]
    fn replacing_is_conditional_on_the_version_read() {
        let Some(b) = test_bucket() else { return };
        assert!(b.get_versioned("locks/x").unwrap().is_none());
        b.put("locks/x", b"one".to_vec()).unwrap();
        let read = b.get_versioned("locks/x").unwrap().unwrap();
        assert_eq!(read.body, b"one");
        assert!(read.e_tag.is_some() && read.modified_ns > 0);
        let e_tag = read.e_tag.as_deref();
        assert_eq!(b.replace("locks/x", b"two".to_vec(), e_tag).unwrap(), Replaced::Done);
        assert_eq!(b.replace("locks/x", b"three".to_vec(), e_tag).unwrap(), Replaced::Changed);
        assert_eq!(b.get("locks/x").unwrap(), b"two");
        assert_eq!(b.replace("locks/x", b"four".to_vec(), None).unwrap(), Replaced::Unsupported);
        let now = b.get_versioned("locks/x").unwrap().unwrap().e_tag;
        b.delete("locks/x").unwrap();
        assert_eq!(b.replace("locks/x", b"five".to_vec(), now.as_deref()).unwrap(), Replaced::Changed);
        assert!(b.head("locks/x").unwrap().is_none(), "a deleted object is not written back");
    }

    #[test]
    fn servers_without_conditional_writes_are_recognised() {
        let generic = |text: &str| object_store::Error::Generic { store: "S3", source: text.to_string().into() };
        let refused = "Server returned non-2xx status code: 501 Not Implemented: <?xml version=\"1.0\"?>\
                       <Error><Code>NotImplemented</Code><Message>A header you provided implies functionality that \
                       is not implemented</Message></Error>";
        let status = |code: &str| generic(&format!("Server returned non-2xx status code: {code}: "));
        assert!(refuses_conditions(&generic(refused)));
        assert!(refuses_conditions(&status("501 Not Implemented")) && refuses_conditions(&status("400 Bad Request")));
        assert!(
            !refuses_conditions(&status("503 Service Unavailable")) && !refuses_conditions(&status("403 Forbidden"))
        );
        assert!(!refuses_conditions(&generic("error sending request")));
        // What `replace` sends again: a conflict, a server error, throttling, no answer; not a refusal.
        assert!(transient(&status("503 Service Unavailable")) && transient(&status("500 Internal Server Error")));
        assert!(transient(&status("429 Too Many Requests")) && transient(&generic("error sending request")));
        assert!(!transient(&status("403 Forbidden")) && !transient(&status("404 Not Found")));
    }

    #[test]
    fn s3_ranges_stream_in_one_request() {
        let Some(b) = test_bucket() else { return };
        let data = crate::testutil::pseudo_random(3 << 20, 21);
        b.put("packs/aa/r.pack", data.clone()).unwrap();
        let before = b.requests();
        // Taken in small reads, as blobs are: one request, every byte in order.
        let mut r = b.read_range("packs/aa/r.pack", 1000, 2 << 20).unwrap();
        let mut got = Vec::new();
        let mut piece = [0u8; 1000];
        loop {
            match r.read(&mut piece).unwrap() {
                0 => break,
                n => got.extend_from_slice(&piece[..n]),
            }
        }
        assert!(got == data[1000..1000 + (2 << 20)]);
        assert_eq!(b.requests(), before + 1);
        // A range past the object's end hands on what exists, then fails where the object ends.
        let mut r = b.read_range("packs/aa/r.pack", (3 << 20) - 10, 20).unwrap();
        let mut tail = [0u8; 10];
        r.read_exact(&mut tail).unwrap();
        assert_eq!(tail[..], data[(3 << 20) - 10..]);
        let e = r.read(&mut tail).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("packs/aa/r.pack"), "{e}");
        let mut beyond = b.read_range("packs/aa/r.pack", 4 << 20, 5).unwrap();
        assert_eq!(beyond.read(&mut tail).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(b.read_range("packs/aa/r.pack", 5, 0).unwrap().read(&mut tail).unwrap(), 0);
        let e = b.read_range("packs/aa/r.pack", 4 << 20, 0).err().expect("an empty range past the end");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(b.read_range("packs/aa/none.pack", 0, 5).err().unwrap().kind(), io::ErrorKind::NotFound);
        assert_eq!(b.read_range("packs/aa/none.pack", 0, 0).err().unwrap().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn s3_small_objects() {
        let Some(b) = test_bucket() else { return };
        let e = b.get("x/missing").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("repo/x/missing") && e.to_string().contains("NoSuchKey"), "{e}");
        assert!(!e.to_string().contains('\n'), "{e}");
        assert!(b.head("x/missing").unwrap().is_none());
        let mut buf = [0u8; 1];
        assert_eq!(b.read_at("x/missing", 0, &mut buf).unwrap_err().kind(), io::ErrorKind::NotFound);
        b.delete("x/missing").unwrap();
        b.put("a/1", b"one".to_vec()).unwrap();
        b.put("a/2", b"two!".to_vec()).unwrap();
        b.put("ab", vec![]).unwrap();
        b.put("b/3", b"3".to_vec()).unwrap();
        b.put("a/1", b"ONE".to_vec()).unwrap();
        assert_eq!(b.get("a/1").unwrap(), b"ONE");
        assert_eq!(b.head("a/2").unwrap().unwrap().size, 4);
        let names = |p: &str| b.list(p).unwrap().into_iter().map(|m| m.name).collect::<Vec<_>>();
        assert_eq!(names(""), ["a/1", "a/2", "ab", "b/3"]);
        assert_eq!(names("a"), ["a/1", "a/2", "ab"]);
        assert_eq!(names("a/"), ["a/1", "a/2"]);
        assert_eq!(names("b/3"), ["b/3"]);
        assert!(names("c/").is_empty());
        let mut out = Vec::new();
        assert_eq!(b.get_to("ab", &mut out).unwrap(), 0);
        assert!(out.is_empty());
        assert_eq!(b.read_at("ab", 0, &mut buf).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        b.read_at("ab", 0, &mut []).unwrap();
        assert!(b.list("").unwrap()[0].modified_ns > 1_600_000_000_000_000_000);
        b.delete("a/1").unwrap();
        assert_eq!(names("a/"), ["a/2"]);
        assert!(b.requests() > 15);
    }

    #[test]
    fn s3_create_is_exclusive() {
        let Some(b) = test_bucket() else { return };
        assert!(b.create("locks/one", b"first".to_vec()).unwrap());
        assert!(!b.create("locks/one", b"second".to_vec()).unwrap());
        assert_eq!(b.get("locks/one").unwrap(), b"first");
        let winners = std::thread::scope(|s| {
            let racers: Vec<_> = (0..8)
                .map(|i| {
                    let b = &b;
                    s.spawn(move || b.create("locks/race", format!("racer {i}").into_bytes()).unwrap())
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).filter(|&won| won).count()
        });
        assert_eq!(winners, 1);
    }

    #[test]
    fn s3_big_files_go_up_in_parts() {
        let Some(b) = test_bucket() else { return };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big");
        let data: Vec<u8> = (0..20u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        fs::write(&file, &data).unwrap();
        let before = b.requests();
        b.put_file("packs/cd/big.pack", &file).unwrap();
        // Its parts, plus starting and completing the upload.
        assert_eq!(b.requests() - before, data.len().div_ceil(PART_SIZE) as u64 + 2);
        assert_eq!(b.head("packs/cd/big.pack").unwrap().unwrap().size, data.len() as u64);
        let mut out = Vec::new();
        assert_eq!(b.get_to("packs/cd/big.pack", &mut out).unwrap(), data.len() as u64);
        assert!(out == data, "downloaded bytes differ");
        // In ranges, as objects bigger than GET_SEGMENT are fetched.
        let (mut out, before) = (Vec::new(), b.requests());
        assert_eq!(b.get_in_ranges("packs/cd/big.pack", &mut out, 3 << 20).unwrap(), data.len() as u64);
        assert!(out == data, "bytes downloaded in ranges differ");
        assert_eq!(b.requests() - before, 7);
        let mut buf = vec![0u8; 100_000];
        let offset = (12 << 20) + 12_345;
        b.read_at("packs/cd/big.pack", offset, &mut buf).unwrap();
        assert!(buf[..] == data[offset as usize..offset as usize + buf.len()]);
        // Straddling the end, and wholly past it.
        for offset in [data.len() as u64 - 10, data.len() as u64 + 10] {
            let e = b.read_at("packs/cd/big.pack", offset, &mut buf).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
            assert!(e.to_string().contains("packs/cd/big.pack"), "{e}");
        }
        // Just below the multipart threshold: one request.
        fs::write(&file, &data[..PART_SIZE - 1]).unwrap();
        let before = b.requests();
        b.put_file("packs/cd/small.pack", &file).unwrap();
        assert_eq!(b.requests() - before, 1);
        assert!(b.get("packs/cd/small.pack").unwrap() == data[..PART_SIZE - 1]);
        // Whole parts, the last as full as the others: no empty part is read or sent.
        for parts in [1, 2] {
            fs::write(&file, &data[..parts * PART_SIZE]).unwrap();
            let before = b.requests();
            b.put_file("packs/cd/whole.pack", &file).unwrap();
            assert_eq!(b.requests() - before, parts as u64 + 2);
            assert!(b.get("packs/cd/whole.pack").unwrap() == data[..parts * PART_SIZE]);
        }
        let e = b.put_file("packs/cd/x.pack", &dir.path().join("absent")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("absent"), "{e}");
    }

    #[test]
    fn s3_uploads_at_once_share_the_upload_slots() {
        let Some(endpoint) = test_endpoint() else { return };
        let settings = Settings { upload_parts: 2, ..test_settings(&endpoint) };
        let b = Bucket::connect_with(&create_test_bucket(&endpoint), &settings).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<(PathBuf, Vec<u8>)> = (0..3)
            .map(|i| {
                let data = crate::testutil::pseudo_random(3 * PART_SIZE + 1000 * i, 50 + i as u64);
                let path = dir.path().join(format!("f{i}"));
                fs::write(&path, &data).unwrap();
                (path, data)
            })
            .collect();
        std::thread::scope(|s| {
            for (i, (path, _)) in files.iter().enumerate() {
                let b = &b;
                s.spawn(move || b.put_file(&format!("packs/ee/{i}.pack"), path).unwrap());
            }
        });
        for (i, (_, data)) in files.iter().enumerate() {
            assert!(b.get(&format!("packs/ee/{i}.pack")).unwrap() == *data, "upload {i} differs");
        }
        // Parts in memory never outnumber the slots, however many uploads ran at once (11 parts in all).
        assert_eq!(b.live_parts.most.load(Ordering::SeqCst), 2);
        assert_eq!(b.live_parts.now.load(Ordering::SeqCst), 0);
        assert!(b.spare_parts.lock().unwrap().len() <= 2);
        assert_eq!(b.upload_slots.available_permits(), 2);
        // What a commit leaves to these uploads out of its own budget (`Backend::write_memory`).
        let backend = S3Backend::new(Arc::new(b), dir.path().join("spool"));
        assert_eq!(crate::backend::Backend::write_memory(&backend), 2 * PART_SIZE as u64);
    }

    #[test]
    fn s3_server_down_fails_fast() {
        let settings = Settings {
            max_retries: 2,
            retry_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(2),
            ..test_settings("http://127.0.0.1:1")
        };
        let b = Bucket::connect_with("s3://down/repo", &settings).unwrap();
        let start = Instant::now();
        let e = b.put("packs/00/x.pack", b"x".to_vec()).unwrap_err();
        let msg = e.to_string();
        assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
        assert!(msg.contains("s3://down/repo/packs/00/x.pack") && msg.contains("127.0.0.1:1"), "{msg}");
        assert!(msg.to_lowercase().contains("refused"), "{msg}");
        assert!(b.list("").is_err());
    }

    /// An https endpoint is spoken to in TLS (CI's moto speaks plain HTTP): the crypto provider is in place
    /// and the client opens with a handshake record, then fails cleanly on a peer that is no TLS server.
    #[test]
    fn s3_https_endpoint_speaks_tls() {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let first_bytes = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut head = [0u8; 3];
            conn.read_exact(&mut head).map(|()| head)
        });
        let settings = Settings {
            max_retries: 0,
            retry_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            ..test_settings(&format!("https://127.0.0.1:{port}"))
        };
        let b = Bucket::connect_with("s3://tls/repo", &settings).unwrap();
        assert!(b.put("packs/00/x.pack", b"x".to_vec()).is_err());
        let head = first_bytes.join().unwrap().expect("the client sent nothing");
        // A TLS record: content type 22 (handshake), protocol version 3.x.
        assert_eq!((head[0], head[1]), (22, 3), "{head:?}");
    }
}
