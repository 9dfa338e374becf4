//! The test bed's own CSI driver (a test component) checked against the CSI spec by csi-sanity
//! (github.com/kubernetes-csi/csi-test/v5, built by tests/kube-testbed/build.sh --node), over its
//! real socket, with real loop devices, mounts and ext4.

use std::process::{Child, Command, Stdio};
use understudy_e2e::bin;
use understudy_e2e::node::{node_testbed_dir, release_under};

/// The driver process and its directory; on drop (also on failure) the driver is stopped and
/// whatever csi-sanity left mounted or attached under the directory is released.
struct Driver {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        release_under(self.dir.path());
    }
}

#[test]
fn the_test_driver_passes_csi_sanity() {
    if !rustix::process::geteuid().is_root() {
        assert!(std::env::var("CI").is_err(), "csi-sanity needs root in CI");
        eprintln!("SKIP: csi-sanity needs root (the driver stages volumes on loop devices)");
        return;
    }
    let Some(testbed) = node_testbed_dir() else {
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("us-sanity-")
        .tempdir_in("/tmp")
        .unwrap();
    let socket = dir.path().join("csi.sock");
    let child = Command::new(bin("understudy-csi"))
        .arg(format!("--endpoint={}", socket.display()))
        .arg(format!(
            "--state-dir={}",
            dir.path().join("state").display()
        ))
        .arg("--node-id=sanity")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let driver = Driver { child, dir };
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = Command::new(testbed.join("csi-sanity"))
        .arg(format!("--csi.endpoint=unix://{}", socket.display()))
        .arg(format!(
            "--csi.mountdir={}",
            driver.dir.path().join("mnt").display()
        ))
        .arg(format!(
            "--csi.stagingdir={}",
            driver.dir.path().join("stage").display()
        ))
        .arg("--csi.testvolumesize=16777216")
        .arg("--ginkgo.no-color")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let summary = report
        .lines()
        .filter(|l| l.contains("Passed") || l.starts_with("Ran "))
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("{summary}");
    assert!(
        out.status.success(),
        "csi-sanity failed:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(summary.contains("0 Failed"), "{summary}");
}
