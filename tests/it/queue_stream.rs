//! The job queue's consumer (`parafed_jobs::stream`) against a real Redis: what a failed
//! or dead worker leaves behind is taken over by another, all of it and promptly; an
//! entry that keeps failing goes to the dead stream; a lost consumer group is recreated.

use crate::support;

use std::collections::HashSet;
use std::time::Duration;

use parafed::queue::consume::StreamConsumer;
use support::redis::{command_line, Redis};

async fn consumer(redis: &Redis, name: &str) -> StreamConsumer {
    let conn = parafed::queue::connect(&redis.url()).unwrap();
    let reader = parafed::queue::connect(&redis.url()).unwrap();
    let mut c = StreamConsumer::new(reader, conn, "t:q".into(), "t:dead".into(), name.into());
    c.batch = 8;
    c.block = Duration::from_millis(100);
    c.min_idle = Duration::from_secs(60);
    c.ensure_group().await.unwrap();
    c
}

fn push(redis: &Redis, n: usize) {
    for i in 0..n {
        let r = command_line(redis.port, &format!("XADD t:q * job {i}")).unwrap();
        assert!(r.starts_with('$'), "{r}");
    }
}

/// Reads everything there is as `c` (and never acknowledges it: a worker that failed
/// every job, or died holding them).
async fn read_all(c: &StreamConsumer) -> usize {
    let mut n = 0;
    loop {
        let got = c.read().await.unwrap();
        if got.is_empty() {
            return n;
        }
        n += got.len();
    }
}

#[tokio::test]
async fn a_failed_workers_entries_are_all_claimed_in_full_rounds() {
    let redis = Redis::start().await.unwrap();
    let (a, mut b) = (consumer(&redis, "a").await, consumer(&redis, "b").await);
    // Any idle time counts: whatever `a` holds is abandoned as far as `b` is concerned.
    b.min_idle = Duration::ZERO;
    push(&redis, 300);
    assert_eq!(read_all(&a).await, 300);
    let mut claimed = HashSet::new();
    let mut rounds = 0;
    loop {
        rounds += 1;
        let (entries, more) = b.claim_stale().await.unwrap();
        for e in &entries {
            assert!(claimed.insert(e.id.clone()), "{} claimed twice", e.id);
            b.ack(&e.id).await.unwrap();
        }
        if !more {
            break;
        }
        assert_eq!(entries.len(), 32, "a full round claims batch × 4");
    }
    assert_eq!(claimed.len(), 300);
    assert!(rounds <= 300 / 32 + 1, "{rounds} rounds");
    assert_eq!(command_line(redis.port, "XLEN t:q").unwrap(), ":0");
}

#[tokio::test]
async fn an_entry_that_keeps_failing_goes_to_the_dead_stream() {
    let redis = Redis::start().await.unwrap();
    let mut a = consumer(&redis, "a").await;
    a.max_deliveries = 3;
    a.min_idle = Duration::ZERO; // every claim round takes the entry again
    push(&redis, 1);
    assert_eq!(read_all(&a).await, 1); // delivery 1
    for delivery in 2..=3 {
        let (entries, _) = a.claim_stale().await.unwrap();
        assert_eq!(entries.len(), 1, "delivery {delivery}");
    }
    let (entries, _) = a.claim_stale().await.unwrap();
    assert!(entries.is_empty(), "a fourth delivery: {entries:?}");
    assert_eq!(command_line(redis.port, "XLEN t:q").unwrap(), ":0");
    assert_eq!(command_line(redis.port, "XLEN t:dead").unwrap(), ":1");
}

#[tokio::test]
async fn a_lost_group_is_recreated_and_new_work_flows() {
    let redis = Redis::start().await.unwrap();
    let a = consumer(&redis, "a").await;
    assert_eq!(command_line(redis.port, "FLUSHALL").unwrap(), "+OK");
    // The first read finds no group, recreates it and returns nothing...
    assert!(a.read().await.unwrap().is_empty());
    push(&redis, 2);
    // ...and work pushed afterwards is read.
    assert_eq!(read_all(&a).await, 2);
    let (entries, more) = a.claim_stale().await.unwrap();
    assert!(entries.is_empty() && !more, "nothing is idle yet");
}

#[tokio::test]
async fn entries_handed_back_by_a_stopping_worker_are_taken_at_once() {
    let redis = Redis::start().await.unwrap();
    // The idle timeout is a minute: without the hand-back, b would wait that long.
    let (a, b) = (consumer(&redis, "a").await, consumer(&redis, "b").await);
    push(&redis, 5);
    let read = a.read().await.unwrap();
    assert_eq!(read.len(), 5);
    let (none, _) = b.claim_stale().await.unwrap();
    assert!(none.is_empty(), "entries just read are not idle");
    a.hand_back(&read.iter().map(|e| e.id.clone()).collect::<Vec<_>>())
        .await
        .unwrap();
    let (taken, _) = b.claim_stale().await.unwrap();
    let ids =
        |v: &[parafed::queue::consume::Entry]| v.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&taken), ids(&read));
    assert_eq!(taken[0].payload, b"0");
}

