//! Link faults between the agents, through the UDP fault relay (tests/src/relay.rs): a sync
//! completes and restores bit-exact under loss, reordering, duplication and jitter, and across a
//! 30 s partition in the middle of a transfer.

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use understudy_e2e::relay::{Faults, Relay};
use understudy_e2e::{Pair, bin, digest, json, sparse_image, write_random};

fn lossy() -> Faults {
    Faults {
        loss: 0.05,
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(100),
        reorder: 0.02,
        reorder_by: Duration::from_millis(30),
        duplicate: 0.02,
        bandwidth: 0,
    }
}

async fn relayed_pair(seed: u64, faults: [Faults; 2]) -> (Pair, Relay) {
    let mut pair = Pair::new();
    pair.start_target(&[]);
    let relay = Relay::start(pair.addr.parse().expect("target address"), seed, faults)
        .await
        .expect("relay");
    pair.route = Some(relay.addr.to_string());
    (pair, relay)
}

fn restores_exactly(pair: &mut Pair, volume: &std::path::Path) {
    pair.kill_target();
    let out = pair.path("restore");
    let report = pair.failover("app", "latest", &out, &[]);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(digest(volume), digest(&out.join("volumes/data.img")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_survives_loss_reordering_duplication_and_jitter() {
    let (mut pair, relay) = relayed_pair(11, [lossy(), lossy()]).await;
    let volume = pair.path("data.img");
    sparse_image(&volume, 64 << 20);
    write_random(&volume, 0, 2 << 20, 1);
    let first = tokio::task::block_in_place(|| pair.cycle("app", &[("data", &volume)], &[]));
    write_random(&volume, 40 << 20, 512 << 10, 2);
    let second = tokio::task::block_in_place(|| pair.cycle("app", &[("data", &volume)], &[]));
    assert_eq!(
        (first["seq"].as_u64(), second["seq"].as_u64()),
        (Some(1), Some(2))
    );
    let c = relay.counters();
    let got = |a: &[std::sync::atomic::AtomicU64; 2]| {
        a[0].load(Ordering::Relaxed) + a[1].load(Ordering::Relaxed)
    };
    eprintln!(
        "relay: {} packets, {} dropped, {} duplicated, {} reordered",
        got(&c.received),
        got(&c.dropped),
        got(&c.duplicated),
        got(&c.reordered)
    );
    assert!(got(&c.dropped) > 0 && got(&c.duplicated) > 0 && got(&c.reordered) > 0);
    tokio::task::block_in_place(|| restores_exactly(&mut pair, &volume));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_30_second_partition_mid_transfer_is_survived() {
    let capped = Faults {
        bandwidth: 4 << 20,
        ..Faults::default()
    };
    let (mut pair, relay) = relayed_pair(12, [capped, Faults::default()]).await;
    let volume = pair.path("data.img");
    sparse_image(&volume, 64 << 20);
    write_random(&volume, 0, 24 << 20, 3);
    // The connection may ride the partition out, or break (an idle timeout meeting the probe
    // backoff): then the agent's retry opens a new session that continues the same cut.
    let mut args = pair.source_args("app", &[("data", &volume)], &[]);
    let retries = args
        .iter()
        .position(|a| a == "--max-retries")
        .expect("flag")
        + 1;
    args[retries] = "5".into();
    let child = Command::new(bin("source-agent"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("source");
    let start = Instant::now();
    while relay.bytes_to_target() < 8 << 20 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "transfer did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at = relay.bytes_to_target();
    relay.partition(Duration::from_secs(30));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        relay.bytes_to_target() - at < 1 << 20,
        "the partition let data through"
    );
    let out = tokio::task::block_in_place(|| child.wait_with_output()).expect("source output");
    assert!(
        out.status.success(),
        "cycle failed across the partition: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report["seq"], 1, "{report}");
    eprintln!(
        "partition at {at} bytes; cycle report {report}; total {} s",
        start.elapsed().as_secs()
    );
    tokio::task::block_in_place(|| restores_exactly(&mut pair, &volume));
}
