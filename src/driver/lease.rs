//! The lease: renewal while a run is driven, checkpoints between stages, and giving it back.

use std::sync::atomic::Ordering;

use tracing::{info, warn};

use super::{DriveError, Driver};
use crate::ports::Ports;
use crate::record::RunRecord;

impl<P: Ports> Driver<P> {
    /// Extends the lease every third of its length while the run is driven, so a long stage
    /// (large fleets, slow AWS) does not let it lapse. A renewal that finds another owner marks
    /// the lease lost; the driver stops at its next write. Each renewal may take at most one
    /// period: one that takes longer is abandoned, and the driver, which then cannot know that
    /// it still holds the lease, fences itself once the lease it last secured has passed.
    pub(super) async fn renew_lease_periodically(&self, run_id: &str, attempt: u32) {
        let period = std::time::Duration::from_secs((self.limits.lease_secs / 3).max(1) as u64);
        loop {
            tokio::time::sleep(period).await;
            let expires_at = self.clock.now().plus_secs(self.limits.lease_secs);
            let renewal = self.ports.renew_lease(run_id, attempt, &self.owner, expires_at);
            match tokio::time::timeout(period, renewal).await {
                Ok(Ok(true)) => {
                    self.lease_valid_until.fetch_max(expires_at.unix_secs(), Ordering::SeqCst);
                    info!(until = %expires_at, "lease renewed");
                }
                Ok(Ok(false)) => {
                    warn!("lease taken over by another driver; stopping at the next write");
                    self.lease_lost.store(true, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                }
                // A failed renewal is retried next period; the versioned writes still fence, and
                // so does the driver itself once its last secured lease has passed.
                Ok(Err(error)) => warn!(error = %error, "lease renewal failed"),
                Err(_) => warn!(period_secs = period.as_secs(), "lease renewal took longer than its period; abandoned"),
            }
        }
    }

    /// Confirms, before a write, that this driver still holds the lease it last secured until a
    /// moment now passed: an owner-conditional renewal. It succeeds only if nobody took the run
    /// over meanwhile, and then extends the lease, so the write that follows is this driver's
    /// to make. A driver that cannot confirm stops (`LeaseLost`, resumable) instead of acting
    /// beside a driver that may have taken over.
    pub(super) async fn revalidate_lease(&self) -> Result<(), DriveError> {
        let Some(crate::ports::Fence { run_id, attempt, .. }) = self.leased_run.lock().expect("lease lock").clone()
        else {
            return Ok(());
        };
        let expires_at = self.clock.now().plus_secs(self.limits.lease_secs);
        let period = std::time::Duration::from_secs((self.limits.lease_secs / 3).max(1) as u64);
        match tokio::time::timeout(period, self.ports.renew_lease(&run_id, attempt, &self.owner, expires_at)).await {
            Ok(Ok(true)) => {
                self.lease_valid_until.fetch_max(expires_at.unix_secs(), Ordering::SeqCst);
                info!(until = %expires_at, "lease had run out; confirmed and renewed before acting");
                Ok(())
            }
            outcome => {
                warn!(?outcome, "this driver's lease ran out and could not be confirmed: stopping before acting");
                self.lease_lost.store(true, Ordering::SeqCst);
                Err(DriveError::LeaseLost { run_id })
            }
        }
    }

    /// Gives the lease back when the driver stops on its own (stalled, or waiting for an earlier
    /// attempt) or the store refused it while it still holds the lease (a later attempt's record
    /// appeared), so that the `resume` its exit code asks for is not refused for the lease's
    /// length. Best effort: if this fails too, the lease simply runs out.
    pub(super) async fn release_lease(&self, run_id: &str, attempt: u32) {
        if self.lease_lost.load(Ordering::SeqCst) {
            return;
        }
        let now = self.clock.now();
        let period = std::time::Duration::from_secs((self.limits.lease_secs / 3).max(1) as u64);
        match tokio::time::timeout(period, self.ports.renew_lease(run_id, attempt, &self.owner, now)).await {
            Ok(Ok(true)) => {
                self.lease_valid_until.store(now.unix_secs(), Ordering::SeqCst);
                info!("lease given back");
            }
            Ok(Ok(false)) => {}
            Ok(Err(error)) => warn!(error = %error, "could not give the lease back; it runs out by itself"),
            Err(_) => warn!("giving the lease back took too long; it runs out by itself"),
        }
    }

    /// Renews the lease when less than half of it is left; refused when another driver took over.
    pub(super) async fn checkpoint(&self, record: &mut RunRecord) -> Result<(), DriveError> {
        let now = self.clock.now();
        if record.lease.expires_at.unix_secs() - now.unix_secs() > self.limits.lease_secs / 2 {
            return Ok(());
        }
        let mut next = record.clone();
        next.version += 1;
        next.updated_at = now;
        next.lease.expires_at = now.plus_secs(self.limits.lease_secs);
        self.persist(record, next).await
    }
}
