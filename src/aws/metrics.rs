//! Counting the HTTP requests the engine sends, by operation, with an SDK interceptor.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

/// Requests sent, keyed `Service.Operation` (every attempt counts, retries included).
#[derive(Debug, Clone, Default)]
pub struct RequestCounter {
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl RequestCounter {
    /// A copy of the counts so far.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts.lock().expect("counter lock").clone()
    }

    /// All requests so far.
    pub fn total(&self) -> u64 {
        self.counts.lock().expect("counter lock").values().sum()
    }

    /// Forgets the counts.
    pub fn reset(&self) {
        self.counts.lock().expect("counter lock").clear();
    }
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
        *self.counts.lock().expect("counter lock").entry(key).or_insert(0) += 1;
        Ok(())
    }
}
