//! The only code that talks to AWS: one thin adapter per service, implementing the traits of
//! [`crate::ports`] with the real aws-sdk-rust clients.

mod audit;
mod dynamodb;
mod ec2;
mod errors;
mod history;
mod metrics;
mod sqs;

pub use audit::{InstanceFilter, MAX_AUDITED_ITEMS};
pub use errors::classify_code;
pub use history::{ensure_run_index, RunIndexCheck, RUN_INDEX_NAME};
pub use metrics::RequestCounter;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};

use crate::config::Limits;

/// Where and how to reach AWS.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// Region; the standard chain (`AWS_REGION`, profile) when `None`.
    pub region: Option<String>,
    /// One endpoint for all three services (the emulator); `AWS_ENDPOINT_URL` also works.
    pub endpoint_url: Option<String>,
}

/// The SDK retry configuration of the limits: standard mode, exponential backoff with jitter.
fn retry_config(limits: &Limits) -> RetryConfig {
    RetryConfig::standard()
        .with_max_attempts(limits.max_attempts)
        .with_initial_backoff(limits.initial_backoff)
        .with_max_backoff(limits.max_backoff)
}

/// The SDK timeouts of the limits (the SDK sets none by default).
fn timeout_config(limits: &Limits) -> TimeoutConfig {
    TimeoutConfig::builder()
        .operation_timeout(limits.operation_timeout)
        .operation_attempt_timeout(limits.attempt_timeout)
        .connect_timeout(limits.connect_timeout)
        .build()
}

/// Loads the SDK configuration with the crate's retry and timeout limits applied.
pub async fn load_sdk_config(connection: &Connection, limits: &Limits) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(retry_config(limits))
        .timeout_config(timeout_config(limits));
    if let Some(region) = &connection.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(endpoint) = &connection.endpoint_url {
        loader = loader.endpoint_url(endpoint.clone());
    }
    loader.load().await
}

/// The three service clients and the pool's table: implements every trait of [`crate::ports`].
#[derive(Debug, Clone)]
pub struct AwsPorts {
    dynamodb: aws_sdk_dynamodb::Client,
    sqs: aws_sdk_sqs::Client,
    ec2: aws_sdk_ec2::Client,
    table: String,
    limits: Limits,
    counter: RequestCounter,
}

/// Finishes one service's client configuration the same way for every client: the request
/// counter, a retry partition of its own, and the limits' retries and timeouts (which override
/// whatever the given configuration carried).
///
/// Each client gets a retry partition of its own. The SDK's default partition is one token
/// bucket (retry quota) per service and region for the whole process: an engine whose calls
/// keep failing would use up the retries of every other engine and client in the process, so
/// their next throttle would come back unretried. An engine's retries are bounded by its own
/// quota instead.
macro_rules! finish_client {
    ($sdk:ident, $builder:expr, $partition:literal, $counter:expr, $limits:expr) => {{
        use $sdk::config::retry::{RetryPartition, TokenBucket};
        $sdk::Client::from_conf(
            $builder
                .interceptor($counter.clone())
                .retry_partition(RetryPartition::custom($partition).token_bucket(TokenBucket::default()).build())
                .retry_config(retry_config($limits))
                .timeout_config(timeout_config($limits))
                .build(),
        )
    }};
}

impl AwsPorts {
    /// Builds the clients from an SDK configuration; the limits' retries and timeouts apply.
    pub fn new(sdk_config: &SdkConfig, table: impl Into<String>, limits: Limits) -> AwsPorts {
        let counter = RequestCounter::default();
        AwsPorts {
            dynamodb: finish_client!(
                aws_sdk_dynamodb,
                aws_sdk_dynamodb::config::Builder::from(sdk_config),
                "post-provision-dynamodb",
                counter,
                &limits
            ),
            sqs: finish_client!(
                aws_sdk_sqs,
                aws_sdk_sqs::config::Builder::from(sdk_config),
                "post-provision-sqs",
                counter,
                &limits
            ),
            ec2: finish_client!(
                aws_sdk_ec2,
                aws_sdk_ec2::config::Builder::from(sdk_config),
                "post-provision-ec2",
                counter,
                &limits
            ),
            table: table.into(),
            limits,
            counter,
        }
    }

    /// Uses clients the caller built (its credentials, endpoints, HTTP client, interceptors), with
    /// the request counter, retry partitions and the limits' retries and timeouts added.
    pub fn from_clients(
        dynamodb: &aws_sdk_dynamodb::Client,
        sqs: &aws_sdk_sqs::Client,
        ec2: &aws_sdk_ec2::Client,
        table: impl Into<String>,
        limits: Limits,
    ) -> AwsPorts {
        let counter = RequestCounter::default();
        AwsPorts {
            dynamodb: finish_client!(
                aws_sdk_dynamodb,
                dynamodb.config().to_builder(),
                "post-provision-dynamodb",
                counter,
                &limits
            ),
            sqs: finish_client!(aws_sdk_sqs, sqs.config().to_builder(), "post-provision-sqs", counter, &limits),
            ec2: finish_client!(aws_sdk_ec2, ec2.config().to_builder(), "post-provision-ec2", counter, &limits),
            table: table.into(),
            limits,
            counter,
        }
    }

    /// The HTTP requests these clients sent, by operation (retries included).
    pub fn requests(&self) -> &RequestCounter {
        &self.counter
    }

    /// The table this engine works in.
    pub fn table(&self) -> &str {
        &self.table
    }
}

pub use dynamodb::{ensure_table, ensure_ttl, run_record_item, TableCheck, TtlCheck, TTL_ATTRIBUTE};
