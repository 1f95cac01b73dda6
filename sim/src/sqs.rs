//! In-memory SQS: standard pool queues with `DelaySeconds` and at-least-once delivery (a message
//! can be received more than once). Every message ever accepted is logged, so the invariants can
//! ask whether an idle record was announced.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::world::Who;

/// A message in a queue.
#[derive(Debug, Clone)]
pub struct Message {
    /// The instance id of the pool message.
    pub instance_id: String,
    /// The record threshold it announces.
    pub threshold: String,
    /// The JSON body.
    pub body: String,
    /// Virtual unix time from which it can be received (`DelaySeconds`).
    pub visible_at: i64,
}

/// The queues.
#[derive(Debug, Default, Clone)]
pub struct Queues {
    /// Queue URL to its messages, oldest first.
    pub queues: BTreeMap<String, VecDeque<Message>>,
    /// (queue URL, instance id, threshold) of every message ever accepted.
    pub announced: BTreeSet<(String, String, String)>,
    /// Messages accepted, by sender.
    pub sent_by: BTreeMap<Who, u64>,
    /// Queues that refuse every call for good from a true unix time on, with the code:
    /// `AWS.SimpleQueueService.NonExistentQueue` (deleted) or `AccessDenied`.
    pub refusing: BTreeMap<String, (i64, &'static str)>,
}

/// The fields of a pool message body the pool's consumers read.
pub fn parse_body(body: &str) -> Option<(String, String)> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    Some((value.get("id")?.as_str()?.to_string(), value.get("threshold")?.as_str()?.to_string()))
}

impl Queues {
    /// Creates an empty queue.
    pub fn create(&mut self, url: &str) {
        self.queues.entry(url.to_string()).or_default();
    }

    /// The code a call to `url` is refused with at true unix time `now`, if it refuses for good.
    pub fn refusal(&self, url: &str, now: i64) -> Option<&'static str> {
        self.refusing.get(url).filter(|(from, _)| *from <= now).map(|(_, code)| *code)
    }

    /// Accepts one message with `delay_secs`; `false` if the queue does not exist. With
    /// `duplicate`, the message is stored twice: a standard queue may deliver it twice.
    pub fn send(&mut self, url: &str, body: &str, now: i64, delay_secs: i64, duplicate: bool, who: Who) -> bool {
        if self.refusal(url, now).is_some() {
            return false;
        }
        let Some(queue) = self.queues.get_mut(url) else { return false };
        let (instance_id, threshold) = parse_body(body).expect("pool messages have an id and a threshold");
        let message = Message {
            instance_id: instance_id.clone(),
            threshold: threshold.clone(),
            body: body.to_string(),
            visible_at: now + delay_secs,
        };
        if duplicate {
            queue.push_back(message.clone());
        }
        queue.push_back(message);
        self.announced.insert((url.to_string(), instance_id, threshold));
        *self.sent_by.entry(who).or_default() += 1;
        true
    }

    /// Receives and deletes the oldest visible message of `url`.
    pub fn receive(&mut self, url: &str, now: i64) -> Option<Message> {
        if self.refusal(url, now).is_some() {
            return None;
        }
        let queue = self.queues.get_mut(url)?;
        let position = queue.iter().position(|message| message.visible_at <= now)?;
        queue.remove(position)
    }

    /// Whether a message announcing `instance_id` at `threshold` was ever accepted by `url`.
    pub fn was_announced(&self, url: &str, instance_id: &str, threshold: &str) -> bool {
        self.announced.contains(&(url.to_string(), instance_id.to_string(), threshold.to_string()))
    }

    /// Whether a queue that still exists at true unix time `now` accepted a message announcing
    /// `instance_id` at `threshold`. A deleted queue's messages went with it: nobody can claim
    /// the instance through one, so the pool no longer holds it by that announcement.
    pub fn was_announced_anywhere(&self, instance_id: &str, threshold: &str, now: i64) -> bool {
        self.queues.keys().any(|url| {
            let gone = self.refusal(url, now).is_some_and(|code| code != "AccessDenied");
            !gone && self.was_announced(url, instance_id, threshold)
        })
    }
}
