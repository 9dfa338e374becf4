//! The worker pool of the scan and the restore: jobs taken in order from an iterator, run on
//! several threads, and their results handed to one consumer in job order. At most `window`
//! jobs are taken ahead of the consumer, so memory is bounded however slow one job is; the first
//! error (from the jobs' iterator, a job or the consumer) stops the rest and is returned.

use anyhow::{Result, anyhow};
use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Condvar, Mutex};

/// Threads for CPU- and I/O-bound block work: two per core (one's reads overlap another's
/// hashing or decoding), at most 8.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get() * 2)
        .min(8)
}

struct Feed<I> {
    jobs: I,
    taken: u64,
    consumed: u64,
    stopped: bool,
}

/// Runs `work` on `workers` threads over `jobs` and calls `consume` with each result in job
/// order. `work` gets a per-thread state made by `init` (a buffer, say).
pub fn ordered<J, T, S, I>(
    jobs: I,
    workers: usize,
    window: usize,
    init: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, J) -> Result<T> + Sync,
    mut consume: impl FnMut(T) -> Result<()>,
) -> Result<()>
where
    I: Iterator<Item = Result<J>> + Send,
    J: Send,
    T: Send,
{
    let window = window.max(workers).max(1) as u64;
    let feed = Mutex::new(Feed {
        jobs,
        taken: 0,
        consumed: 0,
        stopped: false,
    });
    let room = Condvar::new();
    let (tx, rx) = mpsc::channel::<(u64, Result<T>)>();
    std::thread::scope(|scope| {
        for _ in 0..workers.max(1) {
            let (tx, feed, room, init, work) = (tx.clone(), &feed, &room, &init, &work);
            scope.spawn(move || {
                let mut state = init();
                while let Some((seq, job)) = next_job(feed, room, window) {
                    let r = job.and_then(|j| work(&mut state, j));
                    let failed = r.is_err();
                    if tx.send((seq, r)).is_err() || failed {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let r = consume_in_order(&rx, &feed, &room, &mut consume);
        stop(&feed, &room);
        r
    })
}

/// Takes the next job once it is within the window of the consumer; `None` when there are no
/// more jobs or the pool stopped.
fn next_job<J, I: Iterator<Item = Result<J>>>(
    feed: &Mutex<Feed<I>>,
    room: &Condvar,
    window: u64,
) -> Option<(u64, Result<J>)> {
    let mut f = feed.lock().unwrap_or_else(|p| p.into_inner());
    while !f.stopped && f.taken >= f.consumed + window {
        f = room.wait(f).unwrap_or_else(|p| p.into_inner());
    }
    if f.stopped {
        return None;
    }
    let job = f.jobs.next()?;
    if job.is_err() {
        f.stopped = true;
        room.notify_all();
    }
    let seq = f.taken;
    f.taken += 1;
    Some((seq, job))
}

fn stop<I>(feed: &Mutex<Feed<I>>, room: &Condvar) {
    feed.lock().unwrap_or_else(|p| p.into_inner()).stopped = true;
    room.notify_all();
}

fn consume_in_order<T, I>(
    rx: &mpsc::Receiver<(u64, Result<T>)>,
    feed: &Mutex<Feed<I>>,
    room: &Condvar,
    consume: &mut impl FnMut(T) -> Result<()>,
) -> Result<()> {
    let mut waiting = BTreeMap::new();
    let mut next = 0u64;
    for (seq, r) in rx {
        waiting.insert(seq, r);
        while let Some(r) = waiting.remove(&next) {
            if let Err(e) = r.and_then(&mut *consume) {
                stop(feed, room);
                return Err(e);
            }
            next += 1;
            feed.lock().unwrap_or_else(|p| p.into_inner()).consumed = next;
            room.notify_all();
        }
    }
    let taken = feed.lock().unwrap_or_else(|p| p.into_inner()).taken;
    if next < taken {
        return Err(anyhow!("a worker thread stopped before finishing its job"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_arrive_in_job_order_and_errors_stop_the_pool() {
        let jobs = (0..500u64).map(Ok);
        let mut seen = Vec::new();
        ordered(
            jobs,
            4,
            8,
            || (),
            |_, j| {
                if j % 7 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Ok(j * 2)
            },
            |t| {
                seen.push(t);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, (0..500).map(|j| j * 2).collect::<Vec<_>>());

        let e = ordered(
            (0..100u64).map(Ok),
            3,
            4,
            || (),
            |_, j| {
                if j == 40 {
                    Err(anyhow!("job 40 failed"))
                } else {
                    Ok(j)
                }
            },
            |_| Ok(()),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "job 40 failed");

        let jobs = (0..10u64).map(|j| {
            if j == 5 {
                Err(anyhow!("no page 5"))
            } else {
                Ok(j)
            }
        });
        let mut got = Vec::new();
        let e = ordered(
            jobs,
            2,
            2,
            || (),
            |_, j| Ok(j),
            |t| {
                got.push(t);
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "no page 5");
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    }
}
