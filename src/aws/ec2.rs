//! EC2: the pool-tag check and terminations, robust to unknown and refused ids.

use super::errors::from_sdk;
use super::AwsPorts;
use crate::ports::{AwsError, Compute, PoolMembership, Termination};

const SERVICE: &str = "EC2";

/// The instance ids an `InvalidInstanceID.NotFound` message names.
fn ids_in_message(message: &str) -> Vec<String> {
    message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|word| word.starts_with("i-") && crate::spec::validate_instance_id(word).is_ok())
        .map(str::to_string)
        .collect()
}

/// Error codes with which EC2 refuses a whole batch for some of its ids: `UnauthorizedOperation`
/// (an IAM condition such as the pool-tag condition on `ec2:TerminateInstances` is evaluated per
/// instance, and one refusal fails the call) and `OperationNotPermitted` (termination protection).
fn refuses_some_ids(error: &AwsError) -> bool {
    matches!(error.code.as_deref(), Some("UnauthorizedOperation" | "OperationNotPermitted"))
}

impl AwsPorts {
    /// One TerminateInstances call set: unknown ids and ids refused on their own come back
    /// separately instead of failing the rest.
    async fn terminate_once(&self, ids: &[String]) -> Result<Termination, AwsError> {
        let mut result = Termination::default();
        // Batches still to send. A refused batch is split in halves until the refusal names
        // single ids, so at most about 2 × ids × log2(ids) calls in the worst case, and one call
        // when nothing is refused.
        let mut batches: Vec<Vec<String>> = vec![ids.to_vec()];
        while let Some(mut pending) = batches.pop() {
            // Each round removes at least one id or ends, so this loop is bounded by the id count.
            while !pending.is_empty() {
                match self.ec2.terminate_instances().set_instance_ids(Some(pending.clone())).send().await {
                    Ok(_) => {
                        result.terminated.append(&mut pending);
                    }
                    Err(error) => {
                        let error = from_sdk(SERVICE, "TerminateInstances", error);
                        if refuses_some_ids(&error) {
                            if pending.len() == 1 {
                                result.refused.push((pending.remove(0), error));
                            } else {
                                let second = pending.split_off(pending.len() / 2);
                                batches.push(second);
                                batches.push(std::mem::take(&mut pending));
                            }
                            continue;
                        }
                        if error.code.as_deref() != Some("InvalidInstanceID.NotFound") {
                            return Err(error);
                        }
                        // AWS fails the whole call for one unknown id and terminates nothing.
                        let named: Vec<String> =
                            ids_in_message(&error.message).into_iter().filter(|id| pending.contains(id)).collect();
                        if named.is_empty() {
                            // The message named no id we sent: try each alone so the rest still go.
                            if pending.len() == 1 {
                                result.not_found.append(&mut pending);
                            } else {
                                batches.extend(std::mem::take(&mut pending).into_iter().map(|id| vec![id]));
                            }
                        } else {
                            pending.retain(|id| !named.contains(id));
                            result.not_found.extend(named);
                        }
                    }
                }
            }
        }
        Ok(result)
    }

    /// One DescribeInstances for `ids`, unknown ids removed and retried as the call names them.
    /// Each known instance comes with its pool tag's value, `None` when it has no pool tag.
    async fn describe_tags(&self, ids: &[String]) -> Result<(Vec<(String, Option<String>)>, Vec<String>), AwsError> {
        let mut pending = ids.to_vec();
        let mut unknown = Vec::new();
        // Each round removes at least one id or ends.
        loop {
            if pending.is_empty() {
                return Ok((Vec::new(), unknown));
            }
            let mut found = Vec::with_capacity(pending.len());
            let mut pages =
                self.ec2.describe_instances().set_instance_ids(Some(pending.clone())).into_paginator().send();
            let mut failed = None;
            while let Some(page) = pages.next().await {
                match page {
                    Ok(page) => {
                        for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                            let Some(id) = instance.instance_id() else { continue };
                            let tag = instance
                                .tags()
                                .iter()
                                .find(|tag| tag.key() == Some(self.limits.pool_tag_key.as_str()))
                                .map(|tag| tag.value().unwrap_or_default().to_string());
                            found.push((id.to_string(), tag));
                        }
                    }
                    Err(error) => {
                        failed = Some(from_sdk(SERVICE, "DescribeInstances", error));
                        break;
                    }
                }
            }
            let Some(error) = failed else {
                let seen: std::collections::HashSet<&str> = found.iter().map(|(id, _)| id.as_str()).collect();
                unknown.extend(pending.iter().filter(|id| !seen.contains(id.as_str())).cloned());
                return Ok((found, unknown));
            };
            if error.code.as_deref() != Some("InvalidInstanceID.NotFound") {
                return Err(error);
            }
            let named: Vec<String> =
                ids_in_message(&error.message).into_iter().filter(|id| pending.contains(id)).collect();
            if named.is_empty() {
                // Nothing to remove: treat the whole set as unknown rather than loop.
                unknown.append(&mut pending);
            } else {
                pending.retain(|id| !named.contains(id));
                unknown.extend(named);
            }
        }
    }
}

impl Compute for AwsPorts {
    async fn pool_membership(&self, instance_ids: &[String]) -> Result<PoolMembership, AwsError> {
        assert!(instance_ids.len() <= crate::core::MAX_TERMINATE_BATCH, "membership batch too large");
        let (mut found, mut unknown) = self.describe_tags(instance_ids).await?;
        // An unknown id can be eventual consistency right after launch: ask again a bounded
        // number of times, as termination does, before treating it as gone.
        for _ in 0..self.limits.not_found_retries {
            if unknown.is_empty() {
                break;
            }
            tokio::time::sleep(self.limits.not_found_delay).await;
            let (again, still_unknown) = self.describe_tags(&std::mem::take(&mut unknown)).await?;
            found.extend(again);
            unknown = still_unknown;
        }
        let mut membership = PoolMembership { unknown, ..PoolMembership::default() };
        for (id, tag) in found {
            match tag {
                Some(value) => {
                    membership.members.insert(id, value);
                }
                None => membership.foreign.push(id),
            }
        }
        Ok(membership)
    }

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
            result.refused.extend(again.refused);
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
