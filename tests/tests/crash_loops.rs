//! Crash loops (invariants 1, 2 and 5): syncs of a two-volume group while the target or the source
//! is killed with SIGKILL at random instants (seeded). After every kill: no partial point is
//! listed, the latest point restores bit-exact, `verify` finds the store whole, and the resumed
//! sync completes without resending a chunk that was durable on the target at the kill.
//!
//! Default: 30 kills per side (`UNDERSTUDY_CRASH_KILLS`); the long run in docs/reliability.md sets
//! it to 200. `UNDERSTUDY_CRASH_SEED` replays a run. The target keeps 3 points, so retention and
//! garbage collection run after every commit and random kills land in them too.

use rand::RngExt;
use rand::rngs::StdRng;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use understudy_e2e::crash::{env_count, seeded, sigkilled, spawn, wait};
use understudy_e2e::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    Target,
    Source,
}

/// Counts a crash loop reports.
#[derive(Default, Debug)]
struct Tally {
    kills: usize,
    missed: usize,
    committed_before_kill: usize,
    durable_at_kills: u64,
    resent_durable: u64,
    chunks_sent_on_resume: u64,
}

struct Loop {
    p: Pair,
    vols: Volumes,
    rng: StdRng,
    generation: u64,
    expected: BTreeMap<u64, Vec<String>>,
    latest: u64,
    cycle_secs: f64,
    tally: Tally,
}

/// Blocks of 64 KiB per volume (32 MiB volumes).
const VOLUME_BLOCKS: u64 = 512;

const SERVE: &[&str] = &["--flush-every-mib", "1", "--keep-last", "3"];

impl Loop {
    fn new(rng: StdRng) -> Self {
        let mut p = Pair::new();
        p.start_target(SERVE);
        let vols = Volumes::create(&p, &["a", "b"], VOLUME_BLOCKS << 16);
        write_random(vols.path(0), 0, 16 << 20, 1);
        write_text(vols.path(1), 0, 16 << 20, 2);
        let mut l = Loop {
            p,
            vols,
            rng,
            generation: 0,
            expected: BTreeMap::new(),
            latest: 0,
            cycle_secs: 0.5,
            tally: Tally::default(),
        };
        let want = l.vols.digests();
        l.complete(want, false);
        l
    }

    /// Overwrites 4 to 8 random runs of 8 to 32 blocks of each volume with new data (random in
    /// a, log-like text in b): 2 to 16 MiB of new chunks per volume.
    fn change(&mut self) -> Vec<String> {
        self.generation += 1;
        for (i, (_, v)) in self.vols.0.iter().enumerate() {
            for k in 0..self.rng.random_range(4..=8u64) {
                let blocks = self.rng.random_range(8..=32u64);
                let first = self.rng.random_range(0..(VOLUME_BLOCKS - blocks));
                let seed = self.generation * 1_000_000 + i as u64 * 1000 + k;
                let (at, len) = (first << 16, (blocks as usize) << 16);
                if i == 0 {
                    write_random(v, at, len, seed);
                } else {
                    write_text(v, at, len, seed);
                }
            }
        }
        self.vols.digests()
    }

    fn durable_chunks(&self) -> u64 {
        let o = self.p.target_cmd(&["verify", "--json"]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "verify found damage: {out}");
        json(&out)["chunks_checked"].as_u64().unwrap()
    }

    /// No partial point is listed and the latest one restores bit-exact. `pending` is the cut in
    /// flight at a kill: the target may have committed it (before the kill, or after a source's
    /// death from what was already on its way), and then it is the latest point. Returns whether
    /// it was.
    fn check(&mut self, pending: Option<&Vec<String>>) -> bool {
        let listed = self.p.points("g");
        let latest = *listed.last().expect("a point is listed");
        let adopted = pending.is_some() && latest == self.latest + 1;
        if let (true, Some(want)) = (adopted, pending) {
            self.expected.insert(latest, want.clone());
            self.latest = latest;
        }
        for seq in &listed {
            assert!(
                self.expected.contains_key(seq),
                "point {seq} is listed but was never committed whole"
            );
        }
        assert_eq!(latest, self.latest, "the latest point moved");
        // The explicit number, not `latest`: after a source's death the target may still commit
        // the cut in flight between the listing above and this failover.
        let out = self.p.path("restore");
        let rep = self.p.failover("g", &latest.to_string(), &out, &[]);
        assert_eq!(rep["ok"], true, "{rep}");
        self.vols
            .assert_restored(&out, &self.expected[&latest], &format!("point {latest}"));
        std::fs::remove_dir_all(&out).unwrap();
        adopted
    }

