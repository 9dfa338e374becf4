//! The README's first command: the demo runs end to end and reports a verified, bit-exact failover.

use std::process::Command;
use understudy_e2e::bin;

#[test]
fn the_quickstart_demo_fails_over_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(bin("understudy-demo"))
        .args(["--size-mib", "32", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "demo failed:\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Redirected output carries no colour escape codes (stdout and the log on stderr).
    for (what, bytes) in [("stdout", &o.stdout), ("stderr", &o.stderr)] {
        assert!(
            !bytes.contains(&0x1b),
            "escape codes in the demo's redirected {what}: {}",
            String::from_utf8_lossy(bytes)
        );
    }
    assert!(
        out.contains("Result: OK") && out.contains("identical"),
        "{out}"
    );
    assert!(
        out.contains("\"namespace\": \"shop-dr\"")
            && out.contains("\"storageClassName\": \"standard\""),
        "{out}"
    );
    assert!(
        !dir.path().join("target-agent/admin.sock").exists(),
        "the stopped server left its admin socket"
    );
}
