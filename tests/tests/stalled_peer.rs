//! Resource bounds: a stalled peer cannot make the other side buffer without limit. A 256 MiB
//! incompressible sync is started; once chunks flow, one agent is frozen with SIGSTOP for 10 s
//! while the other's resident memory is sampled every 50 ms from /proc; then it is thawed with
//! SIGCONT and the sync must complete and restore bit-exact. The bound asserted is on memory, not
//! on time: the transfer is far larger than the bound, so a side that buffered what it could
//! not send (or what it received but could not store) would cross it.

use rustix::process::{Pid, Signal, kill_process};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use understudy_e2e::*;

/// Resident set of `pid` in MiB (VmRSS), or None once it exited.
fn rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024)
}

fn signal(pid: u32, sig: Signal) {
    kill_process(Pid::from_raw(pid as i32).expect("pid"), sig).expect("signal");
}

/// Freezes `frozen` for 10 s and returns the peak RSS (MiB) of `watched` meanwhile, with its RSS
/// when the freeze began.
fn peak_while_frozen(frozen: u32, watched: u32) -> (u64, u64) {
    signal(frozen, Signal::STOP);
    let at_start = rss_mib(watched).unwrap_or(0);
    let mut peak = at_start;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        peak = peak.max(rss_mib(watched).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(frozen, Signal::CONT);
    (at_start, peak)
}

fn stalled(freeze_target: bool) {
    let mut p = Pair::new();
    p.start_target(&[]);
    let v = p.path("v.img");
    sparse_image(&v, 256 << 20);
    write_random(&v, 0, 256 << 20, 7);
    let args = p.source_args("big", &[("data", &v)], &[]);
    let mut source = Proc(
        Command::new(bin("source-agent"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while p.pack_bytes() < 32 << 20 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "transfer never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (tpid, spid) = (p.target.as_ref().unwrap().0.id(), source.0.id());
    let (frozen, watched, who) = if freeze_target {
        (tpid, spid, "source")
    } else {
        (spid, tpid, "target")
    };
    let (before, peak) = peak_while_frozen(frozen, watched);
    println!(
        "{who} RSS while its peer was stopped for 10 s: {before} MiB at the stop, peak {peak} MiB (256 MiB transfer)"
    );
    let done = source.0.wait().is_ok_and(|s| s.success());
    assert!(done, "the sync did not complete after the peer resumed");
    p.kill_target();
    let o = p.path("out");
    let rep = p.failover("big", "latest", &o, &[]);
    assert_eq!(rep["ok"], true, "{rep}");
    assert_eq!(digest(&o.join("volumes/data.img")), digest(&v));
    let bound = 128;
    assert!(
        peak < bound,
        "{who} grew to {peak} MiB while its peer was stalled (bound {bound} MiB)"
    );
}

#[test]
fn a_stalled_target_does_not_make_the_source_buffer() {
    stalled(true);
}

#[test]
fn a_stalled_source_does_not_make_the_target_buffer() {
    stalled(false);
}
