//! Failback over real QUIC, without a cluster (protocol 7): after a failover the application runs
//! on the standby's copy and writes more; the standby's volume is cut into the standby's store
//! (a group of its own), and the old primary's device, which kept its old data and some writes
//! the last point never held, is brought to that point by a basis writer (`target-agent write
//! --basis`): it compares every block with the point by hash and fetches only the ones that
//! differ. The blocks that travel are counted against a count made here from the two images, and
//! the old primary ends byte for byte the standby's volume.

use std::os::unix::fs::FileExt;
use std::path::Path;
use understudy_e2e::*;

const MIB: u64 = 1 << 20;
const BLOCK: usize = 64 << 10;

fn put(path: &Path, at: u64, byte: u8, len: usize) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(&vec![byte; len], at)
        .unwrap();
}

#[test]
fn failback_fetches_only_the_blocks_that_differ_and_the_old_primary_ends_bit_exact() {
    let mut p = Pair::new();
    p.start_target(&[]);
    // The primary's volume, replicated once: point 1 of `app`.
    let primary = p.path("primary.img");
    sparse_image(&primary, 64 * MIB);
    for (k, at) in [0u64, 3, 7, 20, 33].into_iter().enumerate() {
        put(&primary, at * MIB, 10 + k as u8, MIB as usize);
    }
    p.cycle("app", &[("a", &primary)], &[]);

    // Failover: the standby's volume is rebuilt from point 1, and the application writes there.
    let standby = p.path("standby.img");
    let t = p.ticket_ok("app", "a", "1");
    let (code, r) = write_volume(&t, &["--image", s(&standby)]);
    assert_eq!(code, 0, "{r}");
    put(&standby, 3 * MIB + 4096, 0x5a, 100_000); // overwrites inside data (2 blocks)
    put(&standby, 50 * MIB, 0x6b, 3 * BLOCK); // new data in a hole
    put(&standby, 20 * MIB, 0, MIB as usize); // data deleted (zeroed: a hole of the new point)

    // Meanwhile the old primary took writes the last point never held (lost at the failover):
    // one block changed inside its data and one block of data in a hole of both.
    put(&primary, 7 * MIB + 8192, 0x77, 10);
    put(&primary, 40 * MIB, 0x88, BLOCK);

    // Reverse replication: the standby's volume is cut into its own store (group `app-back`):
    // the chunks it shares with point 1 are there already.
    p.cycle("app-back", &[("a", &standby)], &[]);
    let (fetch, zero, data) = basis_difference(&primary, &standby, BLOCK);
    assert_eq!((fetch, zero), (2 + 3 + 1, 16 * BLOCK as u64 + BLOCK as u64));

    // Failback onto the old primary's device (a loop device where this machine has them).
    let lo = loop_devices_available().then(|| LoopDevice::attach(&primary).unwrap());
    let dev = lo.as_ref().map_or(primary.clone(), |l| l.path.clone());
    let t = p.ticket_ok("app-back", "a", "latest");
    let (code, r) = write_volume(&t, &["--device", s(&dev), "--basis"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["blocks"], fetch, "only the differing blocks travel: {r}");
    assert_eq!(r["blocks_matched"], data - fetch, "{r}");
    assert_eq!(r["bytes_written"], fetch * BLOCK as u64, "{r}");
    assert_eq!(r["bytes_zeroed"], zero, "{r}");
    drop(lo);
    assert!(
        std::fs::read(&primary).unwrap() == std::fs::read(&standby).unwrap(),
        "the old primary holds the standby's volume byte for byte"
    );
    assert!(
        p.target_log().contains(&format!("blocks_sent={fetch}")),
        "the target sent only those frames:\n{}",
        p.target_log()
    );

    // Again (a failback pass repeated with nothing new): nothing travels, the check still runs.
    let (code, r) = write_volume(&t, &["--device", s(&primary), "--basis"]);
    assert_eq!(
        (code, &r["blocks"], &r["blocks_matched"]),
        (0, &0.into(), &data.into()),
        "{r}"
    );

    // A device smaller than the volume is refused before anything is read or written.
    let small = p.path("small.img");
    sparse_image(&small, MIB);
    let (code, r) = write_volume(&t, &["--device", s(&small), "--basis"]);
    assert_eq!(code, 2, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("give a larger device"),
        "{r}"
    );
}

#[test]
fn basis_writes_over_a_device_never_a_new_image() {
    let o = run(
        "target-agent",
        &[
            "write",
            "--ticket",
            "/nonexistent",
            "--image",
            "/tmp/x",
            "--basis",
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
