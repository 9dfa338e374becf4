//! Named crash points for the crash harness (`tests/src/crash.rs`, docs/reliability.md).
//!
//! A crash point is a place where a real power cut or `kill -9` would hurt most: after pack files
//! are fsynced but before the catalog records them, between a point's catalog commit and the reply
//! to the source, in the middle of retention GC or of a failover rebuild. The harness names one in
//! the `FAILPOINTS` environment variable (fail-rs syntax: `store.flush.packs-synced=return`, or
//! `2*off->return` for the third time it is reached) and the process kills itself there with
//! SIGKILL: no destructor, no flush, no unwinding, exactly like a crash.
//!
//! The same names take fail-rs's other actions too: `source.cut.scanning=1*sleep(3000)` holds the
//! first scan batch for 3 s, so a test can send a signal while the cut is being made.
//!
//! Crash points exist only in builds with the `failpoints` feature (the test crate enables it);
//! in a release build [`hit`] compiles to nothing and `FAILPOINTS` is ignored.

/// Every crash point in the code, for the harness and the docs.
pub const POINTS: &[&str] = &[
    "store.flush.packs-synced",
    "store.commit.before",
    "store.commit.after",
    "store.gc.chunks-removed",
    "store.compact.copied",
    "failover.volume-written",
    "source.cut.scanning",
    "source.cut.made",
    "source.commit.acked",
    "controller.snapshots.taken",
    "controller.movers.started",
    "controller.point.committed",
    "controller.cleanup.deleting",
];

/// Reads `FAILPOINTS`; call once at start-up and keep the guard for the life of the process.
pub fn setup() -> fail::FailScenario<'static> {
    fail::FailScenario::setup()
}

/// A crash point: kills this process with SIGKILL when `FAILPOINTS` arms `name`.
pub fn hit(name: &str) {
    debug_assert!(
        POINTS.contains(&name),
        "crash point {name} is not in POINTS"
    );
    fail::fail_point!(name, |_| crash(name));
}

#[allow(dead_code)] // only called with the `failpoints` feature
fn crash(name: &str) -> ! {
    eprintln!("crash point {name}: killing this process with SIGKILL");
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    std::process::abort()
}
