//! The test S3 server: versitygw with its posix backend (built from its Go module by
//! `tests/s3-server/build.sh`, cached), one per test, on 127.0.0.1 at a free port, with its own
//! directory and a bucket in it. Dropping it kills the server and removes the directory.

use crate::free_ports;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use understudy_archive::{Bucket, BucketArgs, Credentials};

/// The root user's access key.
pub const ACCESS_KEY: &str = "understudy-test";
/// The bucket every server starts with.
pub const BUCKET: &str = "standby";

/// A running test S3 server.
pub struct S3Server {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    secret: String,
    binary: PathBuf,
}

impl S3Server {
    /// Starts a server with an empty bucket [`BUCKET`]; `None` when versitygw cannot be built
    /// here (never in CI, where that fails the test).
    pub async fn start() -> Option<Self> {
        let binary = binary()?;
        let dir = tempfile::Builder::new()
            .prefix("understudy-s3-")
            .tempdir()
            .expect("a directory for the S3 server");
        for d in ["data", "meta", "iam"] {
            std::fs::create_dir_all(dir.path().join(d)).expect("the backend directories");
        }
        let [port] = free_ports();
        let secret = format!("{:032x}", crate::testbed::rand_u128());
        let mut s = S3Server {
            child: None,
            dir,
            port,
            secret,
            binary,
        };
        s.restart();
        s.bucket()
            .create_bucket()
            .await
            .expect("create the test bucket");
        Some(s)
    }

    /// Starts the server again (after [`S3Server::stop`]) on the same port and directory.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("log");
        let child = Command::new(&self.binary)
            .args([
                "--port",
                &format!("127.0.0.1:{}", self.port),
                "--access",
                ACCESS_KEY,
                "--secret",
                &self.secret,
                "--iam-dir",
                &self.dir.path().join("iam").display().to_string(),
                "posix",
                "--sidecar",
                &self.dir.path().join("meta").display().to_string(),
                &self.data().display().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start versitygw");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "versitygw did not listen on 127.0.0.1:{}: {}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server (SIGKILL); its directory stays.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The backend directory: the bucket's objects are files under `<data>/<bucket>/`.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The `--archive-*` settings of the bucket, `prefix` inside it.
    pub fn args(&self, prefix: &str) -> BucketArgs {
        BucketArgs {
            bucket: Some(BUCKET.into()),
            prefix: prefix.into(),
            endpoint: Some(format!("http://127.0.0.1:{}", self.port)),
            region: "us-east-1".into(),
            path_style: true,
        }
    }

    /// An agent's flags for `prefix` of the bucket, `serve` flags `extra`, and the root user's
    /// keys for its environment.
    pub fn flags(&self, prefix: &str, extra: &[&str]) -> ArchiveFlags {
        let a = self.args(prefix);
        ArchiveFlags {
            bucket: vec![
                "--archive-bucket".into(),
                BUCKET.into(),
                "--archive-prefix".into(),
                a.prefix,
                "--archive-endpoint".into(),
                a.endpoint.unwrap_or_default(),
                "--archive-path-style".into(),
            ],
            extra: extra.iter().map(|x| x.to_string()).collect(),
            keys: (ACCESS_KEY.to_string(), self.secret.clone()),
        }
    }

    /// Keys of a user that may only read the bucket (GET and LIST, granted by the bucket's
    /// policy through versitygw's own IAM): `flags` with those keys instead.
    pub async fn read_only(&self, flags: &ArchiveFlags) -> ArchiveFlags {
        let (id, secret) = (
            "understudy-reader",
            format!("{:032x}", crate::testbed::rand_u128()),
        );
        let o = Command::new(&self.binary)
            .args(["admin", "--access", ACCESS_KEY, "--secret", &self.secret])
            .args(["--endpoint-url", &format!("http://127.0.0.1:{}", self.port)])
            .args([
                "create-user",
                "--access",
                id,
                "--secret",
                &secret,
                "--role",
                "user",
            ])
            .output()
            .expect("run versitygw admin");
        assert!(
            o.status.success(),
            "create the read-only user: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Principal": {"AWS": [id]},
                "Action": ["s3:GetObject", "s3:ListBucket"],
                "Resource": [format!("arn:aws:s3:::{BUCKET}"), format!("arn:aws:s3:::{BUCKET}/*")],
            }],
        });
        self.bucket()
            .set_policy(&policy.to_string())
            .await
            .expect("set the bucket's policy");
        ArchiveFlags {
            keys: (id.to_string(), secret),
            ..flags.clone()
        }
    }

    /// A client for the bucket as the root user.
    pub fn bucket(&self) -> Bucket {
        self.bucket_at("")
    }

    /// A client for `prefix` of the bucket as the root user.
    pub fn bucket_at(&self, prefix: &str) -> Bucket {
        let creds = Credentials::new(ACCESS_KEY, &self.secret, None, None, "test");
        Bucket::connect(&self.args(prefix), BUCKET, creds)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An agent's archive settings: its flags and the keys for its environment.
#[derive(Clone, Debug)]
pub struct ArchiveFlags {
    bucket: Vec<String>,
    extra: Vec<String>,
    keys: (String, String),
}

impl ArchiveFlags {
    /// The `--archive-*` flags naming the bucket (for `archive` commands).
    pub fn bucket(&self) -> Vec<&str> {
        self.bucket.iter().map(String::as_str).collect()
    }

    /// The bucket flags and the extra ones (for `serve`).
    pub fn serve(&self) -> Vec<&str> {
        self.bucket
            .iter()
            .chain(&self.extra)
            .map(String::as_str)
            .collect()
    }

    /// The environment holding the keys.
    pub fn env(&self) -> Vec<(&str, &str)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.keys.0.as_str()),
            ("AWS_SECRET_ACCESS_KEY", self.keys.1.as_str()),
        ]
    }

    /// A client for the bucket with these keys.
    pub fn client(&self, s3: &S3Server, prefix: &str) -> Bucket {
        let creds = Credentials::new(&self.keys.0, &self.keys.1, None, None, "test");
        Bucket::connect(&s3.args(prefix), BUCKET, creds)
    }
}

/// The versitygw binary, built when missing.
fn binary() -> Option<PathBuf> {
    static BIN: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    BIN.get_or_init(|| crate::built_by("s3-server/build.sh", &[], "the test S3 server"))
        .clone()
}
