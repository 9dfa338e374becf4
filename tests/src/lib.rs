//! Test harness: runs the real agent binaries as child processes (killed with SIGKILL on drop),
//! makes sparse images and loop devices (detached on drop), writes seeded data, and reads the
//! agents' JSON output.

pub mod crash;
pub mod manifests;
pub mod node;
pub mod oci;
pub mod relay;
pub mod replication;
pub mod s3;
pub mod standby;
pub mod target_pod;
pub mod testbed;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of an agent binary, built (once per test process) with the same profile and target
/// directory as the running test, so a test never runs a stale agent.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // Test executables live in target/<profile>/deps, the test bed's own binaries in
        // target/<profile>.
        let mut profile_dir = exe.parent().expect("target/<profile>").to_path_buf();
        if profile_dir.ends_with("deps") {
            profile_dir.pop();
        }
        let target_dir = profile_dir.parent().expect("target dir");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args([
            "build",
            "--quiet",
            "--bins",
            "-p",
            "source-agent",
            "-p",
            "target-agent",
            "-p",
            "understudy-e2e",
            "-p",
            "understudy-demo",
            "-p",
            "understudy-csi-driver",
        ])
        .arg("--target-dir")
        .arg(target_dir);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the agents failed");
        profile_dir
    });
    dir.join(name)
}

/// Runs an agent command to completion.
pub fn run(agent: &str, args: &[&str]) -> Output {
    Command::new(bin(agent))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("agent runs")
}

/// Runs an agent command that must succeed; returns stdout.
pub fn ok(agent: &str, args: &[&str]) -> String {
    let o = run(agent, args);
    assert!(
        o.status.success(),
        "{agent} {args:?} failed with {}:\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8")
}

/// Parses the last JSON value an agent printed.
pub fn json(out: &str) -> Value {
    let start = out.find(['{', '[']).expect("JSON in output");
    serde_json::from_str(out[start..].trim()).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

/// A child process killed with SIGKILL (and reaped) when dropped.
pub struct Proc(pub Child);

impl Proc {
    /// Kills the process with SIGKILL now.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What a build script of the test bed (`tests/<script> <args>`) prints: the path of what it
/// built, or found built. `None` where it cannot build here (a missing Go toolchain, say), which
/// fails the test in CI.
pub(crate) fn built_by(script: &str, args: &[&str], what: &str) -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            Some(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        }
        other => {
            assert!(
                std::env::var("CI").is_err(),
                "{what} is required in CI: {other:?}"
            );
            eprintln!(
                "SKIP: {what} could not be built ({} failed)",
                script.display()
            );
            None
        }
    }
}

/// A paired source and target in a temporary directory.
pub struct Pair {
    /// Temporary root (removed on drop).
    pub root: tempfile::TempDir,
    /// The target agent's directory.
    pub target_dir: PathBuf,
    /// The source agent's directory.
    pub source_dir: PathBuf,
    /// Running target, if started.
    pub target: Option<Proc>,
    /// Its address.
    pub addr: String,
    /// Where the source dials instead of `addr` (a fault relay), if set.
    pub route: Option<String>,
}

