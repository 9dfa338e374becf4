//! One bucket (and key prefix) of an S3-compatible object store, and the few calls the archive
//! makes: whole objects, conditional creation, listing, deletion, and resumable multipart uploads
//! of files. aws-sdk-s3 without its default features: HTTPS through rustls with ring, a custom
//! endpoint and path-style addressing for servers other than AWS, checksums only where an
//! operation requires one.

use anyhow::{Context, Result, bail};
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Where the archive is and how to reach it. Credentials come from the environment
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`): in a cluster, a Secret
/// through `envFrom`.
#[derive(clap::Args, Debug, Clone)]
pub struct BucketArgs {
    /// Bucket of the archive tier (S3 or S3-compatible); no archive without it.
    #[arg(long = "archive-bucket", env = "UNDERSTUDY_ARCHIVE_BUCKET")]
    pub bucket: Option<String>,
    /// Key prefix inside the bucket (one bucket can hold several archives).
    #[arg(
        long = "archive-prefix",
        env = "UNDERSTUDY_ARCHIVE_PREFIX",
        default_value = ""
    )]
    pub prefix: String,
    /// Endpoint URL of an S3-compatible server (https://minio.example:9000); default: AWS.
    #[arg(long = "archive-endpoint", env = "UNDERSTUDY_ARCHIVE_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Region of the bucket.
    #[arg(
        long = "archive-region",
        env = "AWS_REGION",
        default_value = "us-east-1"
    )]
    pub region: String,
    /// Path-style addressing (endpoint/bucket/key), which most servers other than AWS need.
    #[arg(long = "archive-path-style", env = "UNDERSTUDY_ARCHIVE_PATH_STYLE")]
    pub path_style: bool,
}

/// An object's name (below the prefix) and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    /// Its key without the archive's prefix.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// What a multipart upload did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Upload {
    /// Parts sent now.
    pub parts_sent: u32,
    /// Parts an interrupted upload had already sent (kept, not sent again).
    pub parts_resumed: u32,
    /// Bytes sent now.
    pub bytes_sent: u64,
}

/// Parts of a multipart upload: 16 MiB (S3 wants at least 5 MiB but for the last).
pub const PART_SIZE: u64 = 16 << 20;

/// A bucket and prefix, with a client for it.
#[derive(Clone)]
pub struct Bucket {
    client: Client,
    bucket: String,
    prefix: String,
}

impl Bucket {
    /// A client for the archive of `args`; `None` when no bucket is configured. Fails when the
    /// environment holds no credentials.
    pub fn from_args(args: &BucketArgs) -> Result<Option<Self>> {
        let Some(bucket) = &args.bucket else {
            return Ok(None);
        };
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let (Some(id), Some(secret)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY"))
        else {
            bail!(
                "--archive-bucket {bucket} needs credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (read-only ones are enough to restore or fail over)"
            );
        };
        let keys = Credentials::new(id, secret, var("AWS_SESSION_TOKEN"), None, "environment");
        Ok(Some(Self::connect(args, bucket, keys)))
    }

    /// A client for `bucket` as `args` say, with these credentials.
    pub fn connect(args: &BucketArgs, bucket: &str, creds: Credentials) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(args.region.clone()))
            .credentials_provider(creds)
            .http_client(http)
            .force_path_style(args.path_style)
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            );
        if let Some(e) = &args.endpoint {
            conf = conf.endpoint_url(e);
        }
        let mut prefix = args.prefix.trim_matches('/').to_string();
        if !prefix.is_empty() {
            prefix.push('/');
        }
        Bucket {
            client: Client::from_conf(conf.build()),
            bucket: bucket.to_string(),
            prefix,
        }
    }

    /// Creates the bucket (a new archive's; a bucket this user already owns is fine).
    pub async fn create_bucket(&self) -> Result<()> {
        let r = self
            .client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BucketAlreadyOwnedByYou") => Ok(()),
            Err(e) => Err(self.failed("CREATE BUCKET", "", e)),
        }
    }

    /// Sets the bucket's access policy (a JSON policy document): how an operator grants
    /// read-only keys for restores and failovers.
    pub async fn set_policy(&self, policy: &str) -> Result<()> {
        self.client
            .put_bucket_policy()
            .bucket(&self.bucket)
            .policy(policy)
            .send()
            .await
            .map_err(|e| self.failed("PUT POLICY", "", e))?;
        Ok(())
    }

    /// `bucket/prefix` for messages.
    pub fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Writes object `name`.
    pub async fn put(&self, name: &str, body: Vec<u8>) -> Result<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key(name))
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.failed("PUT", name, e))?;
        Ok(())
    }

    /// Writes object `name` only if it does not exist (If-None-Match: *); false when it did.
    pub async fn put_new(&self, name: &str, body: Vec<u8>) -> Result<bool> {
        let r = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key(name))
            .if_none_match("*")
            .body(ByteStream::from(body))
            .send()
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) if status(&e) == Some(412) => Ok(false),
            Err(e) => Err(self.failed("PUT", name, e)),
        }
    }

    /// Reads object `name`; `None` when there is none.
    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let r = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.key(name))
            .send()
            .await;
        let out = match r {
            Ok(o) => o,
            Err(e) if status(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(self.failed("GET", name, e)),
        };
        let body = out
            .body
            .collect()
            .await
            .with_context(|| format!("reading {}{name} broke off", self.describe()))?;
        Ok(Some(body.into_bytes().to_vec()))
    }

    /// The objects whose names start with `dir`, in name order.
    pub async fn list(&self, dir: &str) -> Result<Vec<Object>> {
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(self.key(dir))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.failed("LIST", dir, e))?;
            for o in page.contents() {
                let Some(name) = o.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                    continue;
                };
                out.push(Object {
                    name: name.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Deletes object `name` (nothing when it is not there).
    pub async fn delete(&self, name: &str) -> Result<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.key(name))
            .send()
            .await
            .map_err(|e| self.failed("DELETE", name, e))?;
        Ok(())
    }

    /// Uploads the first `len` bytes of file `path` as object `name` in parts of
    /// [`PART_SIZE`]. An upload of `name` an earlier run left unfinished is continued: its parts
    /// of the right sizes are kept, the rest sent. Other unfinished uploads of `name` are
    /// aborted.
    pub async fn upload_file(&self, name: &str, path: &Path, len: u64) -> Result<Upload> {
        let have = std::fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        anyhow::ensure!(
            have >= len,
            "{} holds {have} bytes, fewer than the {len} to upload",
            path.display()
        );
        let parts = len.div_ceil(PART_SIZE).max(1);
        let (id, done) = self.resume_or_create(name, len).await?;
        let mut report = Upload::default();
        let file = std::sync::Arc::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        );
        let mut completed = Vec::new();
        for n in 1..=parts {
            let start = (n - 1) * PART_SIZE;
            let size = PART_SIZE.min(len - start);
            let etag = match done.iter().find(|(p, _, s)| *p == n as i32 && *s == size) {
                Some((_, etag, _)) => {
                    report.parts_resumed += 1;
                    etag.clone()
                }
                None => {
                    let body = read_at(&file, start, size).await?;
                    let etag = self.send_part(name, &id, n as i32, body).await?;
                    report.parts_sent += 1;
                    report.bytes_sent += size;
                    etag
                }
            };
            completed.push(
                CompletedPart::builder()
                    .part_number(n as i32)
                    .e_tag(etag)
                    .build(),
            );
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(self.key(name))
            .upload_id(&id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(completed))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.failed("COMPLETE UPLOAD", name, e))?;
        Ok(report)
    }

    /// The upload of `name` to continue (its id and the parts it holds: number, ETag, size), or
    /// a new one. Other unfinished uploads of `name` are aborted.
    async fn resume_or_create(
        &self,
        name: &str,
        len: u64,
    ) -> Result<(String, Vec<(i32, String, u64)>)> {
        let mut ids = self.unfinished(name).await?;
        if let Some(id) = ids.pop() {
            for other in ids {
                self.abort(name, &other).await?;
            }
            let parts = self.parts_of(name, &id).await?;
            if parts.iter().all(|(_, _, s)| *s <= len) {
                return Ok((id, parts));
            }
            self.abort(name, &id).await?;
        }
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(self.key(name))
            .send()
            .await
            .map_err(|e| self.failed("CREATE UPLOAD", name, e))?;
        let id = out
            .upload_id()
            .with_context(|| format!("{} gave no upload id for {name}", self.describe()))?;
        Ok((id.to_string(), Vec::new()))
    }

    /// Ids of the unfinished uploads of `name`, oldest first.
    async fn unfinished(&self, name: &str) -> Result<Vec<String>> {
        Ok(self
            .uploads(name)
            .await?
            .into_iter()
            .filter(|(n, _)| n == name)
            .map(|(_, id)| id)
            .collect())
    }

    /// Unfinished uploads (name, id) of objects whose names start with `dir`, oldest first.
    pub async fn uploads(&self, dir: &str) -> Result<Vec<(String, String)>> {
        let out = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(self.key(dir))
            .send()
            .await
            .map_err(|e| self.failed("LIST UPLOADS", dir, e))?;
        let mut ups: Vec<_> = out
            .uploads()
            .iter()
            .filter_map(|u| {
                let name = u.key()?.strip_prefix(&self.prefix)?.to_string();
                Some((
                    u.initiated().map(|t| t.secs()),
                    name,
                    u.upload_id()?.to_string(),
                ))
            })
            .collect();
        ups.sort();
        Ok(ups.into_iter().map(|(_, n, id)| (n, id)).collect())
    }

    /// Aborts upload `id` of `name`: the server drops the parts it holds.
    pub async fn abort(&self, name: &str, id: &str) -> Result<()> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(self.key(name))
            .upload_id(id)
            .send()
            .await
            .map_err(|e| self.failed("ABORT UPLOAD", name, e))?;
        Ok(())
    }

    /// The parts upload `id` of `name` holds: number, ETag, size.
    pub async fn parts_of(&self, name: &str, id: &str) -> Result<Vec<(i32, String, u64)>> {
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_parts()
            .bucket(&self.bucket)
            .key(self.key(name))
            .upload_id(id)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.failed("LIST PARTS", name, e))?;
            for p in page.parts() {
                if let (Some(n), Some(etag)) = (p.part_number(), p.e_tag()) {
                    out.push((n, etag.to_string(), p.size().unwrap_or(0).max(0) as u64));
                }
            }
        }
        Ok(out)
    }

    async fn send_part(&self, name: &str, id: &str, n: i32, body: Vec<u8>) -> Result<String> {
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(self.key(name))
            .upload_id(id)
            .part_number(n)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.failed("UPLOAD PART", name, e))?;
        out.e_tag()
            .map(str::to_string)
            .with_context(|| format!("{} gave no ETag for part {n} of {name}", self.describe()))
    }

    /// Downloads object `name` into `path` (created, fsynced); its size.
    pub async fn download_file(&self, name: &str, path: &Path) -> Result<u64> {
        use tokio::io::AsyncWriteExt;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.key(name))
            .send()
            .await
            .map_err(|e| self.failed("GET", name, e))?;
        let mut file = tokio::fs::File::create(path)
            .await
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut body = out.body;
        let mut n = 0u64;
        while let Some(bytes) = body
            .try_next()
            .await
            .with_context(|| format!("reading {}{name} broke off", self.describe()))?
        {
            file.write_all(&bytes)
                .await
                .with_context(|| format!("writing {} failed", path.display()))?;
            n += bytes.len() as u64;
        }
        file.sync_all().await?;
        Ok(n)
    }

    /// An error naming the operation, the object and what the server said.
    fn failed<E>(&self, op: &str, name: &str, e: SdkError<E, HttpResponse>) -> anyhow::Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let hint = match status(&e) {
            Some(403) => "; check the credentials and what they may do",
            Some(404) => "; check the bucket name and the endpoint",
            None => "; check the endpoint and the network",
            _ => "",
        };
        anyhow::anyhow!(
            "{op} {}{name} failed: {}{hint}",
            self.describe(),
            DisplayErrorContext(&e)
        )
    }
}

/// The HTTP status of a failed call, if the server answered.
fn status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    match e {
        SdkError::ServiceError(s) => Some(s.raw().status().as_u16()),
        SdkError::ResponseError(r) => Some(r.raw().status().as_u16()),
        _ => None,
    }
}

/// `len` bytes of `file` from `offset`, read off the async threads.
async fn read_at(file: &std::sync::Arc<std::fs::File>, offset: u64, len: u64) -> Result<Vec<u8>> {
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    })
    .await?
}
