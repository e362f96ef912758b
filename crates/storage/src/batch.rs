//! Group commit: concurrent single-row writes leave as one statement.
//!
//! Each autocommitted statement costs a round trip and a WAL flush; when
//! many connections send at once, most of a send's time was spent
//! waiting for its own commit. A [`Batcher`] queues requests and runs
//! whatever has queued as one statement, with a few statements in flight
//! at most: under light load a request runs at once in its caller's task
//! (no hand-off, no added wait), under heavy load batches grow by
//! themselves. Every caller still gets its answer only after its batch
//! committed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::StoreError;

type Reply<R> = oneshot::Sender<Result<R, StoreError>>;
type Answers<R> = Pin<Box<dyn Future<Output = Vec<Result<R, StoreError>>> + Send>>;
type Run<T, R> = Arc<dyn Fn(Vec<T>) -> Answers<R> + Send + Sync>;

/// Queues items of type `T` and answers each with an `R`.
pub(crate) struct Batcher<T, R> {
    tx: mpsc::Sender<(T, Reply<R>)>,
    slots: Arc<Semaphore>,
    run: Run<T, R>,
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the batching task: batches of at most `max` items, at most
    /// `in_flight` batches running. `run` answers a batch with one result
    /// per item, in order. The task ends when the batcher is dropped.
    pub(crate) fn spawn<F, Fut>(max: usize, in_flight: usize, run: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<R, StoreError>>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<(T, Reply<R>)>(max * in_flight * 2);
        let run: Run<T, R> = Arc::new(move |batch| Box::pin(run(batch)));
        let slots = Arc::new(Semaphore::new(in_flight));
        let batcher = Batcher {
            tx,
            slots: slots.clone(),
            run: run.clone(),
        };
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Take a slot before collecting: while every slot is busy,
                // requests keep queueing and the next batch carries them.
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                let mut items = vec![first];
                while items.len() < max {
                    match rx.try_recv() {
                        Ok(item) => items.push(item),
                        Err(_) => break,
                    }
                }
                let (batch, replies): (Vec<T>, Vec<Reply<R>>) = items.into_iter().unzip();
                let run = run.clone();
                tokio::spawn(async move {
                    let results = run(batch).await;
                    // A missing result drops its reply: the caller sees
                    // `Unavailable` and may retry (writes are idempotent).
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(result);
                    }
                    drop(slot);
                });
            }
        });
        batcher
    }

    /// Queues `item` and waits for its batch's answer. With nothing
    /// queued and a slot free, runs it at once as a batch of one.
    pub(crate) async fn submit(&self, item: T) -> Result<R, StoreError> {
        if self.tx.capacity() == self.tx.max_capacity()
            && let Ok(slot) = self.slots.clone().try_acquire_owned()
        {
            let answer = (self.run)(vec![item]).await.pop();
            drop(slot);
            return answer
                .unwrap_or_else(|| Err(StoreError::Unavailable("write batch abandoned".into())));
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((item, reply))
            .await
            .map_err(|_| StoreError::Unavailable("write batching stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("write batch abandoned".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn concurrent_requests_share_batches_and_get_their_own_answers() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let b = Arc::new(Batcher::spawn(8, 1, move |items: Vec<u32>| {
            seen.lock().unwrap().push(items.len());
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                items
                    .into_iter()
                    .map(|i| {
                        if i == 13 {
                            Err(StoreError::NotFound)
                        } else {
                            Ok(i * 2)
                        }
                    })
                    .collect()
            }
        }));
        let tasks: Vec<_> = (0..20u32)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { (i, b.submit(i).await) })
            })
            .collect();
        for t in tasks {
            let (i, r) = t.await.unwrap();
            if i == 13 {
                assert_eq!(r, Err(StoreError::NotFound));
            } else {
                assert_eq!(r, Ok(i * 2));
            }
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 20);
        assert!(
            sizes.iter().all(|n| *n <= 8),
            "batches stay bounded: {sizes:?}"
        );
        assert!(
            sizes.len() < 20,
            "requests queued behind a running batch travel together: {sizes:?}"
        );
    }

    #[tokio::test]
    async fn a_short_answer_fails_the_unanswered_requests() {
        let b: Batcher<u32, u32> = Batcher::spawn(4, 1, |_items: Vec<u32>| async { Vec::new() });
        assert!(matches!(b.submit(1).await, Err(StoreError::Unavailable(_))));
    }

    #[tokio::test]
    async fn a_lone_request_runs_in_its_callers_task() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let b = Batcher::spawn(8, 2, move |items: Vec<u32>| {
            record.lock().unwrap().push(tokio::task::try_id());
            async move { items.into_iter().map(Ok).collect() }
        });
        let caller = tokio::spawn(async move {
            let answer = b.submit(7).await;
            (tokio::task::try_id(), answer)
        });
        let (caller_id, answer) = caller.await.unwrap();
        assert_eq!(answer, Ok(7));
        assert_eq!(
            *seen.lock().unwrap(),
            vec![caller_id],
            "no hand-off to the batching task when nothing is queued"
        );
    }
}
