//! Writers over real QUIC, without a cluster (protocol 5): the running target grants a writer one
//! volume of one point (`target-agent ticket`), and `target-agent write` rebuilds it elsewhere
//! (what a volume populator's pod runs). Bit-exact (invariant 2) from the bytes read back, holes
//! zeroed on a device that held other data, and the grant's bounds, a damaged chunk and a lapsed
//! ticket each refused with what failed named.

use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use understudy_e2e::*;

const MIB: u64 = 1 << 20;

/// A target holding two points of group `app` (volumes `a` and `b`, 8 MiB each, sparse), and
/// copies of `a` as each point cut it.
struct Stored {
    p: Pair,
    a_at: Vec<PathBuf>,
}

fn stored() -> Stored {
    let mut p = Pair::new();
    p.start_target(&[]);
    let (a, b) = (p.path("a.img"), p.path("b.img"));
    sparse_image(&a, 8 * MIB);
    sparse_image(&b, 8 * MIB);
    let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
    f.write_all_at(&[7u8; 200_000], 0).unwrap();
    f.write_all_at(&[9u8; 70_000], 5 * MIB).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&b)
        .unwrap()
        .write_all_at(&[3u8; 4096], MIB)
        .unwrap();
    let mut a_at = Vec::new();
    for round in 0..2u8 {
        if round == 1 {
            f.write_all_at(&[11u8; 65536], 2 * MIB).unwrap();
        }
        p.cycle("app", &[("a", &a), ("b", &b)], &[]);
        let copy = p.path(&format!("a.{}.img", round + 1));
        snapshot_copy(&a, &copy);
        a_at.push(copy);
    }
    Stored { p, a_at }
}

impl Stored {
    /// `ticket` for `volume` of `point` of group `app`; the command's output.
    fn ticket(&self, volume: &str, point: &str, extra: &[&str]) -> (PathBuf, std::process::Output) {
        self.p.ticket("app", volume, point, extra)
    }

    fn ticket_ok(&self, volume: &str, point: &str) -> PathBuf {
        self.p.ticket_ok("app", volume, point)
    }
}

fn same_bytes(x: &Path, y: &Path) -> bool {
    std::fs::read(x).unwrap() == std::fs::read(y).unwrap()
}

#[test]
fn a_writer_rebuilds_a_point_bit_exact_into_an_image_or_over_old_data() {
    let st = stored();
    // An older point into a fresh image.
    let t1 = st.ticket_ok("a", "1");
    let mode = std::fs::metadata(&t1).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600,
        "a ticket holds a key"
    );
    let img = st.p.path("rebuilt.img");
    let (code, r) = write_volume(&t1, &["--image", s(&img)]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["ok"], true);
    assert_eq!(r["expected_digest"], r["actual_digest"]);
    assert!(same_bytes(&img, &st.a_at[0]), "point 1 of a, byte for byte");
    // 200000 + 70000 bytes of data in 64 KiB blocks: 4 + 2 blocks; the holes travel as nothing.
    assert_eq!(r["blocks"], 6, "{r}");

    // The latest point over a loop device full of other bytes: the holes are zeroed, and the
    // report file is written as a pod's termination message would be.
    let backing = st.p.path("dev.img");
    std::fs::write(&backing, vec![0xAAu8; 8 * MIB as usize]).unwrap();
    let lo = loop_devices_available().then(|| LoopDevice::attach(&backing).unwrap());
    let dev = lo.as_ref().map_or(backing.clone(), |l| l.path.clone());
    let latest = st.ticket_ok("a", "latest");
    let report = st.p.path("termination-log");
    let (code, r) = write_volume(&latest, &["--device", s(&dev), "--report", s(&report)]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["seq"], 2);
    assert!(same_bytes(&dev, &st.a_at[1]), "point 2 of a over old data");
    let kept: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(kept["ok"], true);

    // Run again (a pod restarted after the write): the same result.
    let (code, r) = write_volume(&latest, &["--device", s(&dev)]);
    assert_eq!((code, &r["ok"]), (0, &Value::Bool(true)), "{r}");

    // A device too small is refused before anything is written.
    let small = st.p.path("small.img");
    std::fs::write(&small, vec![0u8; MIB as usize]).unwrap();
    let (code, r) = write_volume(&latest, &["--device", s(&small)]);
    assert_eq!(code, 2);
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("give a larger device"),
        "{r}"
    );
}

#[test]
fn a_writer_reads_only_its_grant_and_a_damaged_chunk_or_a_lapsed_ticket_is_refused() {
    let st = stored();
    // A ticket edited to another volume: the key's grant names `b` of point 2 only.
    let tb = st.ticket_ok("b", "2");
    let mut edited: Value = serde_json::from_str(&std::fs::read_to_string(&tb).unwrap()).unwrap();
    edited["volume"] = "a".into();
    let forged = st.p.path("forged.json");
    std::fs::write(&forged, edited.to_string()).unwrap();
    let (code, r) = write_volume(&forged, &["--image", s(&st.p.path("x.img"))]);
    assert_eq!(code, 2);
    let e = r["error"].as_str().unwrap();
    assert!(
        e.contains("may read volume b of point 2 of group app, not volume a"),
        "{e}"
    );

    // No such volume or point: refused when the ticket is asked for.
    let (_, o) = st.ticket("c", "2", &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("has no volume c: it holds a, b"));
    let (_, o) = st.ticket("a", "9", &[]);
    assert!(!o.status.success());

    // A lapsed ticket: the TLS handshake refuses the key.
    let (short, o) = st.ticket("b", "2", &["--ttl", "1s"]);
    assert!(o.status.success());
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let (code, r) = write_volume(&short, &["--image", s(&st.p.path("y.img"))]);
    assert_eq!(code, 2, "{r}");
    assert!(r["error"].as_str().unwrap().contains("certificate"), "{r}");

    // A chunk damaged in the store: refused with the point, volume and offset; not ok.
    let block = std::fs::read(&st.a_at[1]).unwrap()[5 * MIB as usize..][..64 << 10].to_vec();
    damage_chunk(&st.p, blake3::hash(&block).as_bytes());
    let ta = st.ticket_ok("a", "2");
    let (code, r) = write_volume(&ta, &["--image", s(&st.p.path("z.img"))]);
    assert_eq!(code, 2, "{r}");
    assert_eq!(r["ok"], false);
    let e = r["error"].as_str().unwrap();
    assert!(
        e.contains(&format!("volume a of point 2, block at byte {}", 5 * MIB)),
        "{e}"
    );
    // The target itself is unharmed: volume b still rebuilds.
    let (code, r) = write_volume(
        &st.ticket_ok("b", "2"),
        &["--image", s(&st.p.path("b.img.2"))],
    );
    assert_eq!(code, 0, "{r}");
}