/// A job that keeps failing shows its last error while it is retried, and takes it into
/// the dead stream (`parafed admin jobs list`), instead of looping quietly.
#[tokio::test]
async fn a_failing_job_shows_its_last_error_and_keeps_it_when_dead() {
    use parafed::queue::admin::JobState;
    use parafed::queue::{JobQueue, Keys, QueueName};
    let redis = Redis::start().await.unwrap();
    let keys = Keys::new("t");
    let q = QueueName::Deliver;
    let conn = parafed::queue::connect(&redis.url()).unwrap();
    let reader = parafed::queue::connect(&redis.url()).unwrap();
    let mut c = StreamConsumer::new(
        reader,
        conn.clone(),
        keys.queue(q),
        keys.dead(q),
        "a".into(),
    );
    c.block = Duration::from_millis(100);
    c.max_deliveries = 2;
    c.min_idle = Duration::ZERO;
    c.ensure_group().await.unwrap();
    let jobs = JobQueue::new(conn, keys);
    jobs.push(
        q,
        &parafed::queue::DeliverJob {
            destination: "beta.test".into(),
        },
    )
    .await
    .unwrap();
    let ready = jobs.jobs(q, JobState::Ready, None, 10).await.unwrap();
    assert_eq!(ready.len(), 1);
    assert_eq!(ready[0].job["destination"], "beta.test");
    let got = c.read().await.unwrap();
    let id = got[0].id.clone();
    c.note_error(&id, "beta.test answered 500 Internal Server Error")
        .await
        .unwrap();
    let flying = jobs.jobs(q, JobState::InFlight, None, 10).await.unwrap();
    assert_eq!(flying.len(), 1);
    assert_eq!(flying[0].deliveries, Some(1));
    assert!(flying[0].last_error.as_deref().unwrap().contains("500"));
    assert!(jobs
        .jobs(q, JobState::Ready, None, 10)
        .await
        .unwrap()
        .is_empty());
    let (again, _) = c.claim_stale().await.unwrap(); // delivery 2
    assert_eq!(again.len(), 1);
    c.note_error(&id, "beta.test answered 502 Bad Gateway")
        .await
        .unwrap();
    let (none, _) = c.claim_stale().await.unwrap(); // too many: dead
    assert!(none.is_empty());
    let dead = jobs.jobs(q, JobState::Dead, None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].dead_from.as_deref(), Some(id.as_str()));
    assert!(
        dead[0].last_error.as_deref().unwrap().contains("502"),
        "{:?}",
        dead[0]
    );
    assert_eq!(
        command_line(redis.port, "HLEN t:q:deliver:errors").unwrap(),
        ":0"
    );
    // Redriven, it is a ready job again, under a new id.
    let new_ids = jobs.redrive(q, &dead).await.unwrap();
    assert_eq!(new_ids.len(), 1);
    assert!(jobs
        .jobs(q, JobState::Dead, None, 10)
        .await
        .unwrap()
        .is_empty());
    let ready = jobs.jobs(q, JobState::Ready, None, 10).await.unwrap();
    assert_eq!(ready[0].id, new_ids[0]);
}

/// The entries of a joined job that failed: the error is noted on each, and handed back
/// they are claimed at the next claim round — not after the idle timeout — each to run
/// alone; the entries of a joined job that succeeded are acknowledged and deleted
/// together.
#[tokio::test]
async fn a_failed_joined_job_goes_back_at_once_and_a_finished_one_is_acked_whole() {
    let redis = Redis::start().await.unwrap();
    let a = consumer(&redis, "a").await;
    let b = consumer(&redis, "b").await;
    push(&redis, 4);
    let got = a.read().await.unwrap();
    assert_eq!(got.len(), 4);
    let failed: Vec<String> = got[..2].iter().map(|e| e.id.clone()).collect();
    let done: Vec<&str> = got[2..].iter().map(|e| e.id.as_str()).collect();
    let ids: Vec<&str> = failed.iter().map(String::as_str).collect();
    a.note_errors(&ids, "origin unreachable").await.unwrap();
    assert_eq!(
        command_line(redis.port, "HLEN t:q:errors").unwrap(),
        ":2",
        "the error is noted on every entry of the failed job"
    );
    // Not handed back, nothing is idle long enough (min_idle 60 s) to be claimed.
    let (none, _) = b.claim_stale().await.unwrap();
    assert!(none.is_empty());
    a.hand_back(&failed).await.unwrap();
    let (claimed, _) = b.claim_stale().await.unwrap();
    let claimed: HashSet<String> = claimed.into_iter().map(|e| e.id).collect();
    assert_eq!(claimed, failed.iter().cloned().collect::<HashSet<_>>());
    a.ack_all(&done).await.unwrap();
    assert_eq!(
        command_line(redis.port, "XLEN t:q").unwrap(),
        ":2",
        "the finished job's two entries are deleted, the failed job's two stay"
    );
}

