//! Test hooks as a decorator of the ports, so that the production driver holds none of them:
//! stop (as if the process died) or pause (as if it were stopped by SIGSTOP) after the n-th AWS
//! write. [`crate::engine::Engine`] wraps its ports in [`Hooked`] and ends a driver whose crash
//! point was reached with [`DriveError::Crashed`](super::DriveError::Crashed).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::core::{InstanceDeletion, InstanceTransition, WriteResult};
use crate::ports::{
    AwsError, Compute, CreateOutcome, Fence, InstanceStore, OutgoingMessage, PoolMembership, PoolQueues, RunStore,
    StoreError, Termination,
};
use crate::record::RunRecord;
use crate::spec::ResourceClassConfig;
use crate::timestamp::Timestamp;

/// When to stop or pause. Counting covers every write: run-record writes, spec chunks and every
/// side-effecting call (not lease renewals, nor reads).
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    /// Stop right after the n-th write (1-based): its answer never comes back, and nothing else
    /// is sent, as if the process died.
    pub crash_after_writes: Option<u64>,
    /// After the n-th write, signal `paused` and wait for `resume`, like a process stopped by
    /// SIGSTOP: nothing else is sent meanwhile, lease renewals included.
    pub pause_after_writes: Option<(u64, Arc<Notify>, Arc<Notify>)>,
}

/// Ports `P` with [`Hooks`] applied.
pub struct Hooked<P> {
    inner: Arc<P>,
    hooks: Hooks,
    writes: AtomicU64,
    crashed: AtomicBool,
    crash: Notify,
    paused: AtomicBool,
    unpaused: Notify,
}

impl<P> Hooked<P> {
    /// `inner` with `hooks`.
    pub fn new(inner: Arc<P>, hooks: Hooks) -> Hooked<P> {
        Hooked {
            inner,
            hooks,
            writes: AtomicU64::new(0),
            crashed: AtomicBool::new(false),
            crash: Notify::new(),
            paused: AtomicBool::new(false),
            unpaused: Notify::new(),
        }
    }

    /// The decorated ports.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// Resolves with the crash point once it is reached (never, without a crash hook).
    pub async fn crashed(&self) -> u64 {
        loop {
            let notified = self.crash.notified();
            if self.crashed.load(Ordering::SeqCst) {
                return self.hooks.crash_after_writes.unwrap_or(0);
            }
            notified.await;
        }
    }

    /// A dead process sends nothing: every call after the crash point waits forever (the driver
    /// is dropped by whoever awaits [`Hooked::crashed`]); a stopped one sends nothing until it is
    /// resumed.
    async fn gate(&self) {
        if self.crashed.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        while self.paused.load(Ordering::SeqCst) {
            let notified = self.unpaused.notified();
            if !self.paused.load(Ordering::SeqCst) {
                break;
            }
            notified.await;
        }
    }

    async fn write<T>(&self, call: impl Future<Output = T>) -> T {
        self.gate().await;
        let value = call.await;
        let count = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if self.hooks.crash_after_writes == Some(count) {
            self.crashed.store(true, Ordering::SeqCst);
            self.crash.notify_waiters();
        }
        if self.crashed.load(Ordering::SeqCst) {
            // The crash point, or a call in flight when another one reached it: no answer.
            std::future::pending::<()>().await;
        }
        if let Some((at, paused, resume)) = &self.hooks.pause_after_writes {
            if *at == count {
                self.paused.store(true, Ordering::SeqCst);
                paused.notify_one();
                resume.notified().await;
                self.paused.store(false, Ordering::SeqCst);
                self.unpaused.notify_waiters();
            }
        }
        value
    }

    async fn read<T>(&self, call: impl Future<Output = T>) -> T {
        self.gate().await;
        call.await
    }
}

impl<P: RunStore> RunStore for Hooked<P> {
    async fn load_run(&self, run_id: &str, attempt: u32) -> Result<Option<RunRecord>, StoreError> {
        self.read(self.inner.load_run(run_id, attempt)).await
    }
    async fn load_attempts(&self, run_id: &str) -> Result<Vec<RunRecord>, StoreError> {
        self.read(self.inner.load_attempts(run_id)).await
    }
    async fn create_run(
        &self,
        record: &RunRecord,
        spec_chunks: &[String],
        chunk_ttl: i64,
        transitions: &[InstanceTransition],
        guard: Option<&crate::core::PoolGuard>,
        now: Timestamp,
    ) -> Result<CreateOutcome, StoreError> {
        self.write(self.inner.create_run(record, spec_chunks, chunk_ttl, transitions, guard, now)).await
    }
    async fn replace_run(&self, record: &RunRecord, expected_version: u64) -> Result<(), StoreError> {
        self.write(self.inner.replace_run(record, expected_version)).await
    }
    async fn take_over_run(
        &self,
        record: &RunRecord,
        expected_version: u64,
        committed_as_read: usize,
    ) -> Result<(), StoreError> {
        self.write(self.inner.take_over_run(record, expected_version, committed_as_read)).await
    }
    async fn renew_lease(
        &self,
        run_id: &str,
        attempt: u32,
        owner: &str,
        expires_at: Timestamp,
    ) -> Result<bool, StoreError> {
        self.read(self.inner.renew_lease(run_id, attempt, owner, expires_at)).await
    }
    async fn load_spec(&self, run_id: &str, digest: &str, chunks: u32) -> Result<String, StoreError> {
        self.read(self.inner.load_spec(run_id, digest, chunks)).await
    }
    async fn list_runs(&self, unfinished_only: bool, limit: usize) -> Result<crate::ports::RunListing, StoreError> {
        self.read(self.inner.list_runs(unfinished_only, limit)).await
    }
    async fn load_resource_class_config(&self) -> Result<Option<ResourceClassConfig>, StoreError> {
        self.read(self.inner.load_resource_class_config()).await
    }
    async fn load_instance_facts(&self, ids: &[String]) -> Result<Vec<crate::ports::InstanceFacts>, StoreError> {
        self.read(self.inner.load_instance_facts(ids)).await
    }
}

impl<P: InstanceStore> InstanceStore for Hooked<P> {
    async fn transition(
        &self,
        batch: &[InstanceTransition],
        now: Timestamp,
        fence: &Fence,
    ) -> Result<Vec<WriteResult>, AwsError> {
        self.write(self.inner.transition(batch, now, fence)).await
    }
    async fn delete(&self, batch: &[InstanceDeletion], fence: &Fence) -> Result<Vec<WriteResult>, AwsError> {
        self.write(self.inner.delete(batch, fence)).await
    }
    async fn delete_finishing(
        &self,
        batch: &[InstanceDeletion],
        record: &RunRecord,
        expected_version: u64,
        unknown_attempt: u32,
    ) -> Result<Vec<WriteResult>, AwsError> {
        self.write(self.inner.delete_finishing(batch, record, expected_version, unknown_attempt)).await
    }
}

impl<P: PoolQueues> PoolQueues for Hooked<P> {
    async fn send(&self, queue_url: &str, messages: &[OutgoingMessage]) -> Result<Vec<(String, AwsError)>, AwsError> {
        self.write(self.inner.send(queue_url, messages)).await
    }
}

impl<P: Compute> Compute for Hooked<P> {
    async fn pool_membership(&self, instance_ids: &[String]) -> Result<PoolMembership, AwsError> {
        self.read(self.inner.pool_membership(instance_ids)).await
    }
    async fn terminate(&self, instance_ids: &[String]) -> Result<Termination, AwsError> {
        self.write(self.inner.terminate(instance_ids)).await
    }
}
