//! The only code that talks to AWS: one thin adapter per service, implementing the traits of
//! [`crate::ports`] with the real aws-sdk-rust clients.

mod dynamodb;
mod ec2;
mod errors;
mod metrics;
mod sqs;

pub use errors::classify_code;
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

/// Loads the SDK configuration with the crate's retry and timeout limits applied.
pub async fn load_sdk_config(connection: &Connection, limits: &Limits) -> SdkConfig {
    let retry = RetryConfig::standard()
        .with_max_attempts(limits.max_attempts)
        .with_initial_backoff(limits.initial_backoff)
        .with_max_backoff(limits.max_backoff);
    let timeouts = TimeoutConfig::builder()
        .operation_timeout(limits.operation_timeout)
        .operation_attempt_timeout(limits.attempt_timeout)
        .connect_timeout(limits.connect_timeout)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).retry_config(retry).timeout_config(timeouts);
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

impl AwsPorts {
    /// Builds the clients from an SDK configuration (which carries retries and timeouts).
    ///
    /// Each client gets a retry partition of its own. The SDK's default partition is one token
    /// bucket (retry quota) per service and region for the whole process: an engine whose calls
    /// keep failing would use up the retries of every other engine and client in the process, so
    /// their next throttle would come back unretried. An engine's retries are bounded by its own
    /// quota instead.
    pub fn new(sdk_config: &SdkConfig, table: impl Into<String>, limits: Limits) -> AwsPorts {
        use aws_sdk_dynamodb::config::retry::{RetryPartition, TokenBucket};
        let partition = |service: &'static str| RetryPartition::custom(service).token_bucket(TokenBucket::default()).build();
        let counter = RequestCounter::default();
        let dynamodb = aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::config::Builder::from(sdk_config)
                .interceptor(counter.clone())
                .retry_partition(partition("post-provision-dynamodb"))
                .build(),
        );
        let sqs = aws_sdk_sqs::Client::from_conf(
            aws_sdk_sqs::config::Builder::from(sdk_config)
                .interceptor(counter.clone())
                .retry_partition(partition("post-provision-sqs"))
                .build(),
        );
        let ec2 = aws_sdk_ec2::Client::from_conf(
            aws_sdk_ec2::config::Builder::from(sdk_config)
                .interceptor(counter.clone())
                .retry_partition(partition("post-provision-ec2"))
                .build(),
        );
        AwsPorts { dynamodb, sqs, ec2, table: table.into(), limits, counter }
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

pub use dynamodb::{ensure_table, ensure_ttl, TableCheck, TtlCheck, TTL_ATTRIBUTE};
