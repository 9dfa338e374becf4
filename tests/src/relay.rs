//! A UDP fault relay for link-fault tests (the kernel here has no netem): the source agent talks
//! to the relay, the relay to the target. Each direction has its own seeded faults: loss, delay
//! with jitter (which reorders), explicit reordering, duplication, a bandwidth cap; and the whole
//! link can be partitioned (every packet dropped) for a while. Counters say what it did.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// Faults applied to one direction.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Probability that a packet is dropped.
    pub loss: f64,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Extra delay, uniform in [0, jitter): packets overtake each other.
    pub jitter: Duration,
    /// Probability that a packet is held back by `reorder_by` more than the rest.
    pub reorder: f64,
    /// How long a reordered packet is held back.
    pub reorder_by: Duration,
    /// Probability that a packet is sent twice.
    pub duplicate: f64,
    /// Bytes per second; 0 is unlimited.
    pub bandwidth: u64,
}

/// What the relay did, per direction (0: towards the target, 1: towards the source).
#[derive(Debug, Default)]
pub struct Counters {
    /// Packets received.
    pub received: [AtomicU64; 2],
    /// Packets dropped by loss or partition.
    pub dropped: [AtomicU64; 2],
    /// Extra copies sent.
    pub duplicated: [AtomicU64; 2],
    /// Packets held back for reordering.
    pub reordered: [AtomicU64; 2],
    /// Bytes forwarded.
    pub bytes: [AtomicU64; 2],
}

struct Shared {
    faults: Mutex<[Faults; 2]>,
    partition_until: Mutex<Option<Instant>>,
    counters: Counters,
}

/// A running relay; dropping it stops it.
pub struct Relay {
    /// Where the source should connect.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Starts a relay on 127.0.0.1 (ephemeral port) forwarding to `target`, faults seeded by `seed`.
    pub async fn start(
        target: SocketAddr,
        seed: u64,
        faults: [Faults; 2],
    ) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        back.connect(target).await?;
        let shared = Arc::new(Shared {
            faults: Mutex::new(faults),
            partition_until: Mutex::new(None),
            counters: Counters::default(),
        });
        let addr = front.local_addr()?;
        let task = tokio::spawn(run(front, back, shared.clone(), seed));
        Ok(Relay { addr, shared, task })
    }

    /// Replaces the faults of both directions.
    pub fn set_faults(&self, faults: [Faults; 2]) {
        *self.shared.faults.lock().expect("faults") = faults;
    }

    /// Drops every packet, both ways, for `d` from now.
    pub fn partition(&self, d: Duration) {
        *self.shared.partition_until.lock().expect("partition") = Some(Instant::now() + d);
    }

    /// Counters.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Bytes forwarded towards the target so far.
    pub fn bytes_to_target(&self) -> u64 {
        self.shared.counters.bytes[0].load(Ordering::Relaxed)
    }
}

/// One direction's scheduler: the random source and the bandwidth clock.
struct Lane {
    rng: StdRng,
    next_free: Instant,
}

impl Lane {
    /// When to send each copy of a packet of `len` bytes (empty: dropped).
    fn plan(&mut self, f: &Faults, len: usize, c: &Counters, dir: usize) -> Vec<Duration> {
        if f.loss > 0.0 && self.rng.random_bool(f.loss) {
            c.dropped[dir].fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        let now = Instant::now();
        let mut depart = now;
        if f.bandwidth > 0 {
            depart = self.next_free.max(now);
            self.next_free = depart + Duration::from_secs_f64(len as f64 / f.bandwidth as f64);
        }
        let base = depart - now + f.delay;
        let mut out = vec![self.delay(f, base, c, dir)];
        if f.duplicate > 0.0 && self.rng.random_bool(f.duplicate) {
            c.duplicated[dir].fetch_add(1, Ordering::Relaxed);
            out.push(self.delay(f, base, c, dir));
        }
        out
    }

    /// `base` plus jitter, plus the reorder hold for the unlucky.
    fn delay(&mut self, f: &Faults, base: Duration, c: &Counters, dir: usize) -> Duration {
        let mut d = base;
        if !f.jitter.is_zero() {
            d += f.jitter.mul_f64(self.rng.random_range(0.0..1.0));
        }
        if f.reorder > 0.0 && self.rng.random_bool(f.reorder) {
            c.reordered[dir].fetch_add(1, Ordering::Relaxed);
            d += f.reorder_by;
        }
        d
    }
}

async fn run(front: Arc<UdpSocket>, back: Arc<UdpSocket>, shared: Arc<Shared>, seed: u64) {
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
    let mut lanes = [0u64, 1].map(|i| Lane {
        rng: StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(i)),
        next_free: Instant::now(),
    });
    let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
    loop {
        let (dir, data) = tokio::select! {
            r = front.recv_from(&mut a) => match r {
                Ok((n, from)) => {
                    *client.lock().expect("client") = Some(from);
                    (0, a[..n].to_vec())
                }
                Err(_) => continue,
            },
            r = back.recv(&mut b) => match r {
                Ok(n) => (1, b[..n].to_vec()),
                Err(_) => continue,
            },
        };
        let c = &shared.counters;
        c.received[dir].fetch_add(1, Ordering::Relaxed);
        let partitioned = shared
            .partition_until
            .lock()
            .expect("partition")
            .is_some_and(|t| Instant::now() < t);
        if partitioned {
            c.dropped[dir].fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let faults = shared.faults.lock().expect("faults")[dir];
        let plan = lanes[dir].plan(&faults, data.len(), c, dir);
        if !plan.is_empty() {
            c.bytes[dir].fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        let data = Arc::new(data);
        for delay in plan {
            let (front, back, client, data) =
                (front.clone(), back.clone(), client.clone(), data.clone());
            let send = async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let to = *client.lock().expect("client");
                if dir == 0 {
                    let _ = back.send(&data).await;
                } else if let Some(to) = to {
                    let _ = front.send_to(&data, to).await;
                }
            };
            if delay.is_zero() {
                send.await;
            } else {
                tokio::spawn(send);
            }
        }
    }
}