impl Pair {
    /// Creates both identities and pairs them.
    pub fn new() -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        let target_dir = root.path().join("target");
        let source_dir = root.path().join("source");
        let tfp = ok("target-agent", &["init", "--dir", s(&target_dir)])
            .trim()
            .to_string();
        let sfp = ok("source-agent", &["init", "--dir", s(&source_dir)])
            .trim()
            .to_string();
        ok(
            "target-agent",
            &[
                "pair",
                "--dir",
                s(&target_dir),
                "--peer",
                &sfp,
                "--name",
                "source",
            ],
        );
        ok(
            "source-agent",
            &[
                "pair",
                "--dir",
                s(&source_dir),
                "--peer",
                &tfp,
                "--name",
                "target",
            ],
        );
        Pair {
            root,
            target_dir,
            source_dir,
            target: None,
            addr: String::new(),
            route: None,
        }
    }

    /// A path under the temporary root.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// Starts (or restarts) the target on a free loopback port; extra args are passed to `serve`.
    pub fn start_target(&mut self, extra: &[&str]) {
        self.start_target_env(extra, &[]);
    }

    /// [`Pair::start_target`] with extra environment variables (e.g. `FAILPOINTS`).
    pub fn start_target_env(&mut self, extra: &[&str], env: &[(&str, &str)]) {
        let ready = self.path("target.ready");
        let _ = std::fs::remove_file(&ready);
        let listen = if self.addr.is_empty() {
            "127.0.0.1:0".to_string()
        } else {
            self.addr.clone()
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("target.log"))
            .expect("log");
        let mut args = vec![
            "serve",
            "--dir",
            s(&self.target_dir),
            "--listen",
            &listen,
            "--ready-file",
            s(&ready),
        ];
        args.extend_from_slice(extra);
        let child = Command::new(bin("target-agent"))
            .args(&args)
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn target");
        let proc = Proc(child);
        let start = Instant::now();
        while !ready.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "target did not start: {}",
                self.target_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.addr = std::fs::read_to_string(&ready).expect("ready file");
        self.target = Some(proc);
    }

    /// Stops the target with SIGKILL.
    pub fn kill_target(&mut self) {
        if let Some(mut p) = self.target.take() {
            p.kill9();
        }
    }

    /// Bytes of pack files in the target's store.
    pub fn pack_bytes(&self) -> u64 {
        std::fs::read_dir(self.target_dir.join("store/packs"))
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The target's log so far.
    pub fn target_log(&self) -> String {
        std::fs::read_to_string(self.path("target.log")).unwrap_or_default()
    }

    /// `source-agent run --once` arguments for a group.
    pub fn source_args(
        &self,
        group: &str,
        volumes: &[(&str, &Path)],
        extra: &[&str],
    ) -> Vec<String> {
        let mut a: Vec<String> = [
            "run",
            "--dir",
            s(&self.source_dir),
            "--group",
            group,
            "--target",
            self.route.as_deref().unwrap_or(&self.addr),
            "--once",
            "--json",
            "--max-retries",
            "0",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        for (n, p) in volumes {
            a.push("--volume".into());
            a.push(format!("{n}={}", p.display()));
        }
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    }

    /// `target-agent ticket` for `volume` of `point` of `group`, through the running target; the
    /// ticket's path and the command's output.
    pub fn ticket(
        &self,
        group: &str,
        volume: &str,
        point: &str,
        extra: &[&str],
    ) -> (PathBuf, Output) {
        let out = self.path(&format!("ticket.{group}.{volume}.{point}.json"));
        let mut a = vec![
            "ticket",
            "--dir",
            s(&self.target_dir),
            "--group",
            group,
            "--point",
            point,
            "--volume",
            volume,
            "--target",
            &self.addr,
            "--out",
            s(&out),
        ];
        a.extend_from_slice(extra);
        (out.clone(), run("target-agent", &a))
    }

    /// A ticket that must be made.
    pub fn ticket_ok(&self, group: &str, volume: &str, point: &str) -> PathBuf {
        let (t, o) = self.ticket(group, volume, point, &[]);
        assert!(
            o.status.success(),
            "ticket: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        t
    }

    /// Runs one source cycle that must succeed; returns its report.
    pub fn cycle(&self, group: &str, volumes: &[(&str, &Path)], extra: &[&str]) -> Value {
        let args = self.source_args(group, volumes, extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run("source-agent", &refs);
        assert!(
            o.status.success(),
            "source cycle failed:\n{}\ntarget log:\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.target_log()
        );
        json(&String::from_utf8_lossy(&o.stdout))
    }

    /// Target-agent command on the target directory (target must be stopped for store commands).
    pub fn target_cmd(&self, args: &[&str]) -> Output {
        let mut a = vec![args[0], "--dir", s(&self.target_dir)];
        a.extend_from_slice(&args[1..]);
        run("target-agent", &a)
    }

    /// Fails `group` over to `point` into `out`; returns the JSON report (the command must run).
    pub fn failover(&self, group: &str, point: &str, out: &Path, extra: &[&str]) -> Value {
        let mut a = vec![
            "failover",
            "--group",
            group,
            "--point",
            point,
            "--out",
            s(out),
            "--json",
        ];
        a.extend_from_slice(extra);
        let o = self.target_cmd(&a);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            stdout.contains('{'),
            "failover printed no report: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        json(&stdout)
    }

    /// Sequence numbers of the group's points.
    pub fn points(&self, group: &str) -> Vec<u64> {
        let o = self.target_cmd(&["points", "--group", group, "--json"]);
        assert!(
            o.status.success(),
            "points failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        json(&String::from_utf8_lossy(&o.stdout))
            .as_array()
            .expect("array")
            .iter()
            .map(|p| p["seq"].as_u64().unwrap())
            .collect()
    }
}

impl Default for Pair {
    fn default() -> Self {
        Self::new()
    }
}

/// Flips a byte in the middle of the payload of the stored chunk with this hash (BLAKE3 of its
/// block) in the target's packs: the chunk is damaged at rest, its frame still parses.
pub fn damage_chunk(p: &Pair, hash: &[u8; 32]) {
    use std::os::unix::fs::FileExt;
    for e in std::fs::read_dir(p.target_dir.join("store/packs")).expect("packs") {
        let pack = e.expect("pack").path();
        let bytes = std::fs::read(&pack).expect("read pack");
        if let Some(h) = bytes.windows(32).position(|w| w == hash) {
            // The hash is at 16 of the frame's 48-byte header, the payload's length just before.
            let len = u32::from_le_bytes(bytes[h - 4..h].try_into().expect("4 bytes")) as usize;
            let at = h + 32 + len / 2;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&pack)
                .expect("open pack");
            f.write_all_at(&[bytes[at] ^ 0x10], at as u64)
                .expect("write pack");
            return;
        }
    }
    panic!("chunk not found in the packs");
}

/// Runs `target-agent write --ticket T <to...>`; its exit code and report.
pub fn write_volume(ticket: &Path, to: &[&str]) -> (i32, Value) {
    let mut a = vec!["write", "--ticket", s(ticket)];
    a.extend_from_slice(to);
    let o = run("target-agent", &a);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains('{'),
        "write printed no report: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().unwrap_or(-1), json(&stdout))
}

/// What a basis writer (`write --basis`) must do to turn image `old` into `new`, in blocks of
/// `block` bytes: (data blocks of `new` that `old` does not hold, bytes of `old` to zero where
/// `new` is a hole, data blocks of `new`). Counted here from the bytes, to check its report.
pub fn basis_difference(old: &Path, new: &Path, block: usize) -> (u64, u64, u64) {
    let (old, new) = (std::fs::read(old).unwrap(), std::fs::read(new).unwrap());
    let (mut fetch, mut zero, mut data) = (0, 0, 0);
    for (o, n) in old.chunks(block).zip(new.chunks(block)) {
        if n.iter().any(|b| *b != 0) {
            data += 1;
            fetch += u64::from(o != n);
        } else if o.iter().any(|b| *b != 0) {
            zero += o.len() as u64;
        }
    }
    (fetch, zero, data)
}

/// Path as &str (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Creates a sparse image of `size` bytes.
pub fn sparse_image(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
}

pub use understudy_demo::sample::{digest, write_random, write_text};

/// Copies a sparse image, keeping holes (a saved copy of a volume at a cut).
pub fn snapshot_copy(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .args(["--sparse=always", s(from), s(to)])
        .status()
        .expect("cp");
    assert!(st.success());
}

/// A loop device over a file, detached when dropped.
pub struct LoopDevice {
    /// /dev/loopN.
    pub path: PathBuf,
}

impl LoopDevice {
    /// Attaches `file`; `Err` when this machine cannot (not root, no loop support).
    pub fn attach(file: &Path) -> Result<Self> {
        let o = Command::new("losetup")
            .args(["-f", "--show", s(file)])
            .output()
            .context("losetup not found (install util-linux)")?;
        if !o.status.success() {
            bail!(
                "losetup failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(LoopDevice {
            path: PathBuf::from(String::from_utf8(o.stdout)?.trim()),
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", s(&self.path)]).status();
    }
}

/// True when loop devices can be attached here; prints why not otherwise. In CI (CI=true) a
/// machine without loop devices is an error, not a skip.
pub fn loop_devices_available() -> bool {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("probe.img");
    sparse_image(&f, 1 << 20);
    match LoopDevice::attach(&f) {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("CI").is_err(),
                "loop devices are required in CI: {e:#}"
            );
            eprintln!(
                "SKIP: loop devices unavailable ({e:#}); run the tests as root to include them"
            );
            false
        }
    }
}

/// The volumes of a group under test: (name, sparse image).
pub struct Volumes(pub Vec<(&'static str, PathBuf)>);

impl Volumes {
    /// Sparse images `<name>.img` of `size` bytes under the pair's temporary root.
    pub fn create(p: &Pair, names: &[&'static str], size: u64) -> Self {
        let v: Vec<_> = names
            .iter()
            .map(|n| (*n, p.path(&format!("{n}.img"))))
            .collect();
        for (_, path) in &v {
            sparse_image(path, size);
        }
        Volumes(v)
    }

    /// Image of the `i`-th volume.
    pub fn path(&self, i: usize) -> &Path {
        &self.0[i].1
    }

    /// (name, path) pairs, as [`Pair::cycle`] takes them.
    pub fn refs(&self) -> Vec<(&str, &Path)> {
        self.0.iter().map(|(n, p)| (*n, p.as_path())).collect()
    }

    /// BLAKE3 of each volume, in order.
    pub fn digests(&self) -> Vec<String> {
        self.0.iter().map(|(_, p)| digest(p)).collect()
    }

    /// Asserts that the failover output `out` holds volumes with the digests `want`.
    pub fn assert_restored(&self, out: &Path, want: &[String], what: &str) {
        for ((name, _), d) in self.0.iter().zip(want) {
            assert_eq!(
                &digest(&out.join(format!("volumes/{name}.img"))),
                d,
                "volume {name} of {what}"
            );
        }
    }
}

/// A small ext4 file system on a loop device, mounted at `path`; unmounted and detached when
/// dropped (for disk-full tests).
pub struct SmallFs {
    /// Mount point.
    pub path: PathBuf,
    dev: LoopDevice,
}

impl SmallFs {
    /// Makes a `size`-byte ext4 image at `image`, attaches it and mounts it at `at`.
    pub fn mount(image: &Path, size: u64, at: &Path) -> Result<Self> {
        sparse_image(image, size);
        let mkfs = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", s(image)])
            .status()
            .context("mkfs.ext4 not found (install e2fsprogs)")?;
        anyhow::ensure!(mkfs.success(), "mkfs.ext4 failed");
        let dev = LoopDevice::attach(image)?;
        std::fs::create_dir_all(at)?;
        let o = Command::new("mount").arg(&dev.path).arg(at).output()?;
        anyhow::ensure!(
            o.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        Ok(SmallFs {
            path: at.to_path_buf(),
            dev,
        })
    }

    /// Bytes free for files.
    pub fn available(&self) -> u64 {
        let st = rustix::fs::statvfs(&self.path).expect("statvfs");
        st.f_bavail * st.f_frsize
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = &self.dev; // detached by its own Drop, after the unmount
    }
}

/// A TCP port free on 127.0.0.1 now (for servers whose address is given up front).
pub fn free_port() -> u16 {
    let [p] = free_ports();
    p
}

/// `N` distinct TCP ports free on 127.0.0.1 now: each is held until all are chosen, so the
/// kernel cannot hand out one twice (a server given two of them would fail to bind).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("local address").port())
}

/// The Prometheus text an agent serves on `addr`'s `/metrics`.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics address");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send the request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the response");
    out
}
