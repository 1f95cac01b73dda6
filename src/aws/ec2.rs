//! EC2: terminations, robust to unknown ids.

use super::errors::from_sdk;
use super::AwsPorts;
use crate::ports::{AwsError, Compute, ErrorClass, Termination};

const SERVICE: &str = "EC2";

/// The instance ids an `InvalidInstanceID.NotFound` message names.
fn ids_in_message(message: &str) -> Vec<String> {
    message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|word| word.starts_with("i-") && crate::spec::validate_instance_id(word).is_ok())
        .map(str::to_string)
        .collect()
}

impl AwsPorts {
    /// One TerminateInstances call; unknown ids come back separately instead of failing the rest.
    async fn terminate_once(&self, ids: &[String]) -> Result<Termination, AwsError> {
        let mut pending: Vec<String> = ids.to_vec();
        let mut result = Termination::default();
        // Each round removes at least one id or ends, so this loop is bounded by the id count.
        while !pending.is_empty() {
            match self.ec2.terminate_instances().set_instance_ids(Some(pending.clone())).send().await {
                Ok(_) => {
                    result.terminated.append(&mut pending);
                }
                Err(error) => {
                    let error = from_sdk(SERVICE, "TerminateInstances", error);
                    if error.code.as_deref() != Some("InvalidInstanceID.NotFound") {
                        return Err(error);
                    }
                    // AWS fails the whole call for one unknown id and terminates nothing.
                    let named: Vec<String> =
                        ids_in_message(&error.message).into_iter().filter(|id| pending.contains(id)).collect();
                    if named.is_empty() {
                        // The message named no id we sent: try each alone so the rest still go.
                        for id in std::mem::take(&mut pending) {
                            match self.ec2.terminate_instances().instance_ids(id.clone()).send().await {
                                Ok(_) => result.terminated.push(id),
                                Err(error) => {
                                    let error = from_sdk(SERVICE, "TerminateInstances", error);
                                    if error.class != ErrorClass::NotFound {
                                        return Err(error);
                                    }
                                    result.not_found.push(id);
                                }
                            }
                        }
                    } else {
                        pending.retain(|id| !named.contains(id));
                        result.not_found.extend(named);
                    }
                }
            }
        }
        Ok(result)
    }
}

impl Compute for AwsPorts {
    async fn terminate(&self, instance_ids: &[String]) -> Result<Termination, AwsError> {
        assert!(instance_ids.len() <= crate::core::MAX_TERMINATE_BATCH, "termination batch too large");
        let mut result = self.terminate_once(instance_ids).await?;
        // NotFound can be eventual consistency right after launch: ask again a bounded number of times.
        for _ in 0..self.limits.not_found_retries {
            if result.not_found.is_empty() {
                break;
            }
            tokio::time::sleep(self.limits.not_found_delay).await;
            let again = self.terminate_once(&std::mem::take(&mut result.not_found)).await?;
            result.terminated.extend(again.terminated);
            result.not_found = again.not_found;
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_messages_name_their_ids() {
        assert_eq!(
            ids_in_message("The instance IDs 'i-0123456789abcdef0, i-0aaaaaaaaaaaaaaaa' do not exist"),
            vec!["i-0123456789abcdef0".to_string(), "i-0aaaaaaaaaaaaaaaa".to_string()]
        );
        assert_eq!(ids_in_message("The instance ID 'i-12345678' does not exist"), vec!["i-12345678".to_string()]);
        assert!(ids_in_message("nothing here").is_empty());
    }
}