    /// Runs the cycle to completion and checks the new point. After a point committed at a kill
    /// (`adopted`), the cycle reports that point again, or, when the source had recorded the
    /// commit before it died, makes a new point of the unchanged volumes.
    fn complete(&mut self, want: Vec<String>, adopted: bool) -> serde_json::Value {
        let r = self.p.cycle("g", &self.vols.refs(), &[]);
        let seq = r["seq"].as_u64().unwrap();
        if adopted && seq == self.latest {
            assert_eq!(r["already_committed"], true, "{r}");
        } else {
            assert_eq!(seq, self.latest + 1, "{r}");
            if adopted {
                assert_eq!(r["blocks_changed"], 0, "{r}");
            }
            self.expected.insert(seq, want);
            self.latest = seq;
        }
        self.check(None);
        r
    }

    /// One sync with a kill of `victim` at a random instant; false if the sync ended first.
    fn round(&mut self, victim: Victim) -> bool {
        let before = self.durable_chunks();
        let want = self.change();
        let args = self.p.source_args("g", &self.vols.refs(), &[]);
        let log = self.p.path("source.log");
        let start = Instant::now();
        let mut source = spawn("source-agent", &args, &[], &log);
        let delay = self.rng.random_range(0.0..self.cycle_secs);
        std::thread::sleep(Duration::from_secs_f64(delay));
        if let Some(st) = source.0.try_wait().unwrap() {
            assert!(
                st.success(),
                "source failed without a kill: {}",
                self.p.target_log()
            );
            self.cycle_secs = 0.5 * self.cycle_secs + 0.5 * start.elapsed().as_secs_f64();
            self.tally.missed += 1;
            assert!(
                self.check(Some(&want)),
                "the source succeeded but no point was committed"
            );
            return false;
        }
        match victim {
            Victim::Target => {
                self.p.kill_target();
                self.p.start_target(SERVE);
                let st = wait(&mut source, Duration::from_secs(120)).expect("source ends");
                assert!(!sigkilled(&st));
            }
            Victim::Source => source.kill9(),
        }
        self.tally.kills += 1;
        let adopted = self.check(Some(&want));
        if adopted {
            self.tally.committed_before_kill += 1;
            self.complete(want, true);
            return true;
        }
        let durable = self.durable_chunks().saturating_sub(before);
        let r = self.complete(want, false);
        let held = r["chunks_held"].as_u64().unwrap();
        if r["resumed"] == true && r["already_committed"] == false {
            self.tally.durable_at_kills += durable;
            self.tally.resent_durable += durable.saturating_sub(held);
        }
        self.tally.chunks_sent_on_resume += r["chunks_sent"].as_u64().unwrap();
        true
    }
}

fn crash_loop(victim: Victim) {
    let kills = env_count("UNDERSTUDY_CRASH_KILLS", 30);
    let (seed, rng) = seeded("UNDERSTUDY_CRASH_SEED");
    let mut l = Loop::new(rng);
    let mut rounds = 0;
    while l.tally.kills < kills {
        rounds += 1;
        assert!(
            rounds <= kills * 4,
            "the syncs kept ending before the kill: {:?}",
            l.tally
        );
        l.round(victim);
    }
    let t = &l.tally;
    println!(
        "crash loop ({victim:?}, seed {seed}): {} kills in {rounds} rounds ({} syncs ended before their kill); \
         {} points committed, {} of them just before the kill; chunks durable at the kills: {}, \
         sent again of those: {}; chunks sent by resumed syncs: {}",
        t.kills,
        t.missed,
        l.latest,
        t.committed_before_kill,
        t.durable_at_kills,
        t.resent_durable,
        t.chunks_sent_on_resume
    );
    assert_eq!(
        t.resent_durable, 0,
        "chunks durable at a kill were sent again: {t:?}"
    );
}

#[test]
fn random_sigkills_of_the_target_during_syncs() {
    crash_loop(Victim::Target);
}

#[test]
fn random_sigkills_of_the_source_during_syncs() {
    crash_loop(Victim::Source);
}
