//! The existing system's call pattern, for comparison: per instance, one conditional UpdateItem
//! (and for rollback then one SendMessage); for cleanup, one conditional DeleteItem and then one
//! TerminateInstances. Every instance at once, with the SDK's default configuration (standard
//! retries, 3 attempts, no timeouts), and nothing persisted.
//!
//! At most [`MAX_IN_FLIGHT`] requests are on the wire at once; the others wait for a connection,
//! as they would in a client's connection pool. Without that bound, 1,000 connections opened at
//! once overflow the listen backlog of the emulator and of the proxy (128 each, and the proxy
//! serves 256 connections at most): connections time out, and the comparison would measure the
//! test rig rather than the call pattern.
//!
//! It calls the SDK directly, the one place outside `src/aws/` that does: what is measured is
//! that system's pattern, not this engine's adapters. Its clients count their requests with the
//! engine's own [`RequestCounter`], so both sides are counted the same way.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use aws_config::BehaviorVersion;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::AttributeValue;
use futures::future::join_all;
use post_provision::aws::RequestCounter;
use post_provision::core::PoolMessage;
use post_provision::spec::PoolInstance;
use post_provision::timestamp::Timestamp;
use post_provision::Spec;

use crate::world::{World, IDLE_TIME_SEC, MAX_RUNTIME_MIN};
use crate::PathKind;

/// Most baseline requests on the wire at once.
pub const MAX_IN_FLIGHT: usize = 100;

/// The clients of the baseline, counting into `counter`.
pub struct Baseline {
    dynamodb: aws_sdk_dynamodb::Client,
    sqs: aws_sdk_sqs::Client,
    ec2: aws_sdk_ec2::Client,
    connections: tokio::sync::Semaphore,
}

/// Calls that failed, by `Service.Operation: code`, after the SDK's retries.
pub type Failures = BTreeMap<String, u64>;

impl Baseline {
    /// Clients with the SDK's defaults for this endpoint.
    pub async fn new(endpoint: &str, counter: &RequestCounter) -> Baseline {
        let config =
            aws_config::defaults(BehaviorVersion::latest()).region("us-east-1").endpoint_url(endpoint).load().await;
        Baseline {
            dynamodb: aws_sdk_dynamodb::Client::from_conf(
                aws_sdk_dynamodb::config::Builder::from(&config).interceptor(counter.clone()).build(),
            ),
            sqs: aws_sdk_sqs::Client::from_conf(
                aws_sdk_sqs::config::Builder::from(&config).interceptor(counter.clone()).build(),
            ),
            ec2: aws_sdk_ec2::Client::from_conf(
                aws_sdk_ec2::config::Builder::from(&config).interceptor(counter.clone()).build(),
            ),
            connections: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
        }
    }

    /// Runs the path for every instance of the world at once. Returns the failed calls.
    pub async fn run(&self, world: &World) -> anyhow::Result<Failures> {
        let spec = Spec::from_json(&world.spec.to_string()).map_err(|error| anyhow::anyhow!("{error}"))?;
        let table = world.table.as_str();
        let run_id = world.run_id.as_str();
        let now = Timestamp::now_utc();
        let failures = Mutex::new(Failures::new());
        let fail = |operation: &str, code: &str| {
            let key = format!("{operation}: {code}");
            *failures.lock().expect("failures lock").entry(key).or_insert(0) += 1;
        };
        let calls = spec.instances().map(|(role, instance)| {
            let fail = &fail;
            async move {
                let expected_states: &[&str] = match (world.path, role) {
                    (PathKind::Rollback, post_provision::spec::Role::Created) => &["running"],
                    (_, post_provision::spec::Role::Selected) => &["claimed"],
                    (_, post_provision::spec::Role::Created) => &["running", "created"],
                };
                match world.path {
                    PathKind::Commit => {
                        let threshold = now.plus_secs(MAX_RUNTIME_MIN * 60);
                        if let Err(code) = self
                            .update(table, instance, expected_states, run_id, "running", run_id, threshold, now)
                            .await
                        {
                            fail("DynamoDB.UpdateItem", &code);
                        }
                    }
                    PathKind::Rollback => {
                        let threshold = now.plus_secs(IDLE_TIME_SEC);
                        match self.update(table, instance, expected_states, run_id, "idle", "", threshold, now).await {
                            Ok(()) => {
                                if let Err(code) = self.send(&world.queues, instance, threshold).await {
                                    fail("SQS.SendMessage", &code);
                                }
                            }
                            Err(code) => fail("DynamoDB.UpdateItem", &code),
                        }
                    }
                    PathKind::Cleanup => match self.delete(table, &instance.id, run_id).await {
                        Ok(()) => {
                            if let Err(code) = self.terminate(&instance.id).await {
                                fail("EC2.TerminateInstances", &code);
                            }
                        }
                        Err(code) => fail("DynamoDB.DeleteItem", &code),
                    },
                }
            }
        });
        join_all(calls).await;
        Ok(failures.into_inner().expect("failures lock"))
    }

