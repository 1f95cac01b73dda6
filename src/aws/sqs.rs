//! SQS: pool messages, in batches.

use aws_sdk_sqs::types::SendMessageBatchRequestEntry;

use super::errors::{classify_code, from_sdk};
use super::AwsPorts;
use crate::core::POOL_MESSAGE_DELAY_SECS;
use crate::ports::{AwsError, OutgoingMessage, PoolQueues};

const SERVICE: &str = "SQS";

impl PoolQueues for AwsPorts {
    async fn send(&self, queue_url: &str, messages: &[OutgoingMessage]) -> Result<Vec<(String, AwsError)>, AwsError> {
        assert!(messages.len() <= crate::core::MAX_MESSAGE_BATCH, "message batch too large");
        let mut entries = Vec::with_capacity(messages.len());
        for message in messages {
            let entry = SendMessageBatchRequestEntry::builder()
                .id(message.instance_id.clone())
                .message_body(message.body.clone())
                .delay_seconds(POOL_MESSAGE_DELAY_SECS)
                .build()
                .map_err(|error| AwsError {
                    service: SERVICE,
                    operation: "SendMessageBatch",
                    code: None,
                    message: error.to_string(),
                    class: crate::ports::ErrorClass::Invalid,
                })?;
            entries.push(entry);
        }
        let output = self
            .sqs
            .send_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|error| from_sdk(SERVICE, "SendMessageBatch", error))?;
        // An HTTP 200 can still carry failed entries: each is reported, never dropped.
        Ok(output
            .failed()
            .iter()
            .map(|failure| {
                let class = if failure.sender_fault() {
                    classify_code(failure.code(), Some(400))
                } else {
                    classify_code(failure.code(), Some(500))
                };
                (
                    failure.id().to_string(),
                    AwsError {
                        service: SERVICE,
                        operation: "SendMessageBatch",
                        code: Some(failure.code().to_string()),
                        message: failure.message().unwrap_or("entry failed").to_string(),
                        class,
                    },
                )
            })
            .collect())
    }
}
