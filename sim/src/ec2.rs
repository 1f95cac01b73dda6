//! In-memory EC2: instances with tags and a life, `TerminateInstances` with AWS's semantics
//! (terminating a terminated instance succeeds; an id EC2 does not know, or does not know yet
//! because of eventual consistency, fails the whole call; an id whose termination is refused —
//! termination protection, or outside the IAM tag condition — fails the whole call too, as EC2
//! authorizes a call all or nothing), and who terminated what, when.

use std::collections::BTreeMap;

use crate::world::Who;

/// One instance.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Running (or pending): not terminated.
    pub alive: bool,
    /// `InitialRunId`, `AllowSelfTermination`, ...
    pub tags: BTreeMap<String, String>,
    /// Virtual unix time from which the API knows the id (eventual consistency after launch).
    pub visible_from: i64,
    /// Who terminated it.
    pub terminated_by: Option<Who>,
    /// When it died, true (virtual) unix seconds.
    pub terminated_at: Option<i64>,
    /// Every termination of it is refused with this code (`OperationNotPermitted`: termination
    /// protection; `UnauthorizedOperation`: outside the caller's IAM condition).
    pub refuses: Option<&'static str>,
}

/// Why a `TerminateInstances` call failed as a whole: nothing was terminated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminateError {
    /// `InvalidInstanceID.NotFound`, with the ids EC2 does not know (yet).
    Unknown(Vec<String>),
    /// The call was refused for these ids, with the code.
    Refused(&'static str, Vec<String>),
}

/// The account's instances.
#[derive(Debug, Default, Clone)]
pub struct Ec2 {
    /// By instance id.
    pub instances: BTreeMap<String, Instance>,
}

impl Ec2 {
    /// Launches an instance, known to the API from `visible_from`.
    pub fn launch(&mut self, id: &str, initial_run_id: &str, visible_from: i64) {
        let tags = BTreeMap::from([
            ("AllowSelfTermination".to_string(), "true".to_string()),
            ("InitialRunId".to_string(), initial_run_id.to_string()),
        ]);
        self.instances.insert(
            id.to_string(),
            Instance { alive: true, tags, visible_from, terminated_by: None, terminated_at: None, refuses: None },
        );
    }

    /// Whether the API knows `id` at `now`.
    pub fn known(&self, id: &str, now: i64) -> bool {
        self.instances.get(id).is_some_and(|instance| instance.visible_from <= now)
    }

    /// Whether the instance carries the pool tag (`InitialRunId`).
    pub fn pool_tagged(&self, id: &str) -> bool {
        self.instances.get(id).is_some_and(|i| i.tags.contains_key(post_provision::config::DEFAULT_POOL_TAG_KEY))
    }

    /// Whether the instance is alive (whatever the API would say about it).
    pub fn alive(&self, id: &str) -> bool {
        self.instances.get(id).is_some_and(|instance| instance.alive)
    }

    /// One `TerminateInstances` call at true unix time `now`: unknown ids fail it, then refused
    /// ids (nothing terminated either way), as AWS.
    pub fn terminate_call(&mut self, ids: &[String], now: i64, who: Who) -> Result<(), TerminateError> {
        let unknown: Vec<String> = ids.iter().filter(|id| !self.known(id, now)).cloned().collect();
        if !unknown.is_empty() {
            return Err(TerminateError::Unknown(unknown));
        }
        let refused: Vec<(&'static str, String)> =
            ids.iter().filter_map(|id| Some((self.instances[id].refuses?, id.clone()))).collect();
        if let Some((code, _)) = refused.first() {
            return Err(TerminateError::Refused(code, refused.iter().map(|(_, id)| id.clone()).collect()));
        }
        for id in ids {
            let instance = self.instances.get_mut(id).expect("known");
            if instance.alive {
                instance.alive = false;
                instance.terminated_by = Some(who);
                instance.terminated_at = Some(now);
            }
        }
        Ok(())
    }
}
