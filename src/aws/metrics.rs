//! Counting the HTTP requests the engine sends, by operation, with an SDK interceptor, and timing
//! each one so the number of sequential stages (request waves on the critical path) can be told.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::{ConfigBag, Storable, StoreReplace};

/// Most request spans kept between two [`RequestCounter::reset`]s. Counting goes on beyond it;
/// only the timeline stops growing, so a long-lived engine that never resets stays bounded.
pub const MAX_TIMELINE_SPANS: usize = 100_000;

/// One HTTP attempt: its operation, when it was handed to the transport and when its response
/// arrived (`None` while it is in flight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSpan {
    /// `Service.Operation`, such as `DynamoDB.TransactWriteItems`.
    pub operation: String,
    /// When the request was handed to the transport.
    pub start: Instant,
    /// When its response (or its transport failure) came back.
    pub end: Option<Instant>,
}

#[derive(Debug, Default)]
struct Recorded {
    counts: BTreeMap<String, u64>,
    spans: Vec<RequestSpan>,
    /// Bumped by every reset, so an attempt that was in flight across a reset does not close a
    /// span of the new timeline.
    generation: u64,
}

/// Which span of which timeline the current attempt is; kept in the attempt's config bag.
#[derive(Debug, Clone, Copy)]
struct SpanSlot {
    generation: u64,
    index: usize,
}

impl Storable for SpanSlot {
    type Storer = StoreReplace<Self>;
}

/// Requests sent, keyed `Service.Operation` (every attempt counts, retries included), with the
/// start and end of each.
#[derive(Debug, Clone, Default)]
pub struct RequestCounter {
    recorded: Arc<Mutex<Recorded>>,
}

impl RequestCounter {
    /// A copy of the counts so far.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.lock().counts.clone()
    }

    /// All requests so far.
    pub fn total(&self) -> u64 {
        self.lock().counts.values().sum()
    }

    /// Forgets the counts and the timeline.
    pub fn reset(&self) {
        let mut recorded = self.lock();
        recorded.counts.clear();
        recorded.spans.clear();
        recorded.generation += 1;
    }

    /// Every request so far (up to [`MAX_TIMELINE_SPANS`]), in the order they started.
    pub fn timeline(&self) -> Vec<RequestSpan> {
        self.lock().spans.clone()
    }

    /// The number of request waves on the critical path so far: see
    /// [`RequestCounter::sequential_stages`]. Requests still in flight count as ending now.
    pub fn stages(&self) -> usize {
        let now = Instant::now();
        let intervals: Vec<(Instant, Instant)> =
            self.lock().spans.iter().map(|span| (span.start, span.end.unwrap_or(now).max(span.start))).collect();
        sequential_stages(&intervals)
    }

    /// How many waves of requests lie on the critical path of these `(start, end)` intervals:
    /// sorted by start, a new wave begins when a request starts at or after the moment every
    /// earlier request has ended. `n` requests issued together count 1; `n` requests each
    /// awaiting the previous count `n`. (A pure function, for any part of a timeline.)
    pub fn sequential_stages<T: Ord + Copy>(intervals: &[(T, T)]) -> usize {
        sequential_stages(intervals)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.recorded.lock().expect("request counter lock")
    }

    fn close_span(&self, config: &ConfigBag) {
        let Some(slot) = config.load::<SpanSlot>().copied() else {
            return;
        };
        let mut recorded = self.lock();
        if recorded.generation != slot.generation {
            return;
        }
        if let Some(span) = recorded.spans.get_mut(slot.index) {
            span.end.get_or_insert_with(Instant::now);
        }
    }
}

/// See [`RequestCounter::sequential_stages`]. Requests that overlap in any chain belong to one
/// wave; an empty timeline has no stage.
fn sequential_stages<T: Ord + Copy>(intervals: &[(T, T)]) -> usize {
    let mut sorted = intervals.to_vec();
    sorted.sort();
    let mut stages = 0;
    let mut latest_end: Option<T> = None;
    for (start, end) in sorted {
        match latest_end {
            Some(latest) if start < latest => latest_end = Some(latest.max(end)),
            _ => {
                stages += 1;
                latest_end = Some(end);
            }
        }
    }
    stages
}

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "post_provision::RequestCounter"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        config: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let key = match config.load::<Metadata>() {
            Some(metadata) => format!("{}.{}", metadata.service(), metadata.name()),
            None => "unknown".to_string(),
        };
        let slot = {
            let mut recorded = self.lock();
            *recorded.counts.entry(key.clone()).or_insert(0) += 1;
            if recorded.spans.len() < MAX_TIMELINE_SPANS {
                let index = recorded.spans.len();
                recorded.spans.push(RequestSpan { operation: key, start: Instant::now(), end: None });
                Some(SpanSlot { generation: recorded.generation, index })
            } else {
                None
            }
        };
        match slot {
            Some(slot) => config.interceptor_state().store_put(slot),
            // A retry beyond the bound must not close the span of an earlier attempt.
            None => config.interceptor_state().unset::<SpanSlot>(),
        };
        Ok(())
    }

    fn read_after_transmit(
        &self,
        _context: &BeforeDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        config: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.close_span(config);
        Ok(())
    }

    /// Closes the spans of attempts that never got a response (timeouts, dropped connections).
    fn read_after_attempt(
        &self,
        _context: &FinalizerInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        config: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.close_span(config);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_requests_no_stages() {
        assert_eq!(sequential_stages::<u32>(&[]), 0);
    }

    #[test]
    fn requests_issued_together_are_one_stage() {
        assert_eq!(sequential_stages(&[(0, 10), (1, 5), (2, 30), (3, 4)]), 1);
    }

    #[test]
    fn requests_each_awaiting_the_previous_are_one_stage_each() {
        assert_eq!(sequential_stages(&[(0, 10), (10, 20), (21, 22), (30, 31)]), 4);
    }

    #[test]
    fn a_wave_lasts_until_its_slowest_request_ends() {
        // (12, 15) starts after (0, 10) ended but while (2, 20) is still in flight: same wave.
        assert_eq!(sequential_stages(&[(0, 10), (2, 20), (12, 15), (20, 25), (26, 27)]), 3);
    }

    #[test]
    fn a_bounded_pool_of_workers_is_one_wave() {
        // Eight workers, each starting its next request when its previous one ends, staggered.
        let mut intervals = Vec::new();
        for worker in 0..8u32 {
            for round in 0..5u32 {
                let start = worker + round * 10;
                intervals.push((start, start + 10));
            }
        }
        assert_eq!(sequential_stages(&intervals), 1);
    }

    #[test]
    fn input_order_does_not_matter() {
        assert_eq!(sequential_stages(&[(30, 31), (0, 10), (21, 22), (10, 20)]), 4);
    }

    #[test]
    fn one_request_is_one_stage() {
        assert_eq!(sequential_stages(&[(5, 5)]), 1);
        assert_eq!(RequestCounter::sequential_stages(&[(1, 9)]), 1);
    }

    #[test]
    fn reset_forgets_counts_and_timeline() {
        let counter = RequestCounter::default();
        counter.lock().counts.insert("DynamoDB.GetItem".into(), 2);
        counter.lock().spans.push(RequestSpan {
            operation: "DynamoDB.GetItem".into(),
            start: Instant::now(),
            end: None,
        });
        assert_eq!(counter.total(), 2);
        assert_eq!(counter.stages(), 1);
        counter.reset();
        assert_eq!(counter.total(), 0);
        assert!(counter.timeline().is_empty());
        assert_eq!(counter.stages(), 0);
    }
}