/// A read that found less than a batch waits up to `linger` for the next entries and
/// hands them over together as soon as one comes (verify jobs read together run as one,
/// `verify::LINGER`); a full batch is handed over without waiting.
#[tokio::test]
async fn a_read_short_of_a_batch_waits_for_the_next_entry_and_a_full_one_does_not() {
    let redis = Redis::start().await.unwrap();
    let port = redis.port;
    let mut c = consumer(&redis, "a").await;
    // Longer than the test needs between the two pushes, below the reader's response
    // timeout (2 s); the second entry is pushed as soon as the first is read.
    c.linger = Duration::from_millis(1500);
    push(&redis, 1);
    let reading = tokio::spawn({
        let c = c.clone();
        async move { c.read().await.unwrap() }
    });
    // The first entry is read (pending for the consumer): the read is now waiting.
    support::wait_for(
        "the first entry to be read",
        Duration::from_secs(10),
        || async {
            command_line(port, "XPENDING t:q workers")
                .ok()
                .filter(|r| r.starts_with("*4\r\n:1\r\n"))
        },
    )
    .await;
    push(&redis, 1);
    let got = tokio::time::timeout(Duration::from_secs(60), reading)
        .await
        .expect("the read ends when the next entry comes")
        .unwrap();
    assert_eq!(got.len(), 2, "both entries in one read");
    // A full batch (8) is not held back for a ninth.
    push(&redis, 9);
    let got = tokio::time::timeout(Duration::from_secs(60), c.read())
        .await
        .expect("a full batch is handed over at once")
        .unwrap();
    assert_eq!(got.len(), 8);
}

/// The pending entries of `t:q` as Redis sees them: (id, consumer, idle ms, deliveries).
async fn pending(redis: &Redis) -> Vec<(String, String, u64, u64)> {
    let mut c = parafed::queue::connect(&redis.url()).unwrap();
    redis::cmd("XPENDING")
        .arg("t:q")
        .arg(parafed::queue::consume::GROUP)
        .arg("-")
        .arg("+")
        .arg(100)
        .query_async(&mut c)
        .await
        .unwrap()
}

/// A job that failed runs again after its backoff, not after the idle timeout (the wait
/// for a worker that died, a minute here): the entry is marked idle for `min_idle` less
/// the backoff, so a claim round leaves it alone until the backoff has passed and takes
/// it at the first round after. Marking it does not count a run; the backoff doubles
/// with the runs Redis counted; an entry no longer held is left alone.
#[tokio::test]
async fn a_failed_job_runs_again_after_its_backoff_not_after_the_idle_timeout() {
    let redis = Redis::start().await.unwrap();
    let (mut a, mut b) = (consumer(&redis, "a").await, consumer(&redis, "b").await);
    // A first backoff of 20–30 s (drawn from [2d/3, d], d = 30 s) against a minute.
    a.retry_base = Duration::from_secs(30);
    push(&redis, 1);
    let read = a.read().await.unwrap();
    let id = read[0].id.clone();
    let wait = a
        .retry_later(&id)
        .await
        .unwrap()
        .expect("a holds the entry");
    assert!(
        (Duration::from_secs(20)..=Duration::from_secs(30)).contains(&wait),
        "first backoff {wait:?}"
    );
    let p = pending(&redis).await;
    assert_eq!(p.len(), 1);
    let (_, owner, idle, runs) = &p[0];
    assert_eq!(
        (owner.as_str(), *runs),
        ("a", 1),
        "still a's, one run counted"
    );
    // Set as the code sets it: whole milliseconds, rounded down.
    let marked = (Duration::from_secs(60) - wait).as_millis() as u64;
    assert!(
        (marked..marked + 10_000).contains(idle),
        "idle {idle} ms, marked {marked} ms"
    );
    // The backoff has not passed: a claim round (idle timeout a minute) leaves it.
    let (none, _) = b.claim_stale().await.unwrap();
    assert!(none.is_empty(), "claimed before its backoff: {none:?}");

    // A short backoff: the first claim round after it takes the entry, its second run.
    a.retry_base = Duration::from_millis(50);
    a.retry_later(&id).await.unwrap().expect("a still holds it");
    let taken = support::wait_for("the retried entry", Duration::from_secs(10), || async {
        let (got, _) = b.claim_stale().await.unwrap();
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert_eq!(taken[0].id, id);
    assert_eq!(
        pending(&redis).await[0].3,
        2,
        "the claim counted the second run"
    );
    // Its second failure backs off twice as long: 40–60 s (d = 60 s, the idle timeout).
    b.retry_base = Duration::from_secs(30);
    let second = b.retry_later(&id).await.unwrap().expect("b holds it now");
    assert!(
        (Duration::from_secs(40)..=Duration::from_secs(60)).contains(&second),
        "second backoff {second:?}"
    );
    // a no longer holds it, and once acknowledged nobody does: both are left alone.
    assert_eq!(a.retry_later(&id).await.unwrap(), None);
    b.ack(&id).await.unwrap();
    assert_eq!(b.retry_later(&id).await.unwrap(), None);
    assert!(pending(&redis).await.is_empty());
}