    #[allow(clippy::too_many_arguments)]
    async fn update(
        &self,
        table: &str,
        instance: &PoolInstance,
        expected_states: &[&str],
        expected_run_id: &str,
        new_state: &str,
        new_run_id: &str,
        threshold: Timestamp,
        now: Timestamp,
    ) -> Result<(), String> {
        let _connection = self.connections.acquire().await.expect("never closed");
        let mut values = HashMap::from([
            (":newState".to_string(), s(new_state)),
            (":newRunId".to_string(), s(new_run_id)),
            (":threshold".to_string(), s(threshold.to_string())),
            (":now".to_string(), s(now.to_string())),
            (":runId".to_string(), s(expected_run_id)),
        ]);
        let mut names = Vec::new();
        for (index, state) in expected_states.iter().enumerate() {
            values.insert(format!(":state{index}"), s(*state));
            names.push(format!(":state{index}"));
        }
        self.dynamodb
            .update_item()
            .table_name(table)
            .key("PK", s("TYPE#INSTANCE"))
            .key("SK", s(format!("ID#{}", instance.id)))
            .update_expression("SET #state = :newState, runId = :newRunId, threshold = :threshold, updatedAt = :now")
            .condition_expression(format!("#state IN ({}) AND runId = :runId AND threshold > :now", names.join(", ")))
            .expression_attribute_names("#state", "state")
            .set_expression_attribute_values(Some(values))
            .send()
            .await
            .map(|_| ())
            .map_err(failure)
    }

    async fn send(
        &self,
        queues: &BTreeMap<String, String>,
        instance: &PoolInstance,
        threshold: Timestamp,
    ) -> Result<(), String> {
        let _connection = self.connections.acquire().await.expect("never closed");
        let queue_url = queues.get(&instance.resource_class).ok_or("no queue for the class".to_string())?;
        self.sqs
            .send_message()
            .queue_url(queue_url)
            .message_body(PoolMessage::returning(instance, threshold).body())
            .delay_seconds(post_provision::core::POOL_MESSAGE_DELAY_SECS)
            .send()
            .await
            .map(|_| ())
            .map_err(failure)
    }

    async fn delete(&self, table: &str, id: &str, run_id: &str) -> Result<(), String> {
        let _connection = self.connections.acquire().await.expect("never closed");
        self.dynamodb
            .delete_item()
            .table_name(table)
            .key("PK", s("TYPE#INSTANCE"))
            .key("SK", s(format!("ID#{id}")))
            .condition_expression("runId = :runId")
            .expression_attribute_values(":runId", s(run_id))
            .send()
            .await
            .map(|_| ())
            .map_err(failure)
    }

    async fn terminate(&self, id: &str) -> Result<(), String> {
        let _connection = self.connections.acquire().await.expect("never closed");
        self.ec2.terminate_instances().instance_ids(id).send().await.map(|_| ()).map_err(failure)
    }
}

/// The service's error code, or what kind of transport failure it was.
fn failure<E: ProvideErrorMetadata, R>(error: SdkError<E, R>) -> String {
    match &error {
        SdkError::ServiceError(_) => error.code().unwrap_or("unknown service error").to_string(),
        SdkError::TimeoutError(_) => "timeout".to_string(),
        SdkError::DispatchFailure(failure) if failure.is_timeout() => "connect timeout".to_string(),
        SdkError::DispatchFailure(failure) if failure.is_io() => "connection failure".to_string(),
        SdkError::DispatchFailure(_) => "dispatch failure".to_string(),
        SdkError::ResponseError(_) => "unreadable response".to_string(),
        _ => "request not built".to_string(),
    }
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}
