//! Which data connection of each client session is the newest, so that a write a client gave
//! up on cannot be proposed after the client retried it.
//!
//! A client that hears nothing on a connection for a while gives it up and sends its writes
//! again on a new one. A copy still waiting on this node (for space, for a newer map) must not
//! reach the log after the retry and after the client's next write to the same blocks: it
//! would overwrite acknowledged data. The connection's `gone` flag covers a close the node
//! saw; this covers one it did not see (a half-open connection after a partition). Every
//! client session numbers its connections in the order it opens them and stamps both numbers
//! on its writes; once a write from a newer connection of a session arrived here, a write of
//! an older one not yet proposed is dropped (the client retries it). Once proposed, a write
//! is ordered before anything proposed later in the same Raft log, so the check happens right
//! before proposing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Sessions remembered at most (a few bytes each); beyond, those idle longest are forgotten.
pub const MAX_SESSIONS: usize = 16_384;

/// A session not heard from for this long may be forgotten.
pub const IDLE: Duration = Duration::from_secs(600);

/// The newest connection seen per client session.
#[derive(Debug, Default)]
pub struct Sessions {
    newest: Mutex<HashMap<u64, (u64, Instant)>>,
}

impl Sessions {
    /// Records a request of `connection` in `session` arriving (session 0: the client does not
    /// number its connections).
    pub fn seen(&self, session: u64, connection: u64) {
        if session == 0 {
            return;
        }
        let mut newest = self.newest.lock().unwrap_or_else(|p| p.into_inner());
        if newest.len() >= MAX_SESSIONS && !newest.contains_key(&session) {
            newest.retain(|_, (_, at)| at.elapsed() < IDLE);
            if newest.len() >= MAX_SESSIONS {
                // Still full of live sessions: forget the idlest half.
                let mut ages: Vec<Instant> = newest.values().map(|(_, at)| *at).collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                newest.retain(|_, (_, at)| *at > cut);
            }
        }
        let entry = newest.entry(session).or_insert((connection, Instant::now()));
        entry.0 = entry.0.max(connection);
        entry.1 = Instant::now();
    }

    /// Whether a newer connection of `session` than `connection` has been seen.
    pub fn superseded(&self, session: u64, connection: u64) -> bool {
        session != 0 && self.newest.lock().unwrap_or_else(|p| p.into_inner()).get(&session).is_some_and(|(n, _)| *n > connection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_connection_is_superseded_once_a_newer_one_was_seen() {
        let s = Sessions::default();
        s.seen(7, 2);
        assert!(!s.superseded(7, 2));
        assert!(s.superseded(7, 1), "connection 1 of session 7 is older than 2");
        s.seen(7, 1);
        assert!(s.superseded(7, 1), "seeing an older connection again does not make it newest");
        assert!(!s.superseded(8, 1), "other sessions are separate");
        assert!(!s.superseded(0, 0) && !s.superseded(0, 5), "session 0 is never checked");
        s.seen(7, 3);
        assert!(s.superseded(7, 2) && !s.superseded(7, 3));
    }

    #[test]
    fn the_table_stays_bounded() {
        let s = Sessions::default();
        for session in 1..=(MAX_SESSIONS as u64 + 10) {
            s.seen(session, 1);
        }
        assert!(s.newest.lock().unwrap().len() <= MAX_SESSIONS);
        s.seen(MAX_SESSIONS as u64 + 10, 2);
        assert!(s.superseded(MAX_SESSIONS as u64 + 10, 1), "the newest sessions are kept");
    }
}
